"""Relative bias: train only the relative-position-bias tables of the frozen Swin (MTLoRA Table 1 baseline).

Every window attention keeps a ``(2W-1)^2 x heads`` table of learned biases added to its attention logits; this
baseline trains those tables (23,322 parameters in Swin-T, docs/protocol.md 3.6) plus the decoders. Nothing is added.
As in MTLoRA's Table 1 (copied from Polyhistor), each task gets its own copy of the tables by default
(``per_task``: the backbone runs once per task, ``benchmark.peft_tools.PerTaskBackbone``); ``per_task=false`` trains one
set shared by all tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from benchmark.method_api import MethodConfig, register_method
from benchmark.peft_tools import freeze, tune_per_task, unfreeze_matching


@dataclass(frozen=True)
class RelativeBiasConfig(MethodConfig):
    per_task: bool = True  # each task its own tables (Table 1); false: one set shared by all tasks


@register_method(
    "relative_bias",
    config=RelativeBiasConfig,
    paper="Swin relative-position-bias tuning (MTLoRA Table 1 baseline)",
    adapter_markers=("relative_position_bias_table",),
    identity_at_init=True,
    configuration="each task its own relative-position tables (per_task=true); shared form: per_task=false",
    reproduces="MTLoRA Table 1 'Relative bias' (from Polyhistor): 2.64 M printed, with the Table 1 decoder base",
)
def apply(model: nn.Module, cfg: RelativeBiasConfig) -> nn.Module:
    freeze(model.backbone)
    if unfreeze_matching(model.backbone, ("relative_position_bias_table",)) == 0:
        raise ValueError("relative_bias: the backbone has no relative_position_bias_table parameters")
    if cfg.per_task:
        tune_per_task(model)
    for p in model.decoders.parameters():
        p.requires_grad_(True)
    return model
