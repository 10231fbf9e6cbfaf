"""The method registry: a PEFT method is a frozen config dataclass plus a registered ``apply``.

``apply(model, cfg)`` receives a freshly built ``benchmark.model.MultiTaskModel`` (everything trainable)
and returns the module to train: usually the same model with a frozen backbone and adapters injected;
``single_task`` returns a different module with the same ``forward(image) -> {task: output}``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from benchmark.registry import Registry


@dataclass(frozen=True)
class MethodConfig:
    """Base class of every method config: plain types and tuples only, so ``asdict`` is JSON.

    ``ALIASES`` maps extra ``--set`` names onto fields (e.g. MTLoRA's ``rank`` -> ``shared_rank``), so one
    sweep key can reach the same idea in several methods.
    """

    ALIASES: ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce_json(hints[k], v, k) for k, v in data.items()})

    def validate(self, tasks: Sequence[str]) -> None:
        """Raise ValueError on settings that make no sense for these tasks (override per method)."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[nn.Module, Any], nn.Module]
    paper: str
    description: str
    # substrings of parameter names that count as "adapter" parameters in the breakdown
    adapter_markers: tuple[str, ...] = ()
    # promises checked by tests/test_methods_contract.py:
    # the freshly applied model computes what the unmodified model computes (eval mode, within 1e-6)
    identity_at_init: bool = False
    # regexes (re.search) over parameter names: trainable parameters allowed to get no gradient because no
    # task output depends on them (e.g. a shared branch whose output only the task streams replace)
    no_grad_params: tuple[str, ...] = ()
    # the default configuration in words (what ``--list`` prints), and the published row it reproduces: its
    # source and printed value, or why none ("configuration unknown: ...", "not a published row")
    configuration: str = ""
    reproduces: str = ""

    def default_config(self) -> MethodConfig:
        return self.config_cls()

    def set_names(self) -> list[str]:
        """Every name ``--set`` accepts for this method: its fields and their aliases."""
        return [f.name for f in dataclasses.fields(self.config_cls)] + sorted(self.config_cls.ALIASES)

    def fields(self) -> list[tuple[str, str, Any]]:
        hints = typing.get_type_hints(self.config_cls)
        cfg = self.config_cls()
        return [(f.name, _type_name(hints[f.name]), getattr(cfg, f.name)) for f in dataclasses.fields(self.config_cls)]


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(
    name: str,
    config: type[MethodConfig],
    paper: str,
    adapter_markers: Iterable[str] = (),
    identity_at_init: bool = False,
    no_grad_params: Iterable[str] = (),
    description: str | None = None,
    configuration: str = "",
    reproduces: str = "",
) -> Callable[[Callable[[nn.Module, Any], nn.Module]], Callable[[nn.Module, Any], nn.Module]]:
    """Register ``apply`` under ``name``; the description defaults to its module docstring's first line."""

    def add(fn: Callable[[nn.Module, Any], nn.Module]) -> Callable[[nn.Module, Any], nn.Module]:
        import sys

        text = description if description is not None else sys.modules[fn.__module__].__doc__ or fn.__doc__
        doc = (text or "").strip().splitlines()
        METHODS.add(
            name,
            MethodSpec(
                name,
                config,
                fn,
                paper,
                doc[0] if doc else "",
                tuple(adapter_markers),
                identity_at_init,
                tuple(no_grad_params),
                configuration,
                reproduces,
            ),
        )
        return fn

    return add


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


# --------------------------------------------------------------------------- --set key=value parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce_json(tp: Any, value: Any, key: str) -> Any:
    """Turn a JSON value into the field's type (lists -> tuples), checking it on the way."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce_json(a, value, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"field {key!r}: {value!r} is not a valid {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"field {key!r}: expected a list for {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce_json(args[0], v, key) for v in value)
        if len(args) != len(value):
            raise ValueError(f"field {key!r}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce_json(a, v, key) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"field {key!r}: expected an object for {_type_name(tp)}, got {value!r}")
        kt, vt = args or (str, Any)
        return {_coerce_json(kt, k, key): _coerce_json(vt, v, key) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"field {key!r}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"field {key!r}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"field {key!r}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"field {key!r}: expected a string, got {value!r}")
        return value
    raise TypeError(f"field {key!r}: unsupported field type {_type_name(tp)}")


def parse_value(tp: Any, text: str, key: str) -> Any:
    """Parse one ``--set`` value given as text: JSON if it parses, else a bare string."""
    origin = typing.get_origin(tp)
    want_str = tp is str or (origin in (typing.Union, types.UnionType) and str in typing.get_args(tp))
    low = text.strip().lower()
    if low in ("true", "false"):
        value: Any = low == "true"
    elif low in ("none", "null"):
        value = None
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if want_str and not isinstance(value, str):
            value = text
    return _coerce_json(tp, value, key)


def apply_overrides(cfg: MethodConfig, overrides: Sequence[str]) -> MethodConfig:
    """Apply ``key=value`` strings to a config; unknown keys and wrong types fail with a clear message."""
    import difflib

    from benchmark.keyvalue import split_pair

    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes: dict[str, Any] = {}
    for item in overrides:
        key, text = split_pair(item)
        key = type(cfg).ALIASES.get(key, key)
        if key not in names:
            near = difflib.get_close_matches(key, names, n=3)
            hint = f" did you mean {', '.join(near)}?" if near else ""
            raise ValueError(
                f"--set {key}: unknown config field for {type(cfg).__name__};{hint} valid fields: {', '.join(names) or '(none)'}"
            )
        try:
            current = getattr(cfg, key)
            numeric = isinstance(current, tuple) and current and all(isinstance(v, (int, float)) for v in current)
            if numeric and text.strip()[:1] not in "[(":
                # a single value for a per-stage tuple applies to every entry: rank=64 -> (64, 64, 64, 64)
                changes[key] = parse_value(hints[key], f"[{','.join([text] * len(current))}]", key)
            else:
                changes[key] = parse_value(hints[key], text, key)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--set {item}: {e} (field type {_type_name(hints[key])})") from None
    return dataclasses.replace(cfg, **changes)
