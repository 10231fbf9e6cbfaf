"""Leaderboard: aggregation over seeds, markdown/CSV/plot output, regression checks, bad input, torch-free import.

Result files are synthetic RunResults written here (valid run ids from ``make_run_id``, Δm from
``benchmark.protocol.delta_m``); the parameter-count check runs against an injected command runner.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from scipy.stats import t as t_dist

from benchmark.protocol import PASCAL_CONTEXT as P
from benchmark.protocol import REFERENCES, Protocol, delta_m, table_value
from benchmark.results import RunResult, make_run_id
from leaderboard.checks import (
    CheckReport,
    CommandOutput,
    check_param_counts,
    run_checks,
    run_command,
)
from leaderboard.cli import main
from leaderboard.data import PUBLISHED_DIR, load_expected_params, load_published
from leaderboard.errors import PublishedDataError
from leaderboard.plot import pareto_front
from leaderboard.runs import load_results

ROOT = Path(__file__).resolve().parents[1]
MTLORA64 = {"shared_rank": [64, 64, 64, 64], "task_rank": 4}
BASE = {"semseg": 67.7, "human_parts": 59.9, "sal": 65.1, "normals": 16.7}  # table units


def write_run(
    root: Path,
    method: str = "mtlora",
    config: dict | None = None,
    seed: int = 0,
    vals: dict[str, float] | None = None,
    status: str = "success",
    version: int | None = None,
    cost: dict | None = None,
    edit=None,
    name: str | None = None,
    protocol: Protocol = P,
    reference: str | None = None,
) -> Path:
    """A valid RunResult file under root/<protocol>/<method>/<run_id>.json; ``edit`` may corrupt the dict after.
    ``vals``: the primary metric of every task of ``protocol`` in table units; Δm stored against ``reference``
    (default: the protocol's)."""
    config = MTLORA64 if config is None else config
    vals = vals or BASE
    reference = reference or protocol.reference
    version = protocol.version if version is None else version
    tasks = protocol.tasks
    metrics = {t.name: {t.metric: vals[t.name] / 100 if t.percent else vals[t.name], "extra": 1.0} for t in tasks}
    scores = {t.name: table_value(t, metrics[t.name][t.metric]) for t in tasks}
    run_id = make_run_id(protocol.name, version, method, config, [seed])
    result = RunResult(
        run_id=run_id,
        status=status,
        protocol={"name": protocol.name, "version": version},
        method={"name": method, "config": config},
        seeds=[seed],
        preset="paper",
        metrics=metrics,
        delta_m={"value": delta_m(scores, REFERENCES[reference].values, tasks), "reference": reference},
        params={"decoders": 1946624, "adapter": 4798464, "other_trainable_backbone": 1599546, "trainable": 8344634,
                "total": 34262906},
        selection={"rule": "final", "epoch": 300, "iteration": 299_700},
        cost=cost if cost is not None else {"train_images_per_s": 100.0 + seed, "peak_mem_bytes": (10 + seed) * 2**30},
        notes=["smoke preset"] if status == "debug" else [],
    )  # fmt: skip
    path = root / protocol.name / method / f"{name or run_id}.json"
    data = result.to_dict()
    if edit is not None:
        edit(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def seeds_vals(d: float) -> dict[str, float]:
    return {"semseg": BASE["semseg"] + d, "human_parts": BASE["human_parts"] - d, "sal": BASE["sal"] + 2 * d,
            "normals": BASE["normals"] + d / 2}  # fmt: skip


SEED_OFFSETS = (0.0, 0.2, -0.1)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """3 seeds of mtlora r64, 1 decoders_only run, 1 debug and 1 failed run (both skipped)."""
    root = tmp_path / "results"
    for seed, d in enumerate(SEED_OFFSETS):
        write_run(root, seed=seed, vals=seeds_vals(d))
    write_run(root, method="decoders_only", config={}, vals={"semseg": 62.0, "human_parts": 52.0, "sal": 60.0,
              "normals": 18.9}, cost={})  # fmt: skip
    write_run(root, seed=7, status="debug")
    write_run(root, seed=8, status="failed")
    return root


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def main_table(md: str) -> list[dict[str, str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|   # |"))
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[start:]]
    out = []
    for cells in split[2:]:
        if len(cells) != len(split[0]):
            break
        out.append(dict(zip(split[0], cells, strict=True)))
    return out


# --------------------------------------------------------------------------- aggregation and outputs


def test_pareto_front():
    pts = [(1.0, 1.0), (2.0, 3.0), (2.0, 0.5), (3.0, 2.0), (5.0, 4.0), (0.5, -1.0), (5.0, 4.0)]
    assert pareto_front(pts) == [5, 0, 1, 4]
    assert pareto_front([]) == []


def test_build_groups_seeds_and_reports_skips(results, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "build", results, "-o", "LB.md", "--csv", "lb.csv", "--plot", "plot.png")
    # one plot per protocol section with plottable rows: PASCAL's; NYUD's published counts state no policy
    assert rc == 0, err
    assert "skipped 2 file(s)" in err and "status debug (smoke preset)" in err and "status failed" in err
    assert "--seed7.json" in err and "--seed8.json" in err
    md = Path("LB.md").read_text()
    rows = main_table(md)
    header = list(rows[0])
    assert header[4:8] == ["SemSeg mIoU % ↑", "Parts mIoU % ↑", "Sal mIoU % ↑", "Normals mean° ↓"]
    by_method = {r["Method"]: r for r in rows}
    row = by_method["mtlora"]
    per_seed = [seeds_vals(d) for d in SEED_OFFSETS]
    means = {}
    for t, h in zip(P.task_names, header[4:8], strict=True):
        xs = [v[t] for v in per_seed]
        means[t] = statistics.mean(xs)
        half = t_dist.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / len(xs) ** 0.5  # 95% t-interval over seeds
        assert row[h] == f"{means[t]:.2f} ± {half:.2f}"
    dms_seed = [delta_m(v, REFERENCES[P.reference].values, P.tasks) for v in per_seed]
    half = t_dist.ppf(0.975, 2) * statistics.stdev(dms_seed) / 3**0.5
    assert row["Δm % ↑"] == f"{delta_m(means, REFERENCES[P.reference].values, P.tasks):+.2f} ± {half:.2f}"
    assert row["Source"] == "reproduced" and row["Δm printed"] == "–"
    assert row["Seeds"] == "3 (0,1,2)" and row["Selection"] == "final"
    assert row["Trainable (M) ↓"] == "8.34" and row["Train img/s ↑"] == "101.0" and row["Peak mem (GiB) ↓"] == "11.00"
    dec = by_method["decoders_only"]
    assert dec["Seeds"] == "1 (0)" and dec["SemSeg mIoU % ↑"] == "62.00" and dec["Train img/s ↑"] == "–"
    assert "Skipped 2 result file(s)" in md and "--seed7.json`: status debug" in md
    # published rows sit beside, with their source, printed and recomputed Δm
    full = by_method["MTL full FT"]
    assert (
        full["Source"] == "arXiv:2403.20320 (Table 1) †"
        and full["Δm printed"] == "+2.23 ⚠"
        and full["Δm % ↑"] == "+2.45"
    )
    assert "mtlora-table1-single-task" in md  # Δm names its reference
    # rows sorted by recomputed Δm, best first, numbered
    assert [r["#"] for r in rows] == [str(i) for i in range(1, len(rows) + 1)] and len(rows) == 16
    dms = [float(r["Δm % ↑"].split(" ± ")[0]) for r in rows]
    assert dms == sorted(dms, reverse=True)
    csv_rows = list(csv.DictReader(io.StringIO(Path("lb.csv").read_text())))
    rep = next(r for r in csv_rows if r["kind"] == "reproduced" and r["method"] == "mtlora")
    assert rep["n_seeds"] == "3" and abs(float(rep["semseg"]) - means["semseg"]) < 1e-6
    assert Path("plot-pascal-context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](plot-pascal-context.png)" in md and not Path("plot.png").exists()
    assert not Path("plot-nyud.png").exists() and "plot-nyud.png" not in md
    assert "No plot: no row has a parameter count under the Trainable policy." in md.split("## nyud")[1]


def test_build_is_byte_reproducible(results, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "build", results, "-o", "a.md", "--plot", "a.png")[0] == 0
    # same inputs named differently (trailing slash, files listed explicitly in another order)
    files = sorted(results.rglob("*.json"), reverse=True)
    png = Path("a-pascal-context.png").read_bytes()
    Path("a-pascal-context.png").unlink()
    assert run_cli(capsys, "build", f"{results}/", *files, "-o", "b.md", "--plot", "a.png")[0] == 0
    assert Path("a.md").read_bytes() == Path("b.md").read_bytes()
    assert Path("a-pascal-context.png").read_bytes() == png
    rc, out, _ = run_cli(capsys, "build", results)  # stdout, no file: same text (same plot link)
    assert rc == 0 and out.replace("](docs/pareto-", "](a-") == Path("a.md").read_text()


def test_no_published_rows(results, capsys):
    rc, out, _ = run_cli(capsys, "build", results, "--no-published")
    assert rc == 0 and "MTLoRA r=64" not in out and "| mtlora " in out and "Unverified fragments" not in out


# --------------------------------------------------------------------------- checks


def test_check_passes_then_detects_stale(results, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "build", results, "-o", "LEADERBOARD.md")[0] == 0
    rc, out, err = run_cli(capsys, "check", results, "--skip-params")
    assert rc == 0, err
    assert "all checks passed" in out and "stale: LEADERBOARD.md is up to date" in out
    md = Path("LEADERBOARD.md")
    md.write_text(md.read_text().replace("+2.45", "+2.46"))
    rc, out, err = run_cli(capsys, "check", results, "--skip-params")
    assert rc == 1 and "[stale]" in err
    assert "+2.46" in err and "+2.45" in err and "@@" in err  # unified diff head
    # a new result makes the committed file stale too
    md.write_text(md.read_text().replace("+2.46", "+2.45"))
    write_run(results, seed=3, vals=seeds_vals(0.3))
    rc, _, err = run_cli(capsys, "check", results, "--skip-params")
    assert rc == 1 and "[stale]" in err


def _pub_copy(tmp_path: Path) -> Path:
    d = tmp_path / "published"
    shutil.copytree(PUBLISHED_DIR, d, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return d


def _edit_csv(path: Path, row_id: str, **changes: str) -> None:
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    hit = [r for r in rows if r.get("id") == row_id]
    assert hit, row_id
    hit[0].update(changes)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def test_check_flags_printed_delta_m_mismatch(tmp_path):
    pub = _pub_copy(tmp_path)
    (tmp_path / "empty").mkdir()
    paths = [tmp_path / "empty"]
    _edit_csv(pub / "pascal-context.csv", "mtlora-t1-r64", delta_m_printed="2.60")
    report = run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub)
    msgs = [f.message for f in report.failures if f.check == "published-delta-m"]
    assert (
        len(msgs) == 1 and "mtlora-t1-r64" in msgs[0] and "+2.60" in msgs[0] and "pascal-context.csv, row 6" in msgs[0]
    )
    # the rounding bound against MTLoRA's reference is 0.0178 (aggregate.delta_m_rounding_tol): the recomputed
    # +2.5419 printed as 2.56 (0.0181 off) is more than rounding explains, as 2.555 (0.0131 off) is not; the listed
    # full-FT row is tolerated
    _edit_csv(pub / "pascal-context.csv", "mtlora-t1-r64", delta_m_printed="2.56")
    assert [f.check for f in run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub).failures] == [
        "published-delta-m"
    ]
    _edit_csv(pub / "pascal-context.csv", "mtlora-t1-r64", delta_m_printed="2.555")
    assert run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub).ok
    # unlisting the known inconsistency makes it a failure; listing a consistent row is one too
    (pub / "known_inconsistencies.csv").write_text("id,field,reason\nmtlora-t1-r16,delta_m_printed,wrongly listed\n")
    report = run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub)
    msgs = sorted(f.message for f in report.failures)
    assert len(msgs) == 2
    assert any("mtlora-t1-full_ft" in m and "+2.23" in m and "more than rounding" in m for m in msgs)
    assert any("mtlora-t1-r16" in m and "remove the listing" in m for m in msgs)
    # the single-task row must equal the reference it names
    _edit_csv(pub / "pascal-context.csv", "mtlora-t1-single_task", semseg="67.20")
    report = run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub)
    assert any(f.check == "reference-row" and "'semseg': (67.2, 67.21)" in f.message for f in report.failures)
    (pub / "known_inconsistencies.csv").write_text("id,field,reason\nno-such-row,delta_m_printed,x\n")
    report = run_checks(paths, leaderboard_path=None, skip_params=True, data_dir=pub)
    assert any("no-such-row" in f.message for f in report.failures)


def _fake_dry_run(counts_for):
    """A runner answering like ``benchmark.cli --dry-run --json``; ``counts_for(method, config)`` gives params."""
    calls = []

    def runner(argv, timeout):
        calls.append(list(argv))
        method = argv[argv.index("--method") + 1]
        config = {}
        if "--set" in argv:
            for kv in argv[argv.index("--set") + 1 :]:
                k, v = kv.split("=", 1)
                config[k] = json.loads(v)
        out = {"method": method, "config": config, "params": counts_for(method, config)}
        return CommandOutput(0, "building model...\n" + json.dumps(out, indent=2) + "\n", "")

    return runner, calls


def _expected_counts(method, config):
    for e in load_expected_params():
        if e.method == method and e.config == config:
            return {k: (v if v is not None else 0) for k, v in e.counts.items()}
    raise AssertionError((method, config))


def test_param_check_with_injected_runner():
    expected = load_expected_params()
    runner, calls = _fake_dry_run(_expected_counts)
    report = CheckReport()
    check_param_counts(expected, report, runner=runner)
    assert report.ok, report.failures
    assert len(calls) == len(expected) == 15  # one dry run per row: 3 ranks x 4 LoRA methods + 3 plain ones
    assert {e.method for e in expected} == {
        "mtlora",
        "mtlora_plus",
        "tadformer",
        "tadformer_release",
        "full_ft",
        "decoders_only",
        "single_task",
    }
    argv = next(c for c in calls if "mtlora" in c and "shared_rank=[16,16,16,16]" in c)
    assert argv[:3] == [sys.executable, "-m", "benchmark.cli"]
    assert argv[3:] == ["--method", "mtlora", "--preset", "paper", "--dry-run", "--json", "--set",
                        "shared_rank=[16,16,16,16]", "task_rank=4"]  # fmt: skip
    assert "--set" not in next(c for c in calls if "full_ft" in c)

    def off_by_one(method, config):
        c = _expected_counts(method, config)
        if method == "mtlora_plus" and config["shared_rank"][0] == 32:
            c["trainable"] += 1
            c["adapter"] += 1
        return c

    runner, _ = _fake_dry_run(off_by_one)
    report = CheckReport()
    check_param_counts(expected, report, runner=runner)
    assert [f.check for f in report.failures] == ["params"]
    msg = report.failures[0].message
    assert "mtlora_plus" in msg and "trainable 4,664,379 != expected 4,664,378 (+1)" in msg and "adapter" in msg


def test_param_check_reports_failing_subprocess(tmp_path):
    exp = [e for e in load_expected_params() if e.method == "full_ft"]
    script = "import sys; sys.stderr.write('x' * 5000 + 'Traceback\\nValueError: no such method'); sys.exit(3)"

    def runner(argv, timeout):
        return run_command([sys.executable, "-c", script], timeout)

    report = CheckReport()
    check_param_counts(exp, report, runner=runner)
    msg = report.failures[0].message
    assert "exited with 3" in msg and msg.endswith("ValueError: no such method") and "full_ft" in msg
    slow = run_command([sys.executable, "-c", "import time; time.sleep(10)"], timeout=0.5)
    assert slow.returncode != 0 and "timed out" in slow.stderr
    missing = run_command([str(tmp_path / "no-python")], timeout=5)
    assert missing.returncode != 0 and "cannot run" in missing.stderr
    report = CheckReport()
    check_param_counts(exp, report, runner=lambda argv, t: CommandOutput(0, "not json\n", ""))
    assert "no JSON object" in report.failures[0].message


def test_param_check_compares_config_echo():
    exp = [e for e in load_expected_params() if e.method == "mtlora"][:1]
    runner, _ = _fake_dry_run(lambda m, c: _expected_counts(m, {"shared_rank": [16] * 4, "task_rank": 4}))

    def ignore_set(argv, timeout):  # a CLI that drops the overrides: counts may even match, the config does not
        return runner([a for a in argv if a != "--set" and "=" not in a], timeout)

    report = CheckReport()
    check_param_counts(exp, report, runner=ignore_set)
    assert "config shared_rank='<missing>', expected [16, 16, 16, 16]" in report.failures[0].message


def test_tolerance_band_against_verified_rows(tmp_path):
    pub = _pub_copy(tmp_path)
    _edit_csv(pub / "pascal-context.csv", "mtlora-t1-r64", verified="true")
    row = next(r for r in load_published(P, pub) if r.id == "mtlora-t1-r64")
    root = tmp_path / "results"
    near = {t: v + 0.3 for t, v in row.metrics.items()}
    write_run(root, seed=0, vals=near)
    report = run_checks([root], leaderboard_path=None, skip_params=True, data_dir=pub)
    assert report.ok, report.failures
    assert any("1 reproduced group(s) compared with 1 verified" in p for p in report.passed)
    # one seed 0.8 off on semseg: outside the 0.5 default band
    far = dict(near, semseg=row.metrics["semseg"] + 0.8)
    write_run(root, seed=0, vals=far)
    report = run_checks([root], leaderboard_path=None, skip_params=True, data_dir=pub)
    msg = next(f.message for f in report.failures if f.check == "tolerance")
    assert "semseg 68.70 vs 67.90 (+0.80, band ±0.50)" in msg and "mtlora-t1-r64" in msg and "seed0" in msg
    # several seeds: the band widens to 2·std, and a spread this large covers the 0.8 gap of the mean
    for seed, d in ((1, 2.0), (2, -0.4)):
        write_run(root, seed=seed, vals=dict(near, semseg=row.metrics["semseg"] + d))
    report = run_checks([root], leaderboard_path=None, skip_params=True, data_dir=pub)
    assert report.ok, report.failures
    # a different task_rank is another config: not compared with this row
    write_run(root, seed=0, config={"shared_rank": [64] * 4, "task_rank": 8}, vals={t: v + 5 for t, v in near.items()})
    assert run_checks([root], leaderboard_path=None, skip_params=True, data_dir=pub).ok
    # unverified rows are never compared
    _edit_csv(pub / "pascal-context.csv", "mtlora-t1-r64", verified="false")
    write_run(root, seed=5, vals={t: v + 5 for t, v in near.items()})
    assert run_checks([root], leaderboard_path=None, skip_params=True, data_dir=pub).ok


# --------------------------------------------------------------------------- bad input


def _bad_truncated(root):
    p = write_run(root)
    p.write_text(p.read_text()[:200])
    return p, "not valid JSON (truncated or corrupt?)"


def _bad_version(root):
    return write_run(root, version=2), "field 'protocol': protocol 'pascal-context' version 2 is not supported"


def _bad_protocol(root):
    def edit(d):
        d["protocol"]["name"] = "cityscapes"
        d["run_id"] = make_run_id("cityscapes", 1, "mtlora", MTLORA64, [0])

    return write_run(
        root, edit=edit, name=make_run_id("cityscapes", 1, "mtlora", MTLORA64, [0])
    ), "unknown protocol 'cityscapes'"


def _bad_missing_metric(root):
    return write_run(root, edit=lambda d: d["metrics"].pop("sal")), "field 'metrics.sal.mIoU': missing"


def _bad_delta_m(root):
    def edit(d):
        d["delta_m"]["value"] *= 1 + 1e-7

    return write_run(root, edit=edit), "field 'delta_m.value'"


def _bad_reference(root):
    return write_run(root, edit=lambda d: d["delta_m"].update(reference="nope")), "field 'delta_m.reference'"


def _bad_schema(root):
    return write_run(root, edit=lambda d: d.update(schema=2)), "field 'schema': expected 1, got 2"


def _bad_file_name(root):
    return write_run(root, name="renamed"), "file name: expected pascal-context.v1--mtlora--"


def _bad_run_id(root):
    return write_run(root, edit=lambda d: d.update(seeds=[1]), name="x"), "field 'run_id'"


BAD = [_bad_truncated, _bad_version, _bad_protocol, _bad_missing_metric, _bad_delta_m, _bad_reference, _bad_schema,
       _bad_file_name, _bad_run_id]  # fmt: skip


@pytest.mark.parametrize("make_bad", BAD, ids=[f.__name__[5:] for f in BAD])
def test_bad_result_file(make_bad, tmp_path, capsys):
    root = tmp_path / "results"
    write_run(root, method="decoders_only", config={})
    bad, expected = make_bad(root / "bad")
    out = tmp_path / "LB.md"
    rc, _, err = run_cli(capsys, "build", root, "-o", out, "--plot", tmp_path / "p.png")
    assert rc == 1 and str(bad) in err and expected in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "p.png").exists()  # nothing half-written
    rc, out, err = run_cli(capsys, "validate", root)
    assert rc == 1 and str(bad) in err and expected in err and "1 invalid" in out
    report = run_checks([root], leaderboard_path=None, skip_params=True)
    assert any(f.check == "results" and str(bad) in f.message and expected in f.message for f in report.failures)


def test_validate_summary(results, capsys):
    rc, out, err = run_cli(capsys, "validate", results)
    assert rc == 0 and "6 file(s): 6 valid (4 successful run(s), 2 skipped), 0 invalid" in out
    write_run(results / "more", edit=lambda d: d.update(schema=3))
    rc, out, err = run_cli(capsys, "validate", results)
    assert rc == 1 and "1 invalid" in out and "field 'schema'" in err


def test_stored_delta_m_tolerance_is_relative_1e9(tmp_path):
    root = tmp_path / "r"
    write_run(root, edit=lambda d: d["delta_m"].update(value=d["delta_m"]["value"] * (1 + 1e-11)))
    assert not load_results([root]).errors
    write_run(root, seed=1, edit=lambda d: d["delta_m"].update(value=d["delta_m"]["value"] * (1 + 1e-8)))
    assert len(load_results([root]).errors) == 1


def test_duplicate_run_ids(tmp_path, capsys):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b")
    rc, _, err = run_cli(capsys, "build", tmp_path / "a", tmp_path / "b")
    assert rc == 1 and f"duplicate run_id {json.loads(a.read_text())['run_id']!r}: {a} and {b}" in err


def test_empty_and_missing_results(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, err = run_cli(capsys, "build", empty)
    assert rc == 0 and "no result files under" in err and "published rows only" in err
    assert "No reproduced runs yet" in out
    rc, _, err = run_cli(capsys, "build", empty, "--no-published")
    assert rc == 1 and "no result files under" in err and "--no-published" in err and "nothing to build" in err
    rc, out, _ = run_cli(capsys, "validate", empty)
    assert rc == 0 and "no result files" in out
    rc, _, err = run_cli(capsys, "build", tmp_path / "missing")
    assert rc == 1 and "missing: results path does not exist" in err
    # only skipped runs: same as empty, said so
    write_run(empty, status="debug")
    rc, out, err = run_cli(capsys, "build", empty)
    assert rc == 0 and "no successful runs under" in err and "status debug" in err


def test_non_result_json_is_skipped_and_reported(results, capsys):
    (results / "notes.json").write_text('{"hello": 1}')
    (results / "scalars.json").write_text('{"loss": 1}\n{"loss": 0.5}\n')  # JSON lines from a work dir
    rc, out, err = run_cli(capsys, "build", results)
    assert rc == 0 and "notes.json: not a result file" in err and "scalars.json: not a result file" in err
    assert "Skipped 4 result file(s)" in out
    # but a file named like a result must be one, as must anything that looks like one
    (results / "result.json").write_text('{"hello": 1}')
    (results / "odd.json").write_text('{"schema": 1}')
    rc, out, err = run_cli(capsys, "build", results)
    assert rc == 1 and "result.json: field 'schema'" in err and "odd.json: field 'run_id'" in err
    rc, _, err = run_cli(capsys, "validate", results / "notes.json")  # named explicitly: must be a result
    assert rc == 1 and "field 'schema'" in err


def _drop_column(path: Path, col: str) -> None:
    rows = list(csv.reader(path.open(encoding="utf-8")))
    i = rows[0].index(col)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(r[:i] + r[i + 1 :] for r in rows)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda p: _drop_column(p, "sal"), "pascal-context.csv: missing column 'sal' in the header (row 1)"),
        (lambda p: _edit_csv(p, "faar", normals=""), "pascal-context.csv, row 13, column 'normals': empty"),
        (lambda p: _edit_csv(p, "faar", semseg="72,0"), "row 13, column 'semseg': expected a number, got '72,0'"),
        (lambda p: _edit_csv(p, "faar", verified="yes"), "row 13, column 'verified': expected true or false"),
        (lambda p: _edit_csv(p, "faar", config="{rank: 1}"), "row 13, column 'config': not valid JSON"),
        (lambda p: _edit_csv(p, "faar", reference="x"), "row 13, column 'reference': unknown single-task reference"),
        (lambda p: _edit_csv(p, "faar", id="tadformer-r16"), "row 13, column 'id': duplicate id 'tadformer-r16'"),
        (
            lambda p: p.write_text(p.read_text().splitlines()[0] + "\nfaar,1,FAAR\n"),
            "pascal-context.csv, row 2, column 'venue': missing (the row has too few fields)",
        ),
    ],
    ids=["missing-column", "empty-cell", "bad-number", "bad-bool", "bad-json", "bad-reference", "dup-id", "short-row"],
)
def test_bad_published_data(corrupt, expected, tmp_path, capsys):
    pub = _pub_copy(tmp_path)
    corrupt(pub / "pascal-context.csv")
    with pytest.raises(PublishedDataError) as e:
        load_published(P, pub)
    assert expected in str(e.value) and str(pub / "pascal-context.csv") in str(e.value)
    (tmp_path / "r").mkdir()
    rc, _, err = run_cli(capsys, "build", tmp_path / "r", "--published-dir", pub)
    assert rc == 1 and expected in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, "check", tmp_path / "r", "--published-dir", pub, "--skip-params", "--no-stale")
    assert rc == 1 and expected in err


def test_bad_expected_params(tmp_path):
    pub = _pub_copy(tmp_path)
    path = pub / "expected_params.csv"
    path.write_text(path.read_text().replace(",paper,29464442,", ",paper,29.46M,"))
    with pytest.raises(
        PublishedDataError, match=r"expected_params.csv, row 8, column 'trainable': expected an integer"
    ):
        load_expected_params(pub)


# --------------------------------------------------------------------------- torch-free


def test_leaderboard_imports_without_torch(tmp_path):
    """`import leaderboard.cli`, build a table, run the checks: with torch & co. made unimportable."""
    code = textwrap.dedent(
        f"""
        import sys
        BLOCKED = {{"torch", "timm", "peft", "mmengine", "mmseg", "mmcv", "torchvision"}}

        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked import of {{name}}")
                return None

        sys.meta_path.insert(0, Blocker())
        import leaderboard.cli
        from leaderboard.checks import run_checks
        rc = leaderboard.cli.main(["build", {str(ROOT / "results")!r}, "-o", {str(tmp_path / "lb.md")!r},
                                   "--plot", {str(tmp_path / "lb.png")!r}, "--html", {str(tmp_path / "site")!r},
                                   "--reference", "nyud=tadformer-config-nyud-single-task"])
        assert rc == 0, rc
        report = run_checks([{str(ROOT / "results")!r}], leaderboard_path=None, skip_params=True)
        assert report.ok, report.failures
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("TORCH-FREE OK")
        """
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0 and "TORCH-FREE OK" in p.stdout, p.stderr[-3000:]
    assert "| MTLoRA r=64 " in (tmp_path / "lb.md").read_text()
    assert (
        "## nyud v1" in (tmp_path / "lb.md").read_text()
        and "`tadformer-config-nyud-single-task`" in (tmp_path / "lb.md").read_text()
    )
    assert "MTLoRA r=64" in (tmp_path / "site" / "data.js").read_text()


ALLOWED_THIRD_PARTY = {"pandas", "tabulate", "matplotlib", "numpy", "scipy"}  # + plotly's bundle, read as a file
ALLOWED_FIRST_PARTY = {"benchmark.protocol", "benchmark.results", "leaderboard"}


@pytest.mark.parametrize("path", sorted((ROOT / "leaderboard").rglob("*.py")), ids=lambda p: p.name)
def test_leaderboard_import_layering(path):
    """leaderboard/ imports only the stdlib, pandas/tabulate/matplotlib and benchmark.{protocol,results}."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            ok = (
                top in sys.stdlib_module_names
                or top in ALLOWED_THIRD_PARTY
                or any(name == a or name.startswith(a + ".") for a in ALLOWED_FIRST_PARTY)
            )
            assert ok, f"{path.relative_to(ROOT)} imports {name}"
