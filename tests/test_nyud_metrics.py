"""NYUDv2 compute side: the depth meter, 40-class segmentation with 254, post-processing and Δm against the
official fixture (tests/fixtures/nyud_parity/nyud_metrics_public.pt), and the per-task Δm references."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmark.metrics import DepthMeter, Meter, build_meters, per_image_statistics, results_delta_m
from benchmark.parity_metrics import parity_checks
from benchmark.protocol import NYUD, get_reference
from benchmark.tasks import kind_of

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "nyud_parity" / "nyud_metrics_public.pt"


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


def _inputs(fx):
    logits = {t: fx["logits"][t].float() * fx["logits_scale"][t] for t in NYUD.task_names}
    dtypes = fx["meter_inputs_official_dtypes"]["gt"]
    gts = {t: fx["meter_inputs"]["gt"][t].to(getattr(torch, dtypes[t])) for t in NYUD.task_names}
    return logits, gts


def _run(fx, batches):
    logits, gts = _inputs(fx)
    meters = build_meters(NYUD.tasks)
    stats = {t: [meters[t].stats(logits[t][b], gts[t][b]) for b in map(torch.as_tensor, batches)] for t in meters}
    return {t: {**m.reduce(stats[t]), **m.details(stats[t])} for t, m in meters.items()}, stats, meters


def test_every_parity_check_passes_and_edge_is_skipped_with_its_reason():
    checks = parity_checks(FIXTURE)
    failed = [c for c in checks if not c.passed]
    assert failed == []
    names = {c.name: c for c in checks}
    assert len(checks) >= 30
    for key in ("semseg/mIoU", "semseg/tp", "depth/rmse", "depth/log_rmse", "depth/n_valid", "normals/mean",
                "normals/11.25", "delta_m/delta_m_pct", "delta_m_worked_example", "meter_inputs/depth"):  # fmt: skip
        assert f"nyud_metrics_public/{key}" in names, key
    edge = names["nyud_metrics_public/edge"]
    assert edge.detail.startswith("SKIPPED") and "not part of protocol nyud.v1" in edge.detail
    assert not any(n.startswith("nyud_metrics_public/edge/") for n in names)


def test_depth_meter_pools_pixels_clamps_and_counts_as_official(fx):
    ours, stats, _ = _run(fx, fx["update_batches"])
    res, extra = fx["results"]["depth"], fx["results_extra_not_from_official_code"]
    assert ours["depth"]["n_valid"] == res["n_valid"]
    assert ours["depth"]["rmse"] == pytest.approx(res["rmse"], rel=1e-9)
    assert ours["depth"]["log_rmse"] == pytest.approx(res["log_rmse"], rel=1e-9)
    # pooled, not a per-image average; the clamp matters
    per_image_mean = extra["depth_rmse_mean_of_per_image_values_with_valid_pixels"]
    assert abs(ours["depth"]["rmse"] - per_image_mean) > 1e-3
    assert abs(ours["depth"]["rmse"] - extra["depth_rmse_without_clamp"]) > 1e-5
    # the image without a valid pixel contributes zeros, never a NaN
    rows = torch.cat([s["n"] for s in stats["depth"]])
    sums = torch.cat([s["sum_sq_err"] for s in stats["depth"]])
    for i in fx["special_cases"]["depth_all_missing_images"]:
        assert rows[i] == 0 and sums[i] == 0.0
    assert torch.isfinite(torch.cat([s["sum_sq_log_err"] for s in stats["depth"]])).all()
    # per-image rmse where defined equals the fixture's
    for i, want in enumerate(extra["depth_rmse_per_image"]):
        if rows[i] > 0:
            assert math.sqrt(float(sums[i]) / int(rows[i])) == pytest.approx(want, rel=1e-9)
        else:
            assert math.isnan(want)


def test_depth_meter_by_hand():
    m = DepthMeter("depth")
    pred = torch.tensor([[[[2.0, -1.0], [0.0, 3.0]]]])
    gt = torch.tensor([[[[1.0, 2.0], [255.0, 3.0]]]], dtype=torch.float64)
    r = m.reduce([m.stats(pred, gt)])
    clamped = torch.tensor([2.0, 1e-9, 3.0], dtype=torch.float32).double()
    g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert r["rmse"] == pytest.approx(math.sqrt(((g - clamped) ** 2).mean().item()), rel=1e-15)
    ln_pred = torch.log(torch.tensor([2.0, 1e-9, 3.0], dtype=torch.float32)).double()  # ln(pred) in float32
    assert r["log_rmse"] == pytest.approx(math.sqrt(((torch.log(g) - ln_pred) ** 2).mean().item()), rel=1e-15)
    assert m.details([m.stats(pred, gt)])["n_valid"] == 3
    with pytest.raises(ValueError, match="depth: no valid pixels"):
        m.reduce([m.stats(pred, torch.full_like(gt, 255.0))])
    with pytest.raises(ValueError, match=r"depth: pred_logits must be \[B,1,H,W\]"):
        m.stats(torch.zeros(1, 3, 2, 2), gt)


def test_depth_meter_is_invariant_to_batching_and_sharding():
    g = torch.Generator().manual_seed(0)
    spec = NYUD.task("depth")
    kind = kind_of(spec)
    pred = torch.randn(7, 1, 9, 11, generator=g) + 3
    gt = kind.random_target(spec, 7, (9, 11), g).double()
    gt[2] = 255
    m = kind.meter(spec)
    assert isinstance(m, Meter) and m.task == "depth"
    one = m.reduce([m.stats(pred, gt)])
    sharded = m.reduce([m.stats(pred[[i]], gt[[i]]) for i in (6, 2, 1, 4)] + [m.stats(pred[[5, 0, 3]], gt[[5, 0, 3]])])
    assert sharded == pytest.approx(one, rel=1e-13, abs=0)


def test_semseg_254_is_a_valid_pixel_of_no_class(fx):
    ours, _, _ = _run(fx, fx["update_batches"])
    sc = fx["special_cases"]
    assert sc["semseg_gt_254_pixels"]["count"] > 0
    res = fx["results"]["semseg"]
    assert (
        ours["semseg"]["fp"] == res["fp"] and ours["semseg"]["tp"] == res["tp"] and ours["semseg"]["fn"] == res["fn"]
    )
    assert ours["semseg"]["mIoU"] == res["mIoU"]  # exact
    assert ours["semseg"]["mIoU"] != fx["results_extra_not_from_official_code"]["semseg_mIoU_if_254_were_ignored"]
    # absent from gt and never predicted: IoU 0, still in the mean over all 40 classes
    for c in sc["semseg_classes_absent_from_gt_and_predictions"]:
        assert ours["semseg"]["per_class_IoU"][c] == 0.0
    assert len(ours["semseg"]["per_class_IoU"]) == NYUD.task("semseg").out_channels


def test_by_hand_254_adds_a_false_positive():
    m = kind_of(NYUD.task("semseg")).meter(NYUD.task("semseg"))
    logits = torch.zeros(1, 40, 1, 3)
    logits[0, 5, 0, :] = 1.0  # predicts class 5 everywhere
    gt = torch.tensor([[[[5.0, 254.0, 255.0]]]], dtype=torch.float64)
    d = m.details([m.stats(logits, gt)])
    assert (d["tp"][5], d["fp"][5], d["fn"][5]) == (1, 1, 0)
    assert d["per_class_IoU"][5] == 0.5 and m.reduce([m.stats(logits, gt)])["mIoU"] == 0.5 / 40


def test_delta_m_against_the_fixture_and_the_protocol_reference(fx):
    ours, _, _ = _run(fx, fx["update_batches"])
    dm = fx["delta_m"]
    ref = get_reference(NYUD.reference)
    assert ref.protocol == NYUD.name
    # the fixture's references are the protocol's default (FAAR) row
    assert dict(ref.values) == pytest.approx(
        {
            t: dm["reference_single_task"][k]
            for t, k in (("semseg", "semseg_mIoU_pct"), ("depth", "depth_rmse"), ("normals", "normals_mean_deg"))
        }  # fmt: skip
    )
    assert results_delta_m(ours, NYUD) == pytest.approx(dm["delta_m_pct"], rel=1e-9)
    other = get_reference("tadformer-config-nyud-single-task")
    assert results_delta_m(ours, NYUD, other.name) != pytest.approx(dm["delta_m_pct"], rel=1e-3)


def test_per_image_statistics_reduce_to_the_depth_metrics(fx):
    _, stats, meters = _run(fx, [[i] for i in range(fx["num_images"])])
    rows = [{t: stats[t][i] for t in meters} for i in range(fx["num_images"])]
    pi = per_image_statistics(meters, rows)["depth"]
    assert pi["kind"] == "depth" and len(pi["n"]) == fx["num_images"]
    rmse = math.sqrt(math.fsum(pi["sum_sq_err"]) / sum(pi["n"]))
    assert rmse == meters["depth"].reduce(stats["depth"])["rmse"]


def test_a_changed_official_value_fails_its_check(fx, tmp_path):
    import copy

    bad = copy.deepcopy(fx)
    bad["results"]["depth"]["rmse"] *= 1 + 1e-7  # 100 x the tolerance
    bad["results"]["semseg"]["tp"][0] += 1
    bad["delta_m"]["delta_m_pct"] += 1e-4
    path = tmp_path / "nyud_metrics_bad.pt"
    torch.save(bad, path)
    failed = {c.name for c in parity_checks(path) if not c.passed}
    assert failed == {
        "nyud_metrics_bad/depth/rmse",
        "nyud_metrics_bad/semseg/tp",
        "nyud_metrics_bad/delta_m/delta_m_pct",
    }


def test_a_fixture_without_the_official_dtypes_names_the_field(fx, tmp_path):
    from benchmark.parity_metrics import FixtureError

    bad = {k: v for k, v in fx.items() if k != "meter_inputs_official_dtypes"}
    path = tmp_path / "nyud_metrics_nodtypes.pt"
    torch.save(bad, path)
    with pytest.raises(FixtureError, match="nyud_metrics_nodtypes.pt: missing field 'meter_inputs_official_dtypes'"):
        parity_checks(path)


def test_parity_without_argument_runs_the_nyud_metrics_set():
    from benchmark.parity import FIXTURES_ROOT, discover_sets

    found = discover_sets(FIXTURES_ROOT)
    assert ("nyud_metrics", FIXTURE) in [(k, p.resolve()) for k, p in found]
    assert ("metrics", FIXTURES_ROOT / "official_parity" / "metrics_public.pt") in found
