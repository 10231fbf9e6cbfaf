"""LoRA (Hu et al., ICLR 2022): one low-rank update per targeted linear of the frozen Swin, shared by all tasks.

Injected by HF peft (``inject_adapter_in_model`` on ``model.backbone``): each targeted ``nn.Linear`` computes
``W x + b + (alpha / rank) * B A dropout(x)`` with ``B`` zero-initialised, so the model starts equal to the frozen
one. Targets are module-name suffixes matched by peft; the defaults are qkv, attention proj, fc1 and fc2 of every
block (70,656 x rank parameters in Swin-T, protocol.md 3.6), not the patch-merging reductions. Only the LoRA
matrices and the decoders train; unlike MTLoRA, norms, biases and relative-position tables stay frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from methods.base import MethodConfig, freeze, register_method


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    rank: int = 16
    alpha: float = 64.0  # scale alpha / rank = 4 at the default rank, MTLoRA's constant scale (protocol.md 3.2)
    dropout: float = 0.05  # on the LoRA input, as MTLoRA
    targets: tuple[str, ...] = ("qkv", "attn.proj", "fc1", "fc2")  # module-name suffixes inside the Swin

    def validate(self, tasks: Sequence[str] = ()) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets is empty: name at least one module suffix, e.g. qkv")


@register_method(
    "lora",
    config=LoRAConfig,
    paper="Hu et al., ICLR 2022",
    adapter_markers=("lora_",),
    identity_at_init=True,
)
def apply(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    cfg.validate()
    freeze(model.backbone)
    peft_cfg = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets), bias="none"
    )
    inject_adapter_in_model(peft_cfg, model.backbone)
    for p in model.decoders.parameters():
        p.requires_grad_(True)
    return model
