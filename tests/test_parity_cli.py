"""``python -m benchmark.parity``: dispatch, exit codes and output, on the repository's fixtures, on perturbed copies and
on a fixture-format file built here from seeded random data with expected values from plain numpy."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import benchmark.parity as parity
from benchmark.metrics import SAL_THRESHOLDS
from benchmark.protocol import PASCAL_CONTEXT, get_reference

ROOT = Path(__file__).resolve().parents[1]
REF = get_reference(PASCAL_CONTEXT.reference).values


def _summary(out: str) -> tuple[int, int]:
    last = out.strip().splitlines()[-1]
    passed, failed = last.replace(" passed,", "").replace(" failed", "").split()
    return int(passed), int(failed)


# ---------------------------------------------------------------- the repository's fixtures


def test_cli_passes_on_the_shared_metrics_fixture(fixture_dir):
    r = subprocess.run(
        [sys.executable, "-m", "benchmark.parity", str(fixture_dir), "--only", "metrics"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    passed, failed = _summary(r.stdout)
    assert failed == 0 and passed > 30
    assert "PASS  metrics_public/semseg/mIoU  max_diff=" in r.stdout
    assert "dataset_public" not in r.stdout and "model_public" not in r.stdout  # --only


def _nested_set(d: dict, keys: tuple, delta: float) -> None:
    *head, last = keys
    for k in head:
        d = d[k]
    if isinstance(last, tuple):  # an element of a tensor
        d[last] += delta
    else:
        d[last] = d[last] + delta


@pytest.mark.parametrize(
    ("keys", "delta", "failing"),
    [
        (("results", "semseg", "mIoU"), 1e-3, "metrics_public/semseg/mIoU"),
        (("results", "sal", "Beta maxF"), 1e-4, "metrics_public/sal/Beta maxF"),
        (
            ("results", "sal", "per_image_per_threshold_IoU", (2, 3)),
            1e-5,
            "metrics_public/sal/per_image_per_threshold_IoU",
        ),
        (("results", "normals", "mean"), 2e-6, "metrics_public/normals/mean"),
        (
            ("results", "normals_extra_not_from_official_code", "median_deg"),
            0.06,  # more than the median's resolution (half a 0.05-degree bin) can explain
            "metrics_public/normals_extra/median_deg",
        ),
        (("delta_m", "delta_m_pct"), 1e-3, "metrics_public/delta_m/delta_m_pct"),
        (("delta_m", "per_task_relative_term_pct", "normals"), 1e-3, "metrics_public/delta_m/term/normals"),
        (("delta_m_worked_example", "delta_m_pct"), 1e-3, "metrics_public/delta_m_worked_example"),
    ],
)
def test_a_perturbed_fixture_fails(fixture_dir, tmp_path, capsys, keys, delta, failing):
    fx = torch.load(fixture_dir / "metrics_public.pt", weights_only=True)
    _nested_set(fx, keys, delta)
    torch.save(fx, tmp_path / "metrics_public.pt")
    assert parity.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert [line.split("  ")[1] for line in out.splitlines() if line.startswith("FAIL")] == [failing]
    assert _summary(out)[1] == 1


def test_a_perturbed_input_fails_the_meter_input_check(fixture_dir, tmp_path, capsys):
    fx = torch.load(fixture_dir / "metrics_public.pt", weights_only=True)
    fx["meter_inputs"]["pred"]["sal"][0, 0, 0] += 1e-3
    torch.save(fx, tmp_path / "metrics_x.pt")
    assert parity.main([str(tmp_path), "--only", "metrics"]) == 1
    assert "FAIL  metrics_x/meter_inputs/sal" in capsys.readouterr().out


def test_delta_m_uses_the_fixture_references(fixture_dir, tmp_path, capsys):
    # another reference with the stored Δm unchanged: the formula check must notice
    fx = torch.load(fixture_dir / "metrics_public.pt", weights_only=True)
    fx["delta_m"]["reference_single_task"]["normals_mean_deg"] = 18.0
    torch.save(fx, tmp_path / "metrics_ref.pt")
    assert parity.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  metrics_ref/delta_m/delta_m_pct" in out
    assert "FAIL  metrics_ref/delta_m/term/normals" in out


# ---------------------------------------------------------------- dispatch, errors, JSON


def test_without_a_folder_every_fixture_set_of_the_repository_runs(tmp_path, monkeypatch, capsys, fixture_dir):
    found = parity.discover_sets(parity.FIXTURES_ROOT)
    kinds = {(p.parent.name, k) for k, p in found}
    assert {("official_parity", k) for k in ("dataset", "metrics", "model", "train")} <= kinds
    assert parity.FIXTURES_ROOT / "official_parity" == fixture_dir
    # each sub-folder is one set; a folder without fixtures of a known kind is not one
    root = tmp_path / "fixtures"
    (root / "a").mkdir(parents=True)
    (root / "notes").mkdir()
    (root / "notes" / "README.md").write_text("x")
    torch.save(torch.load(fixture_dir / "metrics_public.pt", weights_only=True), root / "a" / "metrics_public.pt")
    monkeypatch.setattr(parity, "FIXTURES_ROOT", root)
    assert parity.main([]) == 0
    out = capsys.readouterr().out
    assert "== a/metrics_public.pt (metrics)" in out and "notes" not in out
    monkeypatch.setattr(parity, "FIXTURES_ROOT", tmp_path / "none")
    assert parity.main([]) == 2
    assert "no fixture sets" in capsys.readouterr().err


def test_empty_or_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert parity.main([str(tmp_path)]) == 2
    assert "no fixtures" in capsys.readouterr().err
    assert parity.main([str(tmp_path / "nope")]) == 2
    assert "fixture folder not found" in capsys.readouterr().err
    (tmp_path / "model_a_grad.pt").write_bytes(b"")  # a gradient companion alone is no fixture
    (tmp_path / "metrics_a.pt").write_bytes(b"")
    assert parity.main([str(tmp_path), "--only", "model"]) == 2
    assert "no model fixtures" in capsys.readouterr().err


def test_missing_implementations_fail_not_skip(tmp_path, monkeypatch, capsys):
    torch.save({"format_version": 1}, tmp_path / "dataset_a.pt")
    torch.save({"format_version": 1}, tmp_path / "model_a.pt")
    torch.save({"format_version": 1}, tmp_path / "model_a_grad.pt")
    monkeypatch.setitem(parity.CHECKERS, "dataset", ("benchmark._no_such_module", "dataset_*.pt"))
    monkeypatch.setitem(parity.CHECKERS, "model", ("benchmark.protocol", "model_*.pt"))  # has no parity_checks
    assert parity.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        "FAIL  dataset_a  max_diff=inf  tol=0  not implemented: module benchmark._no_such_module does not exist" in out
    )
    assert "not implemented: benchmark.protocol.parity_checks does not exist" in out
    assert "model_a_grad" not in out  # the companion is the model checker's business
    assert out.strip().endswith("0 passed, 2 failed")


def test_a_checker_error_is_a_failing_check(tmp_path, capsys):
    torch.save({"format_version": 1}, tmp_path / "metrics_broken.pt")
    assert parity.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  metrics_broken" in out and "missing field 'logits'" in out


def test_json_output(fixture_dir, tmp_path, capsys):
    torch.save(torch.load(fixture_dir / "metrics_public.pt", weights_only=True), tmp_path / "metrics_public.pt")
    torch.save({}, tmp_path / "metrics_empty.pt")
    assert parity.main([str(tmp_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["failed"] == 1 and doc["passed"] == len(doc["checks"]) - 1
    bad = [c for c in doc["checks"] if not c["passed"]]
    assert bad[0]["fixture"] == "metrics_empty.pt" and bad[0]["max_diff"] is None and bad[0]["kind"] == "metrics"
    assert {"name", "max_diff", "tol", "passed", "detail"} <= set(doc["checks"][0])


# ---------------------------------------------------------------- a fixture built here from random data


def _safe_probs() -> np.ndarray:
    """Probabilities at least 2e-3 away from every threshold of both saliency meters, so that float32 vs
    float64 rounding cannot move a pixel across one (the expected values below are computed in float64)."""
    p = np.linspace(0.01, 0.99, 500)
    sig = 1 / (1 + np.exp(-p))
    far = np.abs(p[:, None] - np.array(SAL_THRESHOLDS)[None]).min(1) > 2e-3
    far &= np.abs(sig[:, None] - np.arange(1, 20)[None] * 0.05).min(1) > 2e-3
    return p[far]


def _seg_expected(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> list[float]:
    valid = gt != 255
    iou = []
    for c in range(n_classes):
        tp = np.sum((gt == c) & (pred == c) & valid)
        fp = np.sum((gt != c) & (pred == c) & valid)
        fn = np.sum((gt == c) & (pred != c) & valid)
        iou.append(tp / max(tp + fp + fn, 1e-8))
    return iou


def _sal_expected(prob: np.ndarray, gt: np.ndarray) -> dict:
    thr = np.linspace(0.2, 0.9, 15)
    iou = np.zeros((len(prob), 15))
    prec, rec = np.zeros_like(iou), np.zeros_like(iou)
    for i in range(len(prob)):
        g = gt[i] != 0
        for j, t in enumerate(thr):
            m = prob[i] > t
            tp, fp, fn = np.sum(m & g), np.sum(m & ~g), np.sum(~m & g)
            iou[i, j] = 1.0 if not g.any() and not m.any() else tp / (tp + fp + fn)
            prec[i, j], rec[i, j] = tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12)
    mp, mr = prec.mean(0), rec.mean(0)
    f = 2 * mp * mr / (mp + mr + 1e-12)
    # Beta maxF: a second sigmoid, dataset-level counts over gt != 255, beta^2 = 0.3
    sig, valid = 1 / (1 + np.exp(-prob)), gt != 255
    fb = []
    for t in np.arange(1, 20) * 0.05:
        m = (sig >= t) & valid
        tp, pp, ap = np.sum(m * gt * valid), np.sum(m), np.sum(gt * valid)
        p, r = (tp / pp if pp else np.nan), tp / ap
        fb.append(np.nan_to_num(1.3 * p * r / (0.3 * p + r), nan=0.0))
    return {
        "mIoU": float(iou.mean(0).max()),
        "maxF": float(f.max()),
        "Beta maxF": float(max(fb)),
        "thresholds": thr.tolist(),
        "per_image_per_threshold_IoU": torch.from_numpy(iou),
        "mean_IoU_per_threshold": iou.mean(0).tolist(),
        "mean_precision_per_threshold": mp.tolist(),
        "mean_recall_per_threshold": mr.tolist(),
        "F_per_threshold": f.tolist(),
    }


def _normals_expected(logits: np.ndarray, gt: np.ndarray) -> tuple[dict, dict]:
    # the official float32 round trip unit -> (u+1)*255/2 -> 2x/255-1, then angles in float64
    u = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    u = np.float32(2) * ((u + np.float32(1)) * np.float32(255) / np.float32(2)) / np.float32(255) - np.float32(1)
    valid = np.all(gt != 255, axis=1)
    g = np.where(valid[:, None], gt, 0.0)
    deg = np.degrees(np.arccos(np.clip((u.astype(np.float64) * g).sum(1), -1, 1)))[valid]
    u2 = (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float64)  # v2 re-normalises
    deg2 = np.degrees(2 * np.arctan2(np.linalg.norm(u2 - g, axis=1), np.linalg.norm(u2 + g, axis=1)))[valid]
    res = {"mean": deg.mean(), "rmse": deg.mean(), "mean_v2": deg2.mean(), "rmse_v2": deg2.mean()}
    res.update({k: 100 * np.mean(deg < b) for k, b in (("11.25", 11.25), ("22.5", 22.5), ("30", 30.0))})
    extra = {"median_deg": float(np.median(deg)), "true_rmse_deg": float(np.sqrt(np.mean(deg**2)))}
    extra.update({"num_valid_pixels": int(valid.sum()), "note": "made by tests/test_parity_cli.py"})
    return {k: float(v) for k, v in res.items()}, extra


def make_random_fixture(path: Path, seed: int = 7, n: int = 5, h: int = 24, w: int = 32) -> dict:
    """A ``metrics_*.pt`` in the official format; expected values from the numpy code above."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n).tolist()
    batches = [order[:3], order[3:]]
    seg_logits = rng.normal(size=(n, 21, h, w)).astype(np.float32)
    seg_logits[:, 5] = -50  # class 5: never predicted and (below) never labelled
    seg_gt = rng.integers(0, 21, size=(n, 1, h, w)).astype(np.float64)
    seg_gt[seg_gt == 5] = 6
    seg_gt[rng.random(seg_gt.shape) < 0.1] = 255
    hp_logits = rng.normal(size=(n, 7, h, w)).astype(np.float32)
    hp_gt = rng.integers(0, 7, size=(n, 1, h, w)).astype(np.float64)
    hp_gt[1] = 255  # an image without parts
    prob = rng.choice(_safe_probs(), size=(n, 1, h, w))
    prob[2] = _safe_probs()[0]  # below every threshold: an empty prediction ...
    sal_logits = np.log(prob / (1 - prob)).astype(np.float32)
    sal_gt = (rng.random((n, 1, h, w)) < 0.4).astype(np.float64)
    sal_gt[2] = 0  # ... on an empty ground truth
    nrm_logits = rng.normal(size=(n, 3, h, w)).astype(np.float32)
    nrm_gt = rng.normal(size=(n, 3, h, w))
    nrm_gt /= np.linalg.norm(nrm_gt, axis=1, keepdims=True)
    nrm_gt[:, :, : h // 4] = 255
    logits = {"semseg": seg_logits, "human_parts": hp_logits, "sal": sal_logits, "normals": nrm_logits}
    gts = {"semseg": seg_gt, "human_parts": hp_gt, "sal": sal_gt, "normals": nrm_gt}

    # the official meters see images in update order
    upd = [i for b in batches for i in b]
    lg = {t: torch.from_numpy(v) for t, v in logits.items()}
    results: dict = {}
    for t, nc in (("semseg", 21), ("human_parts", 7)):
        iou = _seg_expected(logits[t][upd].argmax(1), gts[t][upd, 0], nc)
        results[t] = {"mIoU": float(np.mean(iou)), "per_class_IoU": [float(x) for x in iou]}
    p64 = 1 / (1 + np.exp(-sal_logits[upd, 0].astype(np.float64)))
    results["sal"] = _sal_expected(p64, sal_gt[upd, 0])
    results["normals"], results["normals_extra_not_from_official_code"] = _normals_expected(nrm_logits, nrm_gt)

    pct = {t: results[t]["mIoU"] * 100 for t in ("semseg", "human_parts", "sal")} | {
        "normals": results["normals"]["mean"]
    }
    terms = {t: (pct[t] - REF[t]) / REF[t] * 100 for t in ("semseg", "human_parts", "sal")}
    terms["normals"] = -(pct["normals"] - REF["normals"]) / REF["normals"] * 100
    example = {"semseg": 70.0, "human_parts": 60.0, "sal": 64.0, "normals": 17.0}
    ex_terms = [(example[t] - REF[t]) / REF[t] for t in ("semseg", "human_parts", "sal")]
    ex_terms.append(-(example["normals"] - REF["normals"]) / REF["normals"])
    fx = {
        "format_version": 1,
        "logits": lg,
        "meter_inputs": {
            # the official get_output expressions, written out
            "pred": {
                "semseg": torch.max(lg["semseg"].permute(0, 2, 3, 1), dim=3)[1],
                "human_parts": torch.max(lg["human_parts"].permute(0, 2, 3, 1), dim=3)[1],
                "sal": torch.squeeze(255 * 1 / (1 + torch.exp(-lg["sal"].permute(0, 2, 3, 1)))),
                "normals": (F.normalize(lg["normals"].permute(0, 2, 3, 1), p=2, dim=3) + 1.0) * 255 / 2.0,
            },
            "gt": {t: torch.from_numpy(v) for t, v in gts.items()},
        },
        "update_batches": batches,
        "results": results,
        "delta_m": {
            "reference_single_task": {
                "semseg_mIoU_pct": REF["semseg"],
                "human_parts_mIoU_pct": REF["human_parts"],
                "sal_mIoU_pct": REF["sal"],
                "normals_mean_deg": REF["normals"],
            },
            "metrics_used_pct": pct,
            "per_task_relative_term_pct": terms,
            "delta_m_pct": sum(terms.values()) / 4,
        },
        "delta_m_worked_example": {"metrics_pct": example, "delta_m_pct": 100 * sum(ex_terms) / 4},
    }
    torch.save(fx, path)
    return fx


def test_random_fixture_passes_and_its_perturbation_fails(tmp_path, capsys):
    fx = make_random_fixture(tmp_path / "metrics_random.pt")
    # the fixture really exercises the edge cases
    assert fx["results"]["semseg"]["per_class_IoU"][5] == 0.0
    row = [i for b in fx["update_batches"] for i in b].index(2)  # rows follow the update order
    assert bool((fx["results"]["sal"]["per_image_per_threshold_IoU"][row] == 1).all())
    assert parity.main([str(tmp_path)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert _summary(out)[1] == 0 and "PASS  metrics_random/sal/Beta maxF" in out

    fx["results"]["human_parts"]["per_class_IoU"][3] += 1e-4
    torch.save(fx, tmp_path / "metrics_random.pt")
    assert parity.main([str(tmp_path)]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "metrics_random/human_parts/per_class_IoU" in fails[0]
    assert math.isclose(float(fails[0].split("max_diff=")[1].split()[0]), 1e-4, rel_tol=1e-2)


# ---------------------------------------------------------------- the lean form and the training fixture's companion


def test_lean_fixtures_cli_writes_the_lean_form_and_refuses_bad_input(tmp_path, capsys):
    from benchmark import lean_fixtures

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    heads = {"sal": torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))}
    full = {t: F.interpolate(h, size=32, mode="bilinear", align_corners=False) for t, h in heads.items()}
    torch.save({"config": {}, "outputs": full, "head_outputs_before_resize": heads}, src / "model_a.pt")
    torch.save({"x": 1}, src / "metrics_a.pt")
    (src / "tiny").mkdir()
    (src / "tiny" / "f.txt").write_text("data")
    assert lean_fixtures.main([str(src), str(dst), "--stride", "8"]) == 0
    lean = torch.load(dst / "model_a.pt", weights_only=True)
    assert "outputs" not in lean and lean["outputs_lean"]["shape"]["sal"] == [2, 1, 32, 32]
    assert torch.equal(lean["outputs_lean"]["subsample"]["sal"], full["sal"][:, :, ::8, ::8])
    assert torch.load(dst / "metrics_a.pt", weights_only=True) == {"x": 1}
    assert (dst / "tiny" / "f.txt").read_text() == "data"
    # bad input: exit 2, one message naming the problem, nothing written
    assert lean_fixtures.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "fixture folder not found" in capsys.readouterr().err
    assert lean_fixtures.main([str(src), str(tmp_path / "out"), "--stride", "0"]) == 2
    assert "--stride must be >= 1" in capsys.readouterr().err
    torch.save({"config": {}, "outputs": {"sal": full["sal"] + 0.1}, "head_outputs_before_resize": heads},
               src / "model_b.pt")  # fmt: skip
    assert lean_fixtures.main([str(src), str(tmp_path / "out")]) == 2
    assert "model_b.pt: outputs['sal'] is not the bilinear resize" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_train_fixture_must_name_a_model_file_beside_it(tmp_path, capsys):
    torch.save({"format_version": 1, "uses_state_dict_of": "../model_public.pt"}, tmp_path / "train_x.pt")
    assert parity.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  train_x" in out and "uses_state_dict_of must name a model fixture file beside it" in out
    torch.save({"format_version": 1, "uses_state_dict_of": "model_none.pt"}, tmp_path / "train_x.pt")
    assert parity.main([str(tmp_path)]) == 1
    assert "its model fixture" in capsys.readouterr().out
