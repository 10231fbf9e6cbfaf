"""Adapter (Houlsby et al., ICML 2019): bottleneck adapters after the attention and after the MLP of every block.

Each Swin block becomes ``x = x + DropPath(A_attn(W-MSA(LN1(x))))`` then ``x = x + DropPath(A_mlp(MLP(LN2(x))))``
with ``A(h) = h + up(GELU(down(h)))``, ``down: C -> C / reduction`` and ``up`` zero-initialised, so the adapted model
starts exactly equal to the frozen one. Everything else in the backbone is frozen, except what the config names;
decoders train.

Defaults are MTLoRA's Table 1 row (copied from Polyhistor): bottleneck ``C / 4`` (``reduction=4``), each task its
own adapters (``per_task``: the backbone runs once per task, ``benchmark.peft_tools.PerTaskBackbone``), plus one set of
trainable relative-position tables shared by all tasks (``train_tables``), LayerNorms frozen. ``vl_adapter``
(VL-Adapter, Sung et al., CVPR 2022, as Table 1 uses it) is the same with one set of adapters shared by all tasks.
The LayerNorm training of Houlsby et al. is ``train_norms=true``; the harness's earlier default was
``reduction=16 train_norms=true train_tables=false per_task=false``. Adapters are per-token, so applying them after the
window-reverse (as here) is the same as applying them inside each window.

Blocks are re-classed to ``AdapterSwinBlock`` (a ``SwinTransformerBlock`` with the two adapters in its forward)
rather than wrapped, so every pretrained parameter keeps its name; the new ones are ``blocks.N.adapter_{attn,mlp}.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn

from benchmark.method_api import MethodConfig, register_method
from benchmark.peft_tools import freeze, tune_per_task


@dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    reduction: int = 4  # bottleneck width = block width // reduction (at least 1); C/4 as Table 1
    train_norms: bool = False  # Houlsby et al. also train the LayerNorms; Table 1's count does not
    train_tables: bool = True  # one set of relative-position tables, shared by all tasks, trains too (Table 1)
    per_task: bool = True  # each task its own adapters (Table 1); false: one set shared by all tasks (VL-Adapter)

    def validate(self, tasks: Sequence[str] = ()) -> None:
        if self.reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {self.reduction}")


class Bottleneck(nn.Module):
    """``h + up(GELU(down(h)))`` with ``up`` zero-initialised: the identity at init."""

    def __init__(self, dim: int, hidden: int, device: object = None, dtype: object = None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(self.act(self.down(x)))


class AdapterSwinBlock(SwinTransformerBlock):
    """timm's block forward (timm 1.0.31) with an adapter on each sub-layer output, before the residual add."""

    adapter_attn: Bottleneck
    adapter_mlp: Bottleneck

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = x + self.drop_path1(self.adapter_attn(self._attn(self.norm1(x))))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.adapter_mlp(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)


@dataclass(frozen=True)
class VLAdapterConfig(AdapterConfig):
    per_task: bool = False  # one set of adapters shared by all tasks


@register_method(
    "adapter",
    config=AdapterConfig,
    paper="Houlsby et al., ICML 2019",
    adapter_markers=("adapter_",),
    identity_at_init=True,
    configuration="Houlsby adapters after attention and after the MLP, bottleneck C/4, each task its own, plus one "
    "shared set of trainable relative-position tables (reduction=4 per_task=true train_tables=true "
    "train_norms=false); the earlier shared form: reduction=16 train_norms=true train_tables=false per_task=false",
    reproduces="MTLoRA Table 1 'Adapter' (from Polyhistor): 11.24 M printed, with the Table 1 decoder base",
)
def apply(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    cfg.validate()
    freeze(model.backbone)
    blocks = [m for m in model.backbone.modules() if isinstance(m, SwinTransformerBlock)]
    if not blocks:
        raise ValueError("adapter: the backbone has no Swin blocks")
    for block in blocks:
        w = block.norm1.weight
        hidden = max(1, block.dim // cfg.reduction)
        block.__class__ = AdapterSwinBlock
        block.adapter_attn = Bottleneck(block.dim, hidden, device=w.device, dtype=w.dtype)
        block.adapter_mlp = Bottleneck(block.dim, hidden, device=w.device, dtype=w.dtype)
    for name, p in model.backbone.named_parameters():
        if cfg.train_norms and ".norm" in name:  # norm1/norm2, patch_embed.norm, downsample.norm
            p.requires_grad_(True)
        if cfg.train_tables and "relative_position_bias_table" in name:
            p.requires_grad_(True)
    if cfg.per_task:
        tune_per_task(model, keep_shared=lambda name: "adapter_" not in name)  # tables and norms stay shared
    for p in model.decoders.parameters():
        p.requires_grad_(True)
    return model


register_method(
    "vl_adapter",
    config=VLAdapterConfig,
    paper="Sung et al., CVPR 2022 (VL-Adapter), as MTLoRA Table 1",
    adapter_markers=("adapter_",),
    identity_at_init=True,
    description="VL-Adapter: the adapter baseline with one set of adapters shared by all tasks.",
    configuration="Houlsby adapters after attention and after the MLP, bottleneck C/4, shared by all tasks, plus "
    "trainable relative-position tables (reduction=4 per_task=false train_tables=true train_norms=false)",
    reproduces="MTLoRA Table 1 'VL-Adapter' (from Polyhistor): 4.74 M printed, with the Table 1 decoder base",
)(apply)
