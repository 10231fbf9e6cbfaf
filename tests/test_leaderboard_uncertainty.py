"""Uncertainty: per-image statistics written by a run, 95% intervals in the leaderboard, ``leaderboard compare``.

Every interval and p-value is recomputed here independently: t-intervals and t-tests with scipy.stats
(``t.interval``, ``ttest_rel``, ``ttest_ind(equal_var=False)``), bootstrap intervals by explicit resampling of
image indices and the meters' formulas written out in plain Python.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from test_leaderboard import BASE, main_table, run_cli, seeds_vals, write_run

from benchmark.protocol import PASCAL_CONTEXT as P
from benchmark.protocol import REFERENCES, delta_m, table_value
from benchmark.results import ResultError, make_run_id, per_image_path
from leaderboard.compare import compare_runs
from leaderboard.errors import LeaderboardError
from leaderboard.runs import Run, load_results
from leaderboard.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, PER_IMAGE_FORMAT, load_per_image

ROOT = Path(__file__).resolve().parents[1]
REF = REFERENCES[P.reference].values
KEYS = (*P.task_names, "delta_m")


# --------------------------------------------------------------------------- independent reference computations


def metrics_from_images(doc: dict, idx: list[int]) -> dict[str, float]:
    """Primary metrics (result units) of the images ``idx`` (with repeats), written out as the meters define them."""
    out = {}
    for t in P.tasks:
        s = doc["tasks"][t.name]
        if s["kind"] == "segmentation":
            c = len(s["intersect"][0])
            inter = [sum(s["intersect"][i][k] for i in idx) for k in range(c)]
            union = [sum(s["union"][i][k] for i in idx) for k in range(c)]
            out[t.name] = sum(i / max(u, 1e-8) for i, u in zip(inter, union, strict=True)) / c
        elif s["kind"] == "saliency":
            best = -1.0
            for j in range(len(s["counts"][0])):
                ious = []
                for i in idx:
                    tp, fp, fn = s["counts"][i][j]
                    ious.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
                best = max(best, sum(ious) / len(ious))
            out[t.name] = best
        else:
            out[t.name] = sum(s["sum_deg"][i] for i in idx) / sum(s["n"][i] for i in idx)
    return out


def table_and_dm(m: dict[str, float]) -> dict[str, float]:
    v = {t.name: table_value(t, m[t.name]) for t in P.tasks}
    v["delta_m"] = delta_m(v, REF, P.tasks)
    return v


def bootstrap_reference(docs: list[dict], seeds: list[int], n_res: int = BOOTSTRAP_RESAMPLES):
    """Resampled values per doc; ``seeds[i]`` draws doc i's indices (equal seeds: the same images for both)."""
    out = []
    for doc, seed in zip(docs, seeds, strict=True):
        n = doc["n_images"]
        idx = np.random.default_rng(seed).integers(0, n, size=(n_res, n)).tolist()
        out.append([table_and_dm(metrics_from_images(doc, row)) for row in idx])
    return out


def percentile(xs: list[float], q: float) -> float:
    """numpy's default (linear) percentile, written out."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------- synthetic per-image statistics


def synthetic_doc(run_id: str, n: int, rng: random.Random, images: str = "a" * 64) -> dict:
    tasks = {}
    for t in P.tasks:
        if t.name in ("semseg", "human_parts"):
            union = [[rng.randint(0, 50) for _ in range(t.out_channels)] for _ in range(n)]
            inter = [[rng.randint(0, u) for u in row] for row in union]
            tasks[t.name] = {"kind": "segmentation", "intersect": inter, "union": union}
        elif t.name == "sal":
            tasks[t.name] = {"kind": "saliency", "thresholds": [0.2, 0.5, 0.9],
                             "counts": [[[rng.randint(0, 30) for _ in range(3)] for _ in range(3)] for _ in range(n)]}  # fmt: skip
        else:
            cnt = [rng.randint(1, 40) for _ in range(n)]
            tasks[t.name] = {"kind": "normals", "n": cnt, "sum_deg": [c * rng.uniform(10, 40) for c in cnt]}
    return {"format": PER_IMAGE_FORMAT, "version": 1, "run_id": run_id, "n_images": n, "images_sha256": images,
            "tasks": tasks}  # fmt: skip


def write_run_with_images(root: Path, seed: int, n: int = 12, method: str = "lora", images: str = "a" * 64,
                          rng_seed: int | None = None) -> tuple[Path, dict]:  # fmt: skip
    """A success result whose metrics are what its synthetic per-image statistics reduce to."""
    config = {"rank": 4}
    run_id = make_run_id(P.name, P.version, method, config, [seed])
    doc = synthetic_doc(run_id, n, random.Random(rng_seed if rng_seed is not None else seed), images)
    vals = {t: table_value(P.task(t), v) for t, v in metrics_from_images(doc, list(range(n))).items()}
    path = write_run(root, method=method, config=config, seed=seed, vals=vals)
    data = json.loads(path.read_text())
    # the stored metrics must be exactly the reduction (write_run divides by 100); restate them unrounded
    m = metrics_from_images(doc, list(range(n)))
    for t in P.tasks:
        data["metrics"][t.name][t.metric] = m[t.name]
    data["delta_m"]["value"] = table_and_dm(m)["delta_m"]
    path.write_text(json.dumps(data))
    per_image_path(path).write_bytes(gzip.compress(json.dumps(doc).encode()))
    return path, doc


# --------------------------------------------------------------------------- a real run records its statistics


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> Path:
    """Two seeds of ``run_benchmark --method lora --preset tiny`` (the golden reference-run setup), filed as the
    committed layout with status success, as if they were protocol runs, so the leaderboard tables them."""
    work = tmp_path_factory.mktemp("tiny")
    results = work / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for seed in (0, 1):
        wd = work / f"run{seed}"
        cmd = [sys.executable, "-m", "benchmark.cli", "--method", "lora", "--preset", "tiny", "--seed", str(seed),
               "--work-dir", str(wd)]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        data = json.loads((wd / "result.json").read_text())
        assert per_image_path(wd / "result.json").is_file(), "the run wrote no per-image statistics"
        data["status"], data["notes"] = "success", []
        dest = results / P.name / "lora" / f"{data['run_id']}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(data))
        per_image_path(dest).write_bytes(per_image_path(wd / "result.json").read_bytes())
    return results


def test_run_records_per_image_statistics_that_reduce_to_its_metrics(tiny_runs):
    files = sorted(tiny_runs.rglob("*.json"))
    assert len(files) == 2
    for f in files:
        data = json.loads(f.read_text())
        doc = json.loads(gzip.decompress(per_image_path(f).read_bytes()))
        assert doc["run_id"] == data["run_id"] and doc["format"] == PER_IMAGE_FORMAT
        n = doc["n_images"]
        assert all(len(doc["tasks"][t]["intersect"]) == n for t in ("semseg", "human_parts"))
        got = metrics_from_images(doc, list(range(n)))
        for t in P.tasks:  # same integer sums and divisions as the meters: float64 rounding only
            assert got[t.name] == pytest.approx(data["metrics"][t.name][t.metric], rel=1e-12, abs=1e-12)
    loaded = load_results([tiny_runs])
    assert not loaded.errors and all(r.per_image is not None for r in loaded.runs)


def test_tiny_two_seed_runs_show_intervals_in_markdown_and_page(tiny_runs, tmp_path, capsys):
    out, site = tmp_path / "LB.md", tmp_path / "site"
    rc, _, err = run_cli(capsys, "build", tiny_runs, "-o", out, "--html", site, "--no-published")
    assert rc == 0, err
    row = main_table(out.read_text())[0]
    runs = [json.loads(f.read_text()) for f in sorted(tiny_runs.rglob("*.json"))]
    for t in P.tasks:
        vals = [table_value(t, r["metrics"][t.name][t.metric]) for r in runs]
        sem = sps.sem(vals)  # 0 when both seeds give the same value (scipy's interval is then NaN, the width is 0)
        lo, hi = sps.t.interval(0.95, df=1, loc=np.mean(vals), scale=sem) if sem > 0 else (0.0, 0.0)
        header = next(h for h in row if h.startswith(t.label))
        assert row[header] == f"{np.mean(vals):.2f} ± {(hi - lo) / 2:.2f}"
    data = (site / "data.js").read_text()
    assert "t-interval over 2 seeds" in data


def test_compare_tiny_runs_bootstrap_recomputed(tiny_runs, capsys):
    a, b = sorted((tiny_runs / P.name / "lora").glob("*.json"))
    rc, out, err = run_cli(capsys, "compare", a, b)
    assert rc == 0, err
    assert "paired on the same images" in out
    docs = [json.loads(gzip.decompress(per_image_path(f).read_bytes())) for f in (a, b)]
    ra, rb = bootstrap_reference(docs, [BOOTSTRAP_SEED, BOOTSTRAP_SEED])
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in out.splitlines()
             if ln.startswith("| ") and "interval" not in ln}  # fmt: skip
    for k, label in zip(KEYS, [*(t.label for t in P.tasks), "Δm"], strict=True):
        d = [x[k] - y[k] for x, y in zip(ra, rb, strict=True)]
        cells = next(v for h, v in lines.items() if h.startswith(label))
        assert cells[3] == f"[{percentile(d, 2.5):+.3f}, {percentile(d, 97.5):+.3f}]"
        n = len(d)
        p = min(1.0, 2 * min((sum(x <= 0 for x in d) + 1) / (n + 1), (sum(x >= 0 for x in d) + 1) / (n + 1)))
        assert cells[4] == f"{p:.4f}"


# --------------------------------------------------------------------------- synthetic: intervals and compare


def test_bootstrap_interval_of_one_run_is_recomputed(tmp_path):
    path, doc = write_run_with_images(tmp_path / "results", seed=0)
    lb_rows = _frame_rows(tmp_path / "results")
    (row,) = lb_rows
    (res,) = bootstrap_reference([doc], [BOOTSTRAP_SEED])
    for k in KEYS:
        xs = [r[k] for r in res]
        assert row[f"{k}_ci_lo"] == pytest.approx(percentile(xs, 2.5), rel=1e-9, abs=1e-9)
        assert row[f"{k}_ci_hi"] == pytest.approx(percentile(xs, 97.5), rel=1e-9, abs=1e-9)
    assert row["ci_method"].startswith(f"bootstrap over 12 validation images ({BOOTSTRAP_RESAMPLES} resamples")


def _frame_rows(root: Path) -> list[dict]:
    from leaderboard.build import collect

    lb = collect([root], include_published=False)
    return lb.sections[0].frame.to_dict("records")


def test_t_interval_over_three_seeds(tmp_path, capsys):
    root = tmp_path / "results"
    for seed, d in enumerate((0.0, 0.3, -0.2)):
        write_run(root, seed=seed, vals=seeds_vals(d))
    (row,) = _frame_rows(root)
    for k in KEYS:
        if k == "delta_m":
            vals = [delta_m(seeds_vals(d), REF, P.tasks) for d in (0.0, 0.3, -0.2)]
        else:
            vals = [seeds_vals(d)[k] for d in (0.0, 0.3, -0.2)]
        lo, hi = sps.t.interval(0.95, df=2, loc=np.mean(vals), scale=sps.sem(vals))
        assert (row[f"{k}_ci_lo"], row[f"{k}_ci_hi"]) == pytest.approx((lo, hi), rel=1e-9)
    assert row["ci_method"] == "t-interval over 3 seeds"


def test_single_seed_without_statistics_has_no_interval_and_published_rows_none(tmp_path, capsys):
    root = tmp_path / "results"
    write_run(root, seed=0, vals=BASE)
    out = tmp_path / "LB.md"
    rc, _, err = run_cli(capsys, "build", root, "-o", out)
    assert rc == 0, err
    rows = main_table(out.read_text())
    assert all("±" not in v for r in rows for v in r.values())  # no zero-width interval anywhere
    assert "Published rows have no interval" in out.read_text()


def _runs(root: Path) -> list[Run]:
    loaded = load_results([root])
    loaded.raise_for_errors()
    return loaded.runs


@pytest.mark.parametrize("paired", [True, False], ids=["paired_seeds", "welch"])
def test_compare_over_seeds_matches_scipy(paired, tmp_path):
    offsets_a, offsets_b = (0.0, 0.4, -0.3, 0.1), (-0.5, 0.2, -0.9)
    seeds_b = (0, 1, 2, 3) if paired else (10, 11, 12)
    offsets_b = (-0.5, 0.2, -0.9, -0.1) if paired else offsets_b
    for s, d in zip((0, 1, 2, 3), offsets_a, strict=True):
        write_run(tmp_path / "a", method="lora", config={"rank": 4}, seed=s, vals=seeds_vals(d))
    for s, d in zip(seeds_b, offsets_b, strict=True):
        write_run(tmp_path / "b", method="lora", config={"rank": 8}, seed=s, vals=seeds_vals(d * 1.7 + 0.05))
    c = compare_runs(_runs(tmp_path / "a"), _runs(tmp_path / "b"))
    assert ("paired t-test" in c.test) == paired
    for row in c.rows:
        if row.key == "delta_m":
            xa = [delta_m(seeds_vals(d), REF, P.tasks) for d in offsets_a]
            xb = [delta_m(seeds_vals(d * 1.7 + 0.05), REF, P.tasks) for d in offsets_b]
        else:
            xa = [seeds_vals(d)[row.key] for d in offsets_a]
            xb = [seeds_vals(d * 1.7 + 0.05)[row.key] for d in offsets_b]
        res = sps.ttest_rel(xa, xb) if paired else sps.ttest_ind(xa, xb, equal_var=False)
        ci = res.confidence_interval(0.95)
        assert row.diff == pytest.approx(np.mean(xa) - np.mean(xb), rel=1e-9, abs=1e-12)
        assert (row.lower, row.upper) == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert row.p_value == pytest.approx(res.pvalue, rel=1e-9)


def test_compare_bootstrap_independent_images(tmp_path):
    """Runs evaluated on different image sets: independent resamples (seeds 0 and 1), not paired."""
    _, doc_a = write_run_with_images(tmp_path / "a", seed=0, n=9, images="a" * 64)
    _, doc_b = write_run_with_images(tmp_path / "b", seed=0, n=11, method="mtlora", images="b" * 64, rng_seed=5)
    c = compare_runs(_runs(tmp_path / "a"), _runs(tmp_path / "b"))
    assert "independent resamples" in c.test
    ra, rb = bootstrap_reference([doc_a, doc_b], [BOOTSTRAP_SEED, BOOTSTRAP_SEED + 1])
    for row in c.rows:
        d = [x[row.key] - y[row.key] for x, y in zip(ra, rb, strict=True)]
        assert (row.lower, row.upper) == pytest.approx((percentile(d, 2.5), percentile(d, 97.5)), rel=1e-9, abs=1e-9)


def test_compare_refusals(tmp_path, capsys):
    write_run(tmp_path / "a", method="lora", config={"rank": 4}, seed=0)
    write_run(tmp_path / "a", method="lora", config={"rank": 4}, seed=1)
    write_run(tmp_path / "b", method="lora", config={"rank": 8}, seed=0)
    rc, _, err = run_cli(capsys, "compare", tmp_path / "a", tmp_path / "b")
    assert rc == 1 and "A has 2 seeds, B has 1 seed without per-image statistics" in err
    rc, _, err = run_cli(capsys, "compare", tmp_path, tmp_path / "b")
    assert rc == 1 and "holds 2 configurations" in err
    write_run(tmp_path / "b", method="lora", config={"rank": 8}, seed=1, edit=lambda d: d["params"].update(
        counting_policy="encoder-side"))  # fmt: skip
    a, b = _runs(tmp_path / "a"), _runs(tmp_path / "b")
    with pytest.raises(LeaderboardError, match="parameters counted under different policies"):
        compare_runs(a, b)
    other = [Run(r.path, {**r.data, "protocol": {"name": P.name, "version": 2}}) for r in a]
    with pytest.raises(
        LeaderboardError, match="not comparable: A is protocol pascal-context.v1, B is pascal-context.v2"
    ):
        compare_runs(a, other)
    ref = [Run(r.path, {**r.data, "delta_m": {**r.data["delta_m"], "reference": "other-reference"}}) for r in a]
    with pytest.raises(LeaderboardError, match="different references"):
        compare_runs(a, ref)


def test_per_image_file_of_another_run_or_tampered_is_an_error(tmp_path, capsys):
    path, doc = write_run_with_images(tmp_path / "results", seed=0)
    doc["tasks"]["normals"]["sum_deg"][0] += 1.0  # the reduction no longer gives the stated metric
    per_image_path(path).write_bytes(gzip.compress(json.dumps(doc).encode()))
    rc, _, err = run_cli(capsys, "validate", tmp_path / "results")
    assert rc == 1 and "per_image.json.gz: tasks.normals reduce to mean" in err
    doc["tasks"]["normals"]["sum_deg"][0] -= 1.0
    doc["run_id"] = "someone-else"
    per_image_path(path).write_bytes(gzip.compress(json.dumps(doc).encode()))
    rc, _, err = run_cli(capsys, "validate", tmp_path / "results")
    assert rc == 1 and "field 'run_id': 'someone-else' is not the result's" in err
    per_image_path(path).write_bytes(b"\x1f\x8b\x08garbage")
    rc, _, err = run_cli(capsys, "validate", tmp_path / "results")
    assert rc == 1 and "cannot read per-image statistics" in err


JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
JSON_ANY = st.recursive(JSON_LEAF, lambda i: st.lists(i, max_size=3) | st.dictionaries(st.text(max_size=6), i, max_size=3),
                        max_leaves=8)  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_per_image_reader_answers_any_mutation(tmp_path_factory, data):
    """Any edit of a per-image file gives statistics or one ResultError naming the file, never a traceback."""
    root = tmp_path_factory.mktemp("pi")
    path, doc = write_run_with_images(root, seed=0, n=3)
    result = json.loads(path.read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        task = data.draw(st.sampled_from([*P.task_names, None]))
        tasks = doc.get("tasks")
        node = doc if task is None else (tasks.get(task) if isinstance(tasks, dict) else None)
        if not isinstance(node, dict) or not node:
            continue
        key = data.draw(st.sampled_from(sorted(node)))
        if data.draw(st.booleans()):
            node[key] = data.draw(JSON_ANY)
        elif isinstance(node[key], list) and node[key]:
            i = data.draw(st.integers(0, len(node[key]) - 1))
            node[key][i] = data.draw(JSON_ANY)
        else:
            node.pop(key)
    per_image_path(path).write_bytes(gzip.compress(json.dumps(doc).encode()))
    try:
        load_per_image(path, result, P)
    except ResultError as e:
        assert str(e).startswith(str(per_image_path(path)))
