"""Golden tests of the published data (leaderboard/published/*.csv, the source of truth): Δm recomputed from
per-task values, printed parameter counts against the measured ones, and the committed LEADERBOARD.md snapshot."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from benchmark.protocol import NYUD, PASCAL_CONTEXT, PROTOCOLS, REFERENCES, delta_m, get_reference
from leaderboard.aggregate import (
    PRINTED_HALF_UNIT,
    delta_m_mismatch,
    delta_m_rounding_tol,
    row_delta_m,
    row_rounding_tol,
)
from leaderboard.build import collect, section_plot_path
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
ALL_ROWS = [(p, r) for p in PROTOCOLS.values() for r in load_published(p)]
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


@pytest.mark.parametrize(("protocol", "row"), ALL_ROWS, ids=[f"{p.name}-{r.id}" for p, r in ALL_ROWS])
def test_printed_delta_m_matches_recomputed(protocol, row):
    """Each published row's Δm, recomputed from its per-task values, matches the printed one within rounding,
    except listed inconsistencies, which must really be inconsistent (catches sign/direction errors)."""
    gap = delta_m_mismatch(row, protocol)
    tol = row_rounding_tol(row, protocol)
    if row.id in KNOWN:
        assert gap > tol, f"{row.id} is listed as inconsistent but matches within rounding"
    else:
        assert gap <= tol, f"{row.id}: printed {row.delta_m_printed}, recomputed {row_delta_m(row, protocol)}"


@pytest.mark.parametrize("ref", sorted(REFERENCES))
def test_rounding_bound_is_the_worst_case_of_two_decimal_rounding(ref):
    """The bound is the error model's worst case: Δm is linear in the per-task values, so the largest shift that
    rounding each value by at most half a unit can cause is at a corner of the box; plus the printed Δm's own
    rounding. Checked by evaluating every corner around the reference (independent of the closed form)."""
    r = REFERENCES[ref]
    protocol = PROTOCOLS[r.protocol]
    worst = max(
        abs(delta_m({t: r.values[t] + s * PRINTED_HALF_UNIT for t, s in zip(protocol.task_names, signs, strict=True)}, r.values,
                    protocol.tasks))
        for signs in itertools.product((-1, 1), repeat=len(protocol.tasks))
    )  # fmt: skip
    assert delta_m_rounding_tol(protocol, ref) == pytest.approx(worst + PRINTED_HALF_UNIT, rel=1e-12)


def test_nyud_worked_example():
    """The MTL full fine-tune row of NYUDv2 against FAAR's reference: 38.85 / 0.66 / 24.33 vs 42.65 / 0.60 / 22.83
    is -8.4933 %, printed -8.49; the reference rows equal the references they name."""
    rows = {r.id: r for r in load_published(NYUD)}
    ft = next(r for r in rows.values() if r.method == "full_ft")
    assert ft.reference == NYUD.reference == "faar-nyud-single-task"
    assert round(row_delta_m(ft, NYUD), 4) == -8.4933 and ft.delta_m_printed == -8.49
    assert row_delta_m(ft, NYUD, "tadformer-config-nyud-single-task") != row_delta_m(ft, NYUD)
    single = [r for r in rows.values() if r.method == "single_task"]
    assert {r.reference for r in single} == {n for n, x in REFERENCES.items() if x.protocol == NYUD.name}
    for r in single:
        assert r.metrics == dict(get_reference(r.reference).values) and row_delta_m(r, NYUD) == 0.0


def test_known_inconsistency_is_the_full_ft_row():
    assert set(KNOWN) == {"mtlora-t1-full_ft"}
    row = next(r for r in ROWS if r.id == "mtlora-t1-full_ft")
    assert round(row_delta_m(row, PASCAL_CONTEXT), 2) == 2.45 and row.delta_m_printed == 2.23
    report = CheckReport()
    check_published_delta_m(ROWS, PASCAL_CONTEXT, KNOWN, report)
    assert report.ok, report.failures


def test_single_task_rows_are_their_references():
    singles = [(p, r) for p, r in ALL_ROWS if r.method == "single_task"]
    assert {p.name for p, _ in singles} == set(PROTOCOLS)
    for p, row in singles:
        assert row.metrics == dict(get_reference(row.reference).values)
        assert row_delta_m(row, p) == 0.0
    assert all(not r.verified for _, r in ALL_ROWS)  # secondary quotes until checked against the PDFs


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
    assert [s.protocol.name for s in lb.sections] == list(PROTOCOLS)  # a section per protocol, declared order
    for s in lb.sections:  # each section's plot is committed where LEADERBOARD.md links it, if it has points
        plot = section_plot_path("docs/pareto.png", s, len(lb.sections))
        assert (f"]({plot})".encode() in committed) == bool(s.plotted) == (ROOT / plot).is_file(), plot
