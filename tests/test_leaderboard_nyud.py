"""The leaderboard over several protocols: the NYUDv2 section (published rows, reproduced runs, Δm against a
reference chosen by name), depth's formatting and bounds, and nyud.csv under `leaderboard check`."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_leaderboard import BASE, MTLORA64, _edit_csv, main_table, run_cli, write_run

from benchmark.protocol import NYUD, PASCAL_CONTEXT, PROTOCOLS, REFERENCES, delta_m, table_value
from benchmark.results import ResultError, make_run_id, per_image_path
from leaderboard.aggregate import delta_m_rounding_tol, row_delta_m
from leaderboard.checks import run_checks
from leaderboard.data import PUBLISHED_DIR, load_published
from leaderboard.errors import PublishedDataError
from leaderboard.runs import load_results, validate_result
from leaderboard.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, PER_IMAGE_FORMAT, group_intervals
from leaderboard.tables import task_decimals, task_header

TADFORMER_REF = "tadformer-config-nyud-single-task"
NYUD_VALS = {"semseg": 41.5, "depth": 0.6123, "normals": 23.4}  # table units: mIoU %, rmse, degrees


def _sections(md: str) -> dict[str, str]:
    """Markdown text per protocol section, keyed by protocol name."""
    parts = md.split("\n## ")[1:]
    return {p.split(" ", 1)[0]: p for p in parts}


def _table(section_text: str) -> list[dict[str, str]]:
    return main_table(section_text)


def _by_label(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["Method"]: r for r in rows}


@pytest.fixture
def empty(tmp_path: Path) -> Path:
    (tmp_path / "results").mkdir()
    return tmp_path / "results"


def test_nyud_csv_columns_are_the_protocols_tasks():
    """nyud.csv has the published columns of pascal-context.csv with NYUD's task columns in their place."""
    header = {}
    for p in (PASCAL_CONTEXT, NYUD):
        with (PUBLISHED_DIR / f"{p.name}.csv").open(encoding="utf-8") as f:
            header[p.name] = next(csv.reader(f))
    pascal, nyud = header[PASCAL_CONTEXT.name], header[NYUD.name]
    first = pascal.index(PASCAL_CONTEXT.task_names[0])
    assert pascal[first : first + len(PASCAL_CONTEXT.tasks)] == list(PASCAL_CONTEXT.task_names)
    assert nyud == pascal[:first] + list(NYUD.task_names) + pascal[first + len(PASCAL_CONTEXT.tasks) :]
    rows = load_published(NYUD)
    assert {r.backbone for r in rows} == {NYUD.backbone} and {r.image_size for r in rows} == {NYUD.image_size}
    assert all(r.protocol == NYUD.name and r.protocol_version == NYUD.version for r in rows)


def test_nyud_section_beside_pascal(empty, tmp_path, capsys, monkeypatch):
    """`leaderboard build` writes a NYUD section after PASCAL's, Δm recomputed against FAAR's reference (the
    default), printed Δm beside it, depth with its own decimals and no percent sign, the reference's source."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "build", empty, "-o", "LB.md", "--plot", "p.png", "--csv", "lb.csv")
    assert rc == 0, err
    md = Path("LB.md").read_text()
    secs = _sections(md)
    assert list(secs) == list(PROTOCOLS) and md.index("## pascal-context") < md.index("## nyud")
    nyud = secs[NYUD.name]
    ref = REFERENCES[NYUD.reference]
    assert f"`{ref.name}` (the protocol's default;" in nyud and ref.source in nyud
    rows = _table(nyud)
    headers = list(rows[0])
    assert [task_header(NYUD, t) for t in NYUD.task_names] == headers[4 : 4 + len(NYUD.tasks)]
    depth = NYUD.task("depth")
    assert (
        task_decimals(NYUD, depth) == 3 and "%" not in task_header(NYUD, "depth") and "↓" in task_header(NYUD, "depth")
    )
    published = load_published(NYUD)
    assert len(rows) == len(published)
    by = _by_label(rows)
    for r in published:
        cells = by[r.label]
        assert cells["Δm % ↑"] == f"{row_delta_m(r, NYUD, NYUD.reference):+.2f}"
        assert cells["Δm printed"] == f"{r.delta_m_printed:+.2f}"  # every NYUD row is consistent: no ⚠
        for t in NYUD.tasks:
            assert cells[task_header(NYUD, t.name)] == f"{r.metrics[t.name]:.{task_decimals(NYUD, t)}f}"
    ft = by["MTL full FT"]  # the worked example: 38.85 / 0.66 / 24.33 vs 42.65 / 0.60 / 22.83
    assert ft["Depth rmse ↓"] == "0.660" and ft["Δm % ↑"] == "-8.49" and ft["Δm printed"] == "-8.49"
    # published counts of unstated policy: shown as printed, marked, never plotted; no empty plot file
    assert ft["Trainable (M) ↓"] == "28.10 ?" and "No plot:" in nyud and not Path("p-nyud.png").exists()
    assert Path("p-pascal-context.png").is_file()
    # the other reference row prints Δm 0 against its own reference: said so
    assert f"`tadformer-config-nyud-single_task` (against `{TADFORMER_REF}`)" in nyud
    # a NYUD row never lands in PASCAL's table and vice versa
    pascal = _table(secs[PASCAL_CONTEXT.name])
    assert sorted(r["Δm printed"].split()[0] for r in pascal) == sorted(
        f"{r.delta_m_printed:+.2f}" for r in load_published(PASCAL_CONTEXT)
    )
    exported = list(csv.DictReader(io.StringIO(Path("lb.csv").read_text())))
    assert sum(1 for r in exported if r["protocol"] == NYUD.id) == len(published)
    assert all(r["depth"] == "" for r in exported if r["protocol"] == PASCAL_CONTEXT.id)
    assert all(r["sal"] == "" for r in exported if r["protocol"] == NYUD.id)


def test_reproduced_nyud_runs_land_in_the_nyud_section(tmp_path, capsys, monkeypatch):
    """A result of protocol nyud.v1 appears in the NYUD section only, with its Δm recomputed and depth formatted as
    depth; a PASCAL result stays in PASCAL's table."""
    root = tmp_path / "results"
    seeds = [{**NYUD_VALS, "depth": NYUD_VALS["depth"] + d / 100, "semseg": NYUD_VALS["semseg"] + d} for d in (0, 1)]
    for seed, vals in enumerate(seeds):
        write_run(root, seed=seed, vals=vals, protocol=NYUD)
    write_run(root, method="decoders_only", config={}, vals=BASE)  # PASCAL
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "build", root, "-o", "LB.md", "--no-published", "--html", "site")
    assert rc == 0, err
    secs = _sections(Path("LB.md").read_text())
    nyud, pascal = _table(secs[NYUD.name]), _table(secs[PASCAL_CONTEXT.name])
    assert [r["Method"] for r in nyud] == ["mtlora"] and [r["Method"] for r in pascal] == ["decoders_only"]
    row = nyud[0]
    mean = {t: sum(v[t] for v in seeds) / len(seeds) for t in NYUD.task_names}
    dm = delta_m(mean, REFERENCES[NYUD.reference].values, NYUD.tasks)
    assert row["Δm % ↑"].split(" ± ")[0] == f"{dm:+.2f}" and row["Seeds"] == "2 (0,1)"
    assert row["Depth rmse ↓"].split(" ± ")[0] == f"{mean['depth']:.3f}"
    assert len(row["Depth rmse ↓"].split(" ± ")[1].split(".")[1]) == 3  # the interval at depth's decimals too
    assert "Reproduced: 2 run(s) in 1 group(s)" in secs[NYUD.name]
    data = json.loads(Path("site/data.js").read_text().removeprefix("window.LEADERBOARD_DATA = ").rstrip(";\n"))
    by_id = {s["id"]: s for s in data["sections"]}
    assert [r["method"] for r in by_id[f"{NYUD.name}-v{NYUD.version}"]["rows"]] == ["mtlora"]
    tasks = by_id[f"{NYUD.name}-v{NYUD.version}"]["tasks"]
    assert [(t["name"], t["decimals"]) for t in tasks] == [(t.name, task_decimals(NYUD, t)) for t in NYUD.tasks]
    assert math.isclose(by_id[f"{NYUD.name}-v{NYUD.version}"]["rows"][0]["values"]["delta_m"], dm, rel_tol=1e-12)


def test_reference_chosen_by_name(tmp_path, capsys, monkeypatch):
    """--reference nyud=<name>: NYUD's Δm (published and reproduced rows) against that reference, named with its
    source on the markdown and the page; PASCAL's section is unchanged."""
    root = tmp_path / "results"
    write_run(root, vals=NYUD_VALS, protocol=NYUD)  # its stored Δm is against the default reference
    write_run(root, method="decoders_only", config={}, vals=BASE)
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "build", root, "-o", "default.md")[0] == 0
    rc, _, err = run_cli(
        capsys, "build", root, "-o", "LB.md", "--reference", f"nyud={TADFORMER_REF}", "--html", "site"
    )
    assert rc == 0, err
    default, chosen = _sections(Path("default.md").read_text()), _sections(Path("LB.md").read_text())
    assert chosen[PASCAL_CONTEXT.name] == default[PASCAL_CONTEXT.name]
    text = chosen[NYUD.name]
    ref = REFERENCES[TADFORMER_REF]
    assert f"`{TADFORMER_REF}` (chosen by name; the default is `{NYUD.reference}`;" in text and ref.source in text
    by = _by_label(_table(text))
    for r in load_published(NYUD):
        assert by[r.label]["Δm % ↑"] == f"{row_delta_m(r, NYUD, TADFORMER_REF):+.2f}"
        assert by[r.label]["Δm printed"] == f"{r.delta_m_printed:+.2f}"  # printed: as the source printed it
    assert by["MTL full FT"]["Δm % ↑"] == "-4.30"
    run = by["mtlora"]
    assert run["Δm % ↑"] == f"{delta_m(NYUD_VALS, ref.values, NYUD.tasks):+.2f}"
    # the rows printed against FAAR's reference are named as such
    for r in load_published(NYUD):
        assert (f"`{r.id}` (against `{r.reference}`)" in text) == (r.reference != TADFORMER_REF)
    page = Path("site/index.html").read_text()
    assert f"<code>{TADFORMER_REF}</code> (chosen by name; the default is <code>{NYUD.reference}</code>" in page


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nyud", "expected PROTOCOL=NAME"),
        ("=x", "expected PROTOCOL=NAME"),
        ("cityscapes=x", "unknown protocol 'cityscapes'"),
        (
            "nyud=mtlora-table1-single-task",
            "'mtlora-table1-single-task' is no single-task reference of protocol 'nyud'",
        ),
        ("nyud=no-such-ref", "'no-such-ref' is no single-task reference of protocol 'nyud'"),
    ],
)
def test_bad_reference_is_a_usage_error(empty, tmp_path, capsys, value, message):
    out = tmp_path / "LB.md"
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "build", empty, "-o", out, "--reference", value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --reference" in err and message in err, err
    assert not out.exists()


def test_reference_named_twice_is_a_usage_error(empty, tmp_path, capsys):
    out = tmp_path / "LB.md"
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "build", empty, "-o", out, "--reference", f"nyud={TADFORMER_REF}",
                "--reference", f"nyud={NYUD.reference}")  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --reference: protocol 'nyud' named twice" in err and not out.exists()
    # the same choice twice is no conflict
    rc, _, _ = run_cli(capsys, "build", empty, "-o", out, *["--reference", f"nyud={TADFORMER_REF}"] * 2)
    assert rc == 0 and out.exists()


def test_depth_out_of_range_is_refused(tmp_path):
    """Depth rmse is bounded by its TaskSpec (>= 0, metres): a negative one is refused in a result and in nyud.csv."""
    lo, hi = NYUD.task("depth").bounds
    path = write_run(tmp_path, vals={**NYUD_VALS, "depth": lo - 0.25}, protocol=NYUD)
    with pytest.raises(ResultError, match=rf"field 'metrics\.depth\.rmse': expected a value in \[{lo:g}, {hi:g}\]"):
        validate_result(json.loads(path.read_text()), str(path))
    pub = tmp_path / "published"
    shutil.copytree(PUBLISHED_DIR, pub)
    _edit_csv(pub / "nyud.csv", "faar-nyud-faar", depth="-0.63")
    with pytest.raises(
        PublishedDataError, match=r"nyud\.csv, row \d+, column 'depth': expected a value in \[0, inf\]"
    ):
        load_published(NYUD, pub)
    _edit_csv(pub / "nyud.csv", "faar-nyud-faar", depth="inf")
    with pytest.raises(PublishedDataError, match=r"column 'depth': expected a finite number"):
        load_published(NYUD, pub)


def test_check_validates_nyud_csv(tmp_path):
    """`leaderboard check` on nyud.csv: printed Δm against the recomputed one within NYUD's rounding bound (0.29
    against FAAR's depth of 0.60), the reference rows equal to the references they name, listings honoured."""
    pub = tmp_path / "published"
    shutil.copytree(PUBLISHED_DIR, pub)
    (tmp_path / "empty").mkdir()
    paths = [tmp_path / "empty"]
    report = run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub)
    assert report.ok, report.failures
    assert any(
        line.startswith(f"published-delta-m: {len(load_published(NYUD))} nyud row(s)") for line in report.passed
    )
    tol = delta_m_rounding_tol(NYUD)
    ft = next(r for r in load_published(NYUD) if r.id == "faar-nyud-full_ft")
    recomputed = row_delta_m(ft, NYUD)
    inside, outside = round(recomputed + 0.9 * tol, 2), round(recomputed + 1.1 * tol + 0.01, 2)
    _edit_csv(pub / "nyud.csv", ft.id, delta_m_printed=f"{inside:.2f}")
    assert run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub).ok
    _edit_csv(pub / "nyud.csv", ft.id, delta_m_printed=f"{outside:.2f}")
    fails = run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub).failures
    assert [f.check for f in fails] == ["published-delta-m"] and "nyud.csv, row 4 (faar-nyud-full_ft" in fails[
        0
    ].message
    # a listed inconsistency is tolerated (and must stay one)
    with (pub / "known_inconsistencies.csv").open("a", encoding="utf-8") as f:
        f.write(f"{ft.id},delta_m_printed,test listing\n")
    assert run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub).ok
    # the reference rows must equal the references they name
    _edit_csv(pub / "nyud.csv", "tadformer-config-nyud-single_task", depth="0.6437")
    fails = run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub).failures
    assert [f.check for f in fails] == ["reference-row"] and "'depth': (0.6437, 0.6436)" in fails[0].message


def test_nyud_csv_with_pascal_columns_is_refused(tmp_path):
    """The columns of a protocol's file are its tasks: PASCAL's task columns in nyud.csv are refused by name."""
    pub = tmp_path / "published"
    shutil.copytree(PUBLISHED_DIR, pub)
    text = (pub / "nyud.csv").read_text(encoding="utf-8")
    (pub / "nyud.csv").write_text(text.replace(",depth,", ",sal,", 1), encoding="utf-8")
    with pytest.raises(PublishedDataError, match=r"nyud\.csv: missing column 'depth' in the header"):
        load_published(NYUD, pub)


def test_hostile_nyud_text_is_escaped(tmp_path, capsys, monkeypatch):
    pub = tmp_path / "published"
    shutil.copytree(PUBLISHED_DIR, pub)
    _edit_csv(pub / "nyud.csv", "faar-nyud-faar", label="<img src=x onerror=alert(1)>|x", notes="<script>x</script>")
    (tmp_path / "results").mkdir()
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "build", "results", "-o", "LB.md", "--published-dir", pub, "--html", "site")
    assert rc == 0, err
    md = Path("LB.md").read_text()
    assert "<img" not in md and "<script>" not in md and "&lt;img src=x onerror=alert(1)&gt;\\|x" in md
    data = Path("site/data.js").read_text()
    assert "<img" not in data and "<script>" not in data and "\\u003cimg" in data
    assert "<img" not in Path("site/index.html").read_text()


# --------------------------------------------------------------------------- per-image statistics of depth


def _nyud_doc(run_id: str, n: int, rng: random.Random) -> dict:
    """Per-image statistics of a NYUD run in benchmark.metrics.per_image_statistics' form (one image without a
    valid depth pixel: depth missing everywhere)."""
    tasks: dict = {}
    for t in NYUD.tasks:
        if t.kind == "semseg":
            union = [[rng.randint(0, 30) for _ in range(t.out_channels)] for _ in range(n)]
            tasks[t.name] = {"kind": "segmentation", "union": union,
                             "intersect": [[rng.randint(0, u) for u in row] for row in union]}  # fmt: skip
        elif t.kind == "depth":
            cnt = [0] + [rng.randint(1, 500) for _ in range(n - 1)]
            tasks[t.name] = {"kind": "depth", "n": cnt, "sum_sq_err": [c * rng.uniform(0.1, 0.6) for c in cnt],
                             "sum_sq_log_err": [c * rng.uniform(0.01, 0.1) for c in cnt]}  # fmt: skip
        else:
            cnt = [rng.randint(1, 40) for _ in range(n)]
            tasks[t.name] = {"kind": "normals", "n": cnt, "sum_deg": [c * rng.uniform(10, 40) for c in cnt]}
    return {"format": PER_IMAGE_FORMAT, "version": 1, "run_id": run_id, "n_images": n, "images_sha256": "b" * 64,
            "tasks": tasks}  # fmt: skip


def _nyud_metrics(doc: dict, idx: list[int]) -> dict[str, float]:
    """Table values of the images ``idx`` (with repeats), the meters' formulas written out in plain Python."""
    out = {}
    for t in NYUD.tasks:
        s = doc["tasks"][t.name]
        if s["kind"] == "segmentation":
            c = len(s["union"][0])
            inter = [sum(s["intersect"][i][k] for i in idx) for k in range(c)]
            union = [sum(s["union"][i][k] for i in idx) for k in range(c)]
            out[t.name] = 100 * sum(i / max(u, 1e-8) for i, u in zip(inter, union, strict=True)) / c
        elif s["kind"] == "depth":
            out[t.name] = math.sqrt(sum(s["sum_sq_err"][i] for i in idx) / sum(s["n"][i] for i in idx))
        else:
            out[t.name] = sum(s["sum_deg"][i] for i in idx) / sum(s["n"][i] for i in idx)
    return out


def _write_nyud_run_with_images(root: Path, n: int = 9) -> tuple[Path, dict]:
    run_id = make_run_id(NYUD.name, NYUD.version, "mtlora", MTLORA64, [0])
    doc = _nyud_doc(run_id, n, random.Random(5))
    vals = _nyud_metrics(doc, list(range(n)))
    path = write_run(root, vals=vals, protocol=NYUD)
    data = json.loads(path.read_text())
    # the stored metrics to the last bit as the statistics reduce (fsum, as the meters; write_run divides by 100)
    seg = doc["tasks"]["semseg"]
    inter = [sum(col) for col in zip(*seg["intersect"], strict=True)]
    union = [sum(col) for col in zip(*seg["union"], strict=True)]
    data["metrics"]["semseg"]["mIoU"] = math.fsum(i / max(u, 1e-8) for i, u in zip(inter, union, strict=True)) / len(
        union
    )
    data["metrics"]["depth"]["rmse"] = math.sqrt(math.fsum(doc["tasks"]["depth"]["sum_sq_err"]) / sum(
        doc["tasks"]["depth"]["n"]))  # fmt: skip
    data["metrics"]["normals"]["mean"] = math.fsum(doc["tasks"]["normals"]["sum_deg"]) / sum(
        doc["tasks"]["normals"]["n"]
    )
    table = {t.name: table_value(t, data["metrics"][t.name][t.metric]) for t in NYUD.tasks}
    data["delta_m"]["value"] = delta_m(table, REFERENCES[NYUD.reference].values, NYUD.tasks)
    path.write_text(json.dumps(data))
    per_image_path(path).write_bytes(gzip.compress(json.dumps(doc).encode()))
    return path, doc


def test_depth_per_image_statistics_give_a_bootstrap_interval(tmp_path):
    """A one-seed NYUD run with per-image statistics: depth rmse pooled over pixels reduces to the stated metric,
    and its bootstrap interval is the one an explicit resampling of the images gives."""
    path, doc = _write_nyud_run_with_images(tmp_path / "results")
    loaded = load_results([tmp_path / "results"])
    assert not loaded.errors, loaded.errors
    run = loaded.runs[0]
    assert run.per_image is not None
    iv = group_intervals([run], NYUD)
    n = doc["n_images"]
    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n)).tolist()
    ref = REFERENCES[NYUD.reference].values
    draws = [_nyud_metrics(doc, row) for row in idx]
    for d in draws:
        d["delta_m"] = delta_m(d, ref, NYUD.tasks)
    for k in (*NYUD.task_names, "delta_m"):
        lo, hi = np.percentile([d[k] for d in draws], [2.5, 97.5])
        assert iv[k].lower == pytest.approx(lo, rel=1e-9) and iv[k].upper == pytest.approx(hi, rel=1e-9), k
    assert iv["depth"].lower < run.table_values()["depth"] < iv["depth"].upper


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["sum_sq_err"].__setitem__(1, d["sum_sq_err"][1] * 1.5), "tasks.depth reduce to rmse"),
        (lambda d: d["sum_sq_err"].__setitem__(0, 1.0), "an error sum on an image without one"),
        (lambda d: d["n"].__setitem__(2, -1), "valid-pixel counts and squared-error sums >= 0"),
        (lambda d: d.pop("sum_sq_log_err"), "field 'tasks.depth.sum_sq_log_err': expected a 1-D array"),
    ],
    ids=["tampered", "sum_without_pixels", "negative_count", "missing_log"],
)
def test_bad_depth_statistics_are_refused(tmp_path, edit, message):
    path, doc = _write_nyud_run_with_images(tmp_path / "results")
    edit(doc["tasks"]["depth"])
    per_image_path(path).write_bytes(gzip.compress(json.dumps(doc).encode()))
    loaded = load_results([tmp_path / "results"])
    assert len(loaded.errors) == 1 and message in loaded.errors[0], loaded.errors


def test_compare_two_nyud_configurations(tmp_path, capsys):
    """`leaderboard compare` on NYUD runs: per NYUD task and Δm, depth one decimal finer than the table."""
    for seed, d in enumerate((0.0, 0.01, 0.02)):
        write_run(tmp_path / "a", seed=seed, vals={**NYUD_VALS, "depth": NYUD_VALS["depth"] + d}, protocol=NYUD)
        write_run(tmp_path / "b", seed=seed, vals={**NYUD_VALS, "depth": NYUD_VALS["depth"] + 2 * d + 0.05},
                  protocol=NYUD)  # fmt: skip
    rc, out, err = run_cli(capsys, "compare", tmp_path / "a", tmp_path / "b")
    assert rc == 0, err
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()
            if line.startswith("| ")}  # fmt: skip
    assert [h for h in rows if h] == [task_header(NYUD, t) for t in NYUD.task_names] + ["Δm % ↑"]
    depth = rows[task_header(NYUD, "depth")]
    assert depth[0] == f"{NYUD_VALS['depth'] + 0.01:.4f}" and depth[1] == f"{NYUD_VALS['depth'] + 0.07:.4f}"
    assert depth[2] == "-0.0600" and "paired t-test over the 3 common seeds" in out
