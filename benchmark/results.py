"""One JSON result per run: the schema as code (stdlib only).

Schema version 1 (``result.json``)::

    schema        1
    run_id        "<protocol>.v<version>--<method>--<config id>--seed<seeds>" (derived, never typed; the
                  config id is "default" or 12 hex digits of the sha256 of the config's canonical JSON)
    status        "success" | "debug" | "failed"; only success reaches a leaderboard table
    protocol      {"name": str, "version": int}
    method        {"name": str, "config": {field: value}}
    seeds         [int, ...]
    preset        "paper" | "smoke" | ... (the run configuration preset)
    metrics       {task: {metric: float}}  unrounded; IoU-type values are fractions
    delta_m       {"value": float | None, "reference": str}  in percent, against the named reference
    params        {"decoders", "adapter", "other_trainable_backbone", "trainable", "total"} ints
    selection     {"rule": "final" | "best", "epoch": int, "iteration": int}
    cost          {"train_seconds", "eval_seconds", "peak_mem_bytes", "train_images_per_s"}
    env           {"git_sha", "git_dirty", "torch", "timm", "peft", "mmengine", "device", ...}
    notes         [str]  free-form (why the run is debug/failed, ...)

Writing is atomic (temp file in the same folder, fsync, ``os.replace``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("success", "debug", "failed")
PARAM_KEYS = ("decoders", "adapter", "other_trainable_backbone", "trainable", "total")


class ResultError(ValueError):
    """A result file that does not validate; the message names the file and the field."""


def config_slug(config: dict[str, Any]) -> str:
    """A short, stable, human-readable slug of a method config (sorted keys)."""
    if not config:
        return "default"
    parts = []
    for k in sorted(config):
        v = config[k]
        if isinstance(v, (list, tuple)):
            v = "x".join(str(i) for i in v)
        elif isinstance(v, dict):
            v = "_".join(f"{a}{b}" for a, b in sorted(v.items()))
        parts.append(f"{k}={v}")
    return ",".join(parts)


def config_id(config: dict[str, Any]) -> str:
    """A short stable id of a method config: "default" when empty, else 12 hex digits of the sha256 of its
    canonical JSON (the readable form is ``config_slug``; a full MTLoRA slug runs to ~350 characters)."""
    if not config:
        return "default"
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def make_run_id(protocol: str, version: int, method: str, config: dict[str, Any], seeds: list[int]) -> str:
    """``<protocol>.v<version>--<method>--<config id>--seed<seeds>``: derived from the result, never typed."""
    seed = "-".join(str(s) for s in seeds)
    return f"{protocol}.v{version}--{method}--{config_id(config)}--seed{seed}"


@dataclass(frozen=True)
class RunResult:
    run_id: str
    status: str
    protocol: dict[str, Any]
    method: dict[str, Any]
    seeds: list[int]
    preset: str
    metrics: dict[str, dict[str, float]]
    delta_m: dict[str, Any]
    params: dict[str, int]
    selection: dict[str, Any]
    cost: dict[str, float] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> RunResult:
        validate_dict(data, source)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> RunResult:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ResultError(f"{path}: cannot read result file ({e.strerror})") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResultError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from e
        return cls.from_dict(data, str(path))


def _require(cond: bool, source: str, field_name: str, expected: str) -> None:
    if not cond:
        raise ResultError(f"{source}: field {field_name!r}: expected {expected}")


def validate_dict(data: Any, source: str) -> None:
    """Check the structure of a result dict; raises ResultError naming the file and field."""
    _require(isinstance(data, dict), source, "<root>", "a JSON object")
    _require(data.get("schema") == SCHEMA_VERSION, source, "schema", f"{SCHEMA_VERSION}, got {data.get('schema')!r}")
    for key, typ, what in (
        ("run_id", str, "a string"),
        ("status", str, "a string"),
        ("protocol", dict, "an object {name, version}"),
        ("method", dict, "an object {name, config}"),
        ("seeds", list, "a list of ints"),
        ("preset", str, "a string"),
        ("metrics", dict, "an object task -> {metric: value}"),
        ("delta_m", dict, "an object {value, reference}"),
        ("params", dict, "an object of parameter counts"),
        ("selection", dict, "an object {rule, epoch, iteration}"),
    ):
        _require(key in data, source, key, f"{what} (missing)")
        _require(isinstance(data[key], typ), source, key, what)
    _require(data["status"] in STATUSES, source, "status", f"one of {STATUSES}, got {data['status']!r}")
    _require(isinstance(data["protocol"].get("name"), str), source, "protocol.name", "a string")
    _require(isinstance(data["protocol"].get("version"), int), source, "protocol.version", "an int")
    _require(isinstance(data["method"].get("name"), str), source, "method.name", "a string")
    _require(isinstance(data["method"].get("config"), dict), source, "method.config", "an object")
    _require(
        all(isinstance(s, int) for s in data["seeds"]) and data["seeds"], source, "seeds", "a non-empty list of ints"
    )
    for task, vals in data["metrics"].items():
        _require(isinstance(vals, dict), source, f"metrics.{task}", "an object metric -> number")
        for m, v in vals.items():
            _require(
                isinstance(v, (int, float)) and not isinstance(v, bool), source, f"metrics.{task}.{m}", "a number"
            )
    if data["status"] == "success":
        for k in PARAM_KEYS:
            _require(isinstance(data["params"].get(k), int), source, f"params.{k}", "an int")
        dm = data["delta_m"].get("value")
        _require(isinstance(dm, (int, float)) and math.isfinite(dm), source, "delta_m.value", "a finite number")
    _require(isinstance(data["delta_m"].get("reference"), str), source, "delta_m.reference", "a reference name")
    expected = make_run_id(
        data["protocol"]["name"],
        data["protocol"]["version"],
        data["method"]["name"],
        data["method"]["config"],
        data["seeds"],
    )
    _require(data["run_id"] == expected, source, "run_id", f"{expected!r} (derived from protocol/method/config/seeds)")


TMP_SUFFIX = ".tmp"
PER_IMAGE_SUFFIX = ".per_image.json.gz"


def per_image_path(result_path: str | os.PathLike[str]) -> Path:
    """The per-image statistics beside a result: ``result.json`` -> ``result.per_image.json.gz`` (and
    ``<run_id>.json`` -> ``<run_id>.per_image.json.gz``); what a confidence interval over images needs."""
    p = Path(result_path)
    return p.with_name(p.name.removesuffix(".json") + PER_IMAGE_SUFFIX)


TMP_TAG = ".mtpeft-"  # temp files are named .<target>.mtpeft-<random>.tmp: only those are ever cleaned up
_STALE_TMP = re.compile(r"^\.(?P<target>.+)\.mtpeft-[A-Za-z0-9_]+\.tmp$")


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON so that readers see the old file or the whole new one, never a part."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename it over ``path``.

    Readers (and a process killed at any point) see the old file or the whole new one, never a part: a kill
    leaves at most a stale ``.<name>.mtpeft-*.tmp`` beside it. Any error (disk full, ...) removes the temp file and
    re-raises with the file name attached.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _fault_in_write(path, f, data)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise
    return path


def stale_temp_files(folder: str | os.PathLike[str], targets: re.Pattern[str] | None = None) -> list[Path]:
    """Temp files that an interrupted :func:`atomic_write_bytes` left in ``folder`` (never read by anything):
    only names of its own form (``.<target>.mtpeft-<random>.tmp``), and with ``targets`` only those whose
    target file name matches it. Other ``*.tmp`` files are not this harness's and are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STALE_TMP.match(p.name)
        if m and p.is_file() and (targets is None or targets.fullmatch(m.group("target"))):
            found.append(p)
    return sorted(found)


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; restored at once, at import time (single-threaded)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# Fault injection for the test-suite only (tests/test_faults.py); inert unless the variable is set.
# MTPEFT_FAULT_KILL_IN_WRITE=<substring>: SIGKILL this process after writing half of a matching file's temp copy.
# MTPEFT_FAULT_ENOSPC=<substring>: fail a matching write with ENOSPC ("disk full") after writing half of it.
FAULT_KILL_IN_WRITE = "MTPEFT_FAULT_KILL_IN_WRITE"
FAULT_ENOSPC = "MTPEFT_FAULT_ENOSPC"


def _fault_in_write(path: Path, f: Any, data: bytes) -> None:
    kill, enospc = os.environ.get(FAULT_KILL_IN_WRITE), os.environ.get(FAULT_ENOSPC)
    if not (kill and kill in path.name) and not (enospc and enospc in path.name):
        return
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    if kill and kill in path.name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
