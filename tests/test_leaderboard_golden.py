"""Golden tests of the published data (leaderboard/published/*.csv, the source of truth): Δm recomputed from
per-task values, printed parameter counts against the measured ones, and the committed LEADERBOARD.md snapshot."""

from __future__ import annotations

import json
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


def test_printed_params_agree_with_the_measured_counts():
    """A published row's printed parameter count (M, 2 decimals) is the official code's measured trainable count
    of the same configuration (expected_params.csv), or the row's note states the measured count."""
    expected = {(e.method, json.dumps(e.config, sort_keys=True)): e for e in load_expected_params()}
    compared = 0
    for row in ROWS:
        e = expected.get((row.method, json.dumps(row.config, sort_keys=True)))
        if e is None or row.params_m_printed is None:
            continue
        compared += 1
        measured = e.counts["trainable"]
        if round(measured / 1e6, 2) != row.params_m_printed:
            assert f"{measured:,}" in row.notes, f"{row.id}: printed {row.params_m_printed}M, measured {measured:,}"
    assert compared >= 4


def test_fragments_are_on_the_leaderboard():
    """Every unverified fragment is shown in LEADERBOARD.md with its printed numbers (2 decimals, '–' if none)."""
    committed = (ROOT / "LEADERBOARD.md").read_text()
    rows = {cells[0]: cells for cells in (t for table in _md_tables(committed) for t in table)}
    frags = load_fragments(PASCAL_CONTEXT)
    assert frags
    for f in frags:
        cells = rows[f.label]
        shown = {_num(c) for c in cells[1:] if re.fullmatch(r"[+-]?\d+(\.\d+)?|[-–]", c)}
        for v in (f.delta_m_printed, f.params_m_printed):
            assert v in shown, (f.label, v, cells)


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
