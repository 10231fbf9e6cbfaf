"""Finding, validating and loading result files (stdlib only).

A results path is a file or a folder; folders are searched recursively for ``*.json`` (the committed
layout is ``results/<protocol>/<method>/<run_id>.json``; a run folder holds ``result.json``).
Nothing is dropped silently: every file is either a valid run, a skipped run (status debug/failed,
or a JSON file found by the folder scan that is no result at all) with the reason, or an error.
Files named like results (``result.json``, ``<run_id>.json``) and files named on the command line
must be valid results; other JSON files met by a folder scan are skipped unless they look like one.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.protocol import Protocol, delta_m, get_protocol, get_reference, table_value
from benchmark.results import ResultError, validate_dict
from leaderboard.errors import LeaderboardError, ResultsNotFoundError
from leaderboard.stats import load_per_image
from leaderboard.validate import check_names, check_result_fields, read_json

# The stored Δm must be what the metrics give: same formula, same inputs, so only float noise may differ.
DELTA_M_STORED_REL_TOL = 1e-9
DELTA_M_STORED_ABS_TOL = 1e-12  # for Δm values at (or within noise of) zero, where a relative test is meaningless


@dataclass(frozen=True)
class Run:
    """One successful, validated result file."""

    path: Path
    data: dict[str, Any]
    per_image: Any = field(default=None, compare=False, repr=False)  # leaderboard.stats.PerImage or None

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def protocol(self) -> Protocol:
        return get_protocol(self.data["protocol"]["name"], self.data["protocol"]["version"])

    @property
    def method(self) -> str:
        return self.data["method"]["name"]

    @property
    def config(self) -> dict[str, Any]:
        return self.data["method"]["config"]

    def table_values(self) -> dict[str, float]:
        """Primary metric of every protocol task, in table units."""
        return table_values(self.data["metrics"], self.protocol)


@dataclass
class LoadedResults:
    """What a set of results paths holds: valid successful runs, skipped files (with why) and errors."""

    runs: list[Run] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def raise_for_errors(self) -> None:
        if self.errors:
            lines = "\n".join(f"  - {e}" for e in self.errors)
            raise LeaderboardError(f"{len(self.errors)} invalid result file(s):\n{lines}")

    def skipped_summary(self) -> list[str]:
        return [f"{p}: {why}" for p, why in self.skipped]


def table_values(metrics: dict[str, dict[str, float]], protocol: Protocol) -> dict[str, float]:
    return {t.name: table_value(t, float(metrics[t.name][t.metric])) for t in protocol.tasks}


def find_result_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every ``*.json`` under ``paths`` (files are taken as given), sorted, without duplicates."""
    found: dict[Path, None] = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ResultsNotFoundError(f"{path}: results path does not exist")
        if path.is_file():
            found[path] = None
        else:
            for f in sorted(path.rglob("*.json")):
                if f.is_file() and not f.name.startswith("."):  # hidden files: editors, atomic-write temp files
                    found[f] = None
    # dedupe paths given twice (results/ and results/x.json) by their resolved location, keep the first spelling
    seen: set[Path] = set()
    out = []
    for f in found:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


def validate_result(data: Any, source: str) -> None:
    """``benchmark.results.validate_dict`` plus what a leaderboard needs of a successful run.

    For status success: the protocol (name and version) is one this harness implements, every
    protocol task has its primary metric as a finite number, the stored Δm names a known reference
    of the same protocol and equals the Δm recomputed from the metrics (relative tolerance 1e-9).
    Raises ``ResultError`` naming the file and the field.
    """
    if isinstance(data, dict):
        check_names(data, source)  # before a run id or a table cell is derived from them
    validate_dict(data, source)
    check_result_fields(data, source)
    if data["status"] != "success":
        return
    try:
        protocol = get_protocol(data["protocol"]["name"], data["protocol"]["version"])
    except (KeyError, ValueError) as e:
        raise ResultError(f"{source}: field 'protocol': {e.args[0]}") from None
    for t in protocol.tasks:
        value = data["metrics"].get(t.name, {}).get(t.metric)
        if value is None:
            raise ResultError(
                f"{source}: field 'metrics.{t.name}.{t.metric}': missing; protocol {protocol.id} needs the "
                f"primary metric of every task {list(protocol.task_names)}"
            )
        if not math.isfinite(value):
            raise ResultError(
                f"{source}: field 'metrics.{t.name}.{t.metric}': expected a finite number, got {value!r}"
            )
    ref_name = data["delta_m"]["reference"]
    try:
        ref = get_reference(ref_name)
    except KeyError as e:
        raise ResultError(f"{source}: field 'delta_m.reference': {e.args[0]}") from None
    if ref.protocol != protocol.name:
        raise ResultError(
            f"{source}: field 'delta_m.reference': {ref_name!r} is a {ref.protocol!r} reference, the run is {protocol.id}"
        )
    stored = float(data["delta_m"]["value"])
    recomputed = delta_m(table_values(data["metrics"], protocol), ref.values, protocol.tasks)
    if not math.isclose(stored, recomputed, rel_tol=DELTA_M_STORED_REL_TOL, abs_tol=DELTA_M_STORED_ABS_TOL):
        raise ResultError(
            f"{source}: field 'delta_m.value': {stored!r} does not match the Δm recomputed from its metrics "
            f"against {ref_name!r}: {recomputed!r}"
        )


# "<protocol>.v<version>--<method>--<config slug>--seed<seeds>", benchmark.results.make_run_id
_RUN_ID_NAME = re.compile(r".+\.v\d+--.+--.+--seed[\d-]+")


def _named_like_result(path: Path) -> bool:
    return path.name == "result.json" or _RUN_ID_NAME.fullmatch(path.stem) is not None


def _looks_like_result(data: Any) -> bool:
    return isinstance(data, dict) and ("schema" in data or "run_id" in data)


def load_results(paths: Sequence[str | os.PathLike[str]]) -> LoadedResults:
    """Read and validate every result file under ``paths``; collects all problems instead of stopping at one.

    Explicitly named files must be results; a JSON file found by a folder scan that does not look like
    a result (no ``schema``/``run_id`` key) is skipped and reported. Duplicate run ids among successful
    runs are an error naming both files. Raises ``ResultsNotFoundError`` for a path that does not exist.
    """
    explicit = {Path(p).resolve() for p in paths if Path(p).is_file()}
    out = LoadedResults(files=find_result_files(paths))
    by_id: dict[str, Path] = {}
    for path in out.files:
        # named like a result (result.json, <run_id>.json) or given explicitly: it must be one. Any other JSON
        # file a folder scan meets (logs, configs in a work dir) is skipped, and reported, unless it looks like one.
        must_be_result = _named_like_result(path) or path.resolve() in explicit
        try:
            data = read_json(path)
        except ResultError as e:
            if must_be_result:
                out.errors.append(str(e))
            else:
                out.skipped.append((path, f"not a result file ({str(e).removeprefix(f'{path}: ')})"))
            continue
        if not must_be_result and not _looks_like_result(data):
            out.skipped.append((path, "not a result file (a JSON file without 'schema' or 'run_id')"))
            continue
        try:
            validate_result(data, str(path))
        except ResultError as e:
            out.errors.append(str(e))
            continue
        if path.name != "result.json" and path.stem != data["run_id"]:
            out.errors.append(f"{path}: file name: expected {data['run_id']}.json or result.json (the file's run_id)")
            continue
        if data["status"] != "success":
            why = f"status {data['status']}"
            if data.get("notes"):
                why += f" ({'; '.join(str(n) for n in data['notes'])})"
            out.skipped.append((path, why))
            continue
        rid = data["run_id"]
        if rid in by_id:
            out.errors.append(f"duplicate run_id {rid!r}: {by_id[rid]} and {path}")
            continue
        try:
            per_image = load_per_image(path, data, get_protocol(data["protocol"]["name"]))
        except ResultError as e:
            out.errors.append(str(e))
            continue
        by_id[rid] = path
        out.runs.append(Run(path, data, per_image))
    out.runs.sort(key=lambda r: r.run_id)
    return out
