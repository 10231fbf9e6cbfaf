"""The multi-task model of the protocol: a registered backbone + one HRNet-style decoder per task.

Backbone: an entry of ``benchmark.backbones.BACKBONES`` (the protocol's ``backbone`` names it; Swin-T/S/B and a
micro Swin for tests), built through its family's builder (timm's Swin, set up as the official one, see
``benchmark.backbones``); the decoders read its ``feature_channels``.

Decoders (docs/protocol.md 3.4): per task, four bias-free 1x1 convs to (18, 36, 72, 144) channels, bilinear
upsampling of scales 1-3 to scale 0, concatenation, 1x1 conv (270 -> 1080) + BatchNorm + ReLU + 1x1 conv to
the task's outputs, then bilinear resize (align_corners=False) to the input size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.backbones import BACKBONES, Features, SwinConfig, build_backbone

SWIN_VARIANTS: dict[str, SwinConfig] = {e.name: e.config for e in BACKBONES.entries()}  # the Swin rows of the registry


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
        self.backbone: nn.Module = build_backbone(cfg.backbone)
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
    """A ModelConfig from a registered backbone's name (``benchmark.backbones.BACKBONES``) or a backbone config,
    optionally at another image size."""
    if isinstance(backbone, str):
        backbone = BACKBONES.get(backbone).config
    changes: dict[str, object] = {}
    if img_size is not None:
        changes["img_size"] = img_size
    if drop_path_rate is not None:
        changes["drop_path_rate"] = drop_path_rate
    bb = replace(backbone, **changes)
    bb.validate()
    return ModelConfig(backbone=bb, tasks=dict(tasks), **kwargs)  # type: ignore[arg-type]
