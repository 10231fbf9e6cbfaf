"""Exact fast paths for low-rank updates, shared by the ``lora`` baseline, the peft tuners and MTLoRA (no method
lives here).

A LoRA'd linear computes ``y = W x + b + s B A drop(x)`` with ``W`` frozen and ``A`` [r, in], ``B`` [out, r]
trained. Three exact ways to compute it and its gradients (per token, flops beyond the frozen layer's own
forward ``in*out`` and input gradient ``in*out``; M tokens):

- ``factored``: ``h = drop(x) A^T``, ``y += (s B) h``: forward ``r(in+out)``, backward ``r(in+2out)`` plus
  ``r in`` for the input gradient. The only exact form when dropout is active (``drop(x) != x``).
- ``materialised``: ``W' = W + s B A`` (``in*out*r`` once per call, independent of M), ``y = W' x + b``; the
  weight gradient ``g^T x`` (``in*out`` per token) gives those of A and B. Cheapest at small widths (Swin-T's
  first stages), where a rank-64 update costs about as much as the layer itself.
- ``hybrid``: forward and input gradient with ``W'`` as materialised (one GEMM each), the factors' gradients
  from ``g (s B)`` and a recomputed ``x A^T``: ``2r(in+out)`` per token, and nothing but ``x`` saved.

``form="auto"`` picks the cheapest by these counts for the layer's width, rank and token count (with dropout:
factored). Dropout itself uses :func:`fast_dropout` on the CPU.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMS = ("auto", "factored", "materialised", "hybrid")
# Above this drop probability the sparse (geometric-gap) dropout stops paying off; use PyTorch's.
SPARSE_DROPOUT_MAX_P = 0.25


_FORM_LOGS: list[Counter[str]] = []  # open record_forms() counters, innermost last


@contextmanager
def record_forms() -> Iterator[Counter[str]]:
    """Count the form each :func:`lora_linear` call uses while the block runs (benchmark.perf reports it)."""
    counts: Counter[str] = Counter()
    _FORM_LOGS.append(counts)
    try:
        yield counts
    finally:
        _FORM_LOGS.remove(counts)


# --------------------------------------------------------------------------- dropout


def drop_positions(n: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """Flat indices dropped by i.i.d. Bernoulli(p) draws over ``n`` elements, sorted (int64).

    A Bernoulli process is a sequence of i.i.d. geometric gaps: drawing the gaps needs about ``n p`` random
    numbers instead of ``n`` (20x fewer at p = 0.05), the part of CPU dropout that dominates its cost.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"drop probability must be in (0, 1), got {p}")
    mean = n * p
    k = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)  # enough gaps to pass n almost always
    parts: list[Tensor] = []
    last = 0.0
    while True:
        # float64 cumsum: positions are exact integers far beyond any tensor size
        pos = torch.empty(k, dtype=torch.float64, device=device).geometric_(p).cumsum_(0).add_(last)
        parts.append(pos)
        last = float(pos[-1])
        if last > n:
            break
    pos = torch.cat(parts) if len(parts) > 1 else parts[0]
    return pos[pos <= n].long().sub_(1)


class _SparseDropout(torch.autograd.Function):
    """Inverted dropout whose mask is kept as the list of dropped positions (about p * n int64)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, p: float) -> Tensor:
        pos = drop_positions(x.numel(), p, x.device)
        scale = 1.0 / (1.0 - p)
        y = x.mul(scale).contiguous()
        y.view(-1)[pos] = 0
        ctx.save_for_backward(pos)
        ctx.scale = scale  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (pos,) = ctx.saved_tensors  # type: ignore[attr-defined]
        g = grad.mul(ctx.scale).contiguous()  # type: ignore[attr-defined]
        g.view(-1)[pos] = 0
        return g, None


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` in distribution: same Bernoulli(1 - p) keep mask and 1 / (1 - p) scale.

    On the CPU with p <= 0.25 the mask is drawn as geometric gaps (:func:`drop_positions`), 3-4x faster than
    ``F.dropout`` at p = 0.05; it consumes the random stream differently, so the masks differ from
    ``F.dropout``'s for the same seed (runs stay reproducible from ``torch.manual_seed``). Elsewhere (CUDA's
    fused dropout is already fast, large p): ``F.dropout``.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p > SPARSE_DROPOUT_MAX_P or x.numel() == 0:
        return F.dropout(x, p, True)
    return _SparseDropout.apply(x, p)


# --------------------------------------------------------------------------- peft layers


def single_plain_adapter(
    layer: Any, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], adapters: Any
) -> str | None:
    """The one active adapter (a key of ``adapters``) of a peft layer over a plain ``nn.Linear``, when a faster
    exact forward may replace peft's: no extra call arguments, adapters enabled and not merged, no fan-in-fan-out
    weight and no input cast (peft casts ``x`` to the adapter's dtype outside autocast). Otherwise None."""
    if args or kwargs or layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    active = [a for a in layer.active_adapters if a in adapters]
    base = layer.get_base_layer()
    if len(active) != 1 or type(base) is not nn.Linear:
        return None
    if x.dtype != base.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return None
    return active[0]


# --------------------------------------------------------------------------- the three exact forms


# Products with a rank-sized dimension run at ~0.75x the speed of the layer's own GEMMs (measured on the CPU at
# Swin-T shapes, rank 64, docs/perf.md): weight their multiply-adds by this factor when comparing forms.
LOW_RANK_COST = 1.3


def extra_cost(form: str, tokens: int, d_in: int, d_out: int, rank: int, train: bool, input_grad: bool) -> float:
    """Multiply-adds one call spends beyond the frozen linear (forward and, when ``train``, backward), the
    rank-sized products weighted by :data:`LOW_RANK_COST` (see the module docstring for the counts)."""
    m, i, o, r, k = tokens, d_in, d_out, rank, LOW_RANK_COST
    if form == "factored":
        return k * (m * r * (i + o) + (m * r * (i + 2 * o) + (m * r * i if input_grad else 0) if train else 0))
    if form == "materialised":
        return k * i * o * r + (m * i * o + k * 2 * i * o * r if train else 0)
    if form == "hybrid":
        return k * (i * o * r + (2 * m * r * (i + o) if train else 0))
    raise ValueError(f"unknown LoRA form {form!r}; choose from {list(FORMS)}")


def choose_form(tokens: int, d_in: int, d_out: int, rank: int, dropout: bool, train: bool, input_grad: bool) -> str:
    """The cheapest exact form for one call (``factored`` whenever dropout is active)."""
    if dropout:
        return "factored"
    forms = ("materialised", "hybrid", "factored") if train else ("materialised", "factored")
    return min(forms, key=lambda f: extra_cost(f, tokens, d_in, d_out, rank, train, input_grad))


class _HybridLoRA(torch.autograd.Function):
    """``y = x (W + B_s A)^T + b`` with the factors' gradients taken in low rank (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_a: Tensor,
        b_scaled: Tensor,
    ) -> Tensor:
        merged = torch.addmm(weight, b_scaled, lora_a)
        y = F.linear(x, merged, bias)
        ctx.save_for_backward(x, merged, lora_a, b_scaled)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, merged, lora_a, b_scaled = ctx.saved_tensors  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        dt = grad.dtype  # under autocast the incoming gradient may be lower precision than the saved tensors
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        gx = gw = gb = ga = gbs = None
        if need[0]:
            gx = (g @ merged.to(dt)).view(x.shape).to(x.dtype)
        if need[1]:
            gw = (g.t() @ x2).to(merged.dtype)
        if need[2]:
            gb = g.sum(0).to(merged.dtype)
        if need[3]:
            ga = ((g @ b_scaled.to(dt)).t() @ x2).to(lora_a.dtype)  # (g B_s)^T x: [r, in]
        if need[4]:
            gbs = (g.t() @ (x2 @ lora_a.to(dt).t())).to(b_scaled.dtype)  # g^T (x A^T): [out, r]
        return gx, gw, gb, ga, gbs


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
    form: str = "auto",
    dropout: Callable[[Tensor, float, bool], Tensor] = fast_dropout,
) -> Tensor:
    """``W x + b + scale * B A drop(x)`` (``drop`` only when ``training`` and ``dropout_p > 0``), exactly.

    ``form``: one of :data:`FORMS`; a form other than factored with active dropout is a ValueError (it would
    compute a different function).
    """
    if form not in FORMS:
        raise ValueError(f"unknown LoRA form {form!r}; choose from {list(FORMS)}")
    drops = training and dropout_p > 0.0
    d_in, d_out, rank = lora_a.shape[1], lora_b.shape[0], lora_a.shape[0]
    tokens = x.numel() // d_in if d_in else 0
    grad_on = torch.is_grad_enabled()
    train = grad_on and (lora_a.requires_grad or lora_b.requires_grad)
    input_grad = grad_on and x.requires_grad
    if form == "auto":
        form = choose_form(tokens, d_in, d_out, rank, drops, train, input_grad)
    elif drops and form != "factored":
        raise ValueError(f"LoRA form {form!r} is not exact with dropout on the LoRA input; use 'factored'")
    if _FORM_LOGS:
        _FORM_LOGS[-1][form + ("+dropout" if drops else "")] += 1
    b_scaled = lora_b if scale == 1.0 else lora_b * scale  # scale the [out, r] factor, not the [M, out] output
    if form == "materialised":
        return F.linear(x, torch.addmm(weight, b_scaled, lora_a), bias)
    if form == "hybrid":
        return _HybridLoRA.apply(x, weight, bias, lora_a, b_scaled)
    # factored: base GEMM, then the low-rank product accumulated into its output in place (no [M, out] temporary)
    x2 = x.reshape(-1, d_in)
    xd = dropout(x2, dropout_p, True) if drops else x2
    h = xd @ lora_a.t()
    out = F.linear(x2, weight, bias)
    out = out.addmm_(h, b_scaled.t()) if _inplace_ok(out, h, b_scaled) else torch.addmm(out, h, b_scaled.t())
    return out.view(*x.shape[:-1], d_out)


def _inplace_ok(out: Tensor, *others: Tensor) -> bool:
    # the frozen linear's output is saved by nobody, so accumulating into it is safe; promoting dtypes is not
    return all(o.dtype == out.dtype for o in others)
