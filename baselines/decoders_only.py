"""Decoders only: the Swin backbone stays frozen, only the per-task decoders are trained.

The "MTL - tuning decoders only" row of MTLoRA Table 1: 1,946,624 trainable parameters at the paper config
(docs/protocol.md 3.6). Nothing is added to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from benchmark.method_api import MethodConfig, register_method
from benchmark.peft_tools import freeze


@dataclass(frozen=True)
class DecodersOnlyConfig(MethodConfig):
    pass


@register_method(
    "decoders_only",
    config=DecodersOnlyConfig,
    paper="MTL decoders-only baseline (MTLoRA Table 1)",
    identity_at_init=True,
    configuration="frozen Swin, the four decoders train",
    reproduces="MTLoRA Table 1 'MTL - tuning decoders only': 1,946,624 by the official code",
)
def apply(model: nn.Module, cfg: DecodersOnlyConfig) -> nn.Module:
    freeze(model.backbone)
    for p in model.decoders.parameters():
        p.requires_grad_(True)
    return model
