"""BitFit (Ben Zaken, Ravfogel, Goldberg, ACL 2022): train every bias of the frozen backbone.

All backbone bias terms become trainable: the patch-embedding conv bias, the qkv/proj/fc1/fc2 biases and the
LayerNorm biases (BitFit trains "all bias terms", LayerNorm included). Weights, LayerNorm scales and the bias-free
patch-merging reductions stay frozen. Nothing is added to the model.

MTLoRA's Table 1 row (copied from Polyhistor) trains every parameter whose name contains ``bias``, which in the
official Swin includes the relative-position-bias tables (74,778 per task at Swin-T), and gives each task its own
copy (``per_task``: the backbone runs once per task, ``benchmark.peft_tools.PerTaskBackbone``). Those are the defaults;
``tables=false`` keeps the tables frozen (the bias vectors only) and ``per_task=false`` shares one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from benchmark.method_api import MethodConfig, register_method
from benchmark.peft_tools import freeze, tune_per_task


@dataclass(frozen=True)
class BitFitConfig(MethodConfig):
    tables: bool = True  # also the relative-position-bias tables (every name containing "bias", as Table 1)
    per_task: bool = True  # each task its own copy (Table 1); false: one copy shared by all tasks


@register_method(
    "bitfit",
    config=BitFitConfig,
    paper="Ben Zaken et al., ACL 2022",
    adapter_markers=("bias",),
    identity_at_init=True,
    configuration="each task its own copy of every backbone parameter named *bias*, relative-position tables "
    "included (tables=true per_task=true); shared bias vectors only: tables=false per_task=false",
    reproduces="MTLoRA Table 1 'BitFit' (from Polyhistor): 2.85 M printed, with the Table 1 decoder base",
)
def apply(model: nn.Module, cfg: BitFitConfig) -> nn.Module:
    freeze(model.backbone)
    for name, p in model.backbone.named_parameters():
        if name.endswith(".bias") or (cfg.tables and "relative_position_bias_table" in name):
            p.requires_grad_(True)
    if cfg.per_task:
        tune_per_task(model)
    for p in model.decoders.parameters():
        p.requires_grad_(True)
    return model
