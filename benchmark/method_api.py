"""The method API of the core: what a PEFT method is, the registry, and how the core finds the plug-ins.

A method is a frozen config dataclass (:class:`MethodConfig`) plus a registered ``apply(model, cfg)``, which
receives a freshly built ``benchmark.model.MultiTaskModel`` (everything trainable) and returns the module to
train: usually the same model with a frozen backbone and adapters injected; ``single_task`` returns a different
module with the same ``forward(image) -> {task: output}``.

Methods live in two sibling plug-in packages, ``methods/`` and ``baselines/``, one file each; each file registers
its methods with :func:`register_method`. The core never imports them by name: :data:`PLUGINS` lists every
plug-in module as a string, imported (``importlib``) the first time the registry :data:`METHODS` is read. What a
method can do beyond ``apply`` is declared on its :class:`MethodSpec` and reached through the registry:
``merge_for_eval`` (evaluation with merged adapters), ``activation_checkpointing``, ``official`` (the official
code base's fixtures and checkpoint names) and ``variants`` (alternative appliers of the same config).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from benchmark.peft_tools import merge_for_eval
from benchmark.registry import Registry

# Every plug-in module, one line each: the only place the core names a method's module. A module missing here
# never registers its methods (tests/test_layering.py compares this list with the files of methods/ and
# baselines/).
PLUGINS: tuple[str, ...] = (
    "methods.mtlora",  # mtlora, mtlora_plus
    "methods.tadformer",  # tadformer, tadformer_release
    "baselines.full_ft",
    "baselines.decoders_only",
    "baselines.single_task",
    "baselines.bitfit",
    "baselines.relative_bias",
    "baselines.vpt",  # vpt_shallow, vpt_deep
    "baselines.adapter",  # adapter, vl_adapter
    "baselines.lora",
    "baselines.peft_bridge",  # dora, loha, lokr, ia3, vera, oft
)


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
class OfficialSupport:
    """How a method meets the official code base (``benchmark.official``): its parity fixtures and checkpoints.

    ``claims(config)``: this fixture ``config`` describes this method (exactly one registered method may claim a
    fixture). ``config_from_fixture(config, lora_dropout)``: the method config it describes, every value read from
    it (ValueError on what this implementation cannot represent; ``lora_dropout`` overrides the training-only
    noise); the registered method whose ``config_cls`` is that config's class builds the model.
    ``wraps_linear(module)``: the module wraps a linear whose weight and bias the official state dict names
    ``<module>.linear.weight`` / ``.bias`` (MTLoRA's layers).
    """

    claims: Callable[[Mapping[str, Any]], bool]
    config_from_fixture: Callable[[Mapping[str, Any], float | None], MethodConfig]
    wraps_linear: Callable[[nn.Module], bool] = lambda module: False


MergeForEval = Callable[[nn.Module], AbstractContextManager[int]]
ActivationCheckpointing = Callable[[nn.Module, "bool | frozenset[int]"], int]


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
    # capabilities, reached through the registry (never by importing the method):
    # evaluation with adapters folded into the weights; yields the number of merged layers, restores on exit
    merge_for_eval: MergeForEval = merge_for_eval
    # set activation checkpointing (True / False / 0-based stages) on the applied model; returns how many
    # backbones took it (0: nothing to set). None: the method has none
    activation_checkpointing: ActivationCheckpointing | None = None
    # the official code base's fixtures and checkpoint names (None: not a method of that code base)
    official: OfficialSupport | None = None
    # alternative appliers of the same config, by name (e.g. lora's "peft_reference": peft's own layers, the
    # anchor benchmark.perf measures the fast layers against)
    variants: Mapping[str, Callable[[nn.Module, Any], nn.Module]] = field(default_factory=dict, compare=False)

    def default_config(self) -> MethodConfig:
        return self.config_cls()

    def set_names(self) -> list[str]:
        """Every name ``--set`` accepts for this method: its fields and their aliases."""
        return [f.name for f in dataclasses.fields(self.config_cls)] + sorted(self.config_cls.ALIASES)

    def fields(self) -> list[tuple[str, str, Any]]:
        hints = typing.get_type_hints(self.config_cls)
        cfg = self.config_cls()
        return [(f.name, _type_name(hints[f.name]), getattr(cfg, f.name)) for f in dataclasses.fields(self.config_cls)]


class PluginRegistry(Registry[MethodSpec]):
    """The method registry: reading it (``get``, ``names``, ``in``, iteration, ``len``) first imports every
    module of ``plugins``, which register themselves with :func:`register_method`."""

    def __init__(self, kind: str, plugins: Sequence[str]) -> None:
        super().__init__(kind)
        self.plugins = tuple(plugins)
        self._loaded = False

    def load(self) -> PluginRegistry:
        if not self._loaded:
            self._loaded = True  # set first: a plug-in that reads the registry while importing sees no recursion
            try:
                for module in self.plugins:
                    importlib.import_module(module)
            except BaseException:
                self._loaded = False
                raise
        return self

    def get(self, name: str) -> MethodSpec:
        self.load()
        return super().get(name)

    def unknown_message(self, name: str) -> str:
        self.load()
        return super().unknown_message(name)

    def names(self) -> list[str]:
        self.load()
        return super().names()

    def __contains__(self, name: object) -> bool:
        self.load()
        return super().__contains__(name)

    def __len__(self) -> int:
        self.load()
        return super().__len__()

    def specs(self) -> list[MethodSpec]:
        return [self.get(n) for n in self.names()]

    def with_capability(self, capability: str) -> list[str]:
        """Names of the methods whose ``capability`` field is set (e.g. ``"activation_checkpointing"``)."""
        return [s.name for s in self.specs() if getattr(s, capability) is not None]


METHODS: PluginRegistry = PluginRegistry("method", PLUGINS)


def method_registry() -> PluginRegistry:
    """The method registry with every plug-in registered."""
    return METHODS.load()


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
    merge_for_eval: MergeForEval = merge_for_eval,
    activation_checkpointing: ActivationCheckpointing | None = None,
    official: OfficialSupport | None = None,
    variants: Mapping[str, Callable[[nn.Module, Any], nn.Module]] | None = None,
) -> Callable[[Callable[[nn.Module, Any], nn.Module]], Callable[[nn.Module, Any], nn.Module]]:
    """Register ``apply`` under ``name``; the description defaults to its module docstring's first line."""

    def add(fn: Callable[[nn.Module, Any], nn.Module]) -> Callable[[nn.Module, Any], nn.Module]:
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
                merge_for_eval,
                activation_checkpointing,
                official,
                dict(variants or {}),
            ),
        )
        return fn

    return add


def parse_checkpoint_stages(text: str, n_stages: int = 4) -> bool | frozenset[int]:
    """``"all"`` -> True, ``"none"`` -> False, ``"1"`` / ``"1,2"`` / ``"1+2"`` (1-based stage numbers) -> the
    0-based stage set a method's ``activation_checkpointing`` takes; anything else is a ValueError naming what is
    expected."""
    value = text.strip().lower()
    if value in ("all", "true"):
        return True
    if value in ("none", "false", ""):
        return False
    parts = [p for p in value.replace("+", ",").split(",") if p]
    if not parts or not all(p.isdigit() and 1 <= int(p) <= n_stages for p in parts):
        raise ValueError(
            f"activation checkpointing {text!r}: expected 'all', 'none' or stage numbers 1-{n_stages} "
            "separated by ',' or '+' (e.g. '1' or '1,2')"
        )
    return frozenset(int(p) - 1 for p in parts)


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
