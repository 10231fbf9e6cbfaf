"""A run's work folder: an exclusive lock for the life of the run, and ownership by one run id.

- Lock: ``<work-dir>/.mtpeft.lock``, an ``flock`` held by the process until it exits (the kernel releases it
  however the process ends, so a killed run never leaves a stale lock). The file holds the holder's pid, which
  a refused second run names.
- Owner: ``<work-dir>/.mtpeft-run.json`` names the run id whose files the folder holds (``result.json`` and
  ``checkpoints/epoch_<N>.pth``). A folder written before this marker existed is attributed from its
  result.json or its last checkpoint. A run never writes into a folder owned by another run id, nor starts
  afresh over its own earlier files without ``--resume``, unless told to take the folder over
  (``--take-over-work-dir``): the earlier files are then moved into ``<work-dir>/replaced/<run id>-<time>/``,
  never deleted.

Only names this harness writes are ever moved, rotated or cleaned: ``result.json``, ``epoch_<N>.pth``,
``.<one of those>.mtpeft-<random>.tmp`` and the two dot files above.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from benchmark.results import RunResult, atomic_write_json

LOCK_NAME = ".mtpeft.lock"
OWNER_NAME = ".mtpeft-run.json"
RESULT_NAME = "result.json"
CKPT_DIR = "checkpoints"
CKPT_NAME = re.compile(r"epoch_(\d+)\.pth")
REPLACED_DIR = "replaced"
HARNESS_FILES = re.compile(r"result\.json|epoch_\d+\.pth")  # targets of the temp files this harness may clean

_held: dict[str, int] = {}  # work dir -> lock file descriptor, open for the life of the process


class WorkDirError(ValueError):
    """A work folder in use by another process, or holding another run (bad input: exit 2)."""


def acquire_lock(work_dir: Path) -> None:
    """Take the folder's exclusive lock for the rest of this process; a WorkDirError naming the holder's pid
    when another process has it."""
    key = str(Path(work_dir).resolve())
    if key in _held:
        return
    path = Path(work_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WorkDirError(
                f"--work-dir {work_dir}: in use by another run (pid {holder}, lock {path}); wait for it to end "
                "or use another --work-dir"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def release_lock(work_dir: Path) -> None:
    fd = _held.pop(str(Path(work_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def harness_files(work_dir: Path) -> list[Path]:
    """The run files in ``work_dir`` that this harness writes (result.json, checkpoints/epoch_<N>.pth)."""
    work_dir = Path(work_dir)
    files = [work_dir / RESULT_NAME] if (work_dir / RESULT_NAME).is_file() else []
    ckpts = work_dir / CKPT_DIR
    if ckpts.is_dir():
        found = [(int(m.group(1)), p) for p in ckpts.iterdir() if (m := CKPT_NAME.fullmatch(p.name)) and p.is_file()]
        files += [p for _, p in sorted(found)]
    return files


def owner(work_dir: Path) -> str | None:
    """The run id whose files ``work_dir`` holds; None for a folder without run files (a marker alone, left by
    a run refused before it wrote anything, does not make a folder another run's)."""
    work_dir = Path(work_dir)
    files = harness_files(work_dir)
    if not files:
        return None
    try:
        data = json.loads((work_dir / OWNER_NAME).read_text())
        if isinstance(data, dict) and isinstance(data.get("run_id"), str):
            return data["run_id"]
    except (OSError, ValueError):
        pass
    if files[0].name == RESULT_NAME:
        try:
            return json.loads(files[0].read_text()).get("run_id") or "unknown"
        except (OSError, ValueError, AttributeError):
            pass
    from benchmark.safeload import CheckpointError, safe_load

    for ckpt in reversed([p for p in files if p.name != RESULT_NAME]):
        try:
            data = safe_load(ckpt)
        except (CheckpointError, OSError):
            continue
        if isinstance(data, dict) and isinstance(data.get("run_id"), str):
            return data["run_id"]
    return "unknown"


def finished_result(work_dir: Path) -> RunResult | None:
    """The run's result.json when it records a finished run (success or debug); None otherwise."""
    path = Path(work_dir) / RESULT_NAME
    if not path.is_file():
        return None
    try:
        result = RunResult.read(path)
    except (OSError, ValueError):
        return None  # unreadable: a resumed run rewrites it
    return result if result.status in ("success", "debug") else None


def move_aside(work_dir: Path, run_id: str | None) -> Path | None:
    """Move the harness files of the run in ``work_dir`` into ``replaced/<run id>-<time>/`` (never delete)."""
    work_dir = Path(work_dir)
    files = harness_files(work_dir)
    if not files:
        return None
    dest = work_dir / REPLACED_DIR / f"{run_id or 'unknown'}-{time.strftime('%Y%m%d-%H%M%S')}"
    base, n = dest, 0
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}.{n}")
    for f in files:
        target = dest / f.relative_to(work_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f, target)
    return dest


def claim(
    work_dir: Path,
    run_id: str,
    *,
    resume: bool,
    take_over: bool,
    settings: dict[str, Any] | None = None,
    evaluating: bool = False,
) -> str:
    """Make ``work_dir`` this run's folder (the lock must be held). Returns 'new', 'resume', 'replaced' or
    'finished' (``--resume`` of a finished run with the same settings: nothing is to be done)."""
    work_dir = Path(work_dir)
    current = owner(work_dir)
    state = "new" if current is None else "resume"
    if current is not None and current != run_id:
        if not take_over:
            raise WorkDirError(
                f"--work-dir {work_dir}: holds the files of another run ({current}; this run is {run_id}). "
                "Use another --work-dir, or add --take-over-work-dir to move its files into "
                f"{work_dir / REPLACED_DIR}/ first"
            )
        state = "replaced"
    elif current is not None and not resume:
        if not take_over and evaluating:
            raise WorkDirError(
                f"--work-dir {work_dir}: already holds this run's files ({', '.join(_names(work_dir))}); an "
                "evaluation writes its own result.json: give it another --work-dir (or add --take-over-work-dir)"
            )
        if not take_over:
            raise WorkDirError(
                f"--work-dir {work_dir}: already holds this run's files ({', '.join(_names(work_dir))}). Add "
                "--resume to continue it, use another --work-dir, or add --take-over-work-dir to move them into "
                f"{work_dir / REPLACED_DIR}/ and start afresh"
            )
        state = "replaced"
    elif current is not None:  # --resume of this run
        done = finished_result(work_dir)
        if done is not None:
            diff = {k: (done.env.get(k), v) for k, v in (settings or {}).items() if k in done.env and done.env[k] != v}
            if diff:
                what = "; ".join(f"{k} {a!r} (this run: {b!r})" for k, (a, b) in diff.items())
                raise WorkDirError(
                    f"--resume: {work_dir / RESULT_NAME} records a finished run with other settings: {what}. "
                    "Use another --work-dir, or --take-over-work-dir"
                )
            return "finished"
    if state == "replaced":
        moved = move_aside(work_dir, current)
        if moved is not None:
            print(f"run_benchmark: moved the earlier run's files ({current}) into {moved}", file=sys.stderr)
    atomic_write_json(work_dir / OWNER_NAME, {"run_id": run_id})
    return state


def _names(work_dir: Path) -> list[str]:
    files = harness_files(work_dir)
    names = [str(p.relative_to(work_dir)) for p in files[:3]]
    return names + ([f"... (+{len(files) - 3})"] if len(files) > 3 else [])
