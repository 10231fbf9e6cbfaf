"""Optimiser groups and learning-rate arithmetic of the protocol, in plain torch (the engine wraps them for
mmengine; the perf tool and the official training-loop parity use them as they are)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from benchmark.protocol import Protocol


def param_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The official grouping: no decay on 1-D parameters and biases, decay on everything else."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Schedule:
    """Linear warm-up then per-iteration cosine, as timm's ``CosineLRScheduler(warmup_prefix=True)``.

    ``lr(t) = warmup_lr + t * (peak_lr - warmup_lr) / warmup_iters`` for ``t < warmup_iters``, then
    ``min_lr + 0.5 * (peak_lr - min_lr) * (1 + cos(pi * (t - warmup_iters) / (total_iters - warmup_iters)))``,
    and ``min_lr`` from ``total_iters`` on. By default iteration ``k`` (0-based) trains with ``lr(k)``.
    ``official_lr_lag``: the official loop steps its scheduler with the index of the iteration just done, so
    iteration ``k >= 1`` trains with ``lr(k - 1)`` (both of the first two with ``lr(0)``); used for the
    training-loop parity check, see docs/protocol.md.
    """

    peak_lr: float
    warmup_lr: float
    min_lr: float
    warmup_iters: int
    total_iters: int
    official_lr_lag: bool = False

    def lr_at(self, iteration: int) -> float:
        """The learning rate iteration ``iteration`` (0-based) trains with (float64, timm's order of operations)."""
        t = max(0, iteration - 1) if self.official_lr_lag else iteration
        w = min(self.warmup_iters, self.total_iters)
        if t < w:
            return self.warmup_lr + t * ((self.peak_lr - self.warmup_lr) / w)
        u, span = t - w, self.total_iters - w
        if u < span:
            return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * u / span))
        return self.min_lr


def steps_per_epoch(n_train: int, batch_size: int, world: int) -> int:
    return n_train // (batch_size * world)


def make_schedule(
    protocol: Protocol, total_batch: int, iters_per_epoch: int, epochs: int, **override: Any
) -> Schedule:
    peak = override.get("peak_lr") or protocol.peak_lr(total_batch)
    scale = peak / protocol.peak_lr(total_batch)
    warmup_epochs = override.get("warmup_epochs", protocol.warmup_epochs)
    return Schedule(
        peak_lr=peak,
        warmup_lr=protocol.warmup_lr * total_batch / protocol.lr_reference_batch * scale,
        min_lr=protocol.min_lr * total_batch / protocol.lr_reference_batch * scale,
        warmup_iters=int(math.floor(warmup_epochs * iters_per_epoch)),
        total_iters=epochs * iters_per_epoch,
    )
