"""Task metrics as pure (stats, reduce) meters, the official MTLoRA definitions (docs/protocol.md section 4).

Every meter turns one batch of network outputs into small CPU statistics, ``stats(pred_logits, target)``,
and a list of those statistics into numbers, ``reduce(list_of_stats)``. Statistics are integer counts or
per-image values that concatenate, so one pass, any batching and any split over processes give the same
numbers (float sums are added with ``math.fsum``, which is exactly rounded and so order-free).

The meters start from the raw network outputs and apply the official post-processing themselves (the functions
a task kind's ``postprocess`` points at, ``benchmark.tasks``): argmax for segmentation, ``255 * sigmoid`` for
saliency, ``(unit + 1) * 255 / 2`` (channels last) for normals, the identity for depth, in float32 with the same
operations as the official code, so the values the official meters saw are reproduced bit for bit. Which meter a
task gets is its kind's choice (:func:`build_meters`); no meter knows a task by name.

- segmentation, semseg / parts (:class:`SegmentationMeter`): dataset-level IoU per class from exact int64
  intersection/union counts (mmsegmentation's ``intersect_and_union``, or a pure-torch twin), then the
  official reduction: IoU = I / max(U, 1e-8) and the mean over ALL classes (an absent class counts 0;
  mmseg's own ``nanmean`` would skip it). A label outside [0, C) other than 255 (NYUD's 254) is a valid pixel
  of no class: a false positive of whatever class is predicted there, as in the official meter.
- saliency (:class:`SaliencyMeter`): "mIoU" = max over 15 thresholds of the per-image IoU averaged over
  images, ``maxF`` (beta^2 = 1 on mean precision / recall) and the official ``Beta maxF``.
- normals (:class:`NormalsMeter`): mean angular error in degrees ("rmse" in the papers' tables), median,
  a true RMSE and the percentage of pixels under 11.25 / 22.5 / 30 degrees.
- depth (:class:`DepthMeter`): rmse and log_rmse pooled over all valid pixels of the set, the prediction
  clamped to >= 1e-9 (the official online meter).

Δm helpers (:func:`primary_scores`, :func:`delta_m_terms`, :func:`results_delta_m`) build on
:func:`benchmark.protocol.delta_m`; ``benchmark.parity_metrics`` compares all of it with the official
metrics fixtures (``python -m benchmark.parity``).

mmsegmentation is imported here only, lazily, so a broken mmcv pin never blocks another module.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.protocol import Protocol as BenchProtocol
from benchmark.protocol import TaskSpec, delta_m, get_reference, table_value

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
_HISTC_EXACT = 2**24  # float32 counts are exact up to 2^24: the most pixels one histc call may see

# ----------------------------------------------------------------------------------------------
# Official post-processing (evaluation/evaluate_utils.py get_output), on NCHW network outputs, in float32 math.
# Each task kind (benchmark.tasks) points at its function; depth's is the identity.


def argmax_labels(logits: Tensor) -> Tensor:
    """Segmentation (semseg, parts): int64 [B,H,W], the argmax over the class channels."""
    return logits.float().max(dim=1).indices


def saliency_255(logits: Tensor) -> Tensor:
    """Saliency: float32 [B,H,W] = 255 * sigmoid, on a 0..255 scale."""
    # written as 255 / (1 + exp(-x)), the official expression, not 255 * torch.sigmoid(x): the two differ in the
    # last float32 bit, and that can flip a threshold comparison
    return (255 / (1 + torch.exp(-logits.float())))[:, 0]


def normals_255(logits: Tensor) -> Tensor:
    """Normals: float32 [B,H,W,3] (channels last) = (unit vector + 1) * 255 / 2."""
    return (F.normalize(logits.float().permute(0, 2, 3, 1), p=2, dim=3) + 1.0) * 255 / 2.0


def _check_shapes(name: str, pred: Tensor, target: Tensor, pred_channels: int, target_channels: int) -> None:
    if pred.dim() != 4 or pred.shape[1] != pred_channels:
        raise ValueError(f"{name}: pred_logits must be [B,{pred_channels},H,W], got {list(pred.shape)}")
    if target.dim() != 4 or target.shape[1] != target_channels:
        raise ValueError(f"{name}: target must be [B,{target_channels},H,W], got {list(target.shape)}")
    if pred.shape[0] != target.shape[0] or pred.shape[2:] != target.shape[2:]:
        raise ValueError(f"{name}: pred_logits {list(pred.shape)} and target {list(target.shape)} differ in B/H/W")


def _require_stats(name: str, stats: Sequence[Mapping[str, Tensor]]) -> None:
    if len(stats) == 0:
        raise ValueError(f"{name}: reduce() got no statistics (was the validation set empty?)")


def _fsum(t: Tensor) -> float:
    """Exactly rounded sum of a float tensor: independent of order, batching and sharding."""
    return math.fsum(t.double().flatten().tolist())


# ----------------------------------------------------------------------------------------------
# Intersection / union counts: mmsegmentation, with a pure-torch twin as fallback.


@functools.cache
def _mmseg_intersect_and_union() -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] | None:
    """mmseg's ``IoUMetric.intersect_and_union``, or None (with a warning) if mmseg cannot be imported.

    mmseg 1.2.2's ``__init__`` asserts ``mmcv < 2.2.0`` but only mmcv-lite 2.2.0 exists for this torch; the
    IoU code does not touch mmcv, so the version is presented as 2.1.0 for the duration of the import
    and restored right after, whatever happens.
    """
    try:
        import mmcv

        real = mmcv.__version__
        mmcv.__version__ = "2.1.0"
        try:
            from mmseg.evaluation.metrics.iou_metric import IoUMetric
        finally:
            mmcv.__version__ = real
        return IoUMetric.intersect_and_union
    except Exception as e:  # any import failure: fall back, never block evaluation
        log.warning("mmsegmentation unavailable (%s: %s); using the pure-torch IoU counts", type(e).__name__, e)
        return None


def torch_intersect_and_union(
    pred_label: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pure-torch twin of mmseg's ``intersect_and_union``: int64 (intersect, union, pred area, label area).

    Pixels whose label is ``ignore_index`` are dropped. Like mmseg's ``histc``, a label outside
    [0, num_classes) is still a valid pixel: it counts in the predicted class's area but in no label area.
    """
    valid = label != ignore_index
    pred, lab = pred_label[valid], label[valid]
    hit = pred[pred == lab]

    def count(x: Tensor) -> Tensor:
        x = x[(x >= 0) & (x <= num_classes - 1)].long()
        return torch.bincount(x, minlength=num_classes).cpu()

    area_intersect, area_pred, area_label = count(hit), count(pred), count(lab)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def intersect_and_union(
    pred_label: Tensor, label: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact int64 (intersect, union, pred area, label area) per class over all pixels given.

    ``backend``: "mmseg" (mmseg's function; its float32 ``histc`` counts are exact because it is fed at most
    2^24 pixels per call), "torch" (:func:`torch_intersect_and_union`) or "auto" (mmseg, else torch).
    """
    if backend not in ("auto", "mmseg", "torch"):
        raise ValueError(f"backend must be 'auto', 'mmseg' or 'torch', got {backend!r}")
    fn = None if backend == "torch" else _mmseg_intersect_and_union()
    if fn is None:
        if backend == "mmseg":
            raise RuntimeError("backend='mmseg' requested but mmsegmentation cannot be imported (see the warning)")
        return torch_intersect_and_union(pred_label, label, num_classes, ignore_index)
    p, lab = pred_label.reshape(-1), label.reshape(-1)
    total = torch.zeros(4, num_classes, dtype=torch.int64)
    for start in range(0, p.numel(), _HISTC_EXACT):  # chunks keep every float32 count exact
        parts = fn(p[start : start + _HISTC_EXACT], lab[start : start + _HISTC_EXACT], num_classes, ignore_index)
        total += torch.stack([t.to(torch.int64) for t in parts])
    return total[0], total[1], total[2], total[3]


# ----------------------------------------------------------------------------------------------
# Meters


@runtime_checkable
class Meter(Protocol):
    """A pure metric: per-batch statistics that concatenate, and a reduction to numbers."""

    task: str

    def stats(self, pred_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Small CPU statistics of one batch (sums or per-image rows; lists of them concatenate)."""
        ...

    def reduce(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
        """Unrounded results over all statistics (IoU-type values as fractions, normals in degrees)."""
        ...

    def details(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
        """Per-class / per-threshold / per-image tables behind ``reduce`` (lists of floats)."""
        ...


class SegmentationMeter:
    """Dataset-level mIoU over ``num_classes`` classes, ignoring ``ignore_index`` (official eval_semseg.py).

    IoU_c = I_c / max(U_c, 1e-8) from exact int64 counts; mIoU is the mean over all classes, so a class
    absent from both labels and predictions counts as 0 (the official reduction, not mmseg's nanmean).
    """

    def __init__(self, task: str, num_classes: int, ignore_index: int = IGNORE_INDEX, backend: str = "auto") -> None:
        self.task, self.num_classes, self.ignore_index, self.backend = task, num_classes, ignore_index, backend

    @torch.no_grad()
    def stats(self, pred_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        _check_shapes(self.task, pred_logits, target, self.num_classes, 1)
        pred = argmax_labels(pred_logits)
        i, u, p, lab = intersect_and_union(pred, target[:, 0], self.num_classes, self.ignore_index, self.backend)
        return {"area_intersect": i, "area_union": u, "area_pred": p, "area_label": lab}

    def _totals(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        _require_stats(self.task, stats)
        return {k: sum(s[k].to(torch.int64) for s in stats) for k in ("area_intersect", "area_union", "area_pred")}

    def _iou(self, stats: Sequence[Mapping[str, Tensor]]) -> list[float]:
        tot = self._totals(stats)
        inter, union = tot["area_intersect"].tolist(), tot["area_union"].tolist()
        return [int(i) / max(float(u), 1e-8) for i, u in zip(inter, union, strict=True)]

    def reduce(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
        iou = self._iou(stats)
        return {"mIoU": math.fsum(iou) / len(iou)}

    def details(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
        """Per-class IoU and the official raw counts: tp = I, fp = predicted - I, fn = U - predicted."""
        tot = self._totals(stats)
        tp, union, pred = tot["area_intersect"], tot["area_union"], tot["area_pred"]
        return {
            "per_class_IoU": self._iou(stats),
            "tp": tp.tolist(),
            "fp": (pred - tp).tolist(),
            "fn": (union - pred).tolist(),
        }


SAL_THRESHOLDS: tuple[float, ...] = tuple(np.linspace(0.2, 0.9, 15).tolist())  # official mask_thres


class SaliencyMeter:
    """Saliency: max-over-threshold mIoU, maxF and Beta maxF (official eval_sal*.py, jaccard.py).

    Per image i and threshold t, the binary prediction is ``prob > t`` with prob = (255*sigmoid)/255 in
    float32, the ground truth is ``gt != 0``:

    - IoU_it = TP / (TP+FP+FN), and 1 when ground truth and prediction are both empty;
    - P_it = TP / (TP+FP+1e-12), R_it = TP / (TP+FN+1e-12);
    - "mIoU" = max_t mean_i IoU_it; "maxF" = max_t 2 mP_t mR_t / (mP_t + mR_t + 1e-12) with mP_t, mR_t the
      means over images.

    "Beta maxF" reproduces the official beta meter: dataset-level counts over pixels with gt != 255 at the
    19 thresholds ``torch.arange(0.05, 1, 0.05)`` applied to ``sigmoid(prob)`` (a second sigmoid, so only
    thresholds 0.5..0.7 can matter), F = (1+b2) P R / (b2 P + R) with b2 = 0.3 in float32, NaN -> 0, max
    over thresholds. Counts are kept exactly in int64 here; the official meter sums them in float32,
    which stops being exact beyond 2^24 pixels per counter (a real 448x448 val set has more), so on full
    data its Beta maxF can differ from this one in the last float32 digits.

    Unlike the official no-beta meter, which squeezes a batch of one image into the wrong shape, this
    meter gives the same numbers for any batching, batches of one included.
    """

    def __init__(self, task: str, thresholds: Sequence[float] = SAL_THRESHOLDS, beta_squared: float = 0.3) -> None:
        self.task = task
        self.thresholds = tuple(float(t) for t in thresholds)
        self.beta_squared = beta_squared
        self.beta_thresholds = torch.arange(0.05, 1, 0.05)  # float32, exactly as the official meter builds it

    @torch.no_grad()
    def stats(self, pred_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        _check_shapes(self.task, pred_logits, target, 1, 1)
        prob = saliency_255(pred_logits) / 255.0  # [B,H,W] float32, as the official meter
        gt = target[:, 0]
        b = prob.shape[0]
        gt_pos = (gt != 0).reshape(b, -1)
        per_image = []
        for t in self.thresholds:
            pos = (prob > t).reshape(b, -1)  # float32 comparison, like the official tensor > numpy scalar
            tp = (pos & gt_pos).sum(1)
            per_image.append(torch.stack([tp, (pos & ~gt_pos).sum(1), (~pos & gt_pos).sum(1)], 1))
        # beta meter: double sigmoid, pixels with gt == 255 dropped, target taken as an integer
        valid = gt != IGNORE_INDEX
        sig = torch.sigmoid(prob)[valid]
        tgt = gt.long()[valid]
        beta = []
        for t in self.beta_thresholds.to(sig.device):
            f = (sig >= t).long()
            beta.append(torch.stack([(f * tgt).sum(), f.sum(), tgt.sum()]))
        return {
            "counts": torch.stack(per_image, 1).to(torch.int64).cpu(),  # [B, T, (tp, fp, fn)]
            "beta_counts": torch.stack(beta).to(torch.int64).cpu(),  # [T_beta, (tp, pred pos, gt pos)]
        }

    def _tables(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
        _require_stats(self.task, stats)
        c = torch.cat([s["counts"] for s in stats]).to(torch.int64)  # [N, T, 3]
        tp, fp, fn = (c[..., k].double() for k in range(3))
        iou = torch.where(c.sum(-1) == 0, torch.ones_like(tp), tp / (tp + fp + fn).clamp_min(1))
        prec, rec = tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12)
        n = c.shape[0]
        m_iou = [math.fsum(iou[:, j].tolist()) / n for j in range(c.shape[1])]
        m_p = [math.fsum(prec[:, j].tolist()) / n for j in range(c.shape[1])]
        m_r = [math.fsum(rec[:, j].tolist()) / n for j in range(c.shape[1])]
        f = [2 * p * r / (p + r + 1e-12) for p, r in zip(m_p, m_r, strict=True)]
        return {
            "thresholds": list(self.thresholds),
            "per_image_per_threshold_IoU": iou.tolist(),
            "mean_IoU_per_threshold": m_iou,
            "mean_precision_per_threshold": m_p,
            "mean_recall_per_threshold": m_r,
            "F_per_threshold": f,
        }

    def _beta_max_f(self, stats: Sequence[Mapping[str, Tensor]]) -> float:
        counts = sum(s["beta_counts"].to(torch.int64) for s in stats)
        tp, pp, ap = (counts[:, k].float() for k in range(3))  # float32 from here on, as the official meter
        precision, recall = tp / pp, tp / ap
        fscore = (1 + self.beta_squared) * precision * recall / (self.beta_squared * precision + recall)
        fscore[fscore != fscore] = 0
        return fscore.max().item()

    def reduce(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
        tab = self._tables(stats)
        return {
            "mIoU": max(tab["mean_IoU_per_threshold"]),
            "maxF": max(tab["F_per_threshold"]),
            "Beta maxF": self._beta_max_f(stats),
        }

    def details(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
        return self._tables(stats)


class NormalsMeter:
    """Surface normals: angular errors in degrees over valid pixels (gt != 255), official eval_normals_v1/v2.

    The prediction takes the official round trip, unit vector -> (u+1)*255/2 -> 2x/255-1 in float32 (not
    re-normalised, like the official v1 meter), and the angle is acos(clamp(<pred, gt>, -1, 1)) in float64.

    - ``mean``: the mean angle, the column the papers call "rmse" (the primary metric);
    - ``rmse``: equal to ``mean``, kept only because the official meter reports it under that name;
    - ``rmse_true``: the real root-mean-square angle (the official meter has none);
    - ``median``: from a fixed histogram of ``bin_deg``-wide bins over [0, 180] (summable statistics); it is
      the midpoint of the bin(s) holding the middle value(s), so it is within ``bin_deg / 2`` of the exact
      median: 0.025 degrees by default. The default bin (0.05 degrees, 3600 int32 counts = 14 KiB) is sized
      for a runner that keeps one statistics entry per image (1449 val images -> 21 MB); 0.01 would be
      five times larger;
    - ``11.25``, ``22.5``, ``30``: percent of valid pixels with an angle below each bound;
    - ``mean_v2`` / ``rmse_v2``: the official meter's second formula, 2*atan2(|p-g|, |p+g|) on re-normalised
      vectors, over pixels valid in all three channels (``rmse_v2`` equals ``mean_v2``, as there).
    """

    bounds: tuple[float, ...] = (11.25, 22.5, 30.0)

    def __init__(self, task: str, bin_deg: float = 0.05) -> None:
        self.task = task
        self.bin_deg = bin_deg
        self.num_bins = int(round(180.0 / bin_deg))

    @torch.no_grad()
    def stats(self, pred_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        _check_shapes(self.task, pred_logits, target, 3, 3)
        pred = 2 * normals_255(pred_logits).permute(0, 3, 1, 2) / 255 - 1  # float32 [B,3,H,W]
        gt = target.double()
        # v1: valid where channel 0 is not 255; the float32 prediction is promoted to float64 by the gt
        valid = gt[:, 0] != IGNORE_INDEX
        deg = (180 / math.pi) * torch.acos(torch.clamp(torch.sum(pred * gt, 1), min=-1, max=1))
        deg = torch.where(valid, deg, torch.zeros_like(deg))
        # v2: valid where no channel is 255; both vectors re-normalised (zero vectors stay zero)
        valid2 = (gt != IGNORE_INDEX).all(dim=1)
        p2, g2 = _normalize_or_zero(pred), _normalize_or_zero(gt)
        deg2 = torch.rad2deg(2 * torch.atan2(_norm(p2 - g2, 1), _norm(p2 + g2, 1)))
        deg2 = torch.where(valid2, deg2, torch.zeros_like(deg2))
        below = torch.stack([((deg < b) & valid).sum((1, 2)) for b in self.bounds], 1)
        bins = (deg[valid] / self.bin_deg).floor().long().clamp_(0, self.num_bins - 1)
        return {
            "n": valid.sum((1, 2)).to(torch.int64).cpu(),  # per image
            "sum_deg": deg.sum((1, 2)).cpu(),  # per image, float64
            "sum_sq_deg": (deg * deg).sum((1, 2)).cpu(),
            "n_below": below.to(torch.int64).cpu(),  # per image x bound
            "n_v2": valid2.sum((1, 2)).to(torch.int64).cpu(),
            "sum_deg_v2": deg2.sum((1, 2)).cpu(),
            "hist": torch.bincount(bins, minlength=self.num_bins).to(torch.int32).cpu(),  # per call, summed
        }

    def _median(self, hist: Tensor, n: int) -> float:
        cum = torch.cumsum(hist, 0)
        # 0-based ranks of the middle value(s), as numpy's median averages the two for even n
        lo, hi = (
            torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype), right=True).item()
            for k in ((n - 1) // 2, n // 2)
        )
        return (lo + hi + 1) / 2 * self.bin_deg

    def reduce(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
        _require_stats(self.task, stats)
        cat = {k: torch.cat([s[k] for s in stats]) for k in stats[0] if k != "hist"}  # per-image rows
        n, n2 = int(cat["n"].sum()), int(cat["n_v2"].sum())
        if n == 0 or n2 == 0:
            raise ValueError("normals: no valid pixels (every target pixel is 255); the angular errors are undefined")
        mean = _fsum(cat["sum_deg"]) / n
        mean_v2 = _fsum(cat["sum_deg_v2"]) / n2
        below = cat["n_below"].sum(0).tolist()
        hist = sum(s["hist"].to(torch.int64) for s in stats)
        out = {"mean": mean, "rmse": mean, "median": self._median(hist, n)}
        out["rmse_true"] = math.sqrt(_fsum(cat["sum_sq_deg"]) / n)
        out.update({_bound_name(b): c * 100 / n for b, c in zip(self.bounds, below, strict=True)})
        out.update({"mean_v2": mean_v2, "rmse_v2": mean_v2})
        return out

    def details(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
        _require_stats(self.task, stats)
        n = int(sum(int(s["n"].sum()) for s in stats))
        return {"num_valid_pixels": n, "n_valid": n, "median_bin_deg": self.bin_deg}


def _bound_name(b: float) -> str:
    return f"{b:g}"  # 11.25, 22.5, 30: the official key names


def _norm(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    # the Euclidean norm over a short strided axis; torch.norm's reduction kernel is ~30x slower on the CPU for
    # [B, 3, H, W] (the evaluation's hot spot) and differs only by rounding (1 ulp)
    return x.square().sum(dim, keepdim=keepdim).sqrt()


def _normalize_or_zero(x: Tensor) -> Tensor:
    norm = _norm(x, 1, keepdim=True)
    zero = norm == 0
    out = x.div(norm.masked_fill(zero, 1))
    return out.masked_fill(zero.expand_as(out), 0)


class DepthMeter:
    """Depth (official ``DepthMeter``, the online meter of the training script): rmse and log_rmse in metres.

    Valid pixels are those whose label is not 255 (missing depth). The prediction is clamped to >= 1e-9 in
    float32 for both metrics (a negative prediction counts as ~0 m in ``rmse`` and as ln(1e-9) in
    ``log_rmse``); ``log_rmse`` uses the natural log, ln(pred) in float32 and ln(gt) in float64. Pixels are
    pooled over the whole set, not averaged per image: rmse = sqrt(sum (gt - pred)^2 / N) and log_rmse =
    sqrt(sum (ln gt - ln pred)^2 / N) over all N valid pixels. An image without a valid pixel adds nothing.

    The statistics are per image (valid count, both sums of squares in float64), so any batching or sharding
    reduces to the same numbers (the sums are added with ``math.fsum``).
    """

    per_image = ("n", "sum_sq_err", "sum_sq_log_err")

    def __init__(self, task: str) -> None:
        self.task = task

    @torch.no_grad()
    def stats(self, pred_logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        _check_shapes(self.task, pred_logits, target, 1, 1)
        pred = pred_logits.float().clamp(min=1e-9)  # float32, as the official meter
        gt = target.double()
        valid = gt != IGNORE_INDEX
        zero = torch.zeros((), dtype=torch.float64, device=gt.device)
        err = torch.where(valid, gt - pred, zero)  # float64 (the float32 prediction is promoted by the gt)
        # ln of a missing label (255) is finite, but masked anyway so that no NaN / inf can enter the sums
        log_err = torch.where(valid, torch.log(torch.where(valid, gt, 1.0)) - torch.log(pred), zero)
        return {
            "n": valid.sum((1, 2, 3)).to(torch.int64).cpu(),  # per image
            "sum_sq_err": (err * err).sum((1, 2, 3)).cpu(),  # per image, float64
            "sum_sq_log_err": (log_err * log_err).sum((1, 2, 3)).cpu(),
        }

    def reduce(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
        _require_stats(self.task, stats)
        n = int(sum(int(s["n"].sum()) for s in stats))
        if n == 0:
            raise ValueError(f"{self.task}: no valid pixels (every target pixel is 255); rmse is undefined")
        sq = _fsum(torch.cat([s["sum_sq_err"] for s in stats]))
        sq_log = _fsum(torch.cat([s["sum_sq_log_err"] for s in stats]))
        return {"rmse": math.sqrt(sq / n), "log_rmse": math.sqrt(sq_log / n)}

    def details(self, stats: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
        _require_stats(self.task, stats)
        return {
            "n_valid": int(sum(int(s["n"].sum()) for s in stats)),
            "sum_sq_err": _fsum(torch.cat([s["sum_sq_err"] for s in stats])),
            "sum_sq_log_err": _fsum(torch.cat([s["sum_sq_log_err"] for s in stats])),
        }


def build_meters(tasks: Sequence[TaskSpec]) -> dict[str, Meter]:
    """One meter per task, in the order given, each from its task kind (``benchmark.tasks``)."""
    from benchmark.tasks import kind_of

    meters: dict[str, Meter] = {}
    for spec in tasks:
        if not isinstance(spec, TaskSpec):
            raise TypeError(f"build_meters takes the protocol's TaskSpecs, got {spec!r}")
        meters[spec.name] = kind_of(spec).meter(spec)
    return meters


# ----------------------------------------------------------------------------------------------
# Δm


def _specs(tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    bad = [t for t in tasks if not isinstance(t, TaskSpec)]
    if bad:
        raise TypeError(f"expected the protocol's TaskSpecs, got {bad[0]!r}")
    return list(tasks)


def primary_scores(results: Mapping[str, Mapping[str, float]], tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """Each task's primary metric (``TaskSpec.metric``) in table units: mIoU x100, normals in degrees."""
    scores = {}
    for task in _specs(tasks):
        if task.name not in results:
            raise KeyError(f"no results for task {task.name!r}; have: {sorted(results)}")
        if task.metric not in results[task.name]:
            raise KeyError(f"results for {task.name!r} lack its primary metric {task.metric!r}")
        scores[task.name] = table_value(task, float(results[task.name][task.metric]))
    return scores


def delta_m_terms(
    scores: Mapping[str, float], reference: Mapping[str, float], tasks: Sequence[TaskSpec]
) -> dict[str, float]:
    """Per-task signed relative change in percent (negated where lower is better); Δm is their mean."""
    return {t.name: delta_m(scores, reference, [t]) for t in _specs(tasks)}


def results_delta_m(
    results: Mapping[str, Mapping[str, float]],
    protocol: BenchProtocol,
    reference: str | Mapping[str, float] | None = None,
) -> float:
    """Δm (percent) of raw meter results over the protocol's tasks, against a named reference or values.

    ``reference`` defaults to ``protocol.reference`` in ``benchmark.protocol.REFERENCES``; a task without a
    reference value is an error.
    """
    if reference is None:
        reference = protocol.reference
    ref = get_reference(reference).values if isinstance(reference, str) else reference
    return delta_m(primary_scores(results, protocol.tasks), ref, protocol.tasks)


# ----------------------------------------------------------------------------------------------
# Per-image statistics for confidence intervals (read by leaderboard/stats.py, torch-free).

PER_IMAGE_FORMAT = "mtpeft-per-image"
PER_IMAGE_VERSION = 1


def per_image_statistics(meters: Mapping[str, Meter], results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-image statistics each meter reduces, as plain lists (one entry per validation image, in order).

    ``results`` is the engine's list of per-image ``{task: stats}``. Stored per task:

    - segmentation: ``intersect`` and ``union``, int pixel counts per image and class (the dataset IoU of a
      class is the sum of intersections over the sum of unions);
    - saliency: ``counts``, int (tp, fp, fn) per image and threshold (the per-image IoU at each threshold);
    - normals: ``n`` (valid pixels) and ``sum_deg`` (sum of angles, float64) per image;
    - depth: ``n`` (valid pixels), ``sum_sq_err`` and ``sum_sq_log_err`` (float64) per image: rmse is
      sqrt(sum of ``sum_sq_err`` / sum of ``n``), pooled over the images.

    Reducing these the way the meters do gives the primary metrics bit for bit; resampling the images gives a
    bootstrap interval (``leaderboard.stats``).
    """
    out: dict[str, Any] = {}
    for t, meter in meters.items():
        stats = [r[t] for r in results]
        if isinstance(meter, SegmentationMeter):
            out[t] = {
                "kind": "segmentation",
                "intersect": [s["area_intersect"].to(torch.int64).tolist() for s in stats],
                "union": [s["area_union"].to(torch.int64).tolist() for s in stats],
            }
        elif isinstance(meter, SaliencyMeter):
            counts = torch.cat([s["counts"] for s in stats]).to(torch.int64) if stats else torch.zeros(0, 0, 3)
            out[t] = {"kind": "saliency", "thresholds": list(meter.thresholds), "counts": counts.tolist()}
        elif isinstance(meter, NormalsMeter):
            cat = {k: torch.cat([s[k] for s in stats]) if stats else torch.zeros(0) for k in ("n", "sum_deg")}
            out[t] = {
                "kind": "normals",
                "n": cat["n"].to(torch.int64).tolist(),
                "sum_deg": cat["sum_deg"].double().tolist(),
            }
        elif isinstance(meter, DepthMeter):
            cat = {k: torch.cat([s[k] for s in stats]) if stats else torch.zeros(0) for k in DepthMeter.per_image}
            out[t] = {
                "kind": "depth",
                "n": cat["n"].to(torch.int64).tolist(),
                "sum_sq_err": cat["sum_sq_err"].double().tolist(),
                "sum_sq_log_err": cat["sum_sq_log_err"].double().tolist(),
            }
    return out


def per_image_blob(meters: Mapping[str, Meter], results: Sequence[Mapping[str, Any]]) -> bytes:
    """``per_image_statistics`` as gzip-compressed JSON (about 0.3 MB for 1449 images: cheap to keep per validation)."""
    text = json.dumps(per_image_statistics(meters, results), separators=(",", ":"), allow_nan=False)
    return gzip.compress(text.encode(), mtime=0)


def per_image_file(run_id: str, image_ids: Sequence[str], blob: bytes) -> bytes:
    """The file written beside result.json: format header, the run it belongs to, the images, then the tasks."""
    doc = {
        "format": PER_IMAGE_FORMAT,
        "version": PER_IMAGE_VERSION,
        "run_id": run_id,
        "n_images": len(image_ids),
        "images_sha256": images_digest(image_ids),
        "tasks": json.loads(gzip.decompress(blob)),
    }
    return gzip.compress(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode(), mtime=0)


def images_digest(image_ids: Sequence[str]) -> str:
    """sha256 of the validation image ids in order: two runs' per-image statistics pair only when it is equal."""
    return hashlib.sha256("\n".join(image_ids).encode()).hexdigest()
