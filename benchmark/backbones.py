"""The backbone registry: a backbone family (its config class, its builder from timm, the names of the linears that
LoRA-family methods adapt) and its variants (a name and a config), so that a new variant is an entry, not an edit.

Swin (docs/protocol.md 3.1 and 8): timm's ``SwinTransformer`` set up to match the official Swin bit for bit: no
final norm, fused attention off, and our own stage loop so that stage ``i``'s feature is taken *after* the next
stage's patch merging (strides 8/16/32/32, channels 2C/4C/8C/8C). Swin-T/S/B are the published sizes (timm builds
every one from its config); ``swin_micro`` is a ~1M-parameter Swin for CPU tests and the smoke preset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import Tensor, nn

from benchmark.registry import Registry

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


@dataclass(frozen=True)
class BackboneFamily:
    """A kind of backbone: its config class (a frozen dataclass with ``img_size`` and ``drop_path_rate`` fields,
    ``validate()`` and ``feature_channels``), the builder of its module (``forward(image) -> Features``, with a
    ``feature_channels`` attribute), and the module-name suffixes, inside each block, of the linears that
    LoRA-family methods adapt (what MTLoRA-style methods read instead of hard-coding them)."""

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    lora_targets: tuple[str, ...]


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: a variant of a family, by name (what a protocol's ``backbone`` and ``--backbone``
    give)."""

    name: str
    family: BackboneFamily
    config: Any
    description: str = ""

    @property
    def feature_channels(self) -> tuple[int, ...]:
        return tuple(self.config.feature_channels)

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return self.family.lora_targets


class _Backbones(Registry[BackboneEntry]):
    def entries(self) -> list[BackboneEntry]:
        return [self.get(n) for n in self.names()]


FAMILIES: Registry[BackboneFamily] = Registry("backbone family")
BACKBONES = _Backbones("backbone")


def family_of(cfg: Any) -> BackboneFamily:
    """The registered family whose config class ``cfg`` is; a KeyError naming the known ones otherwise."""
    for name in FAMILIES.names():
        fam = FAMILIES.get(name)
        if type(cfg) is fam.config_cls:
            return fam
    raise KeyError(f"no backbone family takes a {type(cfg).__name__}; known families: {', '.join(FAMILIES.names())}")


def build_backbone(cfg: Any) -> nn.Module:
    """The backbone module ``cfg`` describes, built by its family."""
    return family_of(cfg).build(cfg)


SWIN = BackboneFamily("swin", SwinConfig, SwinBackbone, ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
FAMILIES.add(SWIN.name, SWIN)


def _variant(family: BackboneFamily, name: str, description: str, **fields: Any) -> None:
    BACKBONES.add(name, BackboneEntry(name, family, family.config_cls(**fields), description))


_variant(SWIN, "swin_tiny", "Swin-T", embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_variant(SWIN, "swin_small", "Swin-S", embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_variant(SWIN, "swin_base", "Swin-B", embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_variant(
    SWIN,
    "swin_micro",
    "a ~1M-parameter Swin for CPU tests and the smoke preset",
    embed_dim=24,
    depths=(1, 1, 2, 1),
    num_heads=(1, 2, 2, 4),
    window_size=4,
    img_size=64,
)
