"""BitFit (Ben Zaken, Ravfogel, Goldberg, ACL 2022): train every bias of the frozen backbone.

All backbone bias terms become trainable: the patch-embedding conv bias, the qkv/proj/fc1/fc2 biases and the
LayerNorm biases (BitFit trains "all bias terms", LayerNorm included). Weights, LayerNorm scales, relative-position
tables and the bias-free patch-merging reductions stay frozen. Nothing is added to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.base import MethodConfig, freeze, register_method


@dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    pass


@register_method(
    "bitfit",
    config=BitFitConfig,
    paper="Ben Zaken et al., ACL 2022",
    adapter_markers=(".bias",),
    identity_at_init=True,
)
def apply(model: nn.Module, cfg: BitFitConfig) -> nn.Module:
    freeze(model.backbone)
    for name, p in model.backbone.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
    for p in model.decoders.parameters():
        p.requires_grad_(True)
    return model
