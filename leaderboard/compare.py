"""``leaderboard compare A B``: do two reproduced configurations differ? (numpy + scipy, torch-free)

A and B are result files or folders; each must hold the successful runs of exactly one configuration
(protocol, method, config, preset, selection rule). Per task (primary metric, table units) and for Δm the
table gives A, B, the difference A − B, its 95% interval and a two-sided p-value:

- both with 2+ seeds and the same seeds: paired t-test on the per-seed differences (df = n − 1);
- both with 2+ seeds, different seeds: Welch's t-test (Welch–Satterthwaite df);
- one run each, both with per-image statistics: bootstrap over validation images (``leaderboard.stats``:
  ``BOOTSTRAP_RESAMPLES`` resamples, seed ``BOOTSTRAP_SEED``), the same resampled images for A and B when both
  were evaluated on the same images (``images_sha256``), independent resamples (seeds 0 and 1) otherwise. The
  interval is the 2.5/97.5 percentiles of the resampled differences, the p-value
  min(1, 2 · min((#{d ≤ 0} + 1) / (B + 1), (#{d ≥ 0} + 1) / (B + 1))).

Anything else is refused with the reason: rows of different protocols, Δm references or parameter counting
policies are not comparable; one side with a single seed and no per-image statistics has no uncertainty to use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmark.protocol import Protocol
from leaderboard.aggregate import canonical_config, config_text
from leaderboard.data import ALL_TRAINABLE
from leaderboard.errors import LeaderboardError
from leaderboard.runs import Run, load_results
from leaderboard.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    DELTA_M,
    LEVEL,
    resample_weights,
    run_values,
    weighted_values,
)


@dataclass(frozen=True)
class CompareRow:
    key: str  # task name or "delta_m"
    a: float
    b: float
    diff: float
    lower: float
    upper: float
    p_value: float


@dataclass(frozen=True)
class Comparison:
    test: str
    rows: list[CompareRow]


def counting_policy(data: dict[str, Any]) -> str:
    """The parameter counting policy a result was counted under: a run records its full breakdown, so it is
    ``all-trainable`` (decoders included, this protocol's rule) unless its ``params`` name another."""
    params = data.get("params", {})
    return str(params.get("counting_policy") or ALL_TRAINABLE)


def load_group(path: str | os.PathLike[str], flag: str) -> list[Run]:
    """The successful runs under ``path``; they must form one configuration."""
    loaded = load_results([path])
    loaded.raise_for_errors()
    if not loaded.runs:
        raise LeaderboardError(f"{flag} {path}: no successful runs (status success) to compare")
    keys = {
        (r.protocol.id, r.method, canonical_config(r.config), r.data["preset"], str(r.data["selection"].get("rule")))
        for r in loaded.runs
    }
    if len(keys) > 1:
        shown = "; ".join(f"{p} {m} {config_text(json.loads(c))} {pr} {s}" for p, m, c, pr, s in sorted(keys))
        raise LeaderboardError(
            f"{flag} {path}: holds {len(keys)} configurations ({shown}); name a file or folder with one configuration"
        )
    return loaded.runs


def refuse_incomparable(a: Sequence[Run], b: Sequence[Run]) -> None:
    pa, pb = (f"{r[0].data['protocol']['name']}.v{r[0].data['protocol']['version']}" for r in (a, b))
    if pa != pb:
        raise LeaderboardError(f"not comparable: A is protocol {pa}, B is {pb} (different tasks, data or schedule)")
    refs = {r.data["delta_m"]["reference"] for r in (*a, *b)}
    if len(refs) > 1:
        raise LeaderboardError(f"not comparable: the runs measure Δm against different references {sorted(refs)}")
    pol_a, pol_b = {counting_policy(r.data) for r in a}, {counting_policy(r.data) for r in b}
    if pol_a != pol_b or len(pol_a) > 1:
        raise LeaderboardError(
            f"not comparable: parameters counted under different policies (A: {sorted(pol_a)}, B: {sorted(pol_b)})"
        )


def _t_quantile(df: float) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(1 - (1 - LEVEL) / 2, df))


def _t_p(t: float, df: float) -> float:
    from scipy.stats import t as student_t

    return float(2 * student_t.sf(abs(t), df))


def _mean_var(x: Sequence[float]) -> tuple[float, float]:
    n = len(x)
    m = math.fsum(x) / n
    return m, math.fsum((v - m) ** 2 for v in x) / (n - 1)


def _paired(da: list[float], db: list[float]) -> tuple[float, float, float, float]:
    d = [x - y for x, y in zip(da, db, strict=True)]
    n = len(d)
    m, var = _mean_var(d)
    se = math.sqrt(var / n)
    if se == 0:
        return m, m, m, (1.0 if m == 0 else 0.0)
    h = _t_quantile(n - 1) * se
    return m, m - h, m + h, _t_p(m / se, n - 1)


def _welch(xa: list[float], xb: list[float]) -> tuple[float, float, float, float]:
    (ma, va), (mb, vb) = _mean_var(xa), _mean_var(xb)
    na, nb = len(xa), len(xb)
    sa, sb = va / na, vb / nb
    se = math.sqrt(sa + sb)
    d = ma - mb
    if se == 0:
        return d, d, d, (1.0 if d == 0 else 0.0)
    df = (sa + sb) ** 2 / (sa**2 / (na - 1) + sb**2 / (nb - 1))
    h = _t_quantile(df) * se
    return d, d - h, d + h, _t_p(d / se, df)


def compare_runs(a: Sequence[Run], b: Sequence[Run]) -> Comparison:
    refuse_incomparable(a, b)
    protocol: Protocol = a[0].protocol
    keys = (*protocol.task_names, DELTA_M)
    reference = a[0].data["delta_m"]["reference"]  # one reference on both sides (refuse_incomparable)
    va = [run_values(r.data, protocol, reference) for r in a]
    vb = [run_values(r.data, protocol, reference) for r in b]
    mean_a = {k: math.fsum(v[k] for v in va) / len(va) for k in keys}
    mean_b = {k: math.fsum(v[k] for v in vb) / len(vb) for k in keys}
    rows = []
    if len(a) >= 2 and len(b) >= 2:
        seeds_a = {r.data["seeds"][0]: v for r, v in zip(a, va, strict=True)}
        seeds_b = {r.data["seeds"][0]: v for r, v in zip(b, vb, strict=True)}
        paired = sorted(seeds_a) == sorted(seeds_b) and len(seeds_a) == len(a) and len(seeds_b) == len(b)
        for k in keys:
            if paired:
                order = sorted(seeds_a)
                d, lo, hi, p = _paired([seeds_a[s][k] for s in order], [seeds_b[s][k] for s in order])
            else:
                d, lo, hi, p = _welch([v[k] for v in va], [v[k] for v in vb])
            rows.append(CompareRow(k, mean_a[k], mean_b[k], d, lo, hi, p))
        test = (
            f"paired t-test over the {len(a)} common seeds"
            if paired
            else f"Welch's t-test ({len(a)} vs {len(b)} seeds)"
        )
        return Comparison(test, rows)
    if len(a) == 1 and len(b) == 1 and a[0].per_image is not None and b[0].per_image is not None:
        pa, pb = a[0].per_image, b[0].per_image
        same = pa.images_sha256 == pb.images_sha256
        wa = resample_weights(pa.n_images, seed=BOOTSTRAP_SEED)
        wb = wa if same else resample_weights(pb.n_images, seed=BOOTSTRAP_SEED + 1)
        ba, bb = weighted_values(pa, protocol, wa, reference), weighted_values(pb, protocol, wb, reference)
        for k in keys:
            d = ba[k] - bb[k]
            lo, hi = np.percentile(d, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
            n = len(d)
            p = min(1.0, 2 * min((np.sum(d <= 0) + 1) / (n + 1), (np.sum(d >= 0) + 1) / (n + 1)))
            rows.append(CompareRow(k, mean_a[k], mean_b[k], mean_a[k] - mean_b[k], float(lo), float(hi), float(p)))
        how = "paired on the same" if same else "independent resamples of different"
        test = f"bootstrap over validation images ({how} images; {BOOTSTRAP_RESAMPLES} resamples)"
        return Comparison(test, rows)

    def what(side: str, runs: Sequence[Run]) -> str:
        if len(runs) >= 2:
            return f"{side} has {len(runs)} seeds"
        return (
            f"{side} has 1 seed " + ("with" if runs[0].per_image is not None else "without") + " per-image statistics"
        )

    raise LeaderboardError(
        f"cannot compare: {what('A', a)}, {what('B', b)}; a comparison needs 2+ seeds on both sides (t-test) or one "
        "run on each side with per-image statistics (bootstrap over images)"
    )


def render(c: Comparison, a_label: str, b_label: str, protocol: Protocol) -> str:
    from tabulate import tabulate

    from leaderboard.tables import task_decimals, task_header
    from leaderboard.validate import md_cell

    rows = []
    for r in c.rows:
        head = "Δm % ↑" if r.key == DELTA_M else task_header(protocol, r.key)
        # one decimal more than the leaderboard prints (3 for percentages and degrees, 4 for depth in metres)
        d = 3 if r.key == DELTA_M else task_decimals(protocol, protocol.task(r.key)) + 1
        rows.append(
            [
                head,
                f"{r.a:.{d}f}",
                f"{r.b:.{d}f}",
                f"{r.diff:+.{d}f}",
                f"[{r.lower:+.{d}f}, {r.upper:+.{d}f}]",
                f"{r.p_value:.4f}",
            ]
        )
    table = tabulate(
        rows,
        headers=["", "A", "B", "A − B", f"{int(LEVEL * 100)}% interval", "p-value"],
        tablefmt="github",
        disable_numparse=True,
        colalign=["left", "right", "right", "right", "right", "right"],
    )
    return f"A: {md_cell(a_label)}\nB: {md_cell(b_label)}\nTest: {c.test}\n\n{table}\n"
