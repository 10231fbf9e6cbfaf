"""Parameter-counting policies in the leaderboard, and the check of published counts against the harness.

Every published row and fragment names the policy its count was made under; results carry a breakdown, so they
show both policies; a published count in another policy is marked and never plotted. ``published-params`` probes
the harness for every published row whose method is registered (the registry is asked, so TADFormer's rows are
checked as soon as the method exists; here a fake runner plays that part, and MTLoRA's rows are checked as they
are today).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest

from benchmark.protocol import PASCAL_CONTEXT as P
from benchmark.protocol import REFERENCES, delta_m, table_value
from benchmark.results import RunResult, make_run_id
from leaderboard.build import collect
from leaderboard.checks import CheckReport, CommandOutput, caching_runner, check_published_params
from leaderboard.cli import main
from leaderboard.data import (
    ALL_TRAINABLE,
    ENCODER_SIDE,
    PARAM_POLICIES,
    PUBLISHED_DIR,
    load_expected_params,
    load_fragments,
    load_known_param_inconsistencies,
    load_published,
)
from leaderboard.errors import PublishedDataError
from leaderboard.tables import FOREIGN_POLICY, UNSTATED_POLICY, render_markdown

ROWS = load_published(P)
# the exact counts the TADFormer methods will have (issue 14), for the fake registry below
TADFORMER = {16: 3_557_502, 32: 4_776_126, 64: 7_379_262}


def _expected(method: str, config: dict) -> dict[str, int]:
    (e,) = [e for e in load_expected_params() if e.method == method and e.config == config]
    return e.counts


def _breakdown(trainable: int, decoders: int = 1_946_624) -> dict[str, int]:
    return {"decoders": decoders, "adapter": trainable - decoders, "other_trainable_backbone": 0,
            "trainable": trainable, "total": trainable + 27_517_818}  # fmt: skip


def _fake_harness(registered: set[str], counts: dict[tuple[str, str], dict[str, int]]):
    """A runner answering ``--list --json`` with ``registered`` and dry runs with ``counts[(method, config json)]``."""
    calls: list[list[str]] = []

    def runner(argv, timeout):
        calls.append(list(argv))
        if "--list" in argv:
            return CommandOutput(0, json.dumps([{"name": n} for n in sorted(registered)]), "")
        method = argv[argv.index("--method") + 1]
        if method not in registered:
            return CommandOutput(2, "", f"run_benchmark: error: unknown method {method!r}")
        config = {}
        if "--set" in argv:
            for kv in argv[argv.index("--set") + 1 :]:
                k, v = kv.split("=", 1)
                config[k] = json.loads(v)
        params = counts[method, json.dumps(config, sort_keys=True)]
        return CommandOutput(0, json.dumps({"method": method, "config": config, "params": params}), "")

    return runner, calls


def _today_counts() -> dict[tuple[str, str], dict[str, int]]:
    """What the harness counts today for the published rows it can run (the official integers)."""
    out = {}
    for r in ROWS:
        if r.method in ("mtlora", "full_ft", "single_task"):
            cfg = {} if r.method != "mtlora" else r.config
            got = _expected(r.method, cfg)
            out[r.method, json.dumps(r.config, sort_keys=True)] = _breakdown(got["trainable"])
    return out


# --------------------------------------------------------------------------- data


def test_every_published_row_and_fragment_names_its_policy() -> None:
    assert all(r.params_policy in PARAM_POLICIES for r in ROWS)
    by_id = {r.id: r for r in ROWS}
    assert {r.id for r in ROWS if r.params_policy == ENCODER_SIDE} == {
        "ditask-multi_task",
        "ditask-single_task_adapters",
    }
    for rank in (16, 32, 64):
        row = by_id[f"tadformer-r{rank}"]
        assert row.params_policy == ALL_TRAINABLE and row.config == {"rank": rank}
        assert row.selection.startswith("best validation Δm")
        assert round(TADFORMER[rank] / 1e6, 2) == row.params_m_printed  # the exact counts round to the print
    assert all(r.params_policy == ALL_TRAINABLE for r in ROWS if r.paper == "MTLoRA")


def test_ditask_quote_of_mtlora_is_its_encoder_side_count() -> None:
    """DiTASK's 6.40 M for MTLoRA r=64 is the official count without the decoders (issue 14)."""
    (frag,) = [f for f in load_fragments(P) if f.method == "mtlora"]
    counts = _expected("mtlora", {"shared_rank": [64] * 4, "task_rank": 4})
    assert frag.params_policy == ENCODER_SIDE
    assert round((counts["trainable"] - counts["decoders"]) / 1e6, 2) == frag.params_m_printed


def _pub_copy(tmp_path: Path) -> Path:
    d = tmp_path / "published"
    shutil.copytree(PUBLISHED_DIR, d, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return d


def _set_cell(path: Path, match: tuple[str, str], column: str, value: str) -> None:
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    hit = [r for r in rows if r[match[0]] == match[1]]
    hit[0][column] = value
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize(
    ("file", "match", "row"),
    [("pascal-context.csv", ("id", "faar"), 13), ("pascal-context.fragments.csv", ("method", "hyperformer"), 8)],
)
def test_unknown_policy_is_a_clear_error(tmp_path, capsys, file, match, row) -> None:
    pub = _pub_copy(tmp_path)
    _set_cell(pub / file, match, "params_policy", "decoders")
    want = f"{file}, row {row}, column 'params_policy': expected one of all-trainable, encoder-side, unstated, got 'decoders'"
    (tmp_path / "r").mkdir()
    assert main(["build", str(tmp_path / "r"), "--published-dir", str(pub), "-o", str(tmp_path / "lb.md")]) == 1
    assert want in capsys.readouterr().err
    assert not (tmp_path / "lb.md").exists()
    with pytest.raises(PublishedDataError, match="params_policy"):
        load_fragments(P, pub) if "fragments" in file else load_published(P, pub)


def test_known_inconsistency_of_an_unknown_field_is_a_clear_error(tmp_path) -> None:
    pub = _pub_copy(tmp_path)
    path = pub / "known_inconsistencies.csv"
    path.write_text(path.read_text() + 'faar,semseg,"why"\n')
    with pytest.raises(PublishedDataError, match=r"row 5, column 'field': expected one of delta_m_printed, params_m"):
        load_known_param_inconsistencies(pub)


# --------------------------------------------------------------------------- tables


def _write_result(root: Path) -> None:
    """One successful mtlora r=64 run with the official breakdown."""
    config = {"shared_rank": [64] * 4, "task_rank": 4}
    vals = {"semseg": 67.7, "human_parts": 59.9, "sal": 65.1, "normals": 16.7}
    metrics = {t.name: {t.metric: vals[t.name] / 100 if t.percent else vals[t.name]} for t in P.tasks}
    scores = {t.name: table_value(t, metrics[t.name][t.metric]) for t in P.tasks}
    run_id = make_run_id(P.name, P.version, "mtlora", config, [0])
    result = RunResult(
        run_id=run_id, status="success", protocol={"name": P.name, "version": P.version},
        method={"name": "mtlora", "config": config}, seeds=[0], preset="paper", metrics=metrics,
        delta_m={"value": delta_m(scores, REFERENCES[P.reference].values, P.tasks), "reference": P.reference},
        params={k: v for k, v in _expected("mtlora", config).items()},
        selection={"rule": "final", "epoch": 300, "iteration": 299_700}, cost={}, notes=[],
    )  # fmt: skip
    path = root / P.name / "mtlora" / f"{run_id}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result.to_dict()))


def _table(md: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|   # |"))
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[start:]]
    rows = [dict(zip(cells[0], c, strict=True)) for c in cells[2:] if len(c) == len(cells[0])]
    return {r["Method"]: r for r in rows}


def test_both_policy_columns_and_foreign_rows_marked(tmp_path) -> None:
    _write_result(tmp_path / "results")
    lb = collect([tmp_path / "results"])
    md = render_markdown(lb, None)
    rows = _table(md)
    run = rows["mtlora"]  # reproduced: both columns from the breakdown (encoder = adapter + other trainable)
    assert run["Trainable (M) ↓"] == "8.34" and run["Encoder-side (M) ↓"] == f"{(4_798_464 + 1_599_546) / 1e6:.2f}"
    ditask = rows["DiTASK multi-task [imagenet-22k]"]  # encoder-side published: its own column only, marked
    assert ditask["Trainable (M) ↓"] == "–" and ditask["Encoder-side (M) ↓"] == f"1.61 {FOREIGN_POLICY}"
    assert rows["FAAR"]["Trainable (M) ↓"] == f"3.38 {UNSTATED_POLICY}" and rows["FAAR"]["Encoder-side (M) ↓"] == "–"
    assert rows["TADFormer r=64"]["Trainable (M) ↓"] == "7.38" and rows["TADFormer r=64"]["Encoder-side (M) ↓"] == "–"
    assert rows["TADFormer r=64"]["Selection"].startswith("best validation Δm")
    assert f"{FOREIGN_POLICY} Published under another counting policy" in md
    # never compared: only all-trainable counts reach the plot's x axis
    frame = lb.sections[0].frame
    plotted = set(frame[frame["params_m"].notna()]["id"])
    assert not plotted & {"ditask-multi_task", "ditask-single_task_adapters", "faar", "free_sinewich-r64"}
    assert {"tadformer-r64", "mtlora-t1-r64"} <= plotted
    assert "| HyperFormer " in md and PARAM_POLICIES["unstated"] in md  # fragments name their policy


# --------------------------------------------------------------------------- published-params check


def test_published_counts_are_checked_against_the_harness_for_registered_methods() -> None:
    known = load_known_param_inconsistencies()
    runner, calls = _fake_harness({"mtlora", "full_ft", "single_task"}, _today_counts())
    report = CheckReport()
    check_published_params(ROWS, known, report, runner)
    assert report.ok, report.failures
    probed = [c[c.index("--method") + 1] for c in calls if "--method" in c]
    assert sorted(probed) == ["full_ft", "mtlora", "mtlora", "mtlora", "single_task"]  # issue 6's row has no count
    assert calls[0] == [sys.executable, "-m", "benchmark.cli", "--list", "--json"]
    line = report.passed[0]
    assert "3 published count(s)" in line and "mtlora-t1-full_ft" in line and "tadformer" in line


def test_tadformer_rows_are_checked_once_the_method_is_registered() -> None:
    counts = _today_counts()
    for rank, n in TADFORMER.items():
        counts["tadformer", json.dumps({"rank": rank})] = _breakdown(n)
    runner, calls = _fake_harness({"mtlora", "full_ft", "single_task", "tadformer"}, counts)
    report = CheckReport()
    check_published_params(ROWS, load_known_param_inconsistencies(), report, runner)
    assert report.ok, report.failures
    probe = ["--method", "tadformer", "--preset", "paper", "--protocol", "pascal-context", "--dry-run", "--json"]
    assert [*probe, "--set", "rank=64"] in [c[3:] for c in calls]
    assert "6 published count(s)" in report.passed[0]
    counts["tadformer", json.dumps({"rank": 32})] = _breakdown(TADFORMER[32] + 10_000)  # 4.79 M: off the print
    runner, _ = _fake_harness({"mtlora", "full_ft", "single_task", "tadformer"}, counts)
    report = CheckReport()
    check_published_params(ROWS, load_known_param_inconsistencies(), report, runner)
    (f,) = report.failures
    assert f.check == "published-params" and "tadformer-r32" in f.message and "4,786,126" in f.message


def test_encoder_side_rows_are_compared_without_decoders() -> None:
    """A registered method with an encoder-side row is compared on trainable minus the decoders."""
    row = next(r for r in ROWS if r.id == "ditask-multi_task")
    counts = {("ditask", json.dumps({})): _breakdown(1_946_624 + 1_610_000)}
    runner, _ = _fake_harness({"ditask"}, counts)
    report = CheckReport()
    check_published_params([row], {}, report, runner)
    assert report.ok, report.failures
    counts = {("ditask", json.dumps({})): _breakdown(1_610_000)}  # all-trainable 1.61 M would be 0.00 encoder-side
    runner, _ = _fake_harness({"ditask"}, counts)
    report = CheckReport()
    check_published_params([row], {}, report, runner)
    assert "printed 1.61M (encoder-side only)" in report.failures[0].message


def test_a_known_count_inconsistency_must_still_be_one_and_the_listing_must_work() -> None:
    known = load_known_param_inconsistencies()
    assert set(known) == {"mtlora-t1-full_ft", "mtlora-t1-single_task"}
    counts = _today_counts()
    counts["full_ft", "{}"] = _breakdown(30_060_000)  # as if the harness now counted the printed value
    runner, _ = _fake_harness({"mtlora", "full_ft", "single_task"}, counts)
    report = CheckReport()
    check_published_params(ROWS, known, report, runner)
    (f,) = report.failures
    assert "mtlora-t1-full_ft" in f.message and "remove the listing" in f.message
    runner, _ = _fake_harness({"mtlora", "full_ft", "single_task"}, _today_counts())
    report = CheckReport()
    check_published_params(ROWS, {}, report, runner)  # unlisted, the 0.60 M gap fails both rows
    assert sorted(f.message.split(" (")[1].split(",")[0] for f in report.failures) == [
        "mtlora-t1-full_ft",
        "mtlora-t1-single_task",
    ]


def test_a_failing_listing_is_a_failure_and_probes_run_once() -> None:
    report = CheckReport()
    check_published_params(ROWS, {}, report, lambda argv, t: CommandOutput(1, "", "ImportError: torch"))
    assert report.failures[0].check == "published-params" and "ImportError: torch" in report.failures[0].message
    runner, calls = _fake_harness({"mtlora", "full_ft", "single_task"}, _today_counts())
    cached = caching_runner(runner)
    for _ in range(2):
        check_published_params(ROWS, load_known_param_inconsistencies(), CheckReport(), cached)
    assert len(calls) == 6  # the listing and five probes, once each
