"""``run_benchmark``: train and evaluate a registered method under the protocol.

    run_benchmark --list
    run_benchmark --method mtlora --preset smoke
    run_benchmark --method mtlora --preset paper --data PASCAL_MT --pretrained swin_tiny_patch4_window7_224.pth
    run_benchmark --method mtlora --preset paper --dry-run --json
    run_benchmark --method mtlora --eval-only --checkpoint FILE --data PASCAL_MT
    torchrun --nproc_per_node 2 $(which run_benchmark) --method lora --preset smoke
    run_benchmark --method mtlora lora --set rank=16,32 --seed 0 1 2 --executor slurm --slurm-partition gpu ...

Exit codes: 0 success; 1 the run failed (non-finite loss, disk full, a crashed data worker or peer process;
result.json says so where one could be written); 2 bad input (arguments, dataset, checkpoint, config).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class UsageError(ValueError):
    """Bad command-line input; printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_benchmark",
        description="Train and evaluate a PEFT method under the PASCAL-Context multi-task protocol (MTLoRA, CVPR 2024).",
    )
    p.add_argument("--list", action="store_true", help="list the registered methods with their config fields")
    p.add_argument("--method", nargs="+", metavar="NAME", help="registered method name(s); several make a sweep")
    p.add_argument("--preset", default="paper", help="paper (the protocol exactly) or smoke (tiny, CPU, debug)")
    p.add_argument("--protocol", default="pascal-context", help="protocol name (default: pascal-context)")
    p.add_argument("--data", type=Path, help="dataset root in the PASCAL_MT layout (smoke: generated when omitted)")
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
    p.add_argument("--amp-dtype", choices=["float16", "bfloat16", "none"], default="float16", help="AMP on CUDA")
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


def _env_info(device: str) -> dict[str, Any]:
    import peft
    import timm
    import torch

    from benchmark.engine import MMENGINE_VERSION

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft.__version__,
        "mmengine": MMENGINE_VERSION,
        "device": device,
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 0,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        info["git_sha"] = sha.stdout.strip() or "unknown"
        info["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["git_sha"], info["git_dirty"] = "unknown", None
    return info


def _print_list(as_json: bool) -> None:
    from benchmark.method_api import METHODS

    rows = []
    for name in METHODS.names():
        spec = METHODS.get(name)
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


def _init_distributed(device: str, timeout_s: float) -> tuple[int, int]:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _report_sigterm(rank: int, world: int) -> None:
    """Say why the process stops on SIGTERM: torchrun sends it to every process when one fails, Slurm on
    preemption or timeout. Unfinished work is lost up to the last checkpoint (files are written atomically)."""
    import signal

    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:  # not in a forked data-loader worker
            who = f"rank {rank} of {world}" if world > 1 else "the run"
            why = " (torchrun stops every process when one fails: its report names the first failure)"
            msg = f"run_benchmark: {who} stopped by SIGTERM{why if world > 1 else ''}; rerun with --resume\n"
            os.write(2, msg.encode())
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return choice


# --------------------------------------------------------------------------- the run


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

    from benchmark import sweep
    from benchmark.build import check_checkpointing, checkpoint_stages
    from benchmark.method_api import METHODS, apply_overrides
    from benchmark.presets import PRESETS, resolve
    from benchmark.protocol import get_protocol

    protocol = get_protocol(args.protocol)
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(sorted(PRESETS))}")
    settings = resolve(protocol, PRESETS[args.preset], args.epochs, args.image_size)
    grid = sweep.expand_grid(
        args.method, args.set, args.seed, protocol, layer_widths(_model_config(settings, protocol))
    )
    if args.pretrained is not None and not args.pretrained.is_file():
        raise FileNotFoundError(f"--pretrained {args.pretrained}: file not found")
    if args.dry_run:
        configs = list({(p.method, p.overrides): p for p in grid}.values())
        return _dry_run_all(args, configs, settings, protocol)
    if args.executor or args.sweep_dry_run or len(grid) > 1:
        model_cfg = _model_config(settings, protocol)  # fails here on a bad --image-size, not in every job
        stages = checkpoint_stages(args.activation_checkpointing, len(model_cfg.backbone.depths))
        for method in dict.fromkeys(p.method for p in grid):  # here: every job would otherwise fail one by one
            check_checkpointing(METHODS.get(method), stages)
        if args.eval_only or args.checkpoint is not None:
            raise UsageError("--eval-only / --checkpoint evaluate one checkpoint: give one method, config and seed")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("a sweep cannot run under torchrun; use --gpus-per-job N (each job runs torchrun)")
        if args.data is not None and not args.data.is_dir():
            raise FileNotFoundError(f"--data {args.data}: dataset folder not found")
        if args.data is None and not settings.synthetic_train:
            raise UsageError(
                f"--data DIR is required with --preset {settings.preset} (download with `benchmark-data fetch`)"
            )
        return sweep.run_sweep(args, grid, settings)
    if any(f for f in ("max_parallel", "gpus_per_job") if getattr(args, f) is not None):
        raise UsageError("--max-parallel / --gpus-per-job apply to sweeps (--executor); use torchrun for one run")
    point = grid[0]
    spec = METHODS.get(point.method)
    method_cfg = apply_overrides(spec.default_config(), point.overrides)
    return _single(args, spec, method_cfg, settings, protocol, point.seed)


def _model_config(settings: Any, protocol: Any) -> Any:
    from benchmark.model import model_config_for

    return model_config_for(
        settings.backbone,
        {t.name: t.out_channels for t in protocol.tasks},
        img_size=settings.image_size,
        drop_path_rate=protocol.drop_path_rate,
        decoder_channels=protocol.decoder_channels,
        head_channels=protocol.head_channels,
    )


def layer_widths(model_cfg: Any) -> list[int]:
    """Per Swin stage, the widest in/out dimension of its linear layers (the MLP's hidden width)."""
    swin = model_cfg.backbone
    return [int(d * swin.mlp_ratio) for d in swin.stage_dims]


def _dry_run_all(args: argparse.Namespace, configs: list[Any], settings: Any, protocol: Any) -> int:
    from benchmark.method_api import METHODS, apply_overrides

    model_cfg = _model_config(settings, protocol)
    outs = []
    for point in configs:
        spec = METHODS.get(point.method)
        cfg = apply_overrides(spec.default_config(), point.overrides)
        outs.append(_dry_run(args, spec, cfg, model_cfg, settings, protocol))
    if args.json:
        print(json.dumps(outs[0] if len(outs) == 1 else outs, indent=2))
    return 0


def _single(args: argparse.Namespace, spec: Any, method_cfg: Any, settings: Any, protocol: Any, seed: int) -> int:
    model_cfg = _model_config(settings, protocol)
    if args.eval_only and args.checkpoint is None:
        raise UsageError("--eval-only needs --checkpoint FILE")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: file not found")
    # read before any folder is made: an unreadable or refused file leaves nothing behind
    from benchmark.checkpoints import read_weights

    if args.pretrained is not None:
        read_weights(args.pretrained)
    args.checkpoint_data = None if args.checkpoint is None else read_weights(args.checkpoint)
    if args.data is not None and not args.data.is_dir():
        raise FileNotFoundError(f"--data {args.data}: dataset folder not found")
    if args.data is None and not settings.synthetic_train:
        raise UsageError(
            f"--data DIR is required with --preset {settings.preset} (download with `benchmark-data fetch`)"
        )

    device = _resolve_device(args.device)
    rank, world = _init_distributed(device, args.dist_timeout)
    _report_sigterm(rank, world)
    if settings.batch_size % world:
        raise UsageError(f"batch size {settings.batch_size} is not divisible by {world} processes")

    from benchmark.results import make_run_id

    run_id = make_run_id(protocol.name, protocol.version, spec.name, method_cfg.to_dict(), [seed])
    work_dir = args.work_dir or (Path("work_dirs") / run_id)
    return _run_one(args, spec, method_cfg, model_cfg, settings, protocol, seed, work_dir, device, rank, world)


def _dry_run(args, spec, method_cfg, model_cfg, settings, protocol) -> dict[str, Any]:
    from benchmark.build import build_net
    from benchmark.params import count_parameters

    # a --pretrained file and --activation-checkpointing are checked here too
    net = build_net(spec, method_cfg, model_cfg, args.pretrained, args.activation_checkpointing)
    counts = count_parameters(net, spec.adapter_markers)
    out = {
        "method": spec.name,
        "config": method_cfg.to_dict(),
        "protocol": {"name": protocol.name, "version": protocol.version},
        "preset": settings.preset,
        "backbone": settings.backbone,
        "image_size": settings.image_size,
        "params": counts,
    }
    if not args.json:
        print(f"{spec.name} on {settings.backbone} at {settings.image_size}px ({protocol.id}), config {out['config']}")
        for k, label in (
            ("decoders", "decoders"),
            ("adapter", "adapter / LoRA"),
            ("other_trainable_backbone", "other trainable backbone"),
            ("trainable", "total trainable"),
            ("total", "total"),
        ):
            print(f"  {label:<26}{counts[k]:>14,}")
    return out


def _prepare_data(args, settings, work_dir: Path, rank: int) -> Path:
    if args.data is not None:
        return args.data
    from benchmark.synth import make_synthetic_dataset

    root = work_dir / "synthetic_data"
    if rank == 0 and not (root / "ImageSets").is_dir():
        make_synthetic_dataset(root, settings.synthetic_train, settings.synthetic_val, seed=0)
    _barrier()
    return root


def _make_work_dir(work_dir: Path) -> None:
    if work_dir.exists() and not work_dir.is_dir():
        raise UsageError(f"--work-dir {work_dir}: exists and is not a folder; expected a folder (or a new path)")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"--work-dir {work_dir}: a part of this path is a file; expected a folder path") from None
    except OSError as e:
        raise UsageError(f"--work-dir {work_dir}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(work_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--work-dir {work_dir}: the folder is not writable")


def _remove_stale_temp_files(*folders: Path) -> None:
    """Temp files of writes that a kill interrupted (this harness's own temp names, for its own files only);
    the files they were replacing are intact."""
    from benchmark.results import stale_temp_files
    from benchmark.workdir import HARNESS_FILES

    for folder in folders:
        for tmp in stale_temp_files(folder, HARNESS_FILES):
            tmp.unlink(missing_ok=True)
            print(f"removed {tmp}, left by an interrupted write", file=sys.stderr)


def _barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _run_one(args, spec, method_cfg, model_cfg, settings, protocol, seed, work_dir, device, rank, world) -> int:
    from benchmark import engine, workdir
    from benchmark.build import build_net, checkpoint_stages
    from benchmark.dataset import PascalMT, build_transforms, collate
    from benchmark.losses import MultiTaskLoss
    from benchmark.metrics import build_meters
    from benchmark.params import count_parameters
    from benchmark.results import RunResult, make_run_id

    tasks = protocol.task_names
    work_dir = Path(work_dir)
    run_id = make_run_id(protocol.name, protocol.version, spec.name, method_cfg.to_dict(), [seed])
    _make_work_dir(work_dir)
    compare = {"backbone": settings.backbone, "image_size": settings.image_size, "epochs": settings.epochs,
               "batch_size": settings.batch_size}  # fmt: skip
    if rank == 0:
        workdir.acquire_lock(work_dir)  # held until this process exits
    # this very run (same run id and settings) already finished here: nothing to do, with or without --resume (a
    # sweep is idempotent the same way); --take-over-work-dir runs it again after moving the old files aside
    rerun = not (args.eval_only or args.take_over_work_dir)
    if rerun and workdir.owner(work_dir) == run_id and workdir.finished_result(work_dir) is not None:
        workdir.claim(work_dir, run_id, resume=True, take_over=False, settings=compare)  # other settings: refused
        print(f"run_benchmark: {work_dir / 'result.json'} records this run as finished; left untouched "
              "(add --take-over-work-dir, without --resume, to run it again)")  # fmt: skip
        return 0
    if rank == 0:
        workdir.claim(work_dir, run_id, resume=args.resume, take_over=args.take_over_work_dir, settings=compare,
                      evaluating=args.eval_only)  # fmt: skip
        _remove_stale_temp_files(work_dir, work_dir / "checkpoints")
    data_root = _prepare_data(args, settings, work_dir, rank)
    workers = settings.workers if args.workers is None else args.workers
    val_ds = PascalMT(
        data_root, protocol.val_split, tasks, build_transforms(settings.image_size, train=False, seed=seed)
    )
    train_ds = None
    if not args.eval_only:
        train_ds = PascalMT(
            data_root, protocol.train_split, tasks, build_transforms(settings.image_size, train=True, seed=seed)
        )

    engine.set_random_seed(seed)  # same initialisation of new (LoRA, decoder) weights on every rank
    net = build_net(spec, method_cfg, model_cfg, args.pretrained, args.activation_checkpointing).to(device)
    params = count_parameters(net, spec.adapter_markers)
    loss_fn = MultiTaskLoss(protocol.tasks)
    meters = build_meters(tasks)
    per_proc_batch = settings.batch_size // world
    meta = {
        "run_id": run_id,
        "method": spec.name,
        "method_config": method_cfg.to_dict(),
        "protocol": protocol.id,
        "backbone": settings.backbone,
        "image_size": settings.image_size,
        "seed": seed,
        # with the above, what --resume checks before continuing a checkpoint (engine.RESUME_KEYS)
        "preset": settings.preset,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
    }
    setup = engine.EngineSetup(
        net=net,
        loss_fn=loss_fn,
        meters=meters,
        protocol=protocol,
        tasks=tasks,
        work_dir=work_dir,
        seed=seed,
        device=device,
        val_dataset=val_ds,
        train_dataset=train_ds,
        batch_size=per_proc_batch,
        val_batch_size=per_proc_batch,
        epochs=settings.epochs,
        val_interval=settings.val_interval,
        workers=workers,
        amp_dtype=None if args.amp_dtype == "none" else args.amp_dtype,
        clip_grad=protocol.clip_grad,
        weight_decay=protocol.weight_decay,
        betas=protocol.betas,
        eps=protocol.eps,
        resume=args.resume,
        log_interval=settings.log_interval,
        meta=meta,
        collate_fn=collate,
    )
    notes: list[str] = []
    status = "debug" if settings.debug else "success"
    if settings.debug:
        notes.append(f"preset {settings.preset} / shortened schedule: not the protocol, never tabled")
    if checkpoint_stages(args.activation_checkpointing, len(model_cfg.backbone.depths)):
        notes.append(
            f"activation checkpointing ({args.activation_checkpointing}): block activations recomputed in backward "
            "(cost figures include it)"
        )
    t_start = time.time()
    failed = None
    if args.eval_only:
        _load_for_eval(net, args.checkpoint, spec, meta, getattr(args, "checkpoint_data", None))
        rule = {"rule": "checkpoint", "epoch": None, "iteration": None, "checkpoint": str(args.checkpoint)}
        outcome = engine.evaluate(setup)
        entry = outcome.history[-1]
    else:
        iters = engine.steps_per_epoch(len(train_ds), per_proc_batch, world)
        setup.schedule = engine.make_schedule(
            protocol,
            settings.batch_size,
            iters,
            settings.epochs,
            peak_lr=settings.peak_lr,
            warmup_epochs=settings.warmup_epochs,
        )
        try:
            outcome = engine.train(setup)
        except engine.NonFiniteLossError as e:
            failed = str(e)
            outcome = None
        if outcome is not None:
            entry, rule = _select(outcome.history, args.select)
    if failed is not None:
        print(f"run_benchmark: {failed}", file=sys.stderr)
        status = "failed"
        notes.append(failed)
        entry = {"metrics": {}, "delta_m": None}
        rule = {"rule": args.select, "epoch": None, "iteration": None}
        outcome = None
    metrics = entry["metrics"]
    cost: dict[str, Any] = {"wall_seconds": time.time() - t_start}
    if outcome is not None:
        cost.update(
            train_seconds=outcome.train_seconds,
            eval_seconds=outcome.eval_seconds,
            peak_mem_bytes=outcome.peak_mem_bytes,
            train_images_per_s=(outcome.train_images / outcome.train_compute_s) if outcome.train_compute_s else 0.0,
        )
        if outcome.peak_mem_reserved_bytes is not None:  # CUDA: what the caching allocator held at its peak
            cost["peak_mem_reserved_bytes"] = outcome.peak_mem_reserved_bytes
        if outcome.resumed_from:
            notes.append(f"resumed from {outcome.resumed_from}")
    result = RunResult(
        run_id=run_id,
        status=status,
        protocol={"name": protocol.name, "version": protocol.version},
        method={"name": spec.name, "config": method_cfg.to_dict()},
        seeds=[seed],
        preset=settings.preset,
        metrics=metrics,
        delta_m={"value": entry.get("delta_m"), "reference": protocol.reference},
        params=params,
        selection=rule,
        cost=cost,
        env={
            **_env_info(device),
            "world_size": world,
            "amp_dtype": setup.amp_dtype if device == "cuda" else None,  # AMP runs on CUDA only (engine)
            "backbone": settings.backbone,
            "image_size": settings.image_size,
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
        },
        notes=notes,
    )
    if rank == 0:
        history = outcome.history if outcome is not None else []
        _write_per_image(work_dir / "result.json", run_id, val_ds.ids, setup.per_image, history, entry)
        path = result.write(work_dir / "result.json")
        dm = entry.get("delta_m")
        dm_s = f"{dm:+.2f}%" if isinstance(dm, float) else "n/a"
        summary = ", ".join(
            f"{t} {protocol.task(t).metric} {metrics[t][protocol.task(t).metric]:.4f}" for t in tasks if t in metrics
        )
        print(f"[{status}] {run_id}: Δm {dm_s}; {summary}; trainable {params['trainable']:,}; result: {path}")
    return 1 if status == "failed" else 0


def _write_per_image(result_path, run_id, image_ids, blobs, history, entry) -> None:
    """The selected evaluation's per-image statistics beside result.json (written first: a result never points at
    a missing file). The last ``len(blobs)`` history entries are this process's validations; an entry from before
    a resume has none, and the run then has no interval over images (the leaderboard says so)."""
    from benchmark.metrics import per_image_file
    from benchmark.results import atomic_write_bytes, per_image_path

    target = per_image_path(result_path)
    idx = next((i for i, h in enumerate(history) if h is entry), None)
    k = None if idx is None else idx - (len(history) - len(blobs))
    if k is None or k < 0:  # none: a stale file from an earlier run in this folder must not pass for this one's
        target.unlink(missing_ok=True)
        return
    atomic_write_bytes(target, per_image_file(run_id, list(image_ids), blobs[k]))


def _select(history: list[dict[str, Any]], rule: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not history:
        raise RuntimeError("training finished without any validation")
    if rule == "best":
        scored = [h for h in history if h.get("delta_m") is not None]
        best = max(scored, key=lambda h: h["delta_m"]) if scored else history[-1]
        return best, {"rule": "best", "epoch": best["epoch"], "iteration": best["iteration"], "note": "best Δm on val"}
    last = history[-1]
    return last, {"rule": "final", "epoch": last["epoch"], "iteration": last["iteration"]}


def _load_for_eval(net: Any, path: Path, spec: Any, meta: dict[str, Any] | None = None, data: Any = None) -> None:
    from benchmark import engine
    from benchmark.checkpoints import read_weights

    # weights-only first; official checkpoints also pickle their yacs config, read as plain data (safeload)
    ckpt = read_weights(path) if data is None else data  # data: the file already read by _single
    if not isinstance(ckpt, dict):
        raise engine.CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if engine.is_own_checkpoint(ckpt):
        if ckpt.get("method") not in (None, spec.name):
            raise engine.CheckpointError(f"{path}: checkpoint of method {ckpt.get('method')!r}, not {spec.name!r}")
        # settings that change the model: named before the weights are compared (a 64 px checkpoint at 128 px
        # would otherwise be blamed on the frozen weights)
        flags = {"image_size": "--image-size", "backbone": "--preset", "method_config": "--set"}
        for key, flag in flags.items():
            if meta and key in ckpt and key in meta and ckpt[key] != meta[key]:
                raise engine.CheckpointError(
                    f"{path}: trained with {key.replace('_', ' ')} {ckpt[key]!r}, this evaluation uses "
                    f"{meta[key]!r}; evaluate with the settings it was trained with ({flag})"
                )
        engine.load_model_state(net, ckpt, str(path))
        return
    from benchmark.official import load_official_state_dict, refuse_incomplete, required_state_keys

    if not isinstance(ckpt.get("model", ckpt), dict) or not ckpt.get("model", ckpt):
        raise engine.CheckpointError(f"{path}: holds no weights (expected {{'model': state_dict}} or a state dict)")
    report = load_official_state_dict(net, ckpt.get("model", ckpt), source=str(path))
    # evaluating a partly filled model would table a random one: every trained weight and buffer must be given
    refuse_incomplete(
        str(path), required_state_keys(net) - set(report.loaded), "trained parameter(s) or buffer(s) are"
    )
    print(f"official checkpoint {path}: {report}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
