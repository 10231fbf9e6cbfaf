"""``leaderboard build ... --html DIR``: the leaderboard as a static web page that works offline.

The site is written from the same ``Leaderboard`` (the same frames) as LEADERBOARD.md, so the two cannot
disagree. It needs no server and loads nothing from the network: ``index.html`` loads scripts that sit beside
it, all shipped with this package or the ``plotly`` package (its self-contained ``plotly.min.js``)::

    DIR/index.html        sections per protocol, tables, plots, filters (static markup + data)
    DIR/data.js           the rows as JSON (window.LEADERBOARD_DATA); a script, since file:// pages cannot fetch
    DIR/leaderboard.js    sorting, filters, plots, detail rows (leaderboard/site/leaderboard.js)
    DIR/leaderboard.css
    DIR/plotly.min.js     plotly's offline bundle
    DIR/runs/<run_id>.json  a copy of every result file shown, linked from the detail rows

Every string from a result or a published file reaches the page either through ``html.escape`` (markup) or
as JSON inside ``data.js`` with ``<``, ``>`` and ``&`` written as ``\\u003c``, ``\\u003e`` and ``\\u0026`` (so no
string can close the script), and the script puts text into the page with ``textContent`` only.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from importlib import resources
from pathlib import Path
from typing import Any

from leaderboard.build import Leaderboard, Section
from leaderboard.data import PARAM_POLICIES, UNSTATED
from leaderboard.stats import NO_INTERVAL
from leaderboard.tables import MISMATCH, UNVERIFIED, _encoder_cell, _params_cell, task_decimals, task_header

SITE_ASSETS = ("leaderboard.js", "leaderboard.css")
FILTER_FIELDS = (
    ("backbone", "Backbone"),
    ("init", "Initialisation"),
    ("counting_policy", "Counting policy"),
    ("source_kind", "Source"),
    ("selection", "Selection rule"),
)


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _set_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ",".join(_set_value(x) for x in v) + "]"
    return str(v)


def reproduce_command(data: dict[str, Any]) -> str:
    """The ``run_benchmark`` command that reruns one result (its method, config, preset, seed, protocol, selection
    rule)."""
    argv = ["run_benchmark", "--method", data["method"]["name"], "--preset", data["preset"]]
    argv += ["--seed", *(str(s) for s in data["seeds"])]
    config = data["method"]["config"]
    if config:
        argv += ["--set", *(f"{k}={_set_value(v)}" for k, v in sorted(config.items()))]
    argv += ["--protocol", data["protocol"]["name"]]
    if data["selection"].get("rule") == "best":
        argv += ["--select", "best"]
    if data["preset"] == "paper":
        argv += ["--data", "DATA", "--pretrained", "WEIGHTS"]
    return shlex.join(argv)


def _run_entry(run: Any) -> dict[str, Any]:
    d = run.data
    return {
        "run_id": run.run_id,
        "file": f"runs/{run.run_id}.json",
        "seeds": d["seeds"],
        "command": reproduce_command(d),
        "env": d.get("env", {}),
        "selection": d["selection"],
        "cost": d.get("cost", {}),
        "per_image": run.per_image is not None,
    }


def _row_entry(row: dict[str, Any], section: Section, runs_by_id: dict[str, Any]) -> dict[str, Any]:
    p = section.protocol
    ref = section.reference
    keys = (*p.task_names, "delta_m")
    reproduced = row["kind"] == "reproduced"
    flags = []
    source = "reproduced"
    backbone = p.backbone
    if not reproduced:
        pub = next(x for x in section.published if x.id == row["id"])
        source = f"{pub.source} ({pub.table})" if pub.table else pub.source
        backbone = pub.backbone
        if not pub.verified:
            flags.append({"mark": UNVERIFIED, "kind": "unverified", "note": "secondary quote, not yet verified"})
    if row["mismatch"]:
        flags.append(
            {
                "mark": MISMATCH,
                "kind": "inconsistent",
                "note": f"printed Δm differs from the recomputed one: {row['mismatch']}",
            }
        )
    ci = {k: [_num(row[f"{k}_ci_lo"]), _num(row[f"{k}_ci_hi"])] for k in keys}
    has_ci = all(v[0] is not None for v in ci.values())
    if reproduced:
        ci_method = row["ci_method"] or NO_INTERVAL
    else:
        ci_method = "published row: no interval (the source prints single numbers)"
    return {
        "kind": row["kind"],
        "source_kind": row["kind"],
        "source": source,
        "id": row["id"],
        "method": row["method"],
        "label": row["method"] if reproduced else row["label"],
        "config_text": row["config_text"],
        "config": json.loads(row["config_json"]),
        "values": {k: _num(row[k]) for k in keys},
        "ci": ci if has_ci else None,
        "ci_method": ci_method,
        "delta_m_printed": _num(row["delta_m_printed"]),
        "params_m": _num(row["params_m"]),
        # sort key of the Trainable column: the count, or as printed where the source does not state its policy
        "params_sort": _num(row["params_m"])
        if _num(row["params_m"]) is not None or row["params_policy"] != UNSTATED
        else _num(row["params_printed"]),
        "params_m_max": _num(row["params_m_max"]),
        "img_s": _num(row["img_s"]),
        "mem_gib": _num(row["mem_gib"]),
        "n_seeds": int(row["n_seeds"]),
        "seeds": row["seeds"],
        "selection": row["selection"] or "",
        "preset": row["preset"] or "",
        "backbone": backbone,
        "init": (row["init"] or ref.init),
        "counting_policy": PARAM_POLICIES.get(row["params_policy"], str(row["params_policy"])),
        "encoder_m": _num(row["encoder_m"]),
        # the parameter cells exactly as LEADERBOARD.md prints them (unstated-policy counts "?", foreign ones "‡")
        "params_text": _params_cell(row),
        "encoder_text": _encoder_cell(row),
        "verified": bool(row["verified"]),
        "flags": flags,
        "notes": row["notes"] or "",
        "runs": [_run_entry(runs_by_id[i]) for i in row["run_ids"]] if reproduced else [],
    }


def site_data(lb: Leaderboard) -> dict[str, Any]:
    """Everything the page shows, as JSON-able data (one entry per section)."""
    runs_by_id = {r.run_id: r for r in lb.results.runs}
    sections = []
    for s in lb.sections:
        p = s.protocol
        ref = s.reference
        rows = [_row_entry(r, s, runs_by_id) for r in s.frame.to_dict("records")]
        sections.append(
            {
                "id": f"{p.name}-v{p.version}",
                "title": f"{p.name} v{p.version} ({p.backbone}, {p.image_size}×{p.image_size}, {len(p.tasks)} tasks)",
                "tasks": [
                    {
                        "name": t.name,
                        "header": task_header(p, t.name),
                        "higher_is_better": t.higher_is_better,
                        "decimals": task_decimals(p, t),
                    }
                    for t in p.tasks
                ],
                "reference": {
                    "name": ref.name,
                    "values": dict(ref.values),
                    "source": ref.source,
                    "default": ref.name == p.reference,
                    "default_name": p.reference,
                },
                "rows": rows,
                "filters": [
                    {"field": f, "label": label, "values": sorted({str(r[f]) for r in rows if r[f] != ""})}
                    for f, label in FILTER_FIELDS
                ],
            }
        )
    return {"sections": sections}


def _script_json(obj: Any) -> str:
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, sort_keys=True, indent=1)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _index_html(lb: Leaderboard, data: dict[str, Any]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src 'self'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:\">",
        "<title>mtpeft-bench leaderboard</title>",
        '<link rel="stylesheet" href="leaderboard.css">',
        "</head><body>",
        "<h1>Leaderboard</h1>",
        '<p class="lead">Generated by <code>leaderboard build --html</code> from the same aggregation as '
        "LEADERBOARD.md. Reproduced rows show the mean ± the half-width of its 95% interval (a t-interval over "
        "seeds when there are several, else a bootstrap over the run's validation images; click a row for "
        "details). <strong>Published rows have no interval</strong>: their sources print single numbers. "
        f"{e(UNVERIFIED)} unverified secondary quote; {e(MISMATCH)} printed Δm inconsistent with the row's own "
        "values (hover the mark for the note).</p>",
    ]
    for s in data["sections"]:
        sid = e(s["id"])
        parts += [
            f'<section class="protocol" id="{sid}" data-section="{sid}">',
            f"<h2>{e(s['title'])}</h2>",
            f'<p class="reference">Δm against the single-task reference <code>{e(s["reference"]["name"])}</code> '
            + (
                "(the protocol's default; "
                if s["reference"]["default"]
                else f"(chosen by name; the default is <code>{e(s['reference']['default_name'])}</code>; "
            )
            + f"source: {e(s['reference']['source'])}).</p>",
            '<div class="filters">',
        ]
        for f in s["filters"]:
            parts.append(
                f'<label>{e(f["label"])} <select data-filter="{e(f["field"])}"><option value="">all</option>'
                + "".join(f'<option value="{e(v)}">{e(v)}</option>' for v in f["values"])
                + "</select></label>"
            )
        parts += [
            "</div>",
            '<table class="board"><thead></thead><tbody></tbody></table>',
            '<div class="plots">'
            '<div class="plot" data-plot="params"></div>'
            '<div class="plot" data-plot="img_s"></div>'
            '<div class="plot" data-plot="mem_gib"></div></div>',
            "</section>",
        ]
    parts += [
        '<script src="plotly.min.js"></script>',
        '<script src="data.js"></script>',
        '<script src="leaderboard.js"></script>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def plotly_bundle() -> bytes:
    """Plotly's self-contained offline bundle, from the installed ``plotly`` package."""
    return (resources.files("plotly") / "package_data" / "plotly.min.js").read_bytes()


def render_site(lb: Leaderboard) -> dict[str, bytes]:
    """The files of the site, relative path -> bytes (nothing is written here)."""
    data = site_data(lb)
    files = {
        "index.html": _index_html(lb, data).encode(),
        "data.js": ("window.LEADERBOARD_DATA = " + _script_json(data) + ";\n").encode(),
        "plotly.min.js": plotly_bundle(),
    }
    assets = resources.files("leaderboard") / "site"
    for name in SITE_ASSETS:
        files[name] = (assets / name).read_bytes()
    for run in lb.results.runs:
        files[f"runs/{run.run_id}.json"] = Path(run.path).read_bytes()
    return files


def write_site(files: dict[str, bytes], out_dir: str | Path) -> None:
    from benchmark.results import atomic_write_bytes

    out = Path(out_dir)
    for rel, content in files.items():
        atomic_write_bytes(out / rel, content)
