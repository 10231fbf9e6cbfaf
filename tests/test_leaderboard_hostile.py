"""Hostile and careless leaderboard inputs (issue 15, item 7): every one gets one clear error (exit 1, the
leaderboard's code for any error, README), names the file or flag, and leaves no output behind; what is tabled
is escaped for markdown, HTML and CSV. Hypothesis checks that the result-JSON validation and the published CSV
reader answer any input with a value or their documented error, never a traceback."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_leaderboard import BASE, run_cli, write_run

from benchmark.protocol import PASCAL_CONTEXT as P
from benchmark.protocol import PROTOCOLS
from benchmark.results import ResultError
from leaderboard.data import PUBLISHED_DIR, load_published
from leaderboard.errors import PublishedDataError
from leaderboard.runs import validate_result
from leaderboard.validate import loads_bounded


def _set_metric(task: str, value):
    def edit(d):
        d["metrics"][task][P.task(task).metric] = value

    return edit


def _write_raw(content: str | bytes):
    def make(root: Path) -> Path:
        path = write_run(root)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return make


def _edited(edit):
    return lambda root: write_run(root, edit=edit)


CASES = {
    "miou_negative": (_edited(_set_metric("semseg", -0.5)), "field 'metrics.semseg.mIoU': expected a value in [0, 1]"),
    "miou_above_one": (_edited(_set_metric("sal", 7.5)), "field 'metrics.sal.mIoU': expected a value in [0, 1]"),
    "normals_negative": (_edited(_set_metric("normals", -10.0)), "field 'metrics.normals.mean': expected a value in [0, 180]"),
    "params_negative": (_edited(lambda d: d["params"].update(trainable=-5)), "field 'params.trainable': expected an integer in [0,"),
    "params_float": (_edited(lambda d: d["params"].update(total=3.5)), "field 'params.total': expected an int"),
    "trainable_above_total": (_edited(lambda d: d["params"].update(trainable=10**9)), "field 'params.trainable': expected at most params.total"),
    "seed_bool": (_edited(lambda d: d.update(seeds=[True])), "field 'seeds[0]': expected an integer in [0, 4294967295], got True"),
    "seed_huge": (_edited(lambda d: d.update(seeds=[2**40])), "field 'seeds[0]': expected an integer in [0, 4294967295]"),
    "method_pipe": (_edited(lambda d: d["method"].update(name="lo|ra")), "field 'method.name': expected a name of letters"),
    "method_newline": (_edited(lambda d: d["method"].update(name="lora\n| x |")), "field 'method.name': expected a name"),
    "method_script": (_edited(lambda d: d["method"].update(name="<script>alert(1)</script>")), "field 'method.name'"),
    "config_markup": (_edited(lambda d: d["method"]["config"].update(form="<b>|x")), "field 'method.config.form': expected text"),
    "config_key": (_edited(lambda d: d["method"]["config"].update({"a|b": 1})), "field 'method.config.<key>'"),
    "env_control": (_edited(lambda d: d["env"].update(device="cpu\n| injected |")), "field 'env.device': expected one line"),
    "cost_negative": (_edited(lambda d: d["cost"].update(train_images_per_s=-1.0)), "field 'cost.train_images_per_s': expected a finite number >= 0"),
    "deep_nesting": (_write_raw("[" * 200_000 + "]" * 200_000), "nested 200000 levels deep (at most 16)"),
    "huge_integer": (_write_raw('{"schema": ' + "9" * 5000 + "}"), "a number literal of 5000 characters"),
    "nan_literal": (_write_raw('{"schema": NaN}'), "NaN (JSON has no non-finite numbers)"),
    "not_utf8": (_write_raw(b'{"schema": "\xff\xfe"}'), "is not UTF-8 text"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_result_is_one_clear_error_and_nothing_is_written(case, tmp_path, capsys):
    make, expected = CASES[case]
    root = tmp_path / "results"
    path = make(root)
    out, plot, csv_out, site = tmp_path / "LB.md", tmp_path / "p.png", tmp_path / "lb.csv", tmp_path / "site"
    rc, stdout, err = run_cli(capsys, "build", root, "-o", out, "--plot", plot, "--csv", csv_out, "--html", site)
    assert rc == 1, err
    assert expected in err and str(path) in err and "Traceback" not in err
    assert not any(p.exists() for p in (out, plot, csv_out, site))
    rc, _, err = run_cli(capsys, "validate", root)
    assert rc == 1 and expected in err


def test_hostile_published_text_is_escaped_in_markdown_csv_and_html(tmp_path, capsys):
    data = tmp_path / "published"
    shutil.copytree(PUBLISHED_DIR, data)
    path = data / f"{P.name}.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    rows[0]["label"] = '=HYPERLINK("http://x")|<script>alert(1)</script>'
    rows[0]["notes"] = "@SUM(A1) | </script><img src=x onerror=alert(1)>"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    root = tmp_path / "results"
    write_run(root, vals=BASE)
    out, csv_out, site = tmp_path / "LB.md", tmp_path / "lb.csv", tmp_path / "site"
    rc, _, err = run_cli(capsys, "build", root, "-o", out, "--csv", csv_out, "--html", site, "--published-dir", data)
    assert rc == 0, err
    md = out.read_text()
    assert "<script>" not in md and "<img" not in md
    # every table line still has the header's number of cells (GitHub markdown: an escaped \| stays in its cell)
    lines = [ln for ln in md.splitlines() if ln.startswith("|   # |") or "HYPERLINK" in ln and ln.startswith("|")]
    header, hit = (re.split(r"(?<!\\)\|", ln.strip().strip("|")) for ln in lines[:2])
    assert len(header) == len(hit) and "&lt;script&gt;" in hit[1] and "\\|" in hit[1]
    cells = [c for row in csv.reader(io.StringIO(csv_out.read_text())) for c in row]
    assert not [c for c in cells if c.startswith(("=", "+", "@"))]
    assert any(c.startswith("'=HYPERLINK") for c in cells) and any(c.startswith("'@SUM") for c in cells)
    page = (site / "index.html").read_text() + (site / "data.js").read_text()
    assert "<script>alert" not in page and "</script><img" not in page and "\\u003cscript\\u003e" in page


def test_output_folder_errors(tmp_path, capsys, monkeypatch):
    root = tmp_path / "results"
    write_run(root)
    rc, _, err = run_cli(capsys, "build", root, "-o", tmp_path / "missing" / "LB.md")
    assert rc == 1 and f"-o {tmp_path / 'missing' / 'LB.md'}: folder {tmp_path / 'missing'} does not exist" in err
    rc, _, err = run_cli(capsys, "build", root, "-o", tmp_path / "LB.md", "--plot", tmp_path / "nope" / "p.png")
    assert rc == 1 and "--plot" in err and "does not exist" in err and not (tmp_path / "LB.md").exists()
    rc, _, err = run_cli(capsys, "build", root, "-o", tmp_path)
    assert rc == 1 and "is a folder; expected a file name" in err
    (tmp_path / "afile").write_text("x")
    rc, _, err = run_cli(capsys, "build", root, "--html", tmp_path / "afile")
    assert rc == 1 and "--html" in err and "exists and is not a folder" in err
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = __import__("os").access
    monkeypatch.setattr("os.access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    rc, _, err = run_cli(capsys, "build", root, "--csv", locked / "lb.csv")
    assert rc == 1 and f"--csv {locked / 'lb.csv'}: not writable" in err


def test_published_dir_typo_is_an_error(tmp_path, capsys):
    root = tmp_path / "results"
    write_run(root)
    rc, _, err = run_cli(capsys, "build", root, "--published-dir", tmp_path / "publshed")
    assert rc == 1 and f"--published-dir {tmp_path / 'publshed'}: folder not found" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, "build", root, "--published-dir", tmp_path / "empty")
    expected = sorted(f"{name}.csv" for name in PROTOCOLS)
    assert rc == 1 and f"holds no published-data file (expected one of {expected})" in err
    rc, _, err = run_cli(capsys, "check", root, "--published-dir", tmp_path / "publshed", "--skip-params")
    assert rc == 1 and "folder not found" in err


def test_published_values_out_of_range_are_refused(tmp_path):
    data = tmp_path / "published"
    shutil.copytree(PUBLISHED_DIR, data)
    path = data / f"{P.name}.csv"
    text = path.read_text(encoding="utf-8").splitlines()
    header = text[1 - 1].split(",")
    cells = next(csv.reader([text[1]]))
    cells[header.index("normals")] = "-10"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    path.write_text("\n".join([text[0], buf.getvalue().rstrip("\n"), *text[2:]]) + "\n", encoding="utf-8")
    with pytest.raises(PublishedDataError, match=r"row 2, column 'normals': expected a value in \[0, 180\]"):
        load_published(P, data)


# --------------------------------------------------------------------------- Hypothesis: any input, no traceback

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _valid_result(tmp: Path) -> dict:
    return json.loads(write_run(tmp).read_text())


_BASE_RESULT: dict = {}


def _base(tmp_path_factory) -> dict:
    if not _BASE_RESULT:
        _BASE_RESULT.update(_valid_result(tmp_path_factory.mktemp("base")))
    return json.loads(json.dumps(_BASE_RESULT))


def _paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_result_validation_answers_any_mutation(tmp_path_factory, data):
    result = _base(tmp_path_factory)
    paths = sorted(_paths(result), key=str)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = result
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            if data.draw(st.booleans()):
                node[path[-1]] = data.draw(JSON_VALUES)
            else:
                node.pop(path[-1], None)
    try:
        validate_result(result, "r.json")
    except ResultError as e:
        assert str(e).startswith("r.json: ")


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(max_size=200)
    | st.builds(lambda a, b: a + b, st.sampled_from(["{", "[", '{"a":', "[1e", '"']), st.text(max_size=50))
)
def test_bounded_json_reader_answers_any_text(text):
    try:
        loads_bounded(text, "x.json")
    except ResultError as e:
        assert str(e).startswith("x.json: ")


_PUBLISHED_HEADER = (PUBLISHED_DIR / f"{P.name}.csv").read_text(encoding="utf-8").splitlines()
CSV_CELL = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["1", "72.5", "-3", "true", "{}", '{"rank": 4}', "mtlora-table1-single-task", "1e400", "nan", ""]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_published_csv_reader_answers_any_file(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("pub")
    header = _PUBLISHED_HEADER[0].split(",")
    if data.draw(st.booleans()):  # rows of random cells under the real header (sometimes a cell short or long)
        rows = data.draw(st.lists(st.lists(CSV_CELL, min_size=len(header) - 1, max_size=len(header) + 1), max_size=3))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        body = buf.getvalue().encode("utf-8", "surrogatepass")
    else:  # any bytes at all
        body = data.draw(st.binary(max_size=300))
    (folder / f"{P.name}.csv").write_bytes(body)
    try:
        rows = load_published(P, folder)
    except PublishedDataError as e:
        assert str(e).startswith(str(folder / f"{P.name}.csv"))
    else:
        assert all(0 <= r.metrics["semseg"] <= 100 for r in rows)
