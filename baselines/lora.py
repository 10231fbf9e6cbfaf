"""LoRA (Hu et al., ICLR 2022): one low-rank update per targeted linear of the frozen Swin, shared by all tasks.

Injected by HF peft (``inject_adapter_in_model`` on ``model.backbone``): each targeted ``nn.Linear`` computes
``W x + b + (alpha / rank) * B A dropout(x)`` with ``B`` zero-initialised, so the model starts equal to the frozen
one. Targets are module-name suffixes matched by peft; the defaults are qkv, attention proj, fc1 and fc2 of every
block (70,656 x rank parameters in Swin-T, docs/protocol.md 3.6), not the patch-merging reductions. Only the LoRA
matrices and the decoders train; unlike MTLoRA, norms, biases and relative-position tables stay frozen.

peft builds the layers through its custom-module hook (``LoraConfig._register_custom_module``) as
:class:`FastLoraLinear`: peft's own ``lora.Linear`` (same parameters ``lora_A.default.weight`` /
``lora_B.default.weight``, same merge/unmerge, state dicts and adapter API) whose forward computes the same
function in the cheapest exact form for the layer (``benchmark.lora_ops``): without LoRA dropout the materialised
weight ``W + s B A`` at Swin-T's narrow first stages, a hybrid (materialised forward, low-rank factor gradients)
in the wide ones; with dropout the factored form, with a faster dropout mask on the CPU. Anything the fast path
does not cover (several active adapters, merged or disabled adapters, DoRA and other variants, LoRA bias,
fan-in-fan-out weights) falls back to peft's forward.

``per_task=true`` gives each task its own LoRA matrices on the shared frozen backbone (the backbone runs once per
task, ``benchmark.peft_tools.PerTaskBackbone``; no merge for evaluation then). The default stays one shared LoRA at rank 16:
MTLoRA's Table 1 prints 2.87 M for its LoRA row, a count no configuration of this harness was found to reproduce
(its configuration is unknown).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import Tensor, nn

from benchmark.lora_ops import FORMS, lora_linear, single_plain_adapter
from benchmark.method_api import MethodConfig, register_method
from benchmark.peft_tools import freeze, tune_per_task


@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    rank: int = 16
    alpha: float = 64.0  # scale alpha / rank = 4 at the default rank, MTLoRA's constant scale (docs/protocol.md 3.2)
    dropout: float = 0.05  # on the LoRA input, as MTLoRA
    targets: tuple[str, ...] = ("qkv", "attn.proj", "fc1", "fc2")  # module-name suffixes inside the Swin
    per_task: bool = False  # each task its own LoRA matrices; false: one LoRA shared by all tasks

    def validate(self, tasks: Sequence[str] = ()) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets is empty: name at least one module suffix, e.g. qkv")


class FastLoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` with a faster forward for the plain single-adapter case (module docstring)."""

    form: str = "auto"  # one of benchmark.lora_ops.FORMS; "auto" picks per call from width, rank and tokens

    def _fast_adapter(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The adapter the fast path computes, or None when peft's forward must run."""
        a = single_plain_adapter(self, x, args, kwargs, self.lora_A)
        if a is None or a in self.lora_variant or self.lora_bias.get(a, False):
            return None
        return a

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        a = self._fast_adapter(x, args, kwargs)
        if a is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        drop = self.lora_dropout[a]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        return lora_linear(
            x,
            base.weight,
            base.bias,
            self.lora_A[a].weight,
            self.lora_B[a].weight,
            self.scaling[a],
            p,
            drop.training,
            self.form,
        )


def set_lora_form(module: nn.Module, form: str) -> int:
    """Force one form (``benchmark.lora_ops.FORMS``) on every FastLoraLinear in ``module``; returns how many."""
    if form not in FORMS:
        raise ValueError(f"unknown LoRA form {form!r}; choose from {list(FORMS)}")
    layers = [m for m in module.modules() if isinstance(m, FastLoraLinear)]
    for m in layers:
        m.form = form
    return len(layers)


def peft_config(cfg: LoRAConfig, fast: bool = True) -> LoraConfig:
    """The peft LoraConfig of ``cfg``; ``fast`` registers :class:`FastLoraLinear` for ``nn.Linear`` targets."""
    out = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets), bias="none"
    )
    if fast:
        out._register_custom_module({nn.Linear: FastLoraLinear})
    return out


def inject(model: nn.Module, cfg: LoRAConfig, fast: bool = True) -> nn.Module:
    """Freeze the backbone and inject LoRA through peft; ``fast=False`` keeps peft's own layers (the anchor
    ``benchmark.perf`` measures against)."""
    cfg.validate()
    freeze(model.backbone)
    inject_adapter_in_model(peft_config(cfg, fast), model.backbone)
    if cfg.per_task:
        tune_per_task(model)
    for p in model.decoders.parameters():
        p.requires_grad_(True)
    return model


@register_method(
    "lora",
    config=LoRAConfig,
    paper="Hu et al., ICLR 2022",
    adapter_markers=("lora_",),
    identity_at_init=True,
    configuration="rank 16, alpha 64, dropout 0.05 on qkv/proj/fc1/fc2, one LoRA shared by all tasks: this "
    "harness's choice; per-task LoRA: per_task=true",
    reproduces="none: MTLoRA Table 1 prints 2.87 M for LoRA, configuration unknown (not reproduced)",
    variants={"peft_reference": lambda model, cfg: inject(model, cfg, fast=False)},  # peft's own layers (perf)
)
def apply(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    return inject(model, cfg, fast=True)
