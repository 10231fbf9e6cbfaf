"""Sweeps: a grid of (method, config, seed) jobs, each one ``run_benchmark`` process, run through submitit.

    run_benchmark --method mtlora lora adapter --seed 0 1 2 --set rank=16,32,64 --executor local
    run_benchmark --method mtlora --set task_rank=2,4,8 --seed 0 1 2 --executor slurm --slurm-partition gpu \\
        --gpus-per-job 2 --data PASCAL_MT --pretrained swin_tiny_patch4_window7_224.pth

- The grid: every method x every combination of the ``--set`` alternatives its config has x every seed.
  A ``--set`` value with top-level commas is a list of alternatives (``rank=16,32,64``); brackets, braces and
  quotes protect commas (``shared_rank=[64,64,64,64]`` is one value). A key applies to the selected methods
  that have that field and is an error only if none has it.
- Each job is a run specification (``benchmark.run.RunSpec``, built by the constructor ``run_benchmark`` uses for
  one run: the config and the run id are the specification's) and runs in ``<sweep dir>/<run_id>/``, as
  ``python -m benchmark.cli ... --resume`` (``torchrun --standalone --nproc_per_node N -m benchmark.cli ...``
  for ``--gpus-per-job N > 1``); the command is recorded in ``command.json`` there, its output in ``log.txt``.
- Idempotent: a job whose ``result.json`` is complete for these settings is skipped; a killed one resumes from
  its last checkpoint; a failed one is reported with its log. ``sweep_summary.json`` and a table at the end
  give done / skipped / resumed / failed.

This module is imported inside every submitit job to unpickle :class:`SweepJob`: it must stay light (stdlib,
submitit and ``benchmark.results``; the method registry is imported only while the grid is expanded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.keyvalue import split_pair, split_top_level
from benchmark.results import ResultError, RunResult, atomic_write_json

if TYPE_CHECKING:
    from benchmark.run import RunSpec

STATES = ("done", "skipped", "resumed", "failed")
LOG_NAME = "log.txt"
COMMAND_NAME = "command.json"
SUMMARY_NAME = "sweep_summary.json"
LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # submitit's local default is 2 minutes; a local job may take days
POLL_S = {"local": 0.5, "slurm": 60.0}


class SweepError(ValueError):
    """A sweep that cannot be planned (bad grid, a job folder that holds another run); nothing was submitted."""


# --------------------------------------------------------------------------- the grid


def split_alternatives(text: str, key: str) -> list[str]:
    """Split ``a,b,c`` at top-level commas; commas inside [], {}, () or quotes belong to the value."""
    out = split_top_level(text)
    if any(not a.strip() for a in out):
        raise SweepError(
            f"--set {key}={text}: empty alternative (top-level commas separate the values to sweep; "
            "write lists in brackets, e.g. [16,32])"
        )
    return [a.strip() for a in out]


def parse_sets(sets: Sequence[str]) -> list[tuple[str, list[str]]]:
    parsed: list[tuple[str, list[str]]] = []
    for item in sets:
        try:
            key, text = split_pair(item)
        except ValueError as e:
            raise SweepError(str(e)) from None
        if any(k == key for k, _ in parsed):
            raise SweepError(f"--set {key}: given twice (write the alternatives as {key}=a,b,c)")
        parsed.append((key, split_alternatives(text, key)))
    return parsed


def _numbers(value: Any) -> list[tuple[int | None, Any]]:
    """The numbers in a config value, with their position in a per-stage tuple (None elsewhere)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(None, value)]
    if isinstance(value, (list, tuple)):
        return [(i, v) for i, item in enumerate(value) for _, v in _numbers(item)]
    if isinstance(value, dict):
        return [(None, v) for item in value.values() for _, v in _numbers(item)]
    return []


def config_range_error(config: dict[str, Any], layer_widths: Sequence[int] | None = None) -> str | None:
    """The first config value out of its real range, as a message naming the field; None when all fit.

    ``layer_widths``: per stage, the widest in/out dimension of the backbone's linear layers (the MLP's hidden
    width). Every number is finite; a dropout is in [0, 1); a rank (``*rank*``, ``r``) is 0 or more and at most
    the width of the layers it can adapt (its stage's for a per-stage tuple, else the widest stage's): a larger
    one exceeds every width of those layers and only allocates; a ``reduction`` is 1 or more; ``num_prompts``
    0 or more.
    """
    import math

    dims = list(layer_widths or [])
    for name, value in config.items():
        low = name.lower()
        per_stage = isinstance(value, (list, tuple)) and len(value) == len(dims)
        for i, v in _numbers(value):
            where = f"field {name!r}" + (f" (stage {i + 1})" if per_stage and i is not None else "")
            if isinstance(v, float) and not math.isfinite(v):
                return f"{where}: expected a finite number, got {v}"
            if "dropout" in low and not 0 <= v < 1:
                return f"{where}: a dropout probability is in [0, 1), got {v}"
            if (low == "r" or "rank" in low) and isinstance(v, int):
                bound = dims[i] if per_stage and i is not None else max(dims, default=v)
                if not 0 <= v <= bound:
                    return f"{where}: rank {v} is outside 0 .. {bound} (the widest layer it can adapt)"
            if low == "reduction" and v < 1:
                return f"{where}: expected 1 or more, got {v}"
            if low == "num_prompts" and v < 0:
                return f"{where}: expected 0 or more, got {v}"
    return None


def expand_grid(
    methods: Sequence[str],
    sets: Sequence[str],
    seeds: Sequence[int],
    protocol: Any,
    layer_widths: Sequence[int] | None = None,
    *,
    settings: Any = None,
    options: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """All jobs of the grid as run specifications (``benchmark.run.RunSpec``, the constructor ``run_benchmark``
    uses for one run) in a stable order (method, config, seed); duplicates removed. Every config is built and
    validated here (its method's rules, then every field's range: ``config_range_error`` against the backbone's
    ``layer_widths``), so a bad value fails before anything runs. ``settings``: the resolved preset (default:
    the protocol itself); ``options``: the other RunSpec fields, the same for every job."""
    import dataclasses
    import difflib

    from benchmark.method_api import apply_overrides, method_registry
    from benchmark.run import RunSpec, resolve_settings

    registry = method_registry()
    settings = settings or resolve_settings(protocol, "paper")
    specs = [registry.get(m) for m in dict.fromkeys(methods)]
    fields = {spec.name: spec.set_names() for spec in specs}
    parsed = parse_sets(sets)
    for key, alts in parsed:
        if any(key in names for names in fields.values()):
            continue
        if len(specs) == 1:  # the registry's own message: "unknown config field ...; did you mean ..."
            apply_overrides(specs[0].default_config(), [f"{key}={alts[0]}"])
        known = sorted({f for names in fields.values() for f in names})
        near = difflib.get_close_matches(key, known, n=3)
        hint = f" did you mean {', '.join(near)}?" if near else ""
        raise SweepError(
            f"--set {key}: none of the selected methods ({', '.join(s.name for s in specs)}) has a config field "
            f"{key!r};{hint} (a key applies to the methods that have it; see run_benchmark --list)"
        )
    points: dict[str, RunSpec] = {}
    for spec in specs:
        own = [(k, alts) for k, alts in parsed if k in fields[spec.name]]
        combos = list(itertools.product(*[alts for _, alts in own]))
        for combo in combos:
            overrides = tuple(f"{k}={v}" for (k, _), v in zip(own, combo, strict=True))
            first = RunSpec.build(
                protocol, spec.name, overrides, seeds[0] if seeds else 0, settings, **(options or {})
            )
            try:
                first.method_config.validate(protocol.task_names)
                problem = config_range_error(first.config, layer_widths)
                if problem and len(specs) == 1 and len(combos) == 1:
                    problem = f"--set {' '.join(overrides) or '(defaults)'}: {problem}"
                if problem:
                    raise ValueError(problem)
            except ValueError as e:
                if len(specs) == 1 and len(combos) == 1:
                    raise
                raise ValueError(f"{spec.name} with --set {' '.join(overrides) or '(defaults)'}: {e}") from None
            for seed in seeds:
                point = first if seed == first.seed else dataclasses.replace(first, seed=seed)
                points.setdefault(point.run_id, point)
    return list(points.values())


# --------------------------------------------------------------------------- commands and executor parameters


# run_benchmark options passed on to every job unchanged (paths made absolute)
PASSTHROUGH = (
    ("protocol", "--protocol"),
    ("preset", "--preset"),
    ("data", "--data"),
    ("pretrained", "--pretrained"),
    ("epochs", "--epochs"),
    ("image_size", "--image-size"),
    ("select", "--select"),
    ("device", "--device"),
    ("workers", "--workers"),
    ("amp_dtype", "--amp-dtype"),
    ("dist_timeout", "--dist-timeout"),
    ("activation_checkpointing", "--activation-checkpointing"),
)


def job_command(point: RunSpec, args: argparse.Namespace, job_dir: Path, nproc: int) -> list[str]:
    """The command one job runs: run_benchmark for one (method, config, seed), always with --resume."""
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    else:
        launcher = [sys.executable]
    cmd = [*launcher, "-m", "benchmark.cli", "--method", point.method, "--seed", str(point.seed)]
    for attr, flag in PASSTHROUGH:
        value = getattr(args, attr, None)
        if value is None:
            continue
        if isinstance(value, Path):
            value = value.expanduser().resolve()
        cmd += [flag, str(value)]
    cmd += ["--work-dir", str(job_dir), "--resume"]
    cmd += [f"--set={o}" for o in point.overrides]  # one flag per value: a value may start with "-"
    return cmd


def slurm_parameters(args: argparse.Namespace, gpus: int) -> dict[str, Any]:
    """``submitit.SlurmExecutor.update_parameters`` keywords (sbatch options) for every job of the sweep."""
    params: dict[str, Any] = {
        "job_name": "mtpeft",
        "time": int(args.slurm_time_min),
        "nodes": 1,
        "ntasks_per_node": 1,  # one task; torchrun starts the per-GPU processes inside it
        "gpus_per_node": gpus,
        "cpus_per_task": int(args.slurm_cpus_per_job),
        "signal_delay_s": 120,  # time between the timeout signal and the kill: the job is requeued, then resumes
        "array_parallelism": args.max_parallel or 256,
    }
    for attr, key in (("slurm_partition", "partition"), ("slurm_account", "account"), ("slurm_qos", "qos")):
        if getattr(args, attr, None):
            params[key] = getattr(args, attr)
    if args.slurm_mem_gb:
        params["mem"] = f"{int(args.slurm_mem_gb)}GB"
    return params


def sbatch_preview(params: dict[str, Any], folder: Path) -> str | None:
    """The sbatch script submitit would write (uses a private submitit helper; None if it is unavailable)."""
    try:
        from submitit.slurm.slurm import _make_sbatch_string

        return _make_sbatch_string(command="<python -m submitit.core._submit ...>", folder=folder, **params)
    except Exception:  # noqa: BLE001 - a preview only
        return None


# --------------------------------------------------------------------------- the job (runs inside submitit)


class SweepJob:
    """One sweep job: run the command, output appended to ``<job dir>/log.txt``. On a Slurm timeout or
    preemption submitit calls :meth:`checkpoint`: the run is stopped and the job requeued; the rerun resumes
    from the run's last checkpoint (the command has --resume)."""

    def __init__(self, command: Sequence[str], job_dir: str, cwd: str) -> None:
        self.command = list(command)
        self.job_dir = job_dir
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None}

    def __call__(self) -> dict[str, Any]:
        log = Path(self.job_dir) / LOG_NAME
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with log.open("ab") as f:
            f.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(self.command)}\n".encode())
            f.flush()
            self._proc = subprocess.Popen(self.command, stdout=f, stderr=subprocess.STDOUT, cwd=self.cwd)
            try:
                rc = self._proc.wait()
            except BaseException:
                self._stop()
                raise
        return {"returncode": rc, "seconds": time.time() - t0, "log": str(log)}

    def _stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        self._stop()
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# --------------------------------------------------------------------------- planning and bookkeeping


@dataclass
class JobRecord:
    run_id: str
    method: str
    config: dict[str, Any]
    seed: int
    job_dir: str
    command: list[str]
    state: str = "pending"  # before: pending / skipped; after: done / resumed / failed
    had_checkpoint: bool = False
    job_id: str | None = None
    returncode: int | None = None
    seconds: float | None = None
    log: str | None = None
    detail: str = ""
    _job: Any = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_job"}


def _expected(settings: Any) -> dict[str, Any]:
    return {
        "status": "debug" if settings.debug else "success",
        "preset": settings.preset,
        "epochs": settings.epochs,
        "image_size": settings.image_size,
        "backbone": settings.backbone,
    }


def completed(job_dir: Path, expected: dict[str, Any]) -> bool:
    """True if ``result.json`` is a finished run with these settings; False if there is none, it is unreadable
    (a rerun rewrites it) or its run failed. A finished run with other settings is an error: rerunning it
    would mix two runs in one folder."""
    path = job_dir / "result.json"
    if not path.is_file():
        return False
    try:
        r = RunResult.read(path)
    except ResultError:
        return False
    if r.status == "failed":
        return False
    have = {
        "status": r.status,
        "preset": r.preset,
        **{k: r.env[k] for k in ("epochs", "image_size", "backbone") if k in r.env},
    }
    diff = [f"{k} {have[k]!r} (this sweep: {v!r})" for k, v in expected.items() if k in have and have[k] != v]
    if diff:
        raise SweepError(
            f"{path}: this folder holds a finished run with other settings: {'; '.join(diff)}. "
            "Use another --work-dir for this sweep"
        )
    return True


def plan(
    args: argparse.Namespace, grid: Sequence[RunSpec], settings: Any, sweep_dir: Path, nproc: int
) -> list[JobRecord]:
    expected = _expected(settings)
    jobs = []
    for p in grid:
        job_dir = sweep_dir / p.run_id
        rec = JobRecord(p.run_id, p.method, p.config, p.seed, str(job_dir), job_command(p, args, job_dir, nproc))
        if completed(job_dir, expected):
            rec.state = "skipped"
            rec.detail = f"{job_dir / 'result.json'} exists"
        rec.had_checkpoint = any((job_dir / "checkpoints").glob("epoch_*.pth"))
        jobs.append(rec)
    return jobs


def _last_error_line(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if "error" in line.lower() or "non-finite" in line:
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else ""


def finish(rec: JobRecord, outcome: dict[str, Any] | None, failure: str | None, expected: dict[str, Any]) -> None:
    """Classify a job that ran: done / resumed / failed, from its exit code and its result.json."""
    job_dir = Path(rec.job_dir)
    if outcome is not None:
        rec.returncode = outcome.get("returncode")
        rec.seconds = round(float(outcome.get("seconds", 0.0)), 1)
        rec.log = outcome.get("log")
    rec.log = rec.log or str(job_dir / LOG_NAME)
    result = None
    try:
        result = RunResult.read(job_dir / "result.json")
    except ResultError:
        pass
    ok = failure is None and rec.returncode == 0 and result is not None and result.status == expected["status"]
    if ok:
        resumed = [n for n in result.notes if n.startswith("resumed from")]
        rec.state = "resumed" if resumed else "done"
        rec.detail = resumed[0] if resumed else ""
        return
    rec.state = "failed"
    if failure is not None:
        rec.detail = failure
    elif result is not None and result.status == "failed":
        rec.detail = "; ".join(result.notes)[:300]
    else:
        rec.detail = f"exit code {rec.returncode}: {_last_error_line(Path(rec.log))}"


def _write_command(rec: JobRecord, executor: str, nproc: int, cwd: str) -> None:
    atomic_write_json(
        Path(rec.job_dir) / COMMAND_NAME,
        {
            "run_id": rec.run_id,
            "method": rec.method,
            "config": rec.config,
            "seed": rec.seed,
            "command": rec.command,
            "shell": shlex.join(rec.command),
            "cwd": cwd,
            "launcher": "torchrun" if nproc > 1 else "python",
            "nproc": nproc,
            "executor": executor,
            "job_id": rec.job_id,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


# --------------------------------------------------------------------------- executors


def _local_executor(folder: Path) -> Any:
    import submitit

    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    return ex


def _slurm_executor(folder: Path, params: dict[str, Any]) -> Any:
    import shutil

    import submitit

    if shutil.which("srun") is None:
        raise SweepError(
            "--executor slurm: no Slurm on this machine (srun not found); run the sweep from a Slurm login node, "
            "see the jobs with --sweep-dry-run, or use --executor local"
        )

    ex = submitit.SlurmExecutor(folder=folder)
    ex.update_parameters(**params)
    return ex


def _gpus_per_job(args: argparse.Namespace) -> int:
    if args.gpus_per_job is not None:
        if args.gpus_per_job < 0:
            raise SweepError(f"--gpus-per-job {args.gpus_per_job}: expected 0 or more")
        return args.gpus_per_job
    if args.executor == "slurm":
        return 1
    if args.device == "cpu":
        return 0
    import torch

    return 1 if torch.cuda.is_available() else 0


def _device_pool() -> list[int]:
    """GPU indices local jobs may use: those of CUDA_VISIBLE_DEVICES when it lists indices, else 0, 1, ..."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [x.strip() for x in env.split(",") if x.strip()]
    if ids and all(x.isdigit() for x in ids):
        return [int(x) for x in ids]
    return list(range(1024))


def run_sweep(args: argparse.Namespace, grid: Sequence[RunSpec], settings: Any) -> int:
    """Plan, submit and wait for the jobs; print and write the summary. Returns 0 if no job failed."""
    executor = args.executor or "local"
    sweep_dir = (args.work_dir or Path("work_dirs")).expanduser().resolve()
    gpus = _gpus_per_job(args)
    nproc = max(gpus, 1)
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SweepError(f"--max-parallel {args.max_parallel}: expected 1 or more")
    if executor == "local" and gpus > 0 and not args.sweep_dry_run:
        import torch

        have, want = torch.cuda.device_count(), gpus * (args.max_parallel or 1)
        if have < want:
            raise SweepError(
                f"--gpus-per-job {gpus} x --max-parallel {args.max_parallel or 1} needs {want} GPU(s); "
                f"this machine has {have} (use --gpus-per-job 0 for CPU jobs)"
            )
    expected = _expected(settings)
    jobs = plan(args, grid, settings, sweep_dir, nproc)
    params = slurm_parameters(args, gpus) if executor == "slurm" else {"timeout_min": LOCAL_TIMEOUT_MIN}
    todo = [j for j in jobs if j.state != "skipped"]
    print(
        f"sweep: {len(jobs)} job(s) in {sweep_dir}: {len(todo)} to run, {len(jobs) - len(todo)} already finished; "
        f"executor {executor}, {gpus} GPU(s) per job" + (f" (torchrun, {nproc} processes)" if nproc > 1 else ""),
        flush=True,
    )
    if args.sweep_dry_run:
        return _print_plan(jobs, executor, params, sweep_dir)
    folder = sweep_dir / ".submitit"
    cwd = os.getcwd()
    if executor == "slurm":
        ex = _slurm_executor(folder / "%j", params)
        with ex.batch():
            for rec in todo:
                rec._job = ex.submit(SweepJob(rec.command, rec.job_dir, cwd))
        for rec in todo:
            rec.job_id = rec._job.job_id
            _write_command(rec, executor, nproc, cwd)
            print(f"submitted {rec.run_id}: slurm job {rec.job_id}", flush=True)
        _wait(todo, None, POLL_S["slurm"], expected)
    else:
        ex = _local_executor(folder)
        _wait(todo, (ex, args.max_parallel or 1, gpus, cwd, nproc), POLL_S["local"], expected)
    return _summarize(jobs, sweep_dir)


def _wait(
    todo: list[JobRecord], local: tuple[Any, int, int, str, int] | None, poll_s: float, expected: dict[str, Any]
) -> None:
    """Submit (local: at most ``max_parallel`` at a time, each on its own GPUs) and collect the jobs."""
    pending = list(todo) if local is not None else []
    running = [] if local is not None else list(todo)
    free_slots = list(range(local[1])) if local is not None else []
    slot_of: dict[str, int] = {}
    try:
        while pending or running:
            while local is not None and pending and free_slots:
                ex, _, gpus, cwd, nproc = local
                rec, slot = pending.pop(0), free_slots.pop(0)
                visible = tuple(_device_pool()[slot * gpus : (slot + 1) * gpus])
                ex.update_parameters(gpus_per_node=gpus, visible_gpus=visible)
                Path(rec.job_dir).mkdir(parents=True, exist_ok=True)
                rec._job = ex.submit(SweepJob(rec.command, rec.job_dir, cwd))
                rec.job_id = str(rec._job.job_id)
                _write_command(rec, "local", nproc, cwd)
                slot_of[rec.run_id] = slot
                running.append(rec)
                print(f"started {rec.run_id} (log {Path(rec.job_dir) / LOG_NAME})", flush=True)
            for rec in [r for r in running if r._job.done()]:
                running.remove(rec)
                if rec.run_id in slot_of:
                    free_slots.append(slot_of.pop(rec.run_id))
                outcome, failure = None, None
                try:
                    outcome = rec._job.result()
                except Exception as e:  # noqa: BLE001 - the job process itself died; report, go on
                    failure = f"submitit job failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}"
                    stderr = getattr(getattr(rec._job, "paths", None), "stderr", None)
                    if stderr is not None:
                        failure += f" (submitit log {stderr})"
                finish(rec, outcome, failure, expected)
                extra = f": {rec.detail}" if rec.state == "failed" else ""
                print(f"[{rec.state}] {rec.run_id} ({rec.seconds or 0:.1f} s; log {rec.log}){extra}", flush=True)
            if pending or running:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        if local is not None:
            for rec in running:
                rec._job.cancel(check=False)
            print("sweep: interrupted; running jobs stopped. Rerun the same command to resume them.", file=sys.stderr)
        else:
            print(
                "sweep: interrupted; the Slurm jobs keep running. Rerun the same command later for the summary.",
                file=sys.stderr,
            )
        raise


def _print_plan(jobs: Sequence[JobRecord], executor: str, params: dict[str, Any], sweep_dir: Path) -> int:
    for rec in jobs:
        mark = "skip" if rec.state == "skipped" else ("resume" if rec.had_checkpoint else "run")
        print(f"[{mark}] {rec.run_id}\n    {shlex.join(rec.command)}")
    print(f"{executor} executor parameters: {json.dumps(params, sort_keys=True)}")
    if executor == "slurm":
        preview = sbatch_preview(params, sweep_dir / ".submitit" / "%j")
        if preview:
            print("sbatch script (per job array):\n" + preview)
    return 0


def _summarize(jobs: Sequence[JobRecord], sweep_dir: Path) -> int:
    counts = {s: sum(j.state == s for j in jobs) for s in STATES}
    atomic_write_json(
        sweep_dir / SUMMARY_NAME,
        {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "counts": counts, "jobs": [j.row() for j in jobs]},
    )
    width = max([len(j.run_id) for j in jobs] + [6])
    print(f"\n{'state':<8}  {'run':<{width}}  {'seconds':>8}  detail")
    for j in jobs:
        secs = f"{j.seconds:.1f}" if j.seconds is not None else "-"
        detail = j.detail + (f" (log {j.log})" if j.state == "failed" and j.log else "")
        print(f"{j.state:<8}  {j.run_id:<{width}}  {secs:>8}  {detail}")
    print(
        f"sweep: {len(jobs)} job(s): "
        + ", ".join(f"{counts[s]} {s}" for s in STATES)
        + f"; summary {sweep_dir / SUMMARY_NAME}"
    )
    return 1 if counts["failed"] else 0
