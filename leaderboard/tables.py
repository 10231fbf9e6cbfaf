"""LEADERBOARD.md and the CSV export: deterministic text (no timestamps, fixed float formats)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
from tabulate import tabulate

from benchmark.protocol import Protocol, Reference, TaskSpec, get_reference
from leaderboard.aggregate import row_delta_m, row_rounding_tol
from leaderboard.build import Leaderboard, Section, section_plot_path
from leaderboard.data import ALL_TRAINABLE, ENCODER_SIDE, PARAM_POLICIES, UNSTATED
from leaderboard.validate import csv_cell, md_cell

MISSING = "–"
BUILD_COMMAND = "leaderboard build results/ -o LEADERBOARD.md --plot docs/pareto.png"
UNVERIFIED = "†"
MISMATCH = "⚠"
FOREIGN_POLICY = "‡"  # a published count made under another counting policy than the protocol's
UNSTATED_POLICY = "?"  # a published count whose source does not say how it counted


# Per-task values are shown with at least MIN_DECIMALS decimals and at least SIGNIFICANT significant digits at the
# scale of the protocol's default reference value: 2 decimals for mIoU in % (67.21) and angles in degrees (17.97),
# 3 for a depth rmse in metres (0.600). Derived from the data, so a new task kind needs no entry here.
MIN_DECIMALS = 2
SIGNIFICANT = 3


def task_decimals(protocol: Protocol, task: TaskSpec) -> int:
    """Decimals of ``task``'s values in tables (the rule above)."""
    v = abs(float(get_reference(protocol.reference).values.get(task.name, 0.0)))
    if v == 0 or not math.isfinite(v):
        return MIN_DECIMALS
    return max(MIN_DECIMALS, SIGNIFICANT - 1 - math.floor(math.log10(v)))


def units_text(tasks: Sequence[TaskSpec]) -> str:
    """How each task's values are given, from the protocol's task records: percentages where the task reports a
    fraction x100, else the metric's own unit; with the direction."""
    parts = [
        f"{t.label} {'in %' if t.percent else 'in its own unit'} ({'higher' if t.higher_is_better else 'lower'} "
        "is better)"
        for t in tasks
    ]
    return ", ".join(parts)


def arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


def task_header(protocol: Protocol, task: str) -> str:
    t = protocol.task(task)
    return f"{t.label}{' %' if t.percent else ''} {arrow(t.higher_is_better)}"


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt(v: Any, spec: str = ".2f") -> str:
    """A number with a fixed format, or the missing marker."""
    return MISSING if _isnan(v) else format(v, spec)


def half_width(row: dict[str, Any], key: str) -> float:
    """Half the width of a row's 95% interval for ``key`` (a task or ``delta_m``); NaN when it has none."""
    lo, hi = row.get(f"{key}_ci_lo", math.nan), row.get(f"{key}_ci_hi", math.nan)
    return math.nan if _isnan(lo) or _isnan(hi) else (hi - lo) / 2


def value_cell(row: dict[str, Any], key: str, decimals: int = 2, sign: bool = False) -> str:
    """``value ± half-width`` of the 95% interval where the row has one, else the bare value."""
    v, h = row[key], half_width(row, key)
    if _isnan(v):
        return MISSING
    text = format(v, f"{'+' if sign else ''}.{decimals}f")
    return text if _isnan(h) else f"{text} ± {h:.{decimals}f}"


def _source_cell(row: dict[str, Any], section: Section) -> str:
    if row["kind"] == "reproduced":
        return "reproduced"
    pub = next(p for p in section.published if p.id == row["id"])
    text = f"{pub.source} ({pub.table})" if pub.table else pub.source
    return text if pub.verified else f"{text} {UNVERIFIED}"


def _range_cell(lo: Any, hi: Any) -> str:
    if not _isnan(lo) and not _isnan(hi) and f"{lo:.2f}" != f"{hi:.2f}":
        return f"{lo:.2f}–{hi:.2f}"
    return fmt(lo)


def _params_cell(row: dict[str, Any]) -> str:
    """All trainable parameters, decoders included (the protocol's policy); a count whose source does not state
    its policy is shown here as printed, marked."""
    if row["kind"] != "reproduced" and row["params_policy"] == UNSTATED and not _isnan(row["params_printed"]):
        return f"{fmt(row['params_printed'])} {UNSTATED_POLICY}"
    return _range_cell(row["params_m"], row["params_m_max"])


def _encoder_cell(row: dict[str, Any]) -> str:
    """Trainable parameters outside the decoders: computed for runs, as printed for encoder-side published rows
    (marked as another policy than the protocol's)."""
    cell = _range_cell(row["encoder_m"], row["encoder_m_max"])
    if row["kind"] != "reproduced" and row["params_policy"] == ENCODER_SIDE and cell != MISSING:
        cell += f" {FOREIGN_POLICY}"
    return cell


def table_rows(section: Section) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells of a section's main table (all formatting happens here)."""
    p = section.protocol
    headers = ["#", "Method", "Config", "Source"]
    headers += [task_header(p, t) for t in p.task_names]
    headers += ["Δm % ↑", "Δm printed", "Trainable (M) ↓", "Encoder-side (M) ↓", "Seeds", "Selection"]
    headers += ["Train img/s ↑", "Peak mem (GiB) ↓"]
    rows = []
    for i, row in enumerate(section.frame.to_dict("records"), start=1):
        reproduced = row["kind"] == "reproduced"
        printed = MISSING if reproduced else f"{row['delta_m_printed']:+.2f}"
        if row["mismatch"]:
            printed += f" {MISMATCH}"
        rows.append(
            [
                str(i),
                row["method"] if reproduced else row["label"] + (f" [{row['init']}]" if row["init_differs"] else ""),
                row["config_text"],
                _source_cell(row, section),
                *(value_cell(row, t.name, task_decimals(p, t)) for t in p.tasks),
                value_cell(row, "delta_m", 2, sign=True),
                printed,
                _params_cell(row),
                _encoder_cell(row),
                f"{row['n_seeds']} ({row['seeds']})" if reproduced else MISSING,
                row["selection"] or MISSING,
                fmt(row["img_s"], ".1f"),
                fmt(row["mem_gib"], ".2f"),
            ]
        )
    return headers, [[md_cell(c) for c in r] for r in rows]


def markdown_table(headers: list[str], rows: list[list[str]], align: list[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True, colalign=align)


def _reference_line(p: Protocol, ref: Reference) -> str:
    vals = ", ".join(f"{p.task(t).label} {ref.values[t]:g}" for t in p.task_names)
    which = "the protocol's default" if ref.name == p.reference else f"chosen by name; the default is `{p.reference}`"
    return (
        f"Δm: mean signed relative change against the single-task reference `{md_cell(ref.name)}` ({which}; {vals}; "
        f"{ref.backbone}, {ref.init}, {ref.image_size}px; source: {md_cell(ref.source)}), in %, positive is better. "
        "It is recomputed here from each row's per-task values (the mean over seeds for reproduced rows); "
        '"Δm printed" is the number the source prints, against the reference that source used.'
    )


def render_section(section: Section, lb: Leaderboard, plot_link: str | None) -> list[str]:
    p = section.protocol
    out = [f"## {p.name} v{p.version} ({p.backbone}, {p.image_size}×{p.image_size}, {len(p.tasks)} tasks)", ""]
    out += [_reference_line(p, section.reference), ""]
    n_groups = section.n_reproduced_groups
    if n_groups == 0:
        out += ["No reproduced runs yet: the table holds published rows only.", ""]
    else:
        n_runs = sum(1 for r in lb.results.runs if r.data["protocol"]["name"] == p.name)
        out += [f"Reproduced: {n_runs} run(s) in {n_groups} group(s) (method, config, preset, selection rule).", ""]
    headers, rows = table_rows(section)
    n_tasks = len(p.tasks)
    align = ["right", "left", "left", "left"] + ["right"] * (n_tasks + 4) + ["left", "left", "right", "right"]
    out += [markdown_table(headers, rows, align), ""]
    foot = [
        f"Per-task values are in table units: {units_text(p.tasks)}. Reproduced rows show the "
        "mean over seeds ± the half-width of its 95% interval: a t-interval over the seeds when there are several, "
        "else a bootstrap over the run's validation images (`leaderboard/stats.py`; the web page's detail view "
        "says which). Published rows have no interval: their sources print single numbers. Throughput and peak "
        "memory are the training figures the runs record.",
        f"Parameters in millions, under two counting policies. Trainable: {PARAM_POLICIES[ALL_TRAINABLE]} (the rule "
        f"of the official MTLoRA code and of this protocol). Encoder-side: {PARAM_POLICIES[ENCODER_SIDE]}, the "
        "trainable parameters outside the decoders. Reproduced rows show both, from the run's parameter breakdown. "
        "A published row shows its printed count in the column of the policy it was counted under, and nothing in "
        "the other: the source's decoder count is not known, so a printed count is never converted. Only Trainable "
        "counts are plotted.",
    ]
    policies = {r["params_policy"] for r in section.frame.to_dict("records") if r["kind"] != "reproduced"}
    if ENCODER_SIDE in policies:
        foot.append(
            f"{FOREIGN_POLICY} Published under another counting policy than this protocol's ({PARAM_POLICIES[ENCODER_SIDE]}, "
            "decoders excluded): not comparable with the Trainable column, and not plotted."
        )
    if UNSTATED in policies:
        foot.append(
            f"{UNSTATED_POLICY} The source does not state whether its count includes the decoders: shown as printed, "
            "not plotted."
        )
    if any(not r.verified for r in section.published):
        foot.append(f"{UNVERIFIED} Secondary quote, not yet verified against the paper (`verified` column).")
    for row in section.frame.to_dict("records"):
        if row["mismatch"]:
            pub = next(x for x in section.published if x.id == row["id"])
            foot.append(
                f"{MISMATCH} `{md_cell(row['id'])}`: printed Δm {row['delta_m_printed']:+.2f} differs from the "
                f"{row_delta_m(pub, p):+.2f} recomputed against `{md_cell(pub.reference)}` by more than rounding "
                f"({row_rounding_tol(pub, p):.3f}). {md_cell(row['mismatch'])}"
            )
    out += [line for f in foot for line in (f, "")]
    other_ref = [r for r in section.published if r.reference != section.reference.name]
    if other_ref:
        shown = ", ".join(f"`{md_cell(r.id)}` (against `{md_cell(r.reference)}`)" for r in other_ref)
        out += [
            f"Printed Δm against another reference than this section's `{md_cell(section.reference.name)}`, so not "
            f"comparable with the Δm % column: {shown}.",
            "",
        ]
    if plot_link and not section.plotted:
        out += ["No plot: no row has a parameter count under the Trainable policy.", ""]
    elif plot_link:
        out += [f"![Δm against trainable parameters, {p.name} v{p.version}]({plot_link})", ""]
        unplotted = [r for r in section.frame.to_dict("records") if _isnan(r["params_m"]) or _isnan(r["delta_m"])]
        if unplotted:
            names = ", ".join(md_cell(r["label"]) for r in unplotted)
            out += [f"Not in the plot (no parameter count under the Trainable policy): {names}.", ""]
    noted = [r for r in section.published if r.notes]
    if noted:
        out += ["### Notes on published rows", ""]
        out += [f"- `{md_cell(r.id)}` ({md_cell(r.label)}, {md_cell(r.source)}): {md_cell(r.notes)}" for r in noted]
        out += [""]
    if section.fragments:
        out += [
            "### Unverified fragments",
            "",
            "Δm / parameter numbers without per-task values and of uncertain attribution: never plotted, never "
            f"checked (`leaderboard/published/{p.name}.fragments.csv`).",
            "",
        ]
        frag_rows = [
            [md_cell(c) for c in (f.label, MISSING if f.delta_m_printed is None else f"{f.delta_m_printed:+.2f}",
             fmt(f.params_m_printed), PARAM_POLICIES[f.params_policy], f.claimed_source, f.notes)]
            for f in section.fragments
        ]  # fmt: skip
        out += [
            tabulate(
                frag_rows,
                headers=["Method", "Δm printed", "Params (M)", "Counting policy", "Claimed source", "Notes"],
                tablefmt="github",
                disable_numparse=True,
                colalign=["left", "right", "right", "left", "left", "left"],
            ),
            "",
        ]
    return out


def render_markdown(lb: Leaderboard, plot_link: str | None = "docs/pareto.png") -> str:
    """The whole LEADERBOARD.md text; the same inputs give the same bytes."""
    out = [
        "# Leaderboard",
        "",
        "<!-- Generated file, do not edit: `leaderboard check` fails when it differs from a fresh build. -->",
        "",
        f"Generated by `{BUILD_COMMAND}` from the committed result files (`results/<protocol>/<method>/<run_id>.json`, "
        "status success only)"
        + (" and the published rows in `leaderboard/published/`." if lb.include_published else "."),
        "",
    ]
    if lb.results.skipped:
        out += [f"Skipped {len(lb.results.skipped)} result file(s):", ""]
        out += [f"- `{md_cell(path.as_posix())}`: {md_cell(why)}" for path, why in lb.results.skipped] + [""]
    for section in lb.sections:
        link = section_plot_path(plot_link, section, len(lb.sections)) if plot_link else None
        out += render_section(section, lb, link)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def frame_to_csv(lb: Leaderboard) -> str:
    """All sections as one CSV (numbers unrounded at 6 decimals, lists joined by ';')."""
    frames = []
    for s in lb.sections:
        df = s.frame.copy()
        df.insert(0, "protocol", f"{s.protocol.name}.v{s.protocol.version}")
        df["run_ids"] = df["run_ids"].map(lambda ids: ";".join(ids))
        frames.append(df.map(csv_cell))  # text cells only: numbers stay numbers
    if not frames:
        return ""
    return pd.concat(frames, ignore_index=True).to_csv(index=False, float_format="%.6f", lineterminator="\n")
