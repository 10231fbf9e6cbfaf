"""The multi-task loss of the protocol (docs/protocol.md 2.5): total = sum_t w_t * L_t, w_t from TaskSpec.loss_weight.

Each task's loss is its task kind's (``benchmark.tasks``), which points at one of these functions (the official
``mtl_loss_schemes.py`` semantics, re-written):

- segmentation (semseg, parts): log-softmax + NLL, ignore label 255, mean over the valid pixels of the batch.
  A batch with no valid pixel gives 0 (with a zero gradient); the official ``NLLLoss`` gives NaN there
  (0/0), which under AMP makes GradScaler skip the whole step. The value differs only in that case. A label
  outside [0, C) other than 255 (NYUD's 254, a PNG value of 255) is refused with a ValueError naming the
  value; the official ``NLLLoss`` fails there with an index error.
- saliency: batch-balanced BCE on logits: label = (y >= 0.5), w = #neg / #pixels over the batch,
  loss = [w * sum_pos BCE + (1 - w) * sum_neg BCE] / numel.
- edge (not in the paper's setting): BCE with a fixed positive weight 0.95, summed, / numel;
- depth (NYUD): L1 over the elements whose label is not 255, mean (0 if none;
  the official mean of an empty selection is NaN);
- normals: L1 between the per-pixel L2-normalised prediction (norm + 1e-12) and the label, over the
  elements whose label is not 255, divided by the number of those elements (0 when there are none,
  as officially: the official divides by max(n_valid, 1e-6)).

Targets are float tensors [B, 1, H, W] (segmentation, saliency, depth) or [B, 3, H, W] (normals), at the
prediction's resolution. The result keeps the official dtype promotion: float64 targets (the official
loader's) make the normals loss, and so the total, float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmark.protocol import TaskSpec

IGNORE_INDEX = 255


def _label_map(target: Tensor) -> Tensor:
    return target[:, 0] if target.dim() == 4 else target


def cross_entropy_ignore(pred: Tensor, target: Tensor) -> Tensor:
    """Pixel-wise cross-entropy, mean over pixels whose label is not 255 (0 if there are none).

    A label outside [0, C) ∪ {255} is a ValueError naming the value (C = the prediction's channels).
    """
    label = _label_map(target).long()
    bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= pred.shape[1]))
    if bad.any():
        value = label[bad][0].item()
        raise ValueError(
            f"segmentation label {value} is outside the classes [0, {pred.shape[1]}) and is not the ignore "
            f"value {IGNORE_INDEX} ({int(bad.sum())} such pixel(s) in this batch)"
        )
    n_valid = (label != IGNORE_INDEX).sum()
    total = F.nll_loss(F.log_softmax(pred, dim=1), label, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n_valid.clamp_min(1).to(total.dtype)


def balanced_bce(pred: Tensor, target: Tensor, pos_weight: float | None = None) -> Tensor:
    """Batch-balanced binary cross-entropy with logits (HED style, the official saliency loss).

    The positive pixels' weight is #neg / #pixels of the batch, or ``pos_weight`` when given.
    """
    if pred.shape != target.shape:
        raise ValueError(f"BCE loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    labels = (target >= 0.5).to(pred.dtype)
    if pos_weight is None:
        n_pos = labels.sum()
        n_neg = (1.0 - labels).sum()
        w = n_neg / (n_pos + n_neg)
    else:
        w = torch.tensor(pos_weight, dtype=pred.dtype, device=pred.device)
    bce = F.binary_cross_entropy_with_logits(pred, labels, reduction="none")
    loss = w * (labels * bce).sum() + (1 - w) * ((1.0 - labels) * bce).sum()
    return loss / float(target.numel())


def normals_l1(pred: Tensor, target: Tensor) -> Tensor:
    """L1 between the unit-normalised prediction and the label over non-ignored elements (label != 255)."""
    if pred.shape != target.shape:
        raise ValueError(f"normals loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    unit = pred / (torch.linalg.vector_norm(pred, dim=1, keepdim=True) + 1e-12)
    mask = target != IGNORE_INDEX
    diff = (unit - target).abs()  # promotes like the official l1_loss on mixed dtypes
    total = torch.where(mask, diff, torch.zeros((), dtype=diff.dtype, device=diff.device)).sum()
    return total / mask.sum().clamp_min(1).to(total.dtype)


def edge_bce(pred: Tensor, target: Tensor) -> Tensor:
    """The official edge loss: BCE with a fixed positive weight of 0.95."""
    return balanced_bce(pred, target, pos_weight=0.95)


def depth_l1(pred: Tensor, target: Tensor) -> Tensor:
    """L1 over the elements whose label is not 255, mean (0 when there are none)."""
    if pred.shape != target.shape:
        raise ValueError(f"depth loss: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    mask = target != IGNORE_INDEX
    diff = (pred - target).abs()
    total = torch.where(mask, diff, torch.zeros((), dtype=diff.dtype, device=diff.device)).sum()
    return total / mask.sum().clamp_min(1).to(total.dtype)


class MultiTaskLoss(nn.Module):
    """``forward(pred, targets) -> {task: loss, ..., "total": sum_t w_t * loss_t}``, each loss its task kind's."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        from benchmark.tasks import TASK_KINDS, kind_of

        if not tasks:
            raise ValueError("MultiTaskLoss needs at least one task")
        unknown = [f"{t.name!r} (kind {t.kind!r})" for t in tasks if t.kind not in TASK_KINDS]
        if unknown:
            raise ValueError(
                f"MultiTaskLoss: no task kind for {', '.join(unknown)}; known kinds: {', '.join(TASK_KINDS.names())}"
            )
        self.tasks = tuple(tasks)
        self._losses = {t.name: kind_of(t).loss for t in self.tasks}

    def forward(self, pred: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for t in self.tasks:
            if t.name not in pred or t.name not in targets:
                where = "predictions" if t.name not in pred else "targets"
                raise KeyError(f"MultiTaskLoss: task {t.name!r} missing from the {where}")
            p, y = pred[t.name], targets[t.name]
            if p.shape[-2:] != y.shape[-2:] or p.shape[0] != y.shape[0]:
                raise ValueError(
                    f"MultiTaskLoss: {t.name} prediction {tuple(p.shape)} and target {tuple(y.shape)} "
                    "differ in batch or spatial size"
                )
            try:
                out[t.name] = self._losses[t.name](p, y)
            except ValueError as e:
                raise ValueError(f"MultiTaskLoss: task {t.name!r}: {e}") from None
        weighted = [t.loss_weight * out[t.name] for t in self.tasks]
        dtype = weighted[0].dtype
        for w in weighted[1:]:
            dtype = torch.promote_types(dtype, w.dtype)
        # stacked then summed, as the official total (float64 when any task loss is float64)
        out["total"] = torch.stack([w.to(dtype) for w in weighted]).sum()
        return out
