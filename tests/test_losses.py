"""The protocol's multi-task loss (docs/protocol.md 2.5), against direct re-statements of the official formulas."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from benchmark.losses import LOSSES, MultiTaskLoss, balanced_bce, cross_entropy_ignore, normals_l1
from benchmark.protocol import PASCAL_CONTEXT, TASKS

G = torch.Generator().manual_seed(0)


def _labels(shape: tuple[int, ...], n_cls: int, ignore_frac: float = 0.2) -> torch.Tensor:
    y = torch.randint(0, n_cls, shape, generator=G).float()
    y[torch.rand(shape, generator=G) < ignore_frac] = 255
    return y


def test_cross_entropy_is_mean_over_valid_pixels() -> None:
    pred = torch.randn(2, 5, 6, 7, generator=G)
    y = _labels((2, 1, 6, 7), 5)
    want = F.cross_entropy(pred, y[:, 0].long(), ignore_index=255)
    torch.testing.assert_close(cross_entropy_ignore(pred, y), want)
    # by hand: -log softmax at the label, averaged over non-255 pixels
    logp = pred.log_softmax(1)
    valid = y[:, 0] != 255
    picked = logp.gather(1, y[:, 0].long().clamp_max(4).unsqueeze(1))[:, 0]
    torch.testing.assert_close(cross_entropy_ignore(pred, y), -picked[valid].mean())


def test_all_ignored_batch_gives_zero_not_nan_and_stays_differentiable() -> None:
    pred = torch.randn(2, 7, 4, 4, generator=G, requires_grad=True)
    y = torch.full((2, 1, 4, 4), 255.0)
    loss = cross_entropy_ignore(pred, y)
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and torch.equal(pred.grad, torch.zeros_like(pred))


def _official_stable_bce(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel BCE written as the official code's 'loss_val' (negated)."""
    ge = (x >= 0).float()
    return -(x * (y - ge) - torch.log(1 + torch.exp(x - 2 * x * ge)))


def test_balanced_bce_batch_weights() -> None:
    pred = torch.randn(2, 1, 8, 8, generator=G) * 3
    y = (torch.rand(2, 1, 8, 8, generator=G) > 0.7).float()
    y[0, 0, 0, 0] = 0.5  # >= 0.5 counts as positive
    lab = (y >= 0.5).float()
    w = (1 - lab).sum() / lab.numel()
    per = _official_stable_bce(pred, lab)
    want = (w * (lab * per).sum() + (1 - w) * ((1 - lab) * per).sum()) / y.numel()
    torch.testing.assert_close(balanced_bce(pred, y), want)
    # all-negative ground truth in the whole batch: w = 1 weights the (absent) positives, the negatives get
    # 1 - w = 0, so the official loss is exactly 0 (not the plain BCE)
    assert balanced_bce(pred, torch.zeros_like(y)).item() == 0.0


def test_normals_l1_on_normalised_prediction_over_valid_elements() -> None:
    pred = torch.randn(2, 3, 5, 5, generator=G)
    gt = F.normalize(torch.randn(2, 3, 5, 5, generator=G), dim=1).double()
    gt[:, :, :2, :] = 255  # ignored pixels: 255 in all three channels
    unit = pred / (pred.norm(dim=1, keepdim=True) + 1e-12)
    mask = gt != 255
    want = (unit.double() - gt).abs()[mask].sum() / mask.sum()
    got = normals_l1(pred, gt)
    assert got.dtype == torch.float64  # float64 labels promote, as officially
    torch.testing.assert_close(got, want)
    assert normals_l1(pred, torch.full_like(gt, 255)).item() == 0.0  # nothing valid: 0, as officially


def test_multitask_total_uses_taskspec_weights() -> None:
    tasks = PASCAL_CONTEXT.tasks
    assert {t.name: t.loss_weight for t in tasks} == {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0}
    pred = {t.name: torch.randn(2, t.out_channels, 6, 6, generator=G) for t in tasks}
    targets = {
        "semseg": _labels((2, 1, 6, 6), 21),
        "human_parts": _labels((2, 1, 6, 6), 7),
        "sal": (torch.rand(2, 1, 6, 6, generator=G) > 0.5).float(),
        "normals": F.normalize(torch.randn(2, 3, 6, 6, generator=G), dim=1),
    }
    out = MultiTaskLoss(tasks)(pred, targets)
    assert set(out) == {"semseg", "human_parts", "sal", "normals", "total"}
    for t in tasks:
        torch.testing.assert_close(out[t.name], LOSSES[t.name](pred[t.name], targets[t.name]))
    want = sum(t.loss_weight * out[t.name] for t in tasks)
    torch.testing.assert_close(out["total"], want)
    custom = [dataclasses.replace(TASKS["sal"], loss_weight=0.5)]
    torch.testing.assert_close(MultiTaskLoss(custom)(pred, targets)["total"], 0.5 * out["sal"])


def test_multitask_loss_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskLoss([])
    with pytest.raises(ValueError, match="no loss for task"):
        MultiTaskLoss([dataclasses.replace(TASKS["sal"], name="keypoints")])
    loss = MultiTaskLoss([TASKS["semseg"], TASKS["sal"]])
    pred = {"semseg": torch.randn(1, 21, 4, 4), "sal": torch.randn(1, 1, 4, 4)}
    with pytest.raises(KeyError, match="'sal' missing from the targets"):
        loss(pred, {"semseg": torch.zeros(1, 1, 4, 4)})
    with pytest.raises(ValueError, match="differ in batch or spatial size"):
        loss(pred, {"semseg": torch.zeros(1, 1, 8, 8), "sal": torch.zeros(1, 1, 4, 4)})
