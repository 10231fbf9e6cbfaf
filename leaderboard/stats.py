"""95% intervals for reproduced rows and the two-configuration comparison (numpy + scipy, torch-free).

Intervals (every per-task metric and Δm of a reproduced row, in table units):

- several seeds: the t-interval over the seeds, mean ± t(0.975, n−1) · s / √n with the sample standard deviation
  s of the per-seed values (Δm per seed: Δm is linear in the per-task values, so the mean of the per-seed Δm is
  the row's Δm);
- one seed with per-image statistics (``<result>.per_image.json.gz``, written by ``run_benchmark``): a
  bootstrap over the validation images of that run. ``BOOTSTRAP_RESAMPLES`` resamples of the images with
  replacement, drawn by ``numpy.random.default_rng(BOOTSTRAP_SEED).integers(0, N, (B, N))``; each resample is
  reduced exactly as the meters reduce (dataset IoU per class from summed intersections and unions, saliency
  max over thresholds of the mean per-image IoU, normals summed angles over summed valid pixels, depth rmse the
  square root of the summed squared errors over the summed valid pixels), Δm from the protocol's tasks, and the
  interval is the 2.5 and 97.5 percentiles (numpy's linear rule). It measures the uncertainty
  from the choice of validation images only, not from training noise: the table says which interval a row has;
- one seed and no per-image statistics: no interval.

The table prints ``value ± half-width`` with half-width = (upper − lower) / 2 (the percentile interval need not
be symmetric; the detail view gives both ends).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.protocol import Protocol, delta_m, get_reference, table_value
from benchmark.results import ResultError, per_image_path
from leaderboard.validate import read_json

PER_IMAGE_FORMAT = "mtpeft-per-image"  # benchmark.metrics.PER_IMAGE_FORMAT (not imported: torch-free here)
PER_IMAGE_VERSION = 1
MAX_PER_IMAGE_BYTES = 256 * 2**20  # decompressed; 1449 images take about 1 MB
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LEVEL = 0.95
# The per-image statistics reduced as the meters reduce them give the stored metrics up to float64 rounding
# of a few operations (same integer sums, one division per class, fsum of per-image values): 1e-12 relative.
RECOMPUTE_REL_TOL = 1e-12
DELTA_M = "delta_m"
# depth statistics: the squared-error sum each depth metric is the pooled root mean of
DEPTH_SUMS = {"rmse": "sum_sq_err", "log_rmse": "sum_sq_log_err"}


@dataclass(frozen=True)
class PerImage:
    """One run's per-image statistics (arrays over the N validation images)."""

    path: Path
    n_images: int
    images_sha256: str
    tasks: dict[str, dict[str, np.ndarray]]


@dataclass(frozen=True)
class Interval:
    lower: float
    upper: float
    method: str  # "t over 3 seeds" / "bootstrap over 8 images (2000 resamples)"

    @property
    def half_width(self) -> float:
        return (self.upper - self.lower) / 2


# --------------------------------------------------------------------------- reading


def _array(v: Any, source: str, field: str, dtype: type, ndim: int) -> np.ndarray:
    try:
        a = np.asarray(v, dtype=object)
        ok = a.ndim == ndim and all(isinstance(x, dtype) and not isinstance(x, bool) for x in a.ravel())
        if dtype is float:
            ok = a.ndim == ndim and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in a.ravel()
            )
    except (ValueError, TypeError):
        ok = False
    if ok:
        try:
            return np.asarray(v, dtype=np.int64 if dtype is int else np.float64).reshape(a.shape)
        except OverflowError:
            pass
    kind = "integers (below 2**63)" if dtype is int else "finite numbers"
    raise ResultError(f"{source}: field {field!r}: expected a {ndim}-D array of {kind}")


def load_per_image(result_path: Path, data: Mapping[str, Any], protocol: Protocol) -> PerImage | None:
    """The per-image statistics beside ``result_path`` (None when there are none); raises ``ResultError`` when
    the file is not of this run, is inconsistent, or does not reduce to the metrics the result states."""
    path = per_image_path(result_path)
    if not path.exists():
        return None
    src = str(path)
    doc = read_json(path, MAX_PER_IMAGE_BYTES, "per-image statistics")
    if not isinstance(doc, dict) or doc.get("format") != PER_IMAGE_FORMAT or doc.get("version") != PER_IMAGE_VERSION:
        raise ResultError(f"{src}: expected per-image statistics ({PER_IMAGE_FORMAT} version {PER_IMAGE_VERSION})")
    if doc.get("run_id") != data["run_id"]:
        raise ResultError(f"{src}: field 'run_id': {doc.get('run_id')!r} is not the result's {data['run_id']!r}")
    n = doc.get("n_images")
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ResultError(f"{src}: field 'n_images': expected an integer >= 1")
    digest = doc.get("images_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ResultError(f"{src}: field 'images_sha256': expected 64 hexadecimal digits")
    raw = doc.get("tasks")
    if not isinstance(raw, dict):
        raise ResultError(f"{src}: field 'tasks': expected an object task -> statistics")
    tasks: dict[str, dict[str, np.ndarray]] = {}
    for t in protocol.tasks:
        s = raw.get(t.name)
        if not isinstance(s, dict):
            raise ResultError(f"{src}: field 'tasks.{t.name}': missing")
        f = f"tasks.{t.name}"
        if s.get("kind") == "segmentation":
            inter = _array(s.get("intersect"), src, f"{f}.intersect", int, 2)
            union = _array(s.get("union"), src, f"{f}.union", int, 2)
            if inter.shape != union.shape or inter.shape != (n, t.out_channels):
                raise ResultError(f"{src}: field {f!r}: expected {n} x {t.out_channels} intersections and unions")
            if (inter < 0).any() or (inter > union).any():
                raise ResultError(f"{src}: field {f!r}: expected 0 <= intersection <= union")
            tasks[t.name] = {"intersect": inter, "union": union}
        elif s.get("kind") == "saliency":
            counts = _array(s.get("counts"), src, f"{f}.counts", int, 3)
            if counts.shape[0] != n or counts.shape[1] < 1 or counts.shape[2] != 3 or (counts < 0).any():
                raise ResultError(f"{src}: field {f!r}: expected {n} x thresholds x (tp, fp, fn) counts >= 0")
            tasks[t.name] = {"counts": counts}
        elif s.get("kind") == "normals":
            cnt = _array(s.get("n"), src, f"{f}.n", int, 1)
            sums = _array(s.get("sum_deg"), src, f"{f}.sum_deg", float, 1)
            if cnt.shape != (n,) or sums.shape != (n,) or (cnt < 0).any() or (sums < 0).any():
                raise ResultError(f"{src}: field {f!r}: expected {n} valid-pixel counts and angle sums >= 0")
            if (sums > 180.0 * cnt).any() or cnt.sum() == 0:
                raise ResultError(f"{src}: field {f!r}: angle sums above 180° per pixel, or no valid pixel")
            tasks[t.name] = {"n": cnt, "sum_deg": sums}
        elif s.get("kind") == "depth":
            # pooled over pixels: rmse = sqrt(sum sum_sq_err / sum n), log_rmse alike (benchmark.metrics.DepthMeter)
            cnt = _array(s.get("n"), src, f"{f}.n", int, 1)
            sq = {k: _array(s.get(k), src, f"{f}.{k}", float, 1) for k in DEPTH_SUMS.values()}
            if cnt.shape != (n,) or any(a.shape != (n,) or (a < 0).any() for a in sq.values()) or (cnt < 0).any():
                raise ResultError(f"{src}: field {f!r}: expected {n} valid-pixel counts and squared-error sums >= 0")
            if cnt.sum() == 0 or any((a[cnt == 0] != 0).any() for a in sq.values()):
                raise ResultError(f"{src}: field {f!r}: no valid pixel, or an error sum on an image without one")
            if t.metric not in DEPTH_SUMS:
                raise ResultError(
                    f"{src}: field {f!r}: depth statistics reduce to {sorted(DEPTH_SUMS)}, not {t.metric}"
                )
            tasks[t.name] = {"n": cnt, "sum_sq": sq[DEPTH_SUMS[t.metric]]}
        else:
            raise ResultError(f"{src}: field '{f}.kind': expected segmentation, saliency, normals or depth")
    pi = PerImage(path, n, digest, tasks)
    for t in protocol.tasks:
        stated = float(data["metrics"][t.name][t.metric])
        got = exact_metric(pi, t.name)
        if not math.isclose(got, stated, rel_tol=RECOMPUTE_REL_TOL, abs_tol=RECOMPUTE_REL_TOL):
            raise ResultError(
                f"{src}: tasks.{t.name} reduce to {t.metric} {got!r}, the result states {stated!r}: "
                "the statistics are not this run's"
            )
    return pi


def _sal_iou(counts: np.ndarray) -> np.ndarray:
    """Per-image IoU at each threshold, as the meter: 1 where prediction and ground truth are both empty."""
    c = counts.astype(np.float64)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    empty = counts.sum(-1) == 0
    return np.where(empty, 1.0, tp / np.maximum(tp + fp + fn, 1.0))


def exact_metric(pi: PerImage, task: str) -> float:
    """A task's primary metric in result units from all images, with the meters' own arithmetic."""
    s = pi.tasks[task]
    if "intersect" in s:
        inter, union = s["intersect"].sum(0).tolist(), s["union"].sum(0).tolist()
        iou = [int(i) / max(float(u), 1e-8) for i, u in zip(inter, union, strict=True)]
        return math.fsum(iou) / len(iou)
    if "counts" in s:
        iou = _sal_iou(s["counts"])
        return max(math.fsum(iou[:, j].tolist()) / iou.shape[0] for j in range(iou.shape[1]))
    if "sum_sq" in s:
        return math.sqrt(math.fsum(s["sum_sq"].tolist()) / int(s["n"].sum()))
    return math.fsum(s["sum_deg"].tolist()) / int(s["n"].sum())


# --------------------------------------------------------------------------- bootstrap


def resample_weights(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """How often each image is drawn in each resample: [resamples, n], every row sums to n."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    w = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(w, (np.repeat(np.arange(resamples), n), idx.ravel()), 1.0)
    return w


def weighted_values(
    pi: PerImage, protocol: Protocol, w: np.ndarray, reference: str | None = None
) -> dict[str, np.ndarray]:
    """Per-task primary metric (table units) and Δm (against ``reference``, default the protocol's) for each row of
    image weights ``w`` [B, N]."""
    out: dict[str, np.ndarray] = {}
    for t in protocol.tasks:
        s = pi.tasks[t.name]
        if "intersect" in s:
            inter, union = w @ s["intersect"].astype(np.float64), w @ s["union"].astype(np.float64)
            v = (inter / np.maximum(union, 1e-8)).mean(1)
        elif "counts" in s:
            v = ((w @ _sal_iou(s["counts"])) / w.sum(1, keepdims=True)).max(1)
        elif "sum_sq" in s:
            v = np.sqrt((w @ s["sum_sq"]) / (w @ s["n"].astype(np.float64)))
        else:
            v = (w @ s["sum_deg"]) / (w @ s["n"].astype(np.float64))
        out[t.name] = table_value(t, 1.0) * v
    ref = get_reference(reference or protocol.reference).values
    out[DELTA_M] = np.array(
        [delta_m({t: float(out[t][b]) for t in protocol.task_names}, ref, protocol.tasks) for b in range(len(w))]
    )
    return out


def _percentile_interval(values: np.ndarray, method: str) -> Interval:
    a = (1 - LEVEL) / 2
    lo, hi = np.percentile(values, [100 * a, 100 * (1 - a)])
    return Interval(float(lo), float(hi), method)


def bootstrap_intervals(pi: PerImage, protocol: Protocol, reference: str | None = None) -> dict[str, Interval]:
    w = resample_weights(pi.n_images)
    vals = weighted_values(pi, protocol, w, reference)
    method = f"bootstrap over {pi.n_images} validation images ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})"
    return {k: _percentile_interval(v, method) for k, v in vals.items()}


# --------------------------------------------------------------------------- seeds


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    from scipy.stats import t as student_t

    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    h = float(student_t.ppf(1 - (1 - LEVEL) / 2, n - 1)) * sd / math.sqrt(n)
    return mean - h, mean + h


def run_values(data: Mapping[str, Any], protocol: Protocol, reference: str | None = None) -> dict[str, float]:
    """One run's per-task primary metrics in table units, and its Δm against ``reference`` (default: the
    protocol's)."""
    vals = {t.name: table_value(t, float(data["metrics"][t.name][t.metric])) for t in protocol.tasks}
    vals[DELTA_M] = delta_m(vals, get_reference(reference or protocol.reference).values, protocol.tasks)
    return vals


def group_intervals(runs: Sequence[Any], protocol: Protocol, reference: str | None = None) -> dict[str, Interval]:
    """The 95% interval of every per-task value and of Δm (against ``reference``, default the protocol's) for one
    reproduced row (empty: none available)."""
    if len(runs) >= 2:
        per_run = [run_values(r.data, protocol, reference) for r in runs]
        method = f"t-interval over {len(runs)} seeds"
        return {k: Interval(*t_interval([v[k] for v in per_run]), method) for k in per_run[0]}
    if len(runs) == 1 and getattr(runs[0], "per_image", None) is not None:
        return bootstrap_intervals(runs[0].per_image, protocol, reference)
    return {}


NO_INTERVAL = "no interval: one seed and no per-image statistics"
