"""HF peft tuners on the frozen Swin, one table row each: DoRA, LoHa, LoKr, IA3, VeRA and OFT.

Every row names a peft config class and a small field table: each field is one entry of the generated frozen config
dataclass (so ``--set`` and JSON work as for any method) and the peft keyword it feeds. ``apply`` freezes the
backbone, builds the peft config from the fields plus fixed keywords, injects the tuner into ``model.backbone`` (so
one adapter is shared by all tasks) and keeps the decoders trainable. Every tuner here is initialised to the
identity (DoRA/LoRA ``B = 0``, LoHa ``w2_b = 0``, LoKr ``w1 = 0``, IA3 scales 1, VeRA ``lambda_b = 0``, OFT skew 0),
so the adapted model starts equal to the frozen one.

Tuner-specific choices, made once here:

* Targets default to LoRA's: every block's ``qkv``, ``attn.proj``, ``fc1`` and ``fc2`` (module-name suffixes).
* IA3 scales the outputs of ``qkv`` (timm fuses q, k and v, so queries are rescaled too, unlike the paper's k/v only)
  and the input of ``fc2`` (``feedforward``: IA3's rescaling of the MLP's hidden activations).
* VeRA shares one frozen random pair (A, B) across layers. Swin's layers have different shapes; peft 0.21 sizes A
  and B to the largest (out, in) among the targets and slices them per layer, so all four projections of every
  block can be targeted. peft's ``inject_adapter_in_model`` refuses VeRA because that shared state lives on the
  tuner; here the tuner is built directly instead: each adapted layer registers the shared buffers as a submodule,
  so they travel with the backbone (``state_dict``, ``.to()``, ``deepcopy``). The projections are saved with it.
* LoHa, LoKr and VeRA layers compute ``x (W + dW)^T`` instead of peft's ``W x + dW x`` (the same function with
  one full-size product each way instead of two; ``FastLoHaLinear`` and siblings below), otherwise peft's layers.
* OFT's block size must divide the input width of every targeted layer (peft would otherwise silently shrink it
  per layer and the recorded config would no longer describe the model): the default 8 divides every width of
  Swin-T/S/B (96 * 2^k, 128 * 2^k) and of the micro test Swin (24 * 2^k); other values are checked in ``apply``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
import torch.nn.functional as F
from peft import inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.loha.layer import Linear as PeftLoHaLinear
from peft.tuners.lokr.layer import Linear as PeftLoKrLinear
from peft.tuners.vera.layer import Linear as PeftVeraLinear
from torch import Tensor, nn

from benchmark.lora_ops import single_plain_adapter
from benchmark.method_api import MethodConfig, register_method
from benchmark.peft_tools import freeze, tune_per_task

TARGETS = ("qkv", "attn.proj", "fc1", "fc2")


@dataclass(frozen=True)
class Field:
    name: str  # config field, the key of --set
    type: Any
    default: Any
    peft: str  # the peft config keyword it feeds
    help: str = ""


@dataclass(frozen=True)
class Tuner:
    name: str  # registered method name
    config_name: str  # name of the generated config dataclass
    peft_config: type
    paper: str
    description: str
    markers: tuple[str, ...]  # adapter parameter name markers for the accounting
    fields: tuple[Field, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)  # peft keywords that are not settable
    check: Callable[[nn.Module, MethodConfig], None] | None = None  # raise ValueError before injection


def _targets(default: tuple[str, ...] = TARGETS) -> Field:
    return Field("targets", tuple[str, ...], default, "target_modules", "module-name suffixes inside the Swin")


def _targeted_linears(backbone: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """The linears peft would match for a list of suffixes: exact name or name ending in '.<suffix>'."""
    return [
        (n, m)
        for n, m in backbone.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    ]


def _check_oft(backbone: nn.Module, cfg: Any) -> None:
    if cfg.block_size < 1:
        raise ValueError(f"oft: block_size must be >= 1, got {cfg.block_size}")
    bad = [
        f"{n} (in {m.in_features})"
        for n, m in _targeted_linears(backbone, cfg.targets)
        if m.in_features % cfg.block_size
    ]
    if bad:
        raise ValueError(
            f"oft: block_size {cfg.block_size} does not divide the input width of {len(bad)} targeted layer(s), "
            f"e.g. {', '.join(bad[:3])}; choose a divisor of every width (8 divides all Swin widths)"
        )


TUNERS: tuple[Tuner, ...] = (
    Tuner(
        "dora",
        "DoRAConfig",
        peft.LoraConfig,
        "Liu et al., ICML 2024",
        "DoRA (Liu et al., ICML 2024): LoRA on the direction of each targeted weight plus a trainable magnitude.",
        ("lora_",),
        (
            Field("rank", int, 16, "r"),
            Field("alpha", float, 64.0, "lora_alpha", "scale alpha / rank, 4 at the default rank as MTLoRA"),
            Field("dropout", float, 0.05, "lora_dropout"),
            _targets(),
        ),
        {"use_dora": True, "bias": "none"},
    ),
    Tuner(
        "loha",
        "LoHaConfig",
        peft.LoHaConfig,
        "Hyeon-Woo et al., ICLR 2022 (FedPara); LyCORIS",
        "LoHa (Hyeon-Woo et al., ICLR 2022): Hadamard product of two low-rank updates per targeted linear.",
        ("hada_",),
        (
            Field("rank", int, 8, "r", "2 x rank x (in + out) per layer: rank 8 costs what LoRA rank 16 costs"),
            Field("alpha", float, 8.0, "alpha", "scale alpha / rank"),
            Field("rank_dropout", float, 0.0, "rank_dropout"),
            Field("module_dropout", float, 0.0, "module_dropout"),
            _targets(),
        ),
    ),
    Tuner(
        "lokr",
        "LoKrConfig",
        peft.LoKrConfig,
        "Yeh et al., ICLR 2024 (LyCORIS)",
        "LoKr (Yeh et al., ICLR 2024): Kronecker product of a small and a low-rank factor per targeted linear.",
        ("lokr_",),
        (
            Field("rank", int, 8, "r"),
            Field("alpha", float, 8.0, "alpha", "scale alpha / rank"),
            Field("rank_dropout", float, 0.0, "rank_dropout"),
            Field("module_dropout", float, 0.0, "module_dropout"),
            Field("decompose_both", bool, False, "decompose_both", "also factor the left Kronecker factor"),
            Field("decompose_factor", int, -1, "decompose_factor", "-1: the most balanced factorisation"),
            _targets(),
        ),
    ),
    Tuner(
        "ia3",
        "IA3Config",
        peft.IA3Config,
        "Liu et al., NeurIPS 2022",
        "IA3 (Liu et al., NeurIPS 2022): learned rescaling of the qkv outputs and of the MLP hidden activations.",
        ("ia3_",),
        (
            _targets(("qkv", "fc2")),
            Field("feedforward", tuple[str, ...], ("fc2",), "feedforward_modules", "targets scaled on their input"),
        ),
    ),
    Tuner(
        "vera",
        "VeRAConfig",
        peft.VeraConfig,
        "Kopiczko et al., ICLR 2024",
        "VeRA (Kopiczko et al., ICLR 2024): shared frozen random low-rank pair, trainable per-layer scaling vectors.",
        ("vera_lambda",),
        (
            Field("rank", int, 256, "r", "rank of the shared random projections"),
            Field("dropout", float, 0.0, "vera_dropout"),
            Field("d_initial", float, 0.1, "d_initial", "initial value of the lambda_d vectors"),
            Field("prng_key", int, 0, "projection_prng_key", "seed of the shared random projections"),
            _targets(),
        ),
        {"save_projection": True},
    ),
    Tuner(
        "oft",
        "OFTConfig",
        peft.OFTConfig,
        "Qiu et al., NeurIPS 2023",
        "OFT (Qiu et al., NeurIPS 2023): block-diagonal orthogonal rotation of each targeted weight's input side.",
        ("oft_",),
        (
            Field("block_size", int, 8, "oft_block_size", "must divide every targeted input width"),
            Field("module_dropout", float, 0.0, "module_dropout"),
            Field("coft", bool, False, "coft", "constrained OFT"),
            Field("eps", float, 6e-5, "eps", "COFT's rotation budget"),
            Field("block_share", bool, False, "block_share", "one rotation block shared by a layer's blocks"),
            Field("cayley_neumann", bool, True, "use_cayley_neumann", "approximate Cayley transform (peft default)"),
            _targets(),
        ),
        {"r": 0},
        _check_oft,
    ),
)


@dataclass(frozen=True)
class PeftTunerConfig(MethodConfig):
    """Base of the generated configs: one validation rule for every tuner's common fields."""

    def validate(self, tasks: Sequence[str] = ()) -> None:
        values = dataclasses.asdict(self)
        if values.get("rank", 1) < 1:
            raise ValueError(f"{type(self).__name__}: rank must be >= 1, got {values['rank']}")
        for k, v in values.items():
            if k.endswith("dropout") and not 0.0 <= v < 1.0:
                raise ValueError(f"{type(self).__name__}: {k} must be in [0, 1), got {v}")
        if "targets" in values and not values["targets"]:
            raise ValueError(f"{type(self).__name__}: targets is empty: name at least one module suffix, e.g. qkv")


def _make_config(t: Tuner) -> type[MethodConfig]:
    fields = [(f.name, f.type, field(default=f.default, metadata={"help": f.help})) for f in t.fields]
    fields.append(("per_task", bool, field(default=False, metadata={"help": "each task its own copy"})))
    cls = dataclasses.make_dataclass(t.config_name, fields, bases=(PeftTunerConfig,), frozen=True)
    cls.__module__ = __name__
    cls.__doc__ = f"Settings of {t.name}; each field feeds peft's {t.peft_config.__name__}."
    return cls


# --------------------------------------------------------------------------- materialised forwards


class _DeltaWeightForward:
    """Forward of a peft layer whose update is a weight delta (LoHa, LoKr, VeRA): ``x (W + dW)^T + b``.

    peft computes ``W x + b`` and then ``dW x`` (LoHa/LoKr: ``F.linear(x, dW)``; VeRA: through the shared rank-256
    projections): a second full-size product in the forward and another for the input gradient, which makes them
    costlier than full fine-tuning. Adding ``dW`` to the frozen weight first computes the same function (up to
    float rounding) with one product each way; the factors' gradients flow through ``dW`` by autograd as in peft.
    The same random draws are made in the same order (LyCORIS' module-dropout draw, its rank dropout), so runs
    keep their random streams. Anything else (several or disabled adapters, merged, VeRA dropout, fan-in-fan-out,
    a dtype peft would cast) runs peft's own forward; ``fast = False`` forces it (tests compare the two).
    """

    fast: bool = True
    adapters_attr: str  # the layer attribute keyed by its adapter names

    def _fast_adapter(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        if not self.fast:
            return None
        a = single_plain_adapter(self, x, args, kwargs, getattr(self, self.adapters_attr))
        return a if a is not None and self._exact(a) else None

    def _exact(self, adapter: str) -> bool:
        return True

    def _delta(self, adapter: str) -> Tensor | None:
        """The weight delta for this call, or None when peft would skip the adapter (module dropout)."""
        raise NotImplementedError

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        a = self._fast_adapter(x, args, kwargs)
        if a is None:
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        base = self.get_base_layer()  # type: ignore[attr-defined]
        delta = self._delta(a)
        if delta is None:
            return base(x)
        return F.linear(x, base.weight + delta.to(base.weight.dtype), base.bias)


class _LycorisDelta(_DeltaWeightForward):
    adapters_attr = "_available_adapters"

    def _delta(self, adapter: str) -> Tensor | None:
        layer: Any = self
        # peft: the adapter runs when (not training) or rand(1) > module_dropout; the draw is made in training
        if layer.training and not bool(torch.rand(1) > layer.module_dropout[adapter]):
            return None
        apply_rank_dropout = layer.training and bool(layer.rank_dropout[adapter])
        return layer.get_delta_weight(adapter, apply_rank_dropout=apply_rank_dropout)


class FastLoHaLinear(_LycorisDelta, PeftLoHaLinear):
    """peft's LoHa ``Linear`` computed as ``x (W + dW)^T`` (:class:`_DeltaWeightForward`)."""


class FastLoKrLinear(_LycorisDelta, PeftLoKrLinear):
    """peft's LoKr ``Linear`` computed as ``x (W + dW)^T`` (:class:`_DeltaWeightForward`)."""


class FastVeraLinear(_DeltaWeightForward, PeftVeraLinear):
    """peft's VeRA ``Linear`` computed as ``x (W + dW)^T`` without VeRA dropout (:class:`_DeltaWeightForward`)."""

    adapters_attr = "vera_lambda_d"

    def _exact(self, adapter: str) -> bool:
        drop = self.vera_dropout[adapter]
        return isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p == 0.0)

    def _delta(self, adapter: str) -> Tensor | None:
        return self.get_delta_weight(adapter)


FAST_LAYERS: dict[type, type] = {
    PeftLoHaLinear: FastLoHaLinear,
    PeftLoKrLinear: FastLoKrLinear,
    PeftVeraLinear: FastVeraLinear,
}


def use_fast_layers(module: nn.Module) -> int:
    """Turn peft's LoHa/LoKr/VeRA ``Linear`` layers in ``module`` into their materialised-forward subclasses (same
    parameters, buffers, state dict and adapter API); returns how many."""
    n = 0
    for m in module.modules():
        fast = FAST_LAYERS.get(type(m))
        if fast is not None:
            m.__class__ = fast
            n += 1
    return n


def _peft_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value  # peft wants lists of target names


def _inject(peft_cfg: Any, backbone: nn.Module) -> None:
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[peft_cfg.peft_type]
    if tuner_cls.uses_shared_state:  # VeRA: see the module docstring
        tuner_cls(backbone, peft_cfg, adapter_name="default")
    else:
        inject_adapter_in_model(peft_cfg, backbone)


def _make_apply(t: Tuner) -> Callable[[nn.Module, Any], nn.Module]:
    def apply(model: nn.Module, cfg: Any) -> nn.Module:
        cfg.validate()
        freeze(model.backbone)
        if t.check is not None:
            t.check(model.backbone, cfg)
        kwargs = {f.peft: _peft_value(getattr(cfg, f.name)) for f in t.fields}
        _inject(t.peft_config(**kwargs, **t.fixed), model.backbone)
        use_fast_layers(model.backbone)
        if cfg.per_task:
            tune_per_task(model)
        for p in model.decoders.parameters():
            p.requires_grad_(True)
        return model

    apply.__name__ = apply.__qualname__ = f"apply_{t.name}"
    apply.__doc__ = t.description
    return apply


CONFIGS: dict[str, type[MethodConfig]] = {}
for _t in TUNERS:
    CONFIGS[_t.name] = globals()[_t.config_name] = _make_config(_t)  # module attributes: importable, picklable
    register_method(
        _t.name,
        config=CONFIGS[_t.name],
        paper=_t.paper,
        adapter_markers=_t.markers,
        identity_at_init=True,
        description=_t.description,
        configuration="the field defaults below, one adapter shared by all tasks: this harness's choice; "
        "per-task copies: per_task=true",
        reproduces="none: not a row of MTLoRA Table 1",
    )(_make_apply(_t))
