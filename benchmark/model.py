"""The multi-task Swin model of the protocol: timm Swin backbone + one HRNet-style decoder per task.

Backbone (docs/protocol.md 3.1 and 8): timm's ``SwinTransformer`` set up to match the official Swin bit for
bit: no final norm, fused attention off, and our own stage loop so that stage ``i``'s feature is taken
*after* the next stage's patch merging (strides 8/16/32/32, channels 2C/4C/8C/8C).

Decoders (docs/protocol.md 3.4): per task, four bias-free 1x1 convs to (18, 36, 72, 144) channels, bilinear
upsampling of scales 1-3 to scale 0, concatenation, 1x1 conv (270 -> 1080) + BatchNorm + ReLU + 1x1 conv to
the task's outputs, then bilinear resize (align_corners=False) to the input size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import Tensor, nn

Features = list[Tensor]  # four NCHW stage features
BackboneOutput = Features | dict[str, Features]  # shared features, or one list per task


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    in_chans: int = 3
    img_size: int = 448
    drop_path_rate: float = 0.2

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """Channels of the four features handed to the decoders (after the next stage's merging)."""
        d = self.stage_dims
        return tuple(d[min(i + 1, len(d) - 1)] for i in range(len(d)))

    def validate(self) -> None:
        n = len(self.depths)
        if len(self.num_heads) != n:
            raise ValueError(f"num_heads has {len(self.num_heads)} entries, depths has {n}")
        grid = self.img_size // self.patch_size
        if self.img_size % self.patch_size:
            raise ValueError(f"image size {self.img_size} is not a multiple of the patch size {self.patch_size}")
        for i in range(n):
            g = grid // 2**i
            if g * 2**i != grid:
                raise ValueError(
                    f"image size {self.img_size}: the stage-{i + 1} token grid is not an integer "
                    f"(token grid {grid} must be divisible by {2 ** (n - 1)})"
                )
            w = min(self.window_size, g)
            if g % w:
                raise ValueError(
                    f"image size {self.img_size} is not allowed by window size {self.window_size}: stage {i + 1} has a "
                    f"{g}x{g} token grid, not a multiple of the window {w} (use e.g. 224 or 448 with window 7)"
                )


SWIN_VARIANTS: dict[str, SwinConfig] = {
    "swin_tiny": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    # a ~1M-parameter Swin for CPU tests and the smoke preset
    "swin_micro": SwinConfig(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=4, img_size=64),
}


@dataclass(frozen=True)
class ModelConfig:
    backbone: SwinConfig = field(default_factory=SwinConfig)
    tasks: Mapping[str, int] = field(default_factory=dict)  # task -> number of outputs, in order
    decoder_channels: tuple[int, ...] = (18, 36, 72, 144)
    head_channels: int = 1080
    bn_momentum: float = 0.1

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)


class SwinBackbone(nn.Module):
    """timm Swin returning the four NCHW stage features of the official MTLoRA backbone."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.swin = SwinTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=cfg.embed_dim,
            depths=cfg.depths,
            num_heads=cfg.num_heads,
            window_size=cfg.window_size,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            drop_path_rate=cfg.drop_path_rate,
            always_partition=False,
        )
        self.swin.norm = nn.Identity()  # the official backbone has no final LayerNorm
        self.swin.head = nn.Identity()
        for m in self.swin.modules():
            if isinstance(m, WindowAttention):
                m.fused_attn = False  # fused SDPA differs from the official math by ~1e-5
        self.feature_channels = cfg.feature_channels

    @property
    def layers(self) -> nn.ModuleList:
        return self.swin.layers  # type: ignore[return-value]

    def forward(self, x: Tensor) -> BackboneOutput:
        x = self.swin.patch_embed(x)  # NHWC
        layers = self.layers
        feats: Features = []
        for i, layer in enumerate(layers):
            x = layer.blocks(x)
            if i + 1 < len(layers):
                x = layers[i + 1].downsample(x)  # official: merging ends stage i
            feats.append(x.permute(0, 3, 1, 2))
        return feats


class TaskDecoder(nn.Module):
    """Bias-free 1x1 projections per scale, then the HRNet head (concat -> 1x1 -> BN -> ReLU -> 1x1)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        mid_channels: Sequence[int],
        hidden: int,
        out_channels: int,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.proj = nn.ModuleList(
            nn.Conv2d(c, m, 1, bias=False) for c, m in zip(in_channels, mid_channels, strict=True)
        )
        cat = sum(mid_channels)
        self.head = nn.Sequential(
            nn.Conv2d(cat, hidden, 1),
            nn.BatchNorm2d(hidden, momentum=bn_momentum),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1),
        )

    def forward(self, feats: Features, out_size: tuple[int, int] | None = None) -> Tensor:
        xs = [p(f) for p, f in zip(self.proj, feats, strict=True)]
        size = xs[0].shape[-2:]
        xs = [xs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in xs[1:]]
        y = self.head(torch.cat(xs, dim=1))
        if out_size is not None:
            y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
        return y


class MultiTaskModel(nn.Module):
    """Backbone shared by all tasks, one decoder per task; ``forward(image) -> {task: NCHW output}``.

    Parameter naming matters for accounting (benchmark.params): everything under ``backbone`` is the
    backbone, everything else is a decoder.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.tasks:
            raise ValueError("ModelConfig.tasks is empty: name at least one task")
        self.cfg = cfg
        self.tasks = cfg.task_names
        self.backbone: nn.Module = SwinBackbone(cfg.backbone)
        chans = cfg.backbone.feature_channels
        self.decoders = nn.ModuleDict(
            {
                t: TaskDecoder(chans, cfg.decoder_channels, cfg.head_channels, n, cfg.bn_momentum)
                for t, n in cfg.tasks.items()
            }
        )

    def task_features(self, image: Tensor) -> dict[str, Features]:
        feats = self.backbone(image)
        if isinstance(feats, dict):
            return feats
        return {t: feats for t in self.tasks}

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        size = (image.shape[-2], image.shape[-1])
        feats = self.task_features(image)
        return {t: self.decoders[t](feats[t], size) for t in self.tasks}


def model_config_for(
    backbone: str | SwinConfig,
    tasks: Mapping[str, int],
    img_size: int | None = None,
    drop_path_rate: float | None = None,
    **kwargs: object,
) -> ModelConfig:
    """A ModelConfig from a Swin variant name (or config), optionally at another image size."""
    if isinstance(backbone, str):
        if backbone not in SWIN_VARIANTS:
            raise KeyError(f"unknown backbone {backbone!r}; known: {sorted(SWIN_VARIANTS)}")
        backbone = SWIN_VARIANTS[backbone]
    changes: dict[str, object] = {}
    if img_size is not None:
        changes["img_size"] = img_size
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    bb = replace(backbone, **changes)
    bb.validate()
    return ModelConfig(backbone=bb, tasks=dict(tasks), **kwargs)  # type: ignore[arg-type]
