"""Building blocks every plug-in method may use (core; no method lives here).

``freeze`` / ``unfreeze_matching`` set the trainable set, :class:`PerTaskBackbone` and :func:`tune_per_task` turn a
shared adaptation into one copy per task, and :func:`merge_for_eval` is the generic evaluation-time merge of
LoRA-family layers (the default ``MethodSpec.merge_for_eval`` of every registered method).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# --------------------------------------------------------------------------- helpers for apply()


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def unfreeze_matching(module: nn.Module, substrings: Iterable[str]) -> int:
    """Make trainable every parameter whose name contains one of ``substrings``; returns the count."""
    subs = tuple(substrings)
    n = 0
    for name, p in module.named_parameters():
        if any(s in name for s in subs):
            p.requires_grad_(True)
            n += p.numel()
    return n


# --------------------------------------------------------------------------- one copy of the tuned parameters per task


class PerTaskBackbone(nn.Module):
    """A frozen backbone run once per task, each task with its own copy of some of its parameters.

    The per-task form of the Polyhistor / MTLoRA Table 1 baselines: the parameters named in ``names`` are taken
    out of ``backbone`` and every task gets its own trainable copy (starting from the same values), stored under
    ``task_params.<task>.<the original name>`` so every name keeps its markers (``relative_position_bias_table``,
    ``.bias``, ``adapter_``, ``prompt``, ``lora_``). ``forward`` runs the backbone once per task with that task's
    copies in place (``torch.func.functional_call``) and returns ``{task: features}``, as MTLoRA's task streams.
    Parameters not named stay in the backbone, shared by all tasks (frozen, or trainable: e.g. the shared
    relative-position tables of the per-task adapter).

    Outside ``forward`` the backbone does not hold the per-task parameters at all, so nothing may merge them into
    its weights: ``merge_for_eval`` leaves this module alone (``mergeable = False``).
    """

    mergeable = False

    def __init__(self, backbone: nn.Module, tasks: Sequence[str], names: Iterable[str]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.tasks = tuple(tasks)
        if not self.names:
            raise ValueError("per-task mode: no backbone parameter to copy per task")
        if not self.tasks:
            raise ValueError("per-task mode: no tasks")
        self.shared = backbone
        self.feature_channels = getattr(backbone, "feature_channels", None)
        self.task_params = nn.ModuleDict({t: nn.Module() for t in self.tasks})
        for name in self.names:
            owner_name, _, leaf = name.rpartition(".")
            owner = backbone.get_submodule(owner_name)
            p = owner._parameters.pop(leaf)  # the backbone no longer holds it: one copy per task instead
            if p is None:
                raise ValueError(f"per-task mode: {name} is not a parameter")
            for t in self.tasks:
                holder = self.task_params[t]
                for part in owner_name.split(".") if owner_name else []:
                    if not hasattr(holder, part):
                        holder.add_module(part, nn.Module())
                    holder = getattr(holder, part)
                holder.register_parameter(leaf, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        """``{name in the backbone: this task's copy}``."""
        holder = self.task_params[task]
        return {n: holder.get_parameter(n) for n in self.names}

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        from torch.func import functional_call

        return {t: functional_call(self.shared, self.task_parameters(t), (x,)) for t in self.tasks}


def tune_per_task(model: nn.Module, keep_shared: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """Turn a method applied in its shared form into its per-task form: every trainable backbone parameter
    (except those ``keep_shared`` names) gets one copy per task (:class:`PerTaskBackbone`)."""
    names = [n for n, p in model.backbone.named_parameters() if p.requires_grad and not keep_shared(n)]
    model.backbone = PerTaskBackbone(model.backbone, model.tasks, names)
    return model


# --------------------------------------------------------------------------- evaluation with merged adapters


def _is_peft_tuner_layer(m: nn.Module) -> bool:
    # duck-typed so that this module needs no peft import: peft's BaseTunerLayer API
    return all(hasattr(m, a) for a in ("merged_adapters", "get_base_layer", "merge", "unmerge"))


def _merge_layer(m: nn.Module) -> Callable[[], None] | None:
    """Merge one layer's adapter into its weights; returns the function that restores them exactly."""
    if getattr(m, "exact_unmerge", False):  # layers that keep their frozen weight themselves (MTLoRALinear)
        return m.unmerge if m.merge() else None
    if not _is_peft_tuner_layer(m) or m.merged or not m.active_adapters:
        return None
    base = m.get_base_layer()
    saved = {n: p.detach().clone() for n, p in base.named_parameters(recurse=False)}
    m.merge()
    if not m.merged:  # nothing to merge (e.g. no active adapter on this layer)
        return None

    @torch.no_grad()
    def restore() -> None:
        with warnings.catch_warnings():  # e.g. "Unmerge result can be inaccurate for (IA)^3": the copy fixes it
            warnings.simplefilter("ignore")
            m.unmerge()  # peft's own bookkeeping; its arithmetic inverse is not exact, so copy the saved values back
        params = dict(base.named_parameters(recurse=False))
        for n, v in saved.items():
            params[n].copy_(v)

    return restore


def _mergeable_modules(net: nn.Module) -> Iterator[nn.Module]:
    """``net.modules()`` without the subtrees of modules that say ``mergeable = False`` (:class:`PerTaskBackbone`)."""
    seen: set[int] = set()
    stack = [net]
    while stack:
        m = stack.pop()
        if id(m) in seen or getattr(m, "mergeable", True) is False:
            continue
        seen.add(id(m))
        yield m
        stack.extend(reversed(list(m.children())))


@contextmanager
def merge_for_eval(net: nn.Module) -> Iterator[int]:
    """Fold LoRA-family updates into the frozen weights while evaluating; the exact weights come back on exit.

    Merges peft tuner layers (``lora`` and the peft bridge: LoRA, DoRA, LoHa, LoKr, IA3, VeRA, OFT, through
    peft's ``merge``) and layers that restore themselves exactly (``exact_unmerge = True``: MTLoRA's shared
    branch). Yields the number of merged layers (0 for methods without mergeable adapters). Evaluation only:
    the model must not train, nor be saved, while merged (peft layers would save the merged weights).
    """
    restores: list[Callable[[], None]] = []
    try:
        with torch.no_grad():
            for m in _mergeable_modules(net):
                r = _merge_layer(m)
                if r is not None:
                    restores.append(r)
        yield len(restores)
    finally:
        for r in reversed(restores):
            r()
