"""Reproduced runs grouped over seeds, published rows beside them, Δm recomputed for both (pandas).

One row of the leaderboard frame is either a group of reproduced runs, keyed by (protocol, method,
config, preset, selection rule), with per-task mean and std over its runs, or one published row.
Δm is always recomputed here, from the per-task values in table units, against one single-task reference per
protocol (``benchmark.protocol.delta_m``): the protocol's default, or another reference of the same protocol chosen
by name (``leaderboard build --reference PROTOCOL=NAME``); the printed Δm of a paper sits beside it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from benchmark.protocol import Protocol, Reference, delta_m, get_reference
from benchmark.results import config_slug
from leaderboard.data import ALL_TRAINABLE, ENCODER_SIDE, KnownInconsistency, PublishedRow
from leaderboard.errors import LeaderboardError
from leaderboard.runs import Run
from leaderboard.stats import DELTA_M, Interval, group_intervals

# Error model of a printed Δm. Sources print Δm with 2 decimals and compute it from per-task values that they
# print with 2 decimals too, against the single-task reference as printed. Rounding a per-task value x_t moves it
# by at most h = 0.005 (half a unit of the 2nd decimal), which moves its term 100/n · (x_t - r_t)/r_t by at most
# 100/n · h/|r_t|; rounding the printed Δm adds another h. So |printed - recomputed| <= 100/n · h · Σ 1/|r_t| + h.
# Against MTLoRA's PASCAL-Context row (67.21 / 61.93 / 62.35 / 17.97) that is 0.0128 + 0.005 = 0.0178; against
# a NYUDv2 reference with depth rmse 0.60 (metres) the depth term alone is 100/3 · 0.005/0.60 = 0.28: the bound
# follows the reference, it is no constant. A larger gap is not a rounding effect.
PRINTED_HALF_UNIT = 0.005


def delta_m_rounding_tol(protocol: Protocol, reference: str | None = None) -> float:
    """The largest |printed - recomputed| Δm that 2-decimal rounding explains, against ``reference`` (default: the
    protocol's): 100/n · 0.005 · Σ 1/|r_t| + 0.005 (the error model above)."""
    ref = get_reference(reference or protocol.reference)
    tasks = protocol.task_names
    return 100.0 / len(tasks) * PRINTED_HALF_UNIT * sum(1.0 / abs(ref.values[t]) for t in tasks) + PRINTED_HALF_UNIT


def section_reference(protocol: Protocol, reference: str | None = None) -> Reference:
    """The reference a section's Δm is measured against: ``reference`` (a name) or the protocol's default; one of
    another protocol, or without a value for every task, is refused."""
    try:
        ref = get_reference(reference or protocol.reference)
    except KeyError as e:
        raise LeaderboardError(e.args[0]) from None
    if ref.protocol != protocol.name:
        raise LeaderboardError(
            f"single-task reference {ref.name!r} is a {ref.protocol!r} reference, not one of protocol {protocol.name!r}"
        )
    missing = [t for t in protocol.task_names if t not in ref.values]
    if missing:
        raise LeaderboardError(f"single-task reference {ref.name!r} has no value for task(s) {missing}")
    return ref


GIB = 2**30
GROUP_KEYS = ("method", "config_json", "preset", "selection")


def canonical_config(config: Mapping[str, Any]) -> str:
    """A config as canonical JSON (sorted keys), the grouping and matching key."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def config_text(config: Mapping[str, Any], fallback: str = "") -> str:
    return config_slug(dict(config)) if config else (fallback or "default")


def row_delta_m(row: PublishedRow, protocol: Protocol, reference: str | None = None) -> float:
    """Δm of a published row from its own per-task values, against ``reference`` (default: the row's own)."""
    ref = get_reference(reference or row.reference)
    return delta_m(row.metrics, ref.values, protocol.tasks)


def delta_m_mismatch(row: PublishedRow, protocol: Protocol) -> float:
    """|printed Δm − Δm recomputed against the reference the row names|."""
    return abs(row.delta_m_printed - row_delta_m(row, protocol))


def row_rounding_tol(row: PublishedRow, protocol: Protocol) -> float:
    """How far a row's printed Δm may be from the recomputed one by rounding alone (against the row's reference)."""
    return delta_m_rounding_tol(protocol, row.reference)


def encoder_side(params: Mapping[str, int]) -> int:
    """The encoder-side count of a result's breakdown: its trainable backbone parameters, decoders excluded.

    ``benchmark.params`` defines ``other_trainable_backbone`` as trainable - adapter - trainable decoders, so
    adapter + other_trainable_backbone is exactly the trainable parameters outside the decoders.
    """
    return int(params["adapter"]) + int(params["other_trainable_backbone"])


def reproduced_frame(runs: Sequence[Run], protocol: Protocol, reference: str | None = None) -> pd.DataFrame:
    """Successful runs of ``protocol`` grouped over seeds: one row per (method, config, preset, selection), Δm
    against ``reference`` (default: the protocol's)."""
    tasks = protocol.task_names
    records = []
    for r in sorted(runs, key=lambda r: r.run_id):
        p = r.data["protocol"]
        if (p["name"], p["version"]) != (protocol.name, protocol.version):
            continue
        cost = r.data.get("cost") or {}
        rec: dict[str, Any] = {
            "method": r.method,
            "config_json": canonical_config(r.config),
            "preset": r.data["preset"],
            "selection": str(r.data["selection"].get("rule", "?")),
            "run_id": r.run_id,
            "seeds": "-".join(str(s) for s in r.data["seeds"]),
            "trainable": r.data["params"]["trainable"],
            "encoder": encoder_side(r.data["params"]),
            "img_s": _num(cost.get("train_images_per_s")),
            "mem_gib": _num(cost.get("peak_mem_bytes")) / GIB,
        }
        rec.update(r.table_values())
        records.append(rec)
    if not records:
        return _empty_frame(protocol)
    df = pd.DataFrame.from_records(records)
    grouped = df.groupby(list(GROUP_KEYS), sort=True)
    agg = grouped.agg(
        **{t: (t, "mean") for t in tasks},
        **{f"{t}_std": (t, "std") for t in tasks},  # sample std (ddof=1); NaN for a single run
        n_seeds=("run_id", "size"),
        seeds=("seeds", lambda s: ",".join(s)),
        run_ids=("run_id", lambda s: list(s)),
        params_min=("trainable", "min"),
        params_max=("trainable", "max"),
        encoder_min=("encoder", "min"),
        encoder_max=("encoder", "max"),
        img_s=("img_s", "mean"),
        mem_gib=("mem_gib", "mean"),
    ).reset_index()
    ref = section_reference(protocol, reference)
    by_id = {r.run_id: r for r in runs}
    rows = []
    for rec in agg.to_dict("records"):
        config = json.loads(rec["config_json"])
        notes = []
        if rec["params_min"] != rec["params_max"]:
            notes.append(f"trainable parameters differ between runs: {rec['params_min']} to {rec['params_max']}")
        rows.append(
            {
                "kind": "reproduced",
                "source": "reproduced",
                "id": "",
                "method": rec["method"],
                "label": f"{rec['method']} {config_text(config)}",
                "config_json": rec["config_json"],
                "config_text": config_text(config),
                **{t: float(rec[t]) for t in tasks},
                **{f"{t}_std": float(rec[f"{t}_std"]) for t in tasks},
                "n_seeds": int(rec["n_seeds"]),
                "seeds": rec["seeds"],
                "delta_m": delta_m({t: rec[t] for t in tasks}, ref.values, protocol.tasks),
                "delta_m_printed": math.nan,
                "mismatch": "",
                "params_policy": ALL_TRAINABLE,
                "params_m": rec["params_min"] / 1e6,
                "params_m_max": rec["params_max"] / 1e6,
                "params_printed": math.nan,
                "encoder_m": rec["encoder_min"] / 1e6,
                "encoder_m_max": rec["encoder_max"] / 1e6,
                "selection": rec["selection"],
                "preset": rec["preset"],
                "img_s": float(rec["img_s"]),
                "mem_gib": float(rec["mem_gib"]),
                "verified": True,
                "init": "",  # a run's backbone initialisation is fixed by its protocol
                "init_differs": False,
                "notes": "; ".join(notes),
                "run_ids": rec["run_ids"],
                **interval_columns(group_intervals([by_id[i] for i in rec["run_ids"]], protocol, ref.name), protocol),
            }
        )
    return pd.DataFrame.from_records(rows, columns=frame_columns(protocol))


def interval_columns(intervals: Mapping[str, Interval], protocol: Protocol) -> dict[str, Any]:
    """``<task>_ci_lo`` / ``<task>_ci_hi`` (and ``delta_m_ci_*``) and ``ci_method``; NaN and "" without one."""
    out: dict[str, Any] = {}
    for k in (*protocol.task_names, DELTA_M):
        iv = intervals.get(k)
        out[f"{k}_ci_lo"] = iv.lower if iv else math.nan
        out[f"{k}_ci_hi"] = iv.upper if iv else math.nan
    out["ci_method"] = next(iter(intervals.values())).method if intervals else ""
    return out


def published_frame(
    rows: Sequence[PublishedRow],
    protocol: Protocol,
    known: Mapping[str, KnownInconsistency] | None = None,
    reference: str | None = None,
) -> pd.DataFrame:
    """Published rows with Δm recomputed against ``reference`` (default: the protocol's) and a mismatch marker
    (printed against recomputed Δm, both against the reference the row names)."""
    known = known or {}
    tasks = protocol.task_names
    ref = section_reference(protocol, reference)
    recs = []
    for row in rows:
        notes = [row.notes] if row.notes else []
        if row.reference != ref.name:
            notes.append(f"the printed Δm was computed against {row.reference!r}")
        printed = math.nan if row.params_m_printed is None else row.params_m_printed
        mismatch = ""
        if delta_m_mismatch(row, protocol) > row_rounding_tol(row, protocol):
            mismatch = known[row.id].reason if row.id in known else "not listed as a known inconsistency"
        recs.append(
            {
                "kind": "published",
                "source": row.source,
                "id": row.id,
                "method": row.method,
                "label": row.label,
                "config_json": canonical_config(row.config),
                "config_text": config_text(row.config, row.variant),
                **{t: row.metrics[t] for t in tasks},
                **{f"{t}_std": math.nan for t in tasks},
                "n_seeds": 0,
                "seeds": "",
                "delta_m": row_delta_m(row, protocol, ref.name),
                "delta_m_printed": row.delta_m_printed,
                "mismatch": mismatch,
                "params_policy": row.params_policy,
                "params_m": printed if row.params_policy == ALL_TRAINABLE else math.nan,
                "params_m_max": printed if row.params_policy == ALL_TRAINABLE else math.nan,
                "encoder_m": printed if row.params_policy == ENCODER_SIDE else math.nan,
                "encoder_m_max": printed if row.params_policy == ENCODER_SIDE else math.nan,
                "params_printed": printed,
                "selection": row.selection,
                "preset": "",
                "img_s": math.nan,
                "mem_gib": math.nan,
                "verified": row.verified,
                "init": row.init,
                "init_differs": row.init != ref.init,
                "notes": " ".join(notes),
                "run_ids": [],
                **interval_columns({}, protocol),
            }
        )
    return pd.DataFrame.from_records(recs, columns=frame_columns(protocol))


def leaderboard_frame(
    runs: Sequence[Run],
    published: Sequence[PublishedRow],
    protocol: Protocol,
    known: Mapping[str, KnownInconsistency] | None = None,
    reference: str | None = None,
) -> pd.DataFrame:
    """Reproduced and published rows together, Δm against ``reference`` (default: the protocol's), sorted by Δm
    (best first), ties broken by fixed keys."""
    frames = (reproduced_frame(runs, protocol, reference), published_frame(published, protocol, known, reference))
    parts = [f for f in frames if len(f)]
    if not parts:
        return _empty_frame(protocol)
    df = pd.concat(parts, ignore_index=True)
    df["_kind_order"] = (df["kind"] != "reproduced").astype(int)
    df["_neg_dm"] = -df["delta_m"]
    df = df.sort_values(
        ["_neg_dm", "_kind_order", "method", "config_text", "source", "id", "preset", "selection"],
        kind="mergesort",
        na_position="last",
    )
    return df.drop(columns=["_kind_order", "_neg_dm"]).reset_index(drop=True)


def frame_columns(protocol: Protocol) -> list[str]:
    tasks = list(protocol.task_names)
    return [
        "kind", "source", "id", "method", "label", "config_json", "config_text",
        *tasks, *(f"{t}_std" for t in tasks),
        "n_seeds", "seeds", "delta_m", "delta_m_printed", "mismatch",
        "params_policy", "params_m", "params_m_max", "encoder_m", "encoder_m_max", "params_printed",
        "selection", "preset", "img_s", "mem_gib", "verified", "init", "init_differs", "notes", "run_ids",
        *(f"{k}_ci_{e}" for k in (*tasks, DELTA_M) for e in ("lo", "hi")), "ci_method",
    ]  # fmt: skip


def _empty_frame(protocol: Protocol) -> pd.DataFrame:
    return pd.DataFrame(columns=frame_columns(protocol))


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
