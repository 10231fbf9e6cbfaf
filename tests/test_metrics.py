"""Meters: official values on the public fixture, IoU backends, batching / sharding invariance, edge cases."""

from __future__ import annotations

import ast
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmark.metrics as M
from benchmark.metrics import (
    Meter,
    NormalsMeter,
    SaliencyMeter,
    SegmentationMeter,
    build_meters,
    intersect_and_union,
    torch_intersect_and_union,
)
from benchmark.parity_metrics import parity_checks
from benchmark.protocol import PASCAL_CONTEXT
from benchmark.tasks import kind_of

TASKS = {t.name: t for t in PASCAL_CONTEXT.tasks}

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fx(fixture_dir):
    return torch.load(fixture_dir / "metrics_public.pt", weights_only=True)


def _run(fx, batches):
    tasks = list(fx["logits"])
    meters = build_meters([TASKS[t] for t in tasks])
    stats = {t: [] for t in tasks}
    for b in batches:
        idx = torch.as_tensor(b)
        for t in tasks:
            stats[t].append(meters[t].stats(fx["logits"][t][idx], fx["meter_inputs"]["gt"][t][idx]))
    return {t: {**meters[t].reduce(stats[t]), **meters[t].details(stats[t])} for t in tasks}


def _close(ours, ref, tol=1e-6):
    a, b = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=0, atol=tol), (a, b)


# ---------------------------------------------------------------- the public fixture


def test_postprocess_reproduces_the_official_meter_inputs(fx):
    for task, logits in fx["logits"].items():
        ref = fx["meter_inputs"]["pred"][task]
        ours = kind_of(TASKS[task]).postprocess(logits)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, task
        assert torch.equal(ours, ref), task  # bit for bit: a last-bit change can flip a threshold


def test_meters_reproduce_every_official_result(fx):
    ours = _run(fx, fx["update_batches"])
    results = fx["results"]
    for task in fx["logits"]:
        for metric, ref in results[task].items():
            _close(ours[task][metric], ref)
    extra = results["normals_extra_not_from_official_code"]
    _close(ours["normals"]["rmse_true"], extra["true_rmse_deg"])
    assert ours["normals"]["num_valid_pixels"] == extra["num_valid_pixels"]
    # the median comes from a histogram: within half a bin of numpy's exact median
    assert abs(ours["normals"]["median"] - extra["median_deg"]) <= NormalsMeter("normals").bin_deg / 2 + 1e-12


def test_fixture_special_cases_behave_as_official(fx):
    ours = _run(fx, fx["update_batches"])
    sc = fx["special_cases"]
    for c in sc["semseg_classes_absent_from_gt_and_predictions"]:
        assert ours["semseg"]["per_class_IoU"][c] == 0.0  # counts as 0 in the mean (not skipped as in nanmean)
    iou = ours["semseg"]["per_class_IoU"]
    assert ours["semseg"]["mIoU"] == pytest.approx(sum(iou) / len(iou), abs=1e-15)
    rows = ours["sal"]["per_image_per_threshold_IoU"]
    for i in sc["sal_empty_gt_images"]:
        assert any(v == 1.0 for v in rows[i])  # empty gt and empty prediction score 1


def test_parity_checks_all_pass_on_the_public_fixture(fixture_dir):
    checks = parity_checks(fixture_dir / "metrics_public.pt")
    assert len(checks) > 30
    assert [c for c in checks if not c.passed] == []
    names = {c.name for c in checks}
    assert "metrics_public/sal/Beta maxF" in names and "metrics_public/delta_m/delta_m_pct" in names


# ---------------------------------------------------------------- IoU counts: mmseg vs pure torch


@pytest.mark.parametrize("num_classes", [2, 7, 21])
def test_mmseg_and_torch_counts_are_identical(num_classes):
    g = torch.Generator().manual_seed(num_classes)
    pred = torch.randint(0, num_classes, (3, 17, 23), generator=g)
    label = torch.randint(0, num_classes, (3, 17, 23), generator=g).double()
    label[torch.rand(label.shape, generator=g) < 0.2] = 255
    label[0, 0, :5] = num_classes + 3  # valid but no class: a false positive for the predicted class
    a = intersect_and_union(pred, label, num_classes, 255, backend="mmseg")
    b = torch_intersect_and_union(pred, label, num_classes, 255)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, y)
    inter, union, area_pred, area_label = b
    assert torch.equal(union, area_pred + area_label - inter)
    assert int(area_pred.sum()) == int((label != 255).sum())  # every valid pixel has a prediction


def test_mmseg_counts_stay_exact_beyond_float32_range():
    # histc counts in float32; 2^24 + 3 pixels of one class would come back as 2^24 + 4 in one call
    n = 2**24 + 3
    pred = torch.zeros(n, dtype=torch.uint8)
    inter, union, area_pred, area_label = intersect_and_union(pred, pred, 2, 255, backend="mmseg")
    assert inter.tolist() == [n, 0] and union.tolist() == [n, 0] and area_label.tolist() == [n, 0]


def test_chunked_mmseg_calls_add_up(monkeypatch):
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 5, (2, 30, 40), generator=g)
    label = torch.randint(0, 5, (2, 30, 40), generator=g)
    label[:, :3] = 255
    monkeypatch.setattr(M, "_HISTC_EXACT", 1000)  # 2400 pixels -> 3 calls
    a = intersect_and_union(pred, label, 5, 255, backend="mmseg")
    b = torch_intersect_and_union(pred, label, 5, 255)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_fallback_to_torch_when_mmseg_cannot_be_imported(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mmseg.evaluation.metrics.iou_metric", None)  # import now raises
    M._mmseg_intersect_and_union.cache_clear()
    try:
        pred = torch.tensor([[0, 1, 2, 2]])
        label = torch.tensor([[0, 1, 1, 255]])
        with caplog.at_level(logging.WARNING, logger="benchmark.metrics"):
            counts = intersect_and_union(pred, label, 3, 255)
        assert "pure-torch" in caplog.text
        assert [c.tolist() for c in counts] == [[1, 1, 0], [1, 2, 1], [1, 1, 1], [1, 2, 0]]
        with pytest.raises(RuntimeError, match="mmsegmentation"):
            intersect_and_union(pred, label, 3, 255, backend="mmseg")
    finally:
        M._mmseg_intersect_and_union.cache_clear()


def test_mmseg_is_imported_lazily_and_mmcv_version_restored():
    code = (
        "import sys, mmcv, benchmark.metrics as m\n"
        "assert 'mmseg' not in sys.modules, 'imported eagerly'\n"
        "v = mmcv.__version__\n"
        "assert m._mmseg_intersect_and_union() is not None\n"
        "assert 'mmseg' in sys.modules and mmcv.__version__ == v, mmcv.__version__\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_only_metrics_imports_mmseg():
    offenders = []
    for d in ("benchmark", "methods", "baselines", "leaderboard"):
        for path in sorted((ROOT / d).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() == "benchmark/metrics.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n == "mmseg" or n.startswith("mmseg.") for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# ---------------------------------------------------------------- hand-computed values


def _onehot_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def test_segmentation_official_reduction_by_hand():
    # 3 classes, class 2 in neither gt nor prediction; one ignored pixel predicted as 1
    pred = torch.tensor([[[0, 0, 1, 1, 1]]])
    gt = torch.tensor([[[[0, 1, 1, 1, 255]]]], dtype=torch.float64)
    m = SegmentationMeter("semseg", 3)
    s = m.stats(_onehot_logits(pred, 3), gt)
    assert s["area_intersect"].tolist() == [1, 2, 0] and s["area_union"].tolist() == [2, 3, 0]
    iou = m.details([s])["per_class_IoU"]
    assert iou == [0.5, 2 / 3, 0.0]
    assert m.reduce([s])["mIoU"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3, abs=1e-15)


def test_saliency_by_hand():
    m = SaliencyMeter("sal")
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    # image 0: probabilities 0.3 and 0.8 over gt (0, 1); image 1: everything empty
    x = torch.tensor([[[[logit(0.3), logit(0.8)]]], [[[-20.0, -20.0]]]])
    gt = torch.tensor([[[[0.0, 1.0]]], [[[0.0, 0.0]]]])
    d = m.details([m.stats(x, gt)])
    thr = np.array(d["thresholds"])
    iou0 = np.where(thr < 0.3, 0.5, np.where(thr < 0.8, 1.0, 0.0))
    np.testing.assert_allclose(np.array(d["per_image_per_threshold_IoU"]), np.stack([iou0, np.ones(15)]), atol=1e-12)
    r = m.reduce([m.stats(x, gt)])
    assert r["mIoU"] == pytest.approx(1.0)  # mean of 1 (image 0 at 0.3 < t < 0.8) and 1 (empty image)
    # precision is 0 for the empty image, so mean P at its best is 0.5 and mean R 0.5: F = 0.5
    assert r["maxF"] == pytest.approx(0.5, abs=1e-9)


def test_normals_by_hand():
    # three valid pixels at 0, 90 and 180 degrees, one ignored pixel
    gt = torch.tensor([[1.0, 1.0, 1.0, 255.0], [0.0, 0.0, 0.0, 255.0], [0.0, 0.0, 0.0, 255.0]]).view(1, 3, 1, 4)
    pred = torch.tensor([[1.0, 0.0, -1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).view(1, 3, 1, 4)
    m = NormalsMeter("normals")
    r = m.reduce([m.stats(pred, gt)])
    assert r["mean"] == pytest.approx(90.0, abs=1e-4) and r["rmse"] == r["mean"]
    assert r["rmse_true"] == pytest.approx(math.sqrt((0 + 90**2 + 180**2) / 3), abs=1e-3)
    assert abs(r["median"] - 90.0) <= m.bin_deg / 2 + 1e-9
    assert r["11.25"] == pytest.approx(100 / 3) and r["30"] == pytest.approx(100 / 3)
    assert m.details([m.stats(pred, gt)])["num_valid_pixels"] == 3


def test_normals_median_and_rmse_against_numpy():
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(3, 3, 20, 24, generator=g)
    gt = torch.nn.functional.normalize(torch.randn(3, 3, 20, 24, generator=g, dtype=torch.float64), dim=1)
    gt[:, :, :4] = 255
    m = NormalsMeter("normals")
    r = m.reduce([m.stats(pred[:2], gt[:2]), m.stats(pred[2:], gt[2:])])
    u = pred.double() / pred.double().norm(dim=1, keepdim=True)
    deg = np.degrees(np.arccos(np.clip((u * gt).sum(1).numpy(), -1, 1)))[(gt[:, 0] != 255).numpy()]
    assert abs(r["median"] - np.median(deg)) <= m.bin_deg / 2 + 1e-9
    assert r["mean"] == pytest.approx(deg.mean(), abs=1e-5)
    assert r["rmse_true"] == pytest.approx(np.sqrt((deg**2).mean()), abs=1e-5)
    assert r["mean_v2"] == pytest.approx(deg.mean(), abs=1e-5)
    assert r["22.5"] == pytest.approx(100 * (deg < 22.5).mean(), abs=1e-9)


# ---------------------------------------------------------------- batching and sharding


def _random_set(n=7, h=12, w=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = {t: torch.randn(n, TASKS[t].out_channels, h, w, generator=g) * 2 for t in TASKS}
    seg = torch.randint(0, 21, (n, 1, h, w), generator=g).double()
    seg[torch.rand(seg.shape, generator=g) < 0.1] = 255
    parts = torch.randint(0, 7, (n, 1, h, w), generator=g).double()
    parts[1] = 255
    sal = (torch.rand(n, 1, h, w, generator=g) < 0.4).double()
    sal[2] = 0
    normals = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g, dtype=torch.float64), dim=1)
    normals[:, :, :2] = 255
    return logits, {"semseg": seg, "human_parts": parts, "sal": sal, "normals": normals}


def test_sharded_evaluation_equals_one_pass():
    logits, targets = _random_set()
    meters = build_meters(list(TASKS.values()))
    for t, m in meters.items():
        one_pass = m.reduce([m.stats(logits[t], targets[t])])
        # two "ranks": shard A = images [5, 0, 3] in batches of 2 and 1, shard B = [6, 2, 1, 4] one by one;
        # gathered rank B first
        a = [m.stats(logits[t][i], targets[t][i]) for i in ([5, 0], [3])]
        b = [m.stats(logits[t][[i]], targets[t][[i]]) for i in (6, 2, 1, 4)]
        sharded = m.reduce(b + a)
        assert sharded.keys() == one_pass.keys()
        for k in one_pass:
            assert sharded[k] == pytest.approx(one_pass[k], abs=1e-12, rel=0), (t, k)


def test_stats_are_small_cpu_tensors():
    logits, targets = _random_set(n=3)
    for t, m in build_meters(list(TASKS.values())).items():
        s = m.stats(logits[t], targets[t])
        assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in s.values()), t
        assert sum(v.numel() for v in s.values()) <= 20_000, t  # never the full maps
        one = m.stats(logits[t][:1], targets[t][:1])  # runners may keep one entry per image: keep it small
        assert sum(v.numel() * v.element_size() for v in one.values()) <= 16 * 1024, t


# ---------------------------------------------------------------- registry, names, errors


def test_build_meters_and_primary_metric_names():
    logits, targets = _random_set(n=3)
    meters = build_meters(list(TASKS.values()))
    assert list(meters) == list(TASKS)
    for t, m in meters.items():
        assert isinstance(m, Meter)
        r = m.reduce([m.stats(logits[t], targets[t])])
        assert TASKS[t].metric in r, t
        assert all(isinstance(v, float) for v in r.values())
    assert meters["semseg"].num_classes == 21 and meters["human_parts"].num_classes == 7
    with pytest.raises(TypeError, match="TaskSpecs"):
        build_meters(["semseg"])  # a task name is not global: NYUD's semseg has 40 classes, PASCAL's 21


def test_bad_input_is_a_clear_error():
    m = SegmentationMeter("semseg", 21)
    with pytest.raises(ValueError, match=r"semseg: pred_logits must be \[B,21,H,W\]"):
        m.stats(torch.zeros(1, 7, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="differ in B/H/W"):
        m.stats(torch.zeros(1, 21, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"target must be \[B,3,H,W\]"):
        NormalsMeter("normals").stats(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="no statistics"):
        SaliencyMeter("sal").reduce([])
    nm = NormalsMeter("normals")
    with pytest.raises(ValueError, match="no valid pixels"):
        nm.reduce([nm.stats(torch.ones(1, 3, 2, 2), torch.full((1, 3, 2, 2), 255.0))])
    with pytest.raises(ValueError, match="backend"):
        intersect_and_union(torch.zeros(1), torch.zeros(1), 2, backend="numpy")
