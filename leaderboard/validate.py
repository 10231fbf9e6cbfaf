"""What the leaderboard accepts from a result file, and how it escapes what it prints (stdlib only).

A result file is outside text: whatever it says, the leaderboard either tables a number that is in range
or refuses the file with one message naming it and the field. This module holds

- ``read_json``: a bounded JSON reader (file size, nesting depth, length of a number literal; NaN and
  Infinity refused), so a hostile file ends in a ``ResultError`` and never in a ``RecursionError`` or a
  5000-digit integer conversion;
- ``check_result_fields``: type and range of every field the leaderboard reads or shows (each task's
  primary metric against the bounds its ``TaskSpec`` declares, non-negative integer parameter counts,
  seeds that fit the generators, names in a safe character set, bounded provenance strings);
- the escaping of cells for markdown (``md_cell``), HTML (``html.escape`` at the call sites) and CSV
  (``csv_cell``: a text cell starting with ``=``, ``+``, ``-``, ``@``, tab or CR gets a leading ``'`` so that
  a spreadsheet shows it as text instead of running it as a formula).
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path
from typing import Any

from benchmark.protocol import PROTOCOLS
from benchmark.results import PARAM_KEYS, ResultError

MAX_RESULT_BYTES = 4 * 2**20  # a result is a few KiB; 4 MiB leaves room for long notes and provenance
MAX_DEPTH = 16  # the schema nests 3 levels (metrics.task.metric); configs may add a few
MAX_NUMBER_CHARS = 40  # "-1.2345678901234567e-308" is 24 characters; an int of 2**64 is 20 digits
MAX_SEED = 2**32 - 1  # numpy's legacy seeding (mmengine's set_random_seed) takes 0 .. 2**32 - 1
MAX_COUNT = 2**53  # parameter counts stay exact in float64 (pandas); real models are < 2**40
MAX_TEXT = 500  # a provenance string
MAX_NOTE = 20_000  # a note (e.g. the error a failed run records)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")  # method, preset, protocol, reference, rule names
CONFIG_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
CONFIG_TEXT_RE = re.compile(r"[A-Za-z0-9_.,:/+= -]{0,200}")  # config string values: no markup, quotes or breaks
NAME_WHAT = "letters, digits and _ . + - (1-64 characters, starting with a letter or digit)"


class _Bounded(Exception):
    pass


def _parse_number(text: str) -> int | float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Bounded(f"a number literal of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
    v = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(v, float) and not math.isfinite(v):
        raise _Bounded(f"a number out of the float range: {text}")
    return v


def _refuse_constant(name: str) -> Any:
    raise _Bounded(f"{name} (JSON has no non-finite numbers)")


def max_depth(text: str) -> int:
    """Deepest nesting of [ and { in JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    in_str = escaped = False
    for c in text:
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def loads_bounded(text: str, source: str, what: str = "result file", depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with the bounds above; any violation is a ``ResultError`` naming ``source``."""
    d = max_depth(text)
    if d > depth:
        raise ResultError(f"{source}: {what} nested {d} levels deep (at most {depth}); not a result of this harness")
    try:
        return json.loads(text, parse_int=_parse_number, parse_float=_parse_number, parse_constant=_refuse_constant)
    except _Bounded as e:
        raise ResultError(f"{source}: {what} holds {e}") from None
    except json.JSONDecodeError as e:
        raise ResultError(f"{source}: not valid JSON (truncated or corrupt?): {e}") from None
    except (ValueError, RecursionError) as e:  # belt and braces: the bounds above should make these unreachable
        raise ResultError(f"{source}: {what} cannot be parsed: {e}") from None


def read_json(path: Path, max_bytes: int = MAX_RESULT_BYTES, what: str = "result file") -> Any:
    """Read a JSON file (``.gz``: gzip, bounded after decompression) with the bounds above."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as g:
                raw = g.read(max_bytes + 1)
    except (OSError, EOFError) as e:
        raise ResultError(f"{path}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
    if len(raw) > max_bytes:
        raise ResultError(f"{path}: {what} larger than {max_bytes} bytes; not a result of this harness")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ResultError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return loads_bounded(text, str(path), what)


# --------------------------------------------------------------------------- field checks


def _fail(source: str, field: str, expected: str, got: Any) -> None:
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise ResultError(f"{source}: field {field!r}: expected {expected}, got {shown}")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _name(data: Any, source: str, field: str) -> None:
    if not (isinstance(data, str) and NAME_RE.fullmatch(data)):
        _fail(source, field, f"a name of {NAME_WHAT}", data)


def _text(v: Any, source: str, field: str) -> None:
    if not isinstance(v, str) or len(v) > MAX_TEXT or any(ord(c) < 32 and c not in "\t" for c in v):
        _fail(source, field, f"one line of text (at most {MAX_TEXT} characters, no control characters)", v)


def _count(v: Any, source: str, field: str, lo: int = 0, hi: int = MAX_COUNT) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        _fail(source, field, f"an integer in [{lo}, {hi}]", v)


def _config_value(v: Any, source: str, field: str, depth: int = 0) -> None:
    if depth > 4:
        _fail(source, field, "a config value nested at most 4 levels", "...")
    if v is None or isinstance(v, bool) or is_number(v):
        return
    if isinstance(v, int):  # unreachable for finite ints; kept for clarity of the rule
        return
    if isinstance(v, str):
        if not CONFIG_TEXT_RE.fullmatch(v):
            _fail(source, field, "text of letters, digits, spaces and _ . , : / + = - (at most 200)", v)
        return
    if isinstance(v, list):
        if len(v) > 64:
            _fail(source, field, "a list of at most 64 items", f"{len(v)} items")
        for i, x in enumerate(v):
            _config_value(x, source, f"{field}[{i}]", depth + 1)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not CONFIG_KEY_RE.fullmatch(k):
                _fail(source, f"{field}.<key>", "a key of letters, digits and _ (an identifier)", k)
            _config_value(x, source, f"{field}.{k}", depth + 1)
        return
    _fail(source, field, "a number, a boolean, text, a list or an object", v)


def check_names(data: dict[str, Any], source: str) -> None:
    """The identifying fields, before anything derives a run id or a table cell from them."""
    proto, method = data.get("protocol"), data.get("method")
    if isinstance(proto, dict):
        _name(proto.get("name"), source, "protocol.name")
        v = proto.get("version")
        _count(v, source, "protocol.version", 1, 10**6)
    if isinstance(method, dict):
        _name(method.get("name"), source, "method.name")
        config = method.get("config")
        if not isinstance(config, dict):
            _fail(source, "method.config", "an object", config)
        _config_value(config, source, "method.config")
    if "preset" in data:
        _name(data["preset"], source, "preset")
    seeds = data.get("seeds")
    if isinstance(seeds, list):
        if not seeds or len(seeds) > 1000:
            _fail(source, "seeds", "a non-empty list of at most 1000 seeds", seeds)
        for i, s in enumerate(seeds):
            _count(s, source, f"seeds[{i}]", 0, MAX_SEED)
        if len(set(seeds)) != len(seeds):
            _fail(source, "seeds", "distinct seeds", seeds)
    ref = data.get("delta_m", {}).get("reference") if isinstance(data.get("delta_m"), dict) else None
    if ref is not None:
        _name(ref, source, "delta_m.reference")


def check_result_fields(data: dict[str, Any], source: str) -> None:
    """Type and range of every field a leaderboard shows; ``data`` already passed ``validate_dict``."""
    for task, vals in data["metrics"].items():
        if not CONFIG_KEY_RE.fullmatch(task):
            _fail(source, "metrics.<task>", "a task name of letters, digits and _", task)
        for m, v in vals.items():
            if not (isinstance(m, str) and len(m) <= 64 and m.isprintable()):
                _fail(source, f"metrics.{task}.<metric>", "a metric name (printable, at most 64 characters)", m)
            if not is_number(v):
                _fail(source, f"metrics.{task}.{m}", "a finite number", v)
    protocol = PROTOCOLS.get(data["protocol"]["name"])
    if protocol is not None:
        for t in protocol.tasks:
            v = data["metrics"].get(t.name, {}).get(t.metric)
            if t.bounds is not None and is_number(v) and not t.bounds[0] <= v <= t.bounds[1]:
                lo, hi = t.bounds
                _fail(source, f"metrics.{t.name}.{t.metric}", f"a value in [{lo:g}, {hi:g}] ({t.label})", v)
    params = data["params"]
    for k, v in params.items():
        if not CONFIG_KEY_RE.fullmatch(k):
            _fail(source, "params.<key>", "a key of letters, digits and _", k)
        if isinstance(v, str) and k not in PARAM_KEYS:  # a label beside the counts (e.g. a counting policy)
            if not CONFIG_TEXT_RE.fullmatch(v):
                _fail(source, f"params.{k}", "text of letters, digits, spaces and _ . , : / + = -", v)
        elif v is not None or data["status"] == "success":
            _count(v, source, f"params.{k}")
    if data["status"] == "success" and params.get("trainable", 0) > params.get("total", 0):
        _fail(source, "params.trainable", f"at most params.total ({params.get('total')})", params.get("trainable"))
    sel = data["selection"]
    _name(sel.get("rule"), source, "selection.rule")
    for k in ("epoch", "iteration"):
        if sel.get(k) is not None:
            _count(sel[k], source, f"selection.{k}", 0, 10**12)
    cost = data.get("cost", {})
    if not isinstance(cost, dict):
        _fail(source, "cost", "an object of cost figures", cost)
    for k, v in cost.items():
        if v is not None and not (is_number(v) and v >= 0):
            _fail(source, f"cost.{k}", "a finite number >= 0", v)
    env = data.get("env", {})
    if not isinstance(env, dict):
        _fail(source, "env", "an object of provenance fields", env)
    for k, v in env.items():
        _text(k, source, "env.<key>")
        if isinstance(v, str):
            _text(v, source, f"env.{k}")
        elif not (v is None or isinstance(v, bool) or is_number(v)):
            _fail(source, f"env.{k}", "text, a number, a boolean or null", v)
    notes = data.get("notes", [])
    if not isinstance(notes, list):
        _fail(source, "notes", "a list of text", notes)
    for i, n in enumerate(notes):  # free text (a failure message may span lines); escaped wherever it is shown
        if not isinstance(n, str) or len(n) > MAX_NOTE:
            _fail(source, f"notes[{i}]", f"text of at most {MAX_NOTE} characters", n)


# --------------------------------------------------------------------------- escaping

_CSV_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: text starting with a formula trigger gets a leading '."""
    if isinstance(v, str) and v.startswith(_CSV_TRIGGERS):
        return "'" + v
    return v


def md_cell(v: str) -> str:
    """Text for a markdown table cell or line: no table break (|), no line break, no HTML markup."""
    return (
        str(v)
        .replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("|", "\\|")
        .replace("\r", " ")
        .replace("\n", " ")
    )
