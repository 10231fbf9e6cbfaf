"""Golden tests of the published data: Δm recomputed from per-task values, the data against its
source text (shared/published_results.md), and the committed LEADERBOARD.md snapshot."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from benchmark.protocol import PASCAL_CONTEXT, get_reference
from leaderboard.aggregate import DELTA_M_ROUNDING_TOL, delta_m_mismatch, row_delta_m
from leaderboard.build import collect
from leaderboard.checks import CheckReport, check_published_delta_m, default_plot_link
from leaderboard.data import (
    load_expected_params,
    load_fragments,
    load_known_inconsistencies,
    load_published,
)
from leaderboard.tables import render_markdown

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MTPEFT_SHARED", ROOT.parent / "shared"))
PUBLISHED_MD = SHARED / "published_results.md"

ROWS = load_published(PASCAL_CONTEXT)
KNOWN = load_known_inconsistencies()


def _md_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text`` as rows of stripped cells (separator rows dropped)."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def _num(cell: str) -> float | None:
    cell = cell.split("(")[0].strip().replace(",", "")
    return None if cell in ("-", "–", "") else float(cell)


@pytest.fixture(scope="module")
def published_md() -> str:
    if not PUBLISHED_MD.is_file():
        pytest.fail(f"{PUBLISHED_MD} not found (set MTPEFT_SHARED)")
    return PUBLISHED_MD.read_text()


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_printed_delta_m_matches_recomputed(row):
    """Each published row's Δm, recomputed from its per-task values, matches the printed one within rounding,
    except listed inconsistencies, which must really be inconsistent (catches sign/direction errors)."""
    gap = delta_m_mismatch(row, PASCAL_CONTEXT)
    if row.id in KNOWN:
        assert gap > DELTA_M_ROUNDING_TOL, f"{row.id} is listed as inconsistent but matches within rounding"
    else:
        assert gap <= DELTA_M_ROUNDING_TOL, (
            f"{row.id}: printed {row.delta_m_printed}, recomputed {row_delta_m(row, PASCAL_CONTEXT)}"
        )


def test_known_inconsistency_is_the_full_ft_row():
    assert set(KNOWN) == {"mtlora-t1-full_ft"}
    row = next(r for r in ROWS if r.id == "mtlora-t1-full_ft")
    assert round(row_delta_m(row, PASCAL_CONTEXT), 2) == 2.45 and row.delta_m_printed == 2.23
    report = CheckReport()
    check_published_delta_m(ROWS, PASCAL_CONTEXT, KNOWN, report)
    assert report.ok, report.failures


def test_single_task_row_is_the_reference():
    row = next(r for r in ROWS if r.method == "single_task")
    assert row.metrics == dict(get_reference(row.reference).values)
    assert row_delta_m(row, PASCAL_CONTEXT) == 0.0
    assert all(not r.verified for r in ROWS)  # secondary quotes until checked against the PDFs


# Method cell of published_results.md (with the source's first word) -> published row id
MD_TO_ID = {
    ("MTLoRA,", "Single-task full fine-tune (4 models)"): "mtlora-t1-single_task",
    ("same", "MTL full fine-tune"): "mtlora-t1-full_ft",
    ("same", "MTLoRA r=16"): "mtlora-t1-r16",
    ("same", "MTLoRA r=32"): "mtlora-t1-r32",
    ("same", "MTLoRA r=64"): "mtlora-t1-r64",
    ("github", "MTLoRA r=64"): "mtlora-issue6-r64",
    ("TADFormer,", "TADFormer r=16"): "tadformer-r16",
    ("same", "TADFormer r=32"): "tadformer-r32",
    ("same", "TADFormer r=64"): "tadformer-r64",
    ("DiTASK,", "DiTASK multi-task"): "ditask-multi_task",
    ("same", "DiTASK single-task adapters"): "ditask-single_task_adapters",
    ("FAAR,", "FAAR"): "faar",
    ("Free", "Free Sinewich r=64"): "free_sinewich-r64",
    ("same", "Free Sinewich r=32"): "free_sinewich-r32",
}


def test_published_csv_matches_source_text(published_md):
    """Every row of the published table in shared/published_results.md is in the CSV with the same numbers,
    and the harness's recomputed Δm equals the text's recomputed column (to its 2 decimals)."""
    table = next(t for t in _md_tables(published_md) if t[0][:2] == ["Source", "Method"])
    by_id = {r.id: r for r in ROWS}
    seen = set()
    for cells in table[1:]:
        src, method, semseg, parts, sal, normals, dm_printed, dm_recomputed, params = cells
        rid = MD_TO_ID[(src.split()[0], method)]
        seen.add(rid)
        row = by_id[rid]
        assert row.metrics == {
            "semseg": _num(semseg),
            "human_parts": _num(parts),
            "sal": _num(sal),
            "normals": _num(normals),
        }
        assert row.delta_m_printed == _num(dm_printed)
        assert row.params_m_printed == _num(params)
        assert abs(row_delta_m(row, PASCAL_CONTEXT) - _num(dm_recomputed)) <= 0.005 + 1e-9
        assert ("mismatch" in dm_recomputed) == (rid in KNOWN)
    assert seen == set(by_id), f"CSV rows not in the source text: {set(by_id) - seen}"


def test_expected_params_match_source_text(published_md):
    table = next(t for t in _md_tables(published_md) if t[0][:2] == ["Configuration", "Trainable"])
    names = {
        "MTL full fine-tune": "full_ft",
        "Decoders only (frozen Swin)": "decoders_only",
        "4 single-task models": "single_task",
    }
    expected = {(e.method, json.dumps(e.config, sort_keys=True)): e for e in load_expected_params()}
    assert len(expected) == len(table) - 1
    for cells in table[1:]:
        m = re.fullmatch(r"(mtlora(?:_plus)?) r=(\d+) \(task rank (\d+)\)", cells[0])
        if m:
            cfg = {"shared_rank": [int(m[2])] * 4, "task_rank": int(m[3])}
            key = (m[1], json.dumps(cfg, sort_keys=True))
        else:
            key = (names[cells[0]], "{}")
        e = expected[key]
        want = [_num(c) for c in cells[1:]]  # trainable, decoders, LoRA, other, total
        got = [e.counts[k] for k in ("trainable", "decoders", "adapter", "other_trainable_backbone", "total")]
        assert got == [None if w is None else int(w) for w in want], cells[0]


def test_fragments_match_source_text(published_md):
    para = published_md.split("Unverified fragments", 1)[1].split("\n\n", 1)[0]
    found = re.findall(r"([A-Z][\w-]+) ([+-]?\d+\.\d+) / (\d+\.\d+)M", para)
    frags = {f.label: f for f in load_fragments(PASCAL_CONTEXT)}
    assert len(found) == 6, para
    for label, dm, params in found:
        assert (frags[label].delta_m_printed, frags[label].params_m_printed) == (float(dm), float(params))
    assert frags["HyperFormer"].params_m_printed == 72.77 and frags["HyperFormer"].delta_m_printed is None


def test_committed_leaderboard_is_fresh(monkeypatch):
    """LEADERBOARD.md is byte for byte what `leaderboard build results/ -o LEADERBOARD.md` gives."""
    monkeypatch.chdir(ROOT)
    committed = (ROOT / "LEADERBOARD.md").read_bytes()
    lb = collect(["results"])
    fresh = render_markdown(lb, default_plot_link(Path("LEADERBOARD.md"))).encode()
    assert fresh == committed, (
        "LEADERBOARD.md is stale: run `leaderboard build results/ -o LEADERBOARD.md --plot docs/pareto.png`"
    )
    assert b"](docs/pareto.png)" in committed and (ROOT / "docs" / "pareto.png").is_file()
