"""Parity of the meters, post-processing and Δm with the official code: the metrics fixtures.

``python -m benchmark.parity`` calls :func:`parity_checks` for

- ``metrics_*.pt`` (PASCAL-Context, protocol ``pascal-context``): :func:`pascal_checks`;
- ``nyud_metrics_*.pt`` (NYUDv2, protocol ``nyud``): :func:`nyud_checks`.

Both feed the fixture's logits through the meters of the protocol's task kinds in the fixture's own update
batches and compare the post-processed meter inputs, every result value, batching invariance, Δm with the
fixture's single-task references and the worked Δm example. Every size, batch, task and reference is read from
the file; tasks of the file that the protocol does not have are reported as skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.metrics import Meter, NormalsMeter, build_meters, delta_m_terms, primary_scores
from benchmark.parity import Check
from benchmark.protocol import Protocol, TaskSpec, delta_m, get_protocol
from benchmark.tasks import kind_of

# PASCAL tolerance on metric values. Error model: the official meters accumulate counts exactly and averages in
# float64 (recomputation agrees to ~1e-12), except `Beta maxF`, which the official meter keeps in float32: a few
# fp32 roundings (2**-24 ~ 6e-8 each) of values <= 1, i.e. < 1e-6. A real difference is far larger: one pixel of
# the fixture's 6 images of 40 x 56 moves an IoU by >= 1 / 13440 ~ 7e-5, and the normals angles are in degrees.
METRIC_TOL = 1e-6

# NYUD tolerances (relative), from the error model of each meter:
# - segmentation: tp / fp / fn are exact integer counts, each IoU one correctly rounded division of two of them,
#   and the mean of the IoUs is a sum of C doubles: exact, as the fixture's README reports for a re-implementation.
SEG_REL_TOL = 0.0
# - depth and normals: float64 sums of N float32-derived terms (N = the valid pixels, ~1e4 here, ~1e8 on a real val
#   set), added in another order than the official code: <= N * 2**-53 ~ 1e-12 relative here. The normals' second
#   formula (mean_v2) also re-normalises the float32 prediction, where one float32 rounding per pixel (<= 2**-24 ~
#   6e-8 relative, of either sign) may fall differently: averaged over N pixels that is ~6e-8 / sqrt(N) ~ 6e-10
#   relative here (3e-10 observed). 1e-9 covers both and is still far below a real difference: one pixel more or
#   less, or one prediction clamped differently, moves rmse or a normals mean by > 1e-5 relative on these sizes.
FLOAT_REL_TOL = 1e-9
# - the Δm formula alone on given values: three float64 divisions and a mean of values <= 1e3: a few ulp.
FORMULA_ABS_TOL = 1e-12


class FixtureError(ValueError):
    """A fixture file without a field this check needs; the message names the file and the field."""


NYUD_PATTERN = "nyud_metrics_*.pt"


def parity_checks(path: str | Path) -> list[Check]:
    """The checks of one metrics fixture: NYUD's for ``nyud_metrics_*.pt``, PASCAL's for ``metrics_*.pt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics fixture not found: {path}")
    from benchmark.safeload import safe_load

    fx = safe_load(path, "metrics fixture")
    if fnmatch.fnmatch(path.name, NYUD_PATTERN):
        return nyud_checks(fx, path)
    return pascal_checks(fx, path)


# ----------------------------------------------------------------------------------------------
# shared helpers


def _field(d: Any, path: str, keys: Sequence[str]) -> Any:
    cur = d
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            raise FixtureError(f"{path}: missing field {'.'.join(keys)!r}")
        cur = cur[k]
    return cur


def _max_abs_diff(ours: Any, ref: Any) -> float:
    a = torch.as_tensor(ours, dtype=torch.float64)
    b = torch.as_tensor(ref, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {list(a.shape)} vs {list(b.shape)}")
    if a.numel() == 0:
        return 0.0
    same = (a == b) | (a.isnan() & b.isnan())
    return float((a - b).abs().masked_fill(same, 0).max())


def _compare(name: str, ours: Any, ref: Any, tol: float, note: str = "") -> Check:
    try:
        d = _max_abs_diff(ours, ref)
    except (ValueError, TypeError, RuntimeError) as e:
        return Check(name, math.inf, tol, False, f"cannot compare: {e}")
    passed = d <= tol
    detail = note if passed else f"ours {_short(ours)} vs official {_short(ref)}" + (f" ({note})" if note else "")
    return Check(name, d, tol, passed, detail)


def _compare_rel(name: str, ours: Any, ref: Any, rel: float) -> Check:
    """``_compare`` with the tolerance ``rel`` x the largest magnitude of the official values."""
    try:
        scale = float(torch.as_tensor(ref, dtype=torch.float64).abs().max()) if rel else 0.0
    except (ValueError, TypeError, RuntimeError) as e:
        return Check(name, math.inf, 0.0, False, f"cannot compare: {e}")
    return _compare(name, ours, ref, rel * scale, f"relative tolerance {rel:g}" if rel else "")


def _short(x: Any) -> str:
    s = repr(x.tolist() if isinstance(x, Tensor) else x)
    return s if len(s) <= 120 else s[:117] + "..."


def _numeric(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float, Tensor)):
        return True
    return isinstance(x, (list, tuple)) and all(_numeric(e) for e in x)


def _integral(x: Any) -> bool:
    """An exact count (or a list of them) as this code reports it: ints, never floats."""
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_integral(e) for e in x)


def _fixture_references(path: str, refs: Mapping[str, float], tasks: Sequence[str]) -> dict[str, float]:
    """Map the fixture's keys (``semseg_mIoU_pct``, ``normals_mean_deg``, ``depth_rmse``) to task names."""
    out: dict[str, float] = {}
    for key, value in refs.items():
        match = max((t for t in tasks if key.startswith(t + "_")), key=len, default=None)
        if match is None:
            raise FixtureError(f"{path}: key {key!r} names none of the tasks {list(tasks)}")
        out[match] = float(value)
    return out


def _protocol_specs(protocol: Protocol, logits: Mapping[str, Tensor], path: str) -> list[TaskSpec]:
    """The protocol's tasks, each with the number of outputs the fixture's logits have."""
    missing = [t.name for t in protocol.tasks if t.name not in logits]
    if missing:
        raise FixtureError(f"{path}: logits lack the task(s) {missing} of protocol {protocol.id}")
    return [dataclasses.replace(t, out_channels=int(logits[t.name].shape[1])) for t in protocol.tasks]


def _feed(
    meters: Mapping[str, Meter], logits: Mapping[str, Tensor], gts: Mapping[str, Tensor], batches: Sequence[Any]
) -> dict[str, list[dict[str, Tensor]]]:
    stats: dict[str, list[dict[str, Tensor]]] = {t: [] for t in meters}
    for batch in batches:
        idx = torch.as_tensor(batch, dtype=torch.long)
        for t, m in meters.items():
            stats[t].append(m.stats(logits[t][idx], gts[t][idx]))
    return stats


def _results(meters: Mapping[str, Meter], stats: Mapping[str, list[dict[str, Tensor]]]) -> dict[str, dict[str, Any]]:
    return {t: {**m.reduce(stats[t]), **m.details(stats[t])} for t, m in meters.items()}


def _scalars(d: Mapping[str, float]) -> list[float]:
    return [d[k] for k in sorted(d)]


# ----------------------------------------------------------------------------------------------
# PASCAL-Context: metrics_*.pt


# fixture key in results.normals_extra_not_from_official_code -> (our normals key, tolerance or None = bin/2)
_NORMALS_EXTRA = {"median_deg": ("median", None), "true_rmse_deg": ("rmse_true", METRIC_TOL)}


def pascal_checks(fx: Mapping[str, Any], path: Path) -> list[Check]:
    """Feed a ``metrics_*.pt`` fixture's logits through these meters in its ``update_batches`` and compare
    the post-processed meter inputs, every value of ``results``, Δm and the worked Δm example."""
    stem, p = path.stem, str(path)
    logits = _field(fx, p, ["logits"])
    gts = _field(fx, p, ["meter_inputs", "gt"])
    preds = _field(fx, p, ["meter_inputs", "pred"])
    batches = _field(fx, p, ["update_batches"])
    results = _field(fx, p, ["results"])
    protocol = get_protocol("pascal-context")
    tasks = list(logits)
    unknown = [t for t in tasks if t not in protocol.task_names]
    if unknown:
        raise FixtureError(f"{p}: logits has tasks without a meter here: {unknown}")
    specs = [s for s in _protocol_specs(protocol, logits, p) if s.name in tasks]
    meters = build_meters(specs)
    checks: list[Check] = []

    # 1. post-processing: what the official meters received
    for s in specs:
        ours = kind_of(s).postprocess(logits[s.name])
        ref = _field(preds, p, [s.name])
        checks.append(_compare(f"{stem}/meter_inputs/{s.name}", ours.reshape(ref.shape), ref, 0.0))

    # 2. every result value, meters fed in the fixture's batches
    stats = _feed(meters, logits, gts, batches)
    ours_all = _results(meters, stats)
    # "<task>_extra_not_from_official_code": the generator's own figures for a normals-kind task
    normals_extra = {f"{t}_extra_not_from_official_code": t for t, m in meters.items() if isinstance(m, NormalsMeter)}
    for key, table in results.items():
        if key in tasks:
            for metric, ref in table.items():
                name = f"{stem}/{key}/{metric}"
                if not _numeric(ref):
                    continue
                if metric not in ours_all[key]:
                    checks.append(Check(name, math.inf, METRIC_TOL, False, "not produced by benchmark.metrics"))
                else:
                    checks.append(_compare(name, ours_all[key][metric], ref, METRIC_TOL))
        elif key in normals_extra:
            t = normals_extra[key]
            checks.extend(_normals_extra_checks(stem, table, ours_all[t], meters[t]))
        else:
            checks.append(Check(f"{stem}/{key}", math.inf, 0.0, False, "results entry for no known task"))

    # 3. batch invariance (ours): one image per batch gives the same numbers
    for t, m in meters.items():
        single = [m.stats(logits[t][i : i + 1], gts[t][i : i + 1]) for b in batches for i in b]
        checks.append(
            _compare(f"{stem}/batch_invariance/{t}", _scalars(m.reduce(single)), _scalars(m.reduce(stats[t])), 1e-12)
        )

    # 4. Δm: primary scores in table units, per-task terms and their mean, against the fixture's references
    dm = _field(fx, p, ["delta_m"])
    refs = _fixture_references(p, _field(dm, p, ["reference_single_task"]), tasks)
    scores = primary_scores({t: ours_all[t] for t in tasks}, specs)
    for t, ref in _field(dm, p, ["metrics_used_pct"]).items():
        checks.append(_compare(f"{stem}/delta_m/metrics_used_pct/{t}", scores.get(t, math.nan), ref, METRIC_TOL))
    try:
        terms = delta_m_terms(scores, refs, specs)
        value = delta_m(scores, refs, specs)
    except (KeyError, ValueError) as e:
        checks.append(Check(f"{stem}/delta_m", math.inf, METRIC_TOL, False, f"{type(e).__name__}: {e}"))
    else:
        for t, ref in _field(dm, p, ["per_task_relative_term_pct"]).items():
            checks.append(_compare(f"{stem}/delta_m/term/{t}", terms.get(t, math.nan), ref, METRIC_TOL))
        checks.append(_compare(f"{stem}/delta_m/delta_m_pct", value, _field(dm, p, ["delta_m_pct"]), METRIC_TOL))
    # (the fixture's references are inputs of the formula check; the protocol's own REFERENCES are data,
    # tested against the published CSVs by the leaderboard's golden tests)

    # 5. the worked example: the formula alone, on given table values
    ex = _field(fx, p, ["delta_m_worked_example"])
    try:
        value = delta_m(_field(ex, p, ["metrics_pct"]), refs, specs)
        checks.append(_compare(f"{stem}/delta_m_worked_example", value, _field(ex, p, ["delta_m_pct"]), METRIC_TOL))
    except (KeyError, ValueError) as e:
        checks.append(Check(f"{stem}/delta_m_worked_example", math.inf, METRIC_TOL, False, str(e)))
    return checks


def _normals_extra_checks(
    stem: str, table: Mapping[str, Any], ours: Mapping[str, Any], meter: NormalsMeter
) -> list[Check]:
    checks = []
    for key, ref in table.items():
        name = f"{stem}/normals_extra/{key}"
        if key == "num_valid_pixels":
            checks.append(_compare(name, ours["num_valid_pixels"], ref, 0.0))
        elif key in _NORMALS_EXTRA:
            ours_key, tol = _NORMALS_EXTRA[key]
            # the median comes from bin_deg-wide bins: it is exact to half a bin (plus float noise)
            checks.append(_compare(name, ours[ours_key], ref, tol if tol is not None else meter.bin_deg / 2 + 1e-9))
        elif _numeric(ref):
            checks.append(Check(name, math.inf, 0.0, False, "unknown numeric field"))
    return checks


# ----------------------------------------------------------------------------------------------
# NYUDv2: nyud_metrics_*.pt


def _official(tensors: Mapping[str, Tensor], dtypes: Mapping[str, str], path: str, what: str) -> dict[str, Tensor]:
    """The compactly stored tensors in the dtype the official code produced (``.to`` is exact, per the README)."""
    out = {}
    for t, x in tensors.items():
        name = dtypes.get(t)
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        if not isinstance(dtype, torch.dtype):
            raise FixtureError(f"{path}: missing or unknown field 'meter_inputs_official_dtypes.{what}.{t}'")
        out[t] = x.to(dtype)
    return out


def _skip_reason(task: str, protocol: Protocol, fx: Mapping[str, Any]) -> str:
    why = (
        "edge detection is out of v1: its official evaluation is a boundary F-score (odsF) that needs an external "
        "boundary-matching toolbox, and the official in-code meter reports a loss, not odsF"
    )
    in_dm = fx.get("delta_m", {}).get(f"{task}_in_delta_m") if isinstance(fx.get("delta_m"), Mapping) else None
    extra = f"; the fixture says of it in Δm: {in_dm}" if isinstance(in_dm, str) else ""
    return f"SKIPPED: task {task!r} is not part of protocol {protocol.id} ({why}){extra}"


def nyud_checks(fx: Mapping[str, Any], path: Path, protocol: Protocol | None = None) -> list[Check]:
    """NYUD metrics parity: post-processing, meters (official update batches), batching invariance, Δm."""
    protocol = protocol or get_protocol("nyud")
    stem, p = path.stem, str(path)
    tasks = list(_field(fx, p, ["tasks"]))
    raw = _field(fx, p, ["logits"])
    scales = fx.get("logits_scale", {})
    # the float32 logits: int8 codes x scale, exact (README section 3)
    logits = {t: raw[t].float() * float(scales.get(t, 1.0)) for t in raw}
    dtypes = _field(fx, p, ["meter_inputs_official_dtypes"])
    preds = _official(_field(fx, p, ["meter_inputs", "pred"]), _field(dtypes, p, ["pred"]), p, "pred")
    gts = _official(_field(fx, p, ["meter_inputs", "gt"]), _field(dtypes, p, ["gt"]), p, "gt")
    batches = _field(fx, p, ["update_batches"])
    results = _field(fx, p, ["results"])
    specs = _protocol_specs(protocol, logits, p)
    ours_tasks = [s.name for s in specs]
    checks = [
        Check(f"{stem}/{t}", 0.0, 0.0, True, _skip_reason(t, protocol, fx)) for t in tasks if t not in ours_tasks
    ]
    meters = build_meters(specs)
    rel = {s.name: SEG_REL_TOL if kind_of(s).exact_counts else FLOAT_REL_TOL for s in specs}

    # 1. post-processing against what the official meters received (bit for bit, dtype included)
    for s in specs:
        ours = kind_of(s).postprocess(logits[s.name])
        name = f"{stem}/meter_inputs/{s.name}"
        if s.name in preds:
            ref, want = preds[s.name], preds[s.name].dtype
        else:  # not stored: the file's note gives it as the logits unchanged, channels last
            ref, want = logits[s.name].permute(0, 2, 3, 1), torch.float32
        if ours.dtype != want:
            checks.append(Check(name, math.inf, 0.0, False, f"dtype {ours.dtype}, official {want}"))
        else:
            checks.append(_compare(name, ours.reshape(ref.shape), ref, 0.0))

    # 2. every result value of the official meters, ours fed the same update batches
    stats = _feed(meters, logits, gts, batches)
    ours_all = _results(meters, stats)
    for key, table in results.items():
        if key not in ours_tasks:
            continue  # a skipped task (reported above)
        for metric, ref in table.items():
            name = f"{stem}/{key}/{metric}"
            if not _numeric(ref):
                continue
            if metric not in ours_all[key]:
                checks.append(Check(name, math.inf, 0.0, False, "not produced by benchmark.metrics"))
            elif _integral(ours_all[key][metric]):  # counts: exact
                checks.append(_compare(name, ours_all[key][metric], ref, 0.0))
            else:
                checks.append(_compare_rel(name, ours_all[key][metric], ref, rel[key]))

    # 3. batching invariance: the fixture's other batchings give our update-batch numbers. Per-image float64 sums
    # of H*W terms may be reduced in another order for another batch shape: <= H*W * 2**-53 relative
    hw = int(logits[specs[0].name].shape[-2] * logits[specs[0].name].shape[-1])
    inv_rel = hw * 2.0**-53
    for key in _field(fx, p, ["batching_invariance_max_abs_diff"]):
        try:
            other = json.loads(key)
        except (TypeError, ValueError):
            checks.append(Check(f"{stem}/batching/{key}", math.inf, 0.0, False, "not a JSON list of batches"))
            continue
        again = _feed(meters, logits, gts, other)
        for t, m in meters.items():
            got, want = _scalars(m.reduce(again[t])), _scalars(m.reduce(stats[t]))
            checks.append(_compare_rel(f"{stem}/batching/{key}/{t}", got, want, 0.0 if rel[t] == 0 else inv_rel))

    # 4. Δm: our primary scores (table units) against the file's, the per-task terms and Δm, with the file's references
    dm = _field(fx, p, ["delta_m"])
    refs = _fixture_references(p, _field(dm, p, ["reference_single_task"]), ours_tasks)
    used = _fixture_references(p, _field(dm, p, ["metrics_used"]), ours_tasks)
    scores = primary_scores(ours_all, specs)
    term_tol: dict[str, float] = {}
    for s in specs:
        m = used.get(s.name, math.nan)
        checks.append(_compare_rel(f"{stem}/delta_m/metrics_used/{s.name}", scores[s.name], m, rel[s.name]))
        # a score within rel x |m| moves its term 100 (m - r) / r by 100 x rel x |m| / |r|, plus float rounding
        term_tol[s.name] = 100 * rel[s.name] * abs(m) / abs(refs.get(s.name, math.nan)) + FORMULA_ABS_TOL
    try:
        terms = delta_m_terms(scores, refs, specs)
        value = delta_m(scores, refs, specs)
    except (KeyError, ValueError) as e:
        checks.append(Check(f"{stem}/delta_m", math.inf, 0.0, False, f"{type(e).__name__}: {e}"))
    else:
        for t, ref in _field(dm, p, ["per_task_relative_term_pct"]).items():
            if t in ours_tasks:
                checks.append(_compare(f"{stem}/delta_m/term/{t}", terms[t], ref, term_tol[t]))
        tol = math.fsum(term_tol.values()) / len(term_tol)
        checks.append(_compare(f"{stem}/delta_m/delta_m_pct", value, _field(dm, p, ["delta_m_pct"]), tol))

    # 5. the worked example: the formula alone on the given values
    ex = _field(fx, p, ["delta_m_worked_example"])
    try:
        given = _fixture_references(p, _field(ex, p, ["metrics_used"]), ours_tasks)
        value = delta_m(given, refs, specs)
        want = _field(ex, p, ["delta_m_pct"])
        checks.append(_compare(f"{stem}/delta_m_worked_example", value, want, FORMULA_ABS_TOL))
    except (KeyError, ValueError) as e:
        checks.append(Check(f"{stem}/delta_m_worked_example", math.inf, FORMULA_ABS_TOL, False, str(e)))
    return checks
