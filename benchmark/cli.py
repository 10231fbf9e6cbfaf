"""``run_benchmark``: train and evaluate a registered method under a protocol.

    run_benchmark --list
    run_benchmark --method mtlora --preset smoke
    run_benchmark --protocol nyud --method mtlora --preset smoke
    run_benchmark --method mtlora --preset paper --data PASCAL_MT --pretrained swin_tiny_patch4_window7_224.pth
    run_benchmark --method mtlora --preset paper --dry-run --json
    run_benchmark --method mtlora --eval-only --checkpoint FILE --data PASCAL_MT
    torchrun --nproc_per_node 2 $(which run_benchmark) --method lora --preset smoke
    run_benchmark --method mtlora lora --set rank=16,32 --seed 0 1 2 --executor slurm --slurm-partition gpu ...

Exit codes: 0 success; 1 the run failed (non-finite loss, disk full, a crashed data worker or peer process;
result.json says so where one could be written); 2 bad input (arguments, dataset, checkpoint, config).

This module parses the flags, validates them and dispatches: each run is a ``benchmark.run.RunSpec`` (built by
``benchmark.sweep.expand_grid``, the same constructor for one run and for a sweep's jobs) given to
``benchmark.run.run``; a sweep goes to ``benchmark.sweep.run_sweep``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from benchmark.protocol import PROTOCOLS
from benchmark.run import UsageError  # bad input: exit code 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_benchmark",
        description="Train and evaluate a PEFT method under a multi-task protocol (PASCAL-Context as MTLoRA, CVPR 2024, "
        "runs it; NYUDv2).",
    )
    p.add_argument("--list", action="store_true", help="list the registered methods with their config fields")
    p.add_argument("--method", nargs="+", metavar="NAME", help="registered method name(s); several make a sweep")
    p.add_argument("--preset", default="paper", help="paper (the protocol exactly) or smoke (tiny, CPU, debug)")
    p.add_argument(
        "--protocol",
        default="pascal-context",
        help=f"protocol name: one of {', '.join(PROTOCOLS)} (default: pascal-context)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="dataset root in the protocol's layout (PASCAL_MT, NYUD_MT; smoke: generated if omitted)",
    )
    p.add_argument("--pretrained", type=Path, help="Swin ImageNet weights (timm or original Swin release format)")
    p.add_argument(
        "--work-dir",
        type=Path,
        help="output folder (default: work_dirs/<run id>); for a sweep, the folder holding one <run id>/ per job "
        "(default: work_dirs)",
    )
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (one run each)")
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="method config overrides. Top-level commas give alternatives to sweep (rank=16,32,64); brackets, "
        "braces and quotes keep commas in one value (shared_rank=[64,64,64,64]). With several methods a key "
        "applies to those that have the field; it is an error only if none has it",
    )
    p.add_argument("--epochs", type=int, help="override the number of epochs (a shortened run is marked debug)")
    p.add_argument("--image-size", type=int, help="override the image size (a run off the protocol is marked debug)")
    p.add_argument("--select", choices=["final", "best"], default="final", help="which validation is reported")
    p.add_argument("--resume", action="store_true", help="continue from the last good checkpoint in the work dir")
    p.add_argument(
        "--take-over-work-dir",
        action="store_true",
        help="use a --work-dir that holds another run's files (or this run's, without --resume): they are first "
        "moved into <work-dir>/replaced/<run id>-<time>/, never deleted",
    )
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint without training")
    p.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate (this harness's or the official code's)")
    p.add_argument("--dry-run", action="store_true", help="build the model, print the parameter breakdown, exit")
    p.add_argument("--json", action="store_true", help="machine-readable output (with --dry-run / --list)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--workers", type=int, help="data-loader workers per process")
    p.add_argument(
        "--amp-dtype",
        choices=["protocol", "float16", "bfloat16", "none"],
        default="protocol",
        help="autocast dtype on CUDA (default: the protocol's, float16 where it says AMP, else none: fp32)",
    )
    p.add_argument("--dist-timeout", type=float, default=600.0, help="seconds before a stuck collective fails")
    p.add_argument(
        "--activation-checkpointing",
        nargs="?",
        const="all",
        metavar="STAGES",
        help="recompute backbone block activations in backward instead of keeping them: less memory, more "
        "compute, the same values and gradients (MTLoRA methods). 'all' (the default) or stage numbers, e.g. 1 or "
        "1,2: the first stage holds the largest activations for a sixth of the compute (docs/perf.md)",
    )
    s = p.add_argument_group(
        "sweeps",
        "Several methods, seeds or --set alternatives make a sweep: one job per (method, config, seed), each a "
        "run_benchmark process in <work-dir>/<run id>/ started with --resume. A rerun skips finished jobs and "
        "resumes killed ones.",
    )
    s.add_argument("--executor", choices=["local", "slurm"], help="run the grid through submitit (default: local)")
    s.add_argument("--max-parallel", type=int, help="jobs at a time (local default 1; slurm: array parallelism)")
    s.add_argument(
        "--gpus-per-job",
        type=int,
        help="GPUs per job; more than 1 runs the job under torchrun (default: slurm 1; local 1 with CUDA, else 0)",
    )
    s.add_argument("--sweep-dry-run", action="store_true", help="print the jobs, commands and executor settings")
    s.add_argument("--slurm-partition", help="sbatch --partition")
    s.add_argument("--slurm-account", help="sbatch --account")
    s.add_argument("--slurm-qos", help="sbatch --qos")
    s.add_argument("--slurm-time-min", type=int, default=4320, help="time limit per job in minutes (requeued)")
    s.add_argument("--slurm-cpus-per-job", type=int, default=10, help="sbatch --cpus-per-task")
    s.add_argument("--slurm-mem-gb", type=int, help="sbatch --mem in GB")
    return p


# --------------------------------------------------------------------------- small helpers


def _print_list(as_json: bool) -> None:
    from benchmark.method_api import method_registry

    registry = method_registry()
    rows = []
    for name in registry.names():
        spec = registry.get(name)
        rows.append(
            {
                "name": name,
                "paper": spec.paper,
                "description": spec.description,
                "configuration": spec.configuration,
                "reproduces": spec.reproduces,
                "fields": [{"name": n, "type": t, "default": d} for n, t, d in spec.fields()],
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        print(f"{r['name']}  ({r['paper']})")
        if r["description"]:
            print(f"    {r['description']}")
        if r["configuration"]:
            print(f"    configuration: {r['configuration']}")
        if r["reproduces"]:
            print(f"    reproduces: {r['reproduces']}")
        for f in r["fields"]:
            print(f"    --set {f['name']}=...  [{f['type']}]  default {json.dumps(f['default'], default=str)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("run_benchmark: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, KeyError, FileNotFoundError, NotADirectoryError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"run_benchmark: error: {_strip_worker_traceback(msg)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"run_benchmark: error: {_os_error_message(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        engine = sys.modules.get("benchmark.engine")
        if engine is None or not isinstance(e, engine.RunAborted):
            raise
        print(f"run_benchmark: error: {e}", file=sys.stderr)
        return 1


def _os_error_message(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"disk full while writing{where} ({e.strerror}). Checkpoints and results written before are intact "
            "(they are written atomically); free some space and rerun with --resume"
        )
    return f"cannot access{where}: {e.strerror or e}"


def _strip_worker_traceback(msg: str) -> str:
    """PyTorch re-raises a data-loader worker's exception with the worker's traceback in the message; keep the
    original message (its last line) only."""
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        head, sep, tail = last.partition(": ")  # "benchmark.dataset.DatasetError: <message>"
        return (tail if sep and " " not in head else last) + " (in a data-loader worker)"
    return msg


SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes 0 .. 2**32 - 1; torch and random accept all of these


def validate_args(args: argparse.Namespace) -> None:
    """Every flag against its real range, and flags that contradict each other: before anything is built or
    any folder created."""
    import math

    for flag, value, low in (
        ("--epochs", args.epochs, 1),
        ("--image-size", args.image_size, 1),
        ("--workers", args.workers, 0),
        ("--slurm-time-min", args.slurm_time_min, 1),
        ("--slurm-cpus-per-job", args.slurm_cpus_per_job, 1),
        ("--slurm-mem-gb", args.slurm_mem_gb, 1),
    ):
        if value is not None and value < low:
            raise UsageError(f"{flag} {value}: expected a whole number, {low} or more")
    bad = [s for s in args.seed if not 0 <= s <= SEED_MAX]
    if bad:
        raise UsageError(f"--seed {bad[0]}: expected a whole number from 0 to {SEED_MAX} (what the generators take)")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise UsageError(f"--dist-timeout {args.dist_timeout}: expected a positive, finite number of seconds")
    conflicts = (
        (args.eval_only and args.resume, "--eval-only and --resume: evaluation does not continue a training run"),
        (args.dry_run and args.eval_only, "--dry-run and --eval-only: --dry-run only builds the model; give one"),
        (args.dry_run and args.resume, "--dry-run and --resume: --dry-run only builds the model; give one"),
        (
            args.checkpoint is not None and not args.eval_only,
            "--checkpoint is only read with --eval-only (training starts from --pretrained; continue a run with "
            "--resume)",
        ),
        (
            args.take_over_work_dir and args.resume,
            "--take-over-work-dir and --resume: taking a folder over starts afresh; --resume continues its run",
        ),
    )
    for hit, message in conflicts:
        if hit:
            raise UsageError(message)


def _main(args: argparse.Namespace) -> int:
    if args.list:
        _print_list(args.json)
        return 0
    if not args.method:
        raise UsageError("--method is required (see --list)")
    validate_args(args)

    from benchmark import run, sweep
    from benchmark.protocol import get_protocol

    protocol = get_protocol(args.protocol)
    settings = run.resolve_settings(protocol, args.preset, args.epochs, args.image_size)
    model_cfg = run.model_config(settings, protocol)  # fails here on a bad --image-size, not in every job
    grid = sweep.expand_grid(args.method, args.set, args.seed, protocol, run.layer_widths(model_cfg),
                             settings=settings, options=run.options_from_args(args))  # fmt: skip
    if args.pretrained is not None and not args.pretrained.is_file():
        raise FileNotFoundError(f"--pretrained {args.pretrained}: file not found")
    if args.dry_run:
        configs = list({(p.method, p.overrides): p for p in grid}.values())
        outs = [run.dry_run(spec, quiet=args.json) for spec in configs]
        if args.json:
            print(json.dumps(outs[0] if len(outs) == 1 else outs, indent=2))
        return 0
    if args.executor or args.sweep_dry_run or len(grid) > 1:
        # checked here: every job would otherwise start and the other methods' jobs fail one by one
        for method in dict.fromkeys(p.method for p in grid):
            run.check_checkpointing(method, args.activation_checkpointing, len(model_cfg.backbone.depths))
        if args.eval_only or args.checkpoint is not None:
            raise UsageError("--eval-only / --checkpoint evaluate one checkpoint: give one method, config and seed")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("a sweep cannot run under torchrun; use --gpus-per-job N (each job runs torchrun)")
        run.check_data(grid[0])
        return sweep.run_sweep(args, grid, settings)
    if any(f for f in ("max_parallel", "gpus_per_job") if getattr(args, f) is not None):
        raise UsageError("--max-parallel / --gpus-per-job apply to sweeps (--executor); use torchrun for one run")
    result = run.run(grid[0])
    return 1 if result.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
