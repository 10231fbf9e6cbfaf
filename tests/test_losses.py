"""The protocol's multi-task loss (docs/protocol.md 2.5), against direct re-statements of the official formulas."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from benchmark.losses import MultiTaskLoss, balanced_bce, cross_entropy_ignore, depth_l1, normals_l1
from benchmark.protocol import NYUD, PASCAL_CONTEXT
from benchmark.tasks import kind_of

TASKS = {t.name: t for t in PASCAL_CONTEXT.tasks}

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
        torch.testing.assert_close(out[t.name], kind_of(t).loss(pred[t.name], targets[t.name]))
    want = sum(t.loss_weight * out[t.name] for t in tasks)
    torch.testing.assert_close(out["total"], want)
    custom = [dataclasses.replace(TASKS["sal"], loss_weight=0.5)]
    torch.testing.assert_close(MultiTaskLoss(custom)(pred, targets)["total"], 0.5 * out["sal"])


def test_multitask_loss_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskLoss([])
    with pytest.raises(ValueError, match=r"no task kind for 'keypoints' \(kind 'keypoints'\); known kinds: depth, "):
        MultiTaskLoss([dataclasses.replace(TASKS["sal"], name="keypoints", kind="keypoints")])
    loss = MultiTaskLoss([TASKS["semseg"], TASKS["sal"]])
    pred = {"semseg": torch.randn(1, 21, 4, 4), "sal": torch.randn(1, 1, 4, 4)}
    with pytest.raises(KeyError, match="'sal' missing from the targets"):
        loss(pred, {"semseg": torch.zeros(1, 1, 4, 4)})
    with pytest.raises(ValueError, match="differ in batch or spatial size"):
        loss(pred, {"semseg": torch.zeros(1, 1, 8, 8), "sal": torch.zeros(1, 1, 4, 4)})


def test_segmentation_label_outside_the_classes_is_a_clear_error() -> None:
    """NYUD's 254 (a PNG value of 255): the official NLLLoss fails with an index error; ours names task and value."""
    semseg = NYUD.task("semseg")
    loss = MultiTaskLoss([semseg])
    pred = {"semseg": torch.randn(2, semseg.out_channels, 4, 4, generator=G)}
    y = _labels((2, 1, 4, 4), semseg.out_channels)
    y[1, 0, 2, 3] = 254
    with pytest.raises(ValueError, match=r"task 'semseg': segmentation label 254 is outside the classes \[0, 40\)"):
        loss(pred, {"semseg": y})
    y[1, 0, 2, 3] = -1
    with pytest.raises(ValueError, match="label -1 is outside"):
        loss(pred, {"semseg": y})
    y[1, 0, 2, 3] = 255  # ignore is fine, and the value is the plain cross-entropy bit for bit
    want = F.cross_entropy(pred["semseg"], y[:, 0].long(), ignore_index=255)
    assert torch.equal(loss(pred, {"semseg": y})["semseg"], cross_entropy_ignore(pred["semseg"], y))
    torch.testing.assert_close(loss(pred, {"semseg": y})["semseg"], want)


def test_depth_loss_is_l1_over_valid_pixels() -> None:
    pred = torch.randn(2, 1, 5, 5, generator=G)
    y = 0.5 + torch.rand(2, 1, 5, 5, generator=G) * 5
    y[0, 0, :2] = 255
    valid = y != 255
    torch.testing.assert_close(depth_l1(pred, y), (pred - y).abs()[valid].mean())
    p = pred.clone().requires_grad_(True)
    none = depth_l1(p, torch.full_like(y, 255.0))
    assert none.item() == 0.0  # no valid pixel: 0, not NaN
    none.backward()
    assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("protocol", [PASCAL_CONTEXT, NYUD], ids=lambda p: p.name)
def test_multitask_loss_over_a_protocol_with_kind_targets(protocol) -> None:
    g = torch.Generator().manual_seed(3)
    pred = {t.name: torch.randn(2, t.out_channels, 6, 6, generator=g) for t in protocol.tasks}
    targets = {t.name: kind_of(t).random_target(t, 2, 6, g) for t in protocol.tasks}
    out = MultiTaskLoss(protocol.tasks)(pred, targets)
    assert set(out) == {*protocol.task_names, "total"}
    assert all(torch.isfinite(v) for v in out.values())
    want = torch.stack([t.loss_weight * out[t.name] for t in protocol.tasks]).sum()
    torch.testing.assert_close(out["total"], want, rtol=0, atol=0)
