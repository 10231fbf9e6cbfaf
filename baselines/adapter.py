"""Adapter (Houlsby et al., ICML 2019): bottleneck adapters after the attention and after the MLP of every block.

Each Swin block becomes ``x = x + DropPath(A_attn(W-MSA(LN1(x))))`` then ``x = x + DropPath(A_mlp(MLP(LN2(x))))``
with ``A(h) = h + up(GELU(down(h)))``, ``down: C -> C / reduction`` and ``up`` zero-initialised, so the adapted model
starts exactly equal to the frozen one. Following Houlsby et al. the LayerNorms are trained too (``train_norms``).
Everything else in the backbone is frozen; decoders train. Adapters are per-token, so applying them after the
window-reverse (as here) is the same as applying them inside each window.

Blocks are re-classed to ``AdapterSwinBlock`` (a ``SwinTransformerBlock`` with the two adapters in its forward)
rather than wrapped, so every pretrained parameter keeps its name; the new ones are ``blocks.N.adapter_{attn,mlp}.*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from timm.models.swin_transformer import SwinTransformerBlock
from torch import Tensor, nn

from methods.base import MethodConfig, freeze, register_method


@dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    reduction: int = 16  # bottleneck width = block width // reduction (at least 1)
    train_norms: bool = True  # Houlsby et al. also train the LayerNorms

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


@register_method(
    "adapter",
    config=AdapterConfig,
    paper="Houlsby et al., ICML 2019",
    adapter_markers=("adapter_",),
    identity_at_init=True,
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
    if cfg.train_norms:
        for name, p in model.backbone.named_parameters():
            if ".norm" in name:  # norm1/norm2, patch_embed.norm, downsample.norm
                p.requires_grad_(True)
    for p in model.decoders.parameters():
        p.requires_grad_(True)
    return model
