"""Published reference data, read from ``leaderboard/published/*.csv`` (stdlib only).

Files (one row per record, UTF-8, header first):

- ``<protocol>.csv``: published rows, one per (paper, table, method, variant), per-task values in
  table units (mIoU in %, normals mean angle in degrees), the printed Δm and trainable parameters (M);
- ``<protocol>.fragments.csv``: unverified fragments (Δm / parameters only). Shown in LEADERBOARD.md,
  never plotted, never checked;
- ``known_inconsistencies.csv``: published rows whose printed Δm is known not to match their own
  per-task values, or whose printed parameter count is known not to match the harness's count of the
  same configuration, with the reason (``leaderboard check`` tolerates those, and only those);
- ``expected_params.csv``: exact parameter counts the harness must reproduce at a given config.

Every published row and fragment names the policy its parameter count was made under (``params_policy``, one of
``PARAM_POLICIES``): the official MTLoRA code's rule counts every trainable parameter, decoders included
(``all-trainable``); later papers (DiTASK, VMT-Adapter) count the encoder side only, without the decoders
(``encoder-side``); ``unstated`` where the source does not say. Rows also record the checkpoint selection rule
their source used, where known (``selection``).

A missing column, an empty required cell or a value of the wrong type is a ``PublishedDataError``
naming the file, the row (the line number in the file: the header is row 1) and the column.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.protocol import REFERENCES, Protocol, TaskSpec, table_value
from benchmark.results import ResultError
from leaderboard.errors import PublishedDataError
from leaderboard.validate import loads_bounded

PUBLISHED_DIR = Path(__file__).resolve().parent / "published"
KNOWN_INCONSISTENCIES_FILE = "known_inconsistencies.csv"
EXPECTED_PARAMS_FILE = "expected_params.csv"
_EXTRA = "__extra_fields__"  # DictReader key for fields beyond the header
MAX_CSV_BYTES = 2**20  # the committed files are a few KiB
MAX_CELL = 1000  # characters in one cell (the longest note is a few hundred)
PARAM_FIELDS = ("trainable", "decoders", "adapter", "other_trainable_backbone", "total")
# counting policies of a trainable-parameter count, and how tables name them
ALL_TRAINABLE = "all-trainable"
ENCODER_SIDE = "encoder-side"
UNSTATED = "unstated"
PARAM_POLICIES = {
    ALL_TRAINABLE: "all trainable, decoders included",
    ENCODER_SIDE: "encoder-side only",
    UNSTATED: "not stated by the source",
}
INCONSISTENCY_FIELDS = ("delta_m_printed", "params_m_printed")


@dataclass(frozen=True)
class PublishedRow:
    """One published result, in table units."""

    id: str
    protocol: str  # protocol name, from the file name
    protocol_version: int
    paper: str
    venue: str
    source: str  # "arXiv:2403.20320", "github:scale-lab/MTLoRA#6": the "source" column of the leaderboard
    table: str
    method: str  # harness-style method key; equal to a registered method where the harness has it
    label: str  # human label for tables and plots
    variant: str
    config: dict[str, Any]  # harness config fields this row corresponds to (used to match committed results)
    metrics: dict[str, float]  # task name -> value in table units
    delta_m_printed: float
    params_m_printed: float | None  # None: not reported
    params_policy: str  # one of PARAM_POLICIES: how params_m_printed was counted
    backbone: str
    init: str
    image_size: int
    reference: str  # key of benchmark.protocol.REFERENCES that the printed Δm was computed against
    verified: bool  # False: secondary quote, not checked against the PDF yet
    notes: str
    selection: str = ""  # the checkpoint selection rule the source used ("" where unknown)
    file: str = ""
    row: int = 0


@dataclass(frozen=True)
class Fragment:
    """An unverified Δm / parameter fragment without per-task numbers."""

    method: str
    label: str
    delta_m_printed: float | None
    params_m_printed: float | None
    claimed_source: str
    notes: str
    params_policy: str = UNSTATED


@dataclass(frozen=True)
class KnownInconsistency:
    id: str  # PublishedRow.id
    field: str  # one of INCONSISTENCY_FIELDS
    reason: str


@dataclass(frozen=True)
class ExpectedParams:
    """Exact parameter counts of one method at one config; ``None`` where the breakdown is unknown."""

    method: str
    config: dict[str, Any]
    preset: str
    counts: dict[str, int | None] = field(default_factory=dict)  # keys: PARAM_FIELDS
    source: str = ""
    row: int = 0
    protocol: str = ""  # the protocol to count under ("": the harness's default protocol)


# --------------------------------------------------------------------------- CSV plumbing


def _read_rows(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> list[tuple[int, dict[str, str]]]:
    """Rows as (row number, {column: stripped text}); every column must be in the header (row 1)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PublishedDataError(f"{path}: published-data file not found") from None
    except OSError as e:
        raise PublishedDataError(f"{path}: cannot read ({e.strerror})") from e
    if len(raw) > MAX_CSV_BYTES:
        raise PublishedDataError(f"{path}: {len(raw)} bytes; a published-data file is at most {MAX_CSV_BYTES}")
    try:
        text = raw.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not part of the first column name
    except UnicodeDecodeError as e:
        raise PublishedDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return _parse_rows(path, text, required, optional)
    except csv.Error as e:  # NUL bytes, a field over the csv module's size limit, ...
        raise PublishedDataError(f"{path}: not a readable CSV file ({e})") from None


def _parse_rows(path: Path, text: str, required: Sequence[str], optional: Sequence[str]) -> list:
    reader = csv.DictReader(text.splitlines(keepends=True), restkey=_EXTRA)
    header = reader.fieldnames or []
    if not header:
        raise PublishedDataError(
            f"{path}: empty file; expected a header row with columns {list(required) + list(optional)}"
        )
    known = set(required) | set(optional)
    for col in list(required) + list(optional):
        if col not in header:
            raise PublishedDataError(f"{path}: missing column {col!r} in the header (row 1)")
    unknown = [c for c in header if c not in known]
    if unknown:
        raise PublishedDataError(
            f"{path}: unknown column(s) {unknown} in the header (row 1); expected {sorted(known)}"
        )
    rows = []
    for rec in reader:
        n = reader.line_num  # the text line the record ends on; equals the spreadsheet row for one-line records
        if _EXTRA in rec:
            raise PublishedDataError(
                f"{path}, row {n}: {len(header) + len(rec[_EXTRA])} fields, header has {len(header)}"
            )
        for col in header:
            if rec.get(col) is None:  # short row: DictReader fills missing trailing fields with None
                raise PublishedDataError(f"{path}, row {n}, column {col!r}: missing (the row has too few fields)")
        clean = {k: v.strip() for k, v in rec.items()}
        for col, v in clean.items():
            if len(v) > MAX_CELL or any(ord(c) < 32 for c in v):
                raise PublishedDataError(
                    f"{path}, row {n}, column {col!r}: expected one line of text of at most {MAX_CELL} characters"
                )
        for col in required:
            if clean[col] == "":
                raise PublishedDataError(f"{path}, row {n}, column {col!r}: empty; a value is required")
        rows.append((n, clean))
    return rows


def _float(path: Path, n: int, col: str, text: str, allow_empty: bool = False) -> float | None:
    if text == "" and allow_empty:
        return None
    try:
        if len(text) > 40:
            raise ValueError(text)
        v = float(text)
    except ValueError:
        raise PublishedDataError(f"{path}, row {n}, column {col!r}: expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise PublishedDataError(f"{path}, row {n}, column {col!r}: expected a finite number, got {text!r}")
    return v


def _int(path: Path, n: int, col: str, text: str, allow_empty: bool = False) -> int | None:
    if text == "" and allow_empty:
        return None
    try:
        if len(text) > 20:
            raise ValueError(text)
        return int(text)
    except ValueError:
        raise PublishedDataError(f"{path}, row {n}, column {col!r}: expected an integer, got {text!r}") from None


def _metric(path: Path, n: int, task: TaskSpec, text: str) -> float:
    """A per-task value in table units, inside the task's declared bounds (mIoU in [0, 100] %, angles [0, 180])."""
    v = _float(path, n, task.name, text)
    if task.bounds is not None:
        lo, hi = (table_value(task, b) for b in task.bounds)
        if not lo <= v <= hi:
            raise PublishedDataError(
                f"{path}, row {n}, column {task.name!r}: expected a value in [{lo:g}, {hi:g}] ({task.label}), got {text!r}"
            )
    return v


def _nonneg(path: Path, n: int, col: str, text: str) -> float | None:
    v = _float(path, n, col, text, allow_empty=True)
    if v is not None and v < 0:
        raise PublishedDataError(f"{path}, row {n}, column {col!r}: expected a number >= 0, got {text!r}")
    return v


def _bool(path: Path, n: int, col: str, text: str) -> bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise PublishedDataError(f"{path}, row {n}, column {col!r}: expected true or false, got {text!r}")


def _policy(path: Path, n: int, text: str) -> str:
    if text not in PARAM_POLICIES:
        raise PublishedDataError(
            f"{path}, row {n}, column 'params_policy': expected one of {', '.join(PARAM_POLICIES)}, got {text!r}"
        )
    return text


def _config(path: Path, n: int, col: str, text: str) -> dict[str, Any]:
    try:
        value = loads_bounded(text, f"{path}, row {n}, column {col!r}", "config", depth=6)
    except ResultError as e:
        raise PublishedDataError(str(e)) from None
    if not isinstance(value, dict):
        raise PublishedDataError(f"{path}, row {n}, column {col!r}: expected a JSON object, got {text!r}")
    return value


# --------------------------------------------------------------------------- loaders

_ROW_META = ("id", "protocol_version", "paper", "venue", "source", "table", "method", "label", "variant", "config")
_ROW_TAIL = (
    "delta_m_printed", "params_m_printed", "params_policy", "backbone", "init", "image_size", "reference",
    "selection", "verified", "notes",
)  # fmt: skip
_ROW_OPTIONAL = ("paper", "venue", "table", "variant", "params_m_printed", "selection", "notes")


def published_path(protocol: Protocol, data_dir: Path | None = None) -> Path:
    return (data_dir or PUBLISHED_DIR) / f"{protocol.name}.csv"


def load_published(protocol: Protocol, data_dir: Path | None = None) -> list[PublishedRow]:
    """Published rows of ``protocol`` (empty list when it has no published file)."""
    path = published_path(protocol, data_dir)
    if not path.exists():
        return []
    columns = [*_ROW_META, *protocol.task_names, *_ROW_TAIL]
    required = [c for c in columns if c not in _ROW_OPTIONAL]
    optional = [c for c in columns if c in _ROW_OPTIONAL]
    out: list[PublishedRow] = []
    seen: dict[str, int] = {}
    for n, r in _read_rows(path, required, optional):
        if r["id"] in seen:
            raise PublishedDataError(
                f"{path}, row {n}, column 'id': duplicate id {r['id']!r} (also row {seen[r['id']]})"
            )
        seen[r["id"]] = n
        if r["reference"] not in REFERENCES:
            raise PublishedDataError(
                f"{path}, row {n}, column 'reference': unknown single-task reference {r['reference']!r}; "
                f"known: {sorted(REFERENCES)} (benchmark/protocol.py REFERENCES)"
            )
        out.append(
            PublishedRow(
                id=r["id"],
                protocol=protocol.name,
                protocol_version=_int(path, n, "protocol_version", r["protocol_version"]),
                paper=r["paper"],
                venue=r["venue"],
                source=r["source"],
                table=r["table"],
                method=r["method"],
                label=r["label"],
                variant=r["variant"],
                config=_config(path, n, "config", r["config"]),
                metrics={t.name: _metric(path, n, t, r[t.name]) for t in protocol.tasks},
                delta_m_printed=_float(path, n, "delta_m_printed", r["delta_m_printed"]),
                params_m_printed=_nonneg(path, n, "params_m_printed", r["params_m_printed"]),
                params_policy=_policy(path, n, r["params_policy"]),
                backbone=r["backbone"],
                init=r["init"],
                image_size=_int(path, n, "image_size", r["image_size"]),
                reference=r["reference"],
                verified=_bool(path, n, "verified", r["verified"]),
                notes=r["notes"],
                selection=r["selection"],
                file=str(path),
                row=n,
            )
        )
    return out


def load_fragments(protocol: Protocol, data_dir: Path | None = None) -> list[Fragment]:
    """Unverified fragments of ``protocol`` (empty list when there is no fragments file)."""
    path = (data_dir or PUBLISHED_DIR) / f"{protocol.name}.fragments.csv"
    if not path.exists():
        return []
    rows = _read_rows(
        path,
        ("method", "label", "params_policy", "claimed_source"),
        ("delta_m_printed", "params_m_printed", "notes"),
    )
    return [
        Fragment(
            method=r["method"],
            label=r["label"],
            delta_m_printed=_float(path, n, "delta_m_printed", r["delta_m_printed"], allow_empty=True),
            params_m_printed=_nonneg(path, n, "params_m_printed", r["params_m_printed"]),
            claimed_source=r["claimed_source"],
            notes=r["notes"],
            params_policy=_policy(path, n, r["params_policy"]),
        )
        for n, r in rows
    ]


def load_known_inconsistencies(data_dir: Path | None = None) -> dict[str, KnownInconsistency]:
    """Known Δm inconsistencies (``field`` delta_m_printed) keyed by published row id."""
    return {k.id: k for k in _load_inconsistencies(data_dir) if k.field == "delta_m_printed"}


def load_known_param_inconsistencies(data_dir: Path | None = None) -> dict[str, KnownInconsistency]:
    """Known parameter-count inconsistencies (``field`` params_m_printed) keyed by published row id."""
    return {k.id: k for k in _load_inconsistencies(data_dir) if k.field == "params_m_printed"}


def _load_inconsistencies(data_dir: Path | None) -> list[KnownInconsistency]:
    path = (data_dir or PUBLISHED_DIR) / KNOWN_INCONSISTENCIES_FILE
    if not path.exists():
        return []
    out: dict[tuple[str, str], KnownInconsistency] = {}
    for n, r in _read_rows(path, ("id", "field", "reason")):
        if r["field"] not in INCONSISTENCY_FIELDS:
            raise PublishedDataError(
                f"{path}, row {n}, column 'field': expected one of {', '.join(INCONSISTENCY_FIELDS)}, "
                f"got {r['field']!r}"
            )
        if (r["id"], r["field"]) in out:
            raise PublishedDataError(f"{path}, row {n}, column 'id': duplicate id {r['id']!r} for {r['field']}")
        out[r["id"], r["field"]] = KnownInconsistency(r["id"], r["field"], r["reason"])
    return list(out.values())


def load_expected_params(data_dir: Path | None = None) -> list[ExpectedParams]:
    """Expected parameter counts, one per (method, config, preset)."""
    path = (data_dir or PUBLISHED_DIR) / EXPECTED_PARAMS_FILE
    rows = _read_rows(path, ("method", "config", "preset", "trainable", "source"), PARAM_FIELDS[1:])
    out: list[ExpectedParams] = []
    seen: set[tuple[str, str, str]] = set()
    for n, r in rows:
        cfg = _config(path, n, "config", r["config"])
        key = (r["method"], json.dumps(cfg, sort_keys=True), r["preset"])
        if key in seen:
            raise PublishedDataError(f"{path}, row {n}: duplicate (method, config, preset) {key}")
        seen.add(key)
        counts = {k: _int(path, n, k, r[k], allow_empty=True) for k in PARAM_FIELDS}
        out.append(ExpectedParams(r["method"], cfg, r["preset"], counts, r["source"], n))
    return out
