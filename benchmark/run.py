"""The run as a library: a frozen :class:`RunSpec`, built once, turned into a result by :func:`run`.

    spec = RunSpec.build(get_protocol("pascal-context"), "lora", ["rank=8"], seed=0,
                         settings=resolve(protocol, PRESETS["tiny"]), work_dir=Path("out"))
    result = run(spec)            # checks the inputs, starts the processes, then execute(spec, ...)

``run_benchmark`` (``benchmark.cli``) parses its flags into RunSpecs (``RunSpec.from_args``) and calls :func:`run`;
a sweep's grid points are RunSpecs built by the same constructor (``benchmark.sweep.expand_grid``), and the golden
reference runs call :func:`run` too (``benchmark.reference_runs``). The method config (overrides applied once), the
run id and the keys a resume checks are the specification's, computed once per specification.

The module is light to import (stdlib, ``benchmark.protocol``, ``benchmark.presets``, ``benchmark.results``):
torch, the engine and the method registry are imported where a run needs them.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from benchmark.presets import PRESETS, RunSettings, resolve
from benchmark.protocol import Protocol, get_protocol
from benchmark.results import RunResult, make_run_id

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORK_ROOT = Path("work_dirs")


class UsageError(ValueError):
    """Bad input (a flag, a setting, a file given); printed without a traceback, exit code 2."""


# --------------------------------------------------------------------------- activation checkpointing flags


def checkpoint_stages(stages: str | None, n_stages: int) -> bool | frozenset[int]:
    """``--activation-checkpointing`` parsed (False when absent); a bad value is a UsageError."""
    from benchmark import build

    try:
        return build.checkpoint_stages(stages, n_stages)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_checkpointing(method: str, stages: str | None, n_stages: int) -> bool | frozenset[int]:
    """The parsed stages; a UsageError when they switch checkpointing on for a method whose registry entry has
    no ``activation_checkpointing``."""
    from benchmark import build
    from benchmark.method_api import method_registry

    value = checkpoint_stages(stages, n_stages)
    try:
        build.check_checkpointing(method_registry().get(method), value)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return value


# --------------------------------------------------------------------------- the specification


def model_config(settings: RunSettings, protocol: Protocol) -> Any:
    """The network's config (backbone, per-task outputs, decoder) for these settings."""
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


def resolve_settings(
    protocol: Protocol, preset: str, epochs: int | None = None, image_size: int | None = None
) -> RunSettings:
    """The preset resolved against the protocol; an unknown preset is a UsageError."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    return resolve(protocol, PRESETS[preset], epochs, image_size)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run is: what it computes (protocol, method config, seed, settings) and how it runs it.

    Build it with :meth:`build` (or :meth:`from_args`): the overrides are applied there, once. ``run_id``,
    ``config``, ``meta`` (what a resume checks) follow from the fields and are computed once per instance."""

    protocol: Protocol
    method: str
    overrides: tuple[str, ...]  # "key=value", as given
    method_config: Any  # the method's config with the overrides applied (a frozen MethodConfig)
    seed: int
    settings: RunSettings
    data: Path | None = None  # dataset root; None: generated (presets with synthetic data only)
    work_dir: Path | None = None  # the run's folder; None: work_dirs/<run id>
    device: str = "auto"  # auto / cpu / cuda
    select: str = "final"  # which validation is reported: final / best
    resume: bool = False
    take_over: bool = False  # move another run's files aside (never deleted)
    eval_only: bool = False
    checkpoint: Path | None = None  # evaluated with eval_only
    pretrained: Path | None = None
    activation_checkpointing: str | None = None  # 'all' or stage numbers; None: off
    workers: int | None = None  # None: the preset's
    amp_dtype: str | None = "float16"  # on CUDA; None: fp32
    dist_timeout: float = 600.0

    @classmethod
    def build(
        cls,
        protocol: Protocol,
        method: str,
        overrides: Sequence[str],
        seed: int,
        settings: RunSettings,
        **options: Any,
    ) -> RunSpec:
        """The method's default config with ``overrides`` applied; ``options``: the other fields. Without an
        ``amp_dtype`` the protocol's ``amp`` decides (float16 autocast on CUDA, or fp32)."""
        from benchmark.method_api import apply_overrides, method_registry

        config = apply_overrides(method_registry().get(method).default_config(), overrides)
        options.setdefault("amp_dtype", "float16" if protocol.amp else None)
        return cls(protocol, method, tuple(overrides), config, seed, settings, **options)

    @classmethod
    def from_args(
        cls,
        args: argparse.Namespace,
        method: str,
        overrides: Sequence[str] = (),
        seed: int | None = None,
        *,
        protocol: Protocol | None = None,
        settings: RunSettings | None = None,
    ) -> RunSpec:
        """``run_benchmark``'s flags as a specification (``seed`` None: the first ``--seed``)."""
        protocol = protocol or get_protocol(args.protocol)
        settings = settings or resolve_settings(protocol, args.preset, args.epochs, args.image_size)
        return cls.build(protocol, method, overrides, args.seed[0] if seed is None else seed, settings,
                         **options_from_args(args))  # fmt: skip

    @cached_property
    def method_spec(self) -> Any:
        from benchmark.method_api import method_registry

        return method_registry().get(self.method)

    @cached_property
    def config(self) -> dict[str, Any]:
        """The method config as plain data (as in result.json)."""
        return self.method_config.to_dict()

    @cached_property
    def run_id(self) -> str:
        return make_run_id(self.protocol.name, self.protocol.version, self.method, self.config, [self.seed])

    @property
    def run_dir(self) -> Path:
        return self.work_dir if self.work_dir is not None else DEFAULT_WORK_ROOT / self.run_id

    @cached_property
    def meta(self) -> dict[str, Any]:
        """What a checkpoint records about its run; a resume refuses one that differs in ``checkpoints.RESUME_KEYS``."""
        s = self.settings
        return {
            "run_id": self.run_id,
            "method": self.method,
            "method_config": self.config,
            "protocol": self.protocol.id,
            "backbone": s.backbone,
            "image_size": s.image_size,
            "seed": self.seed,
            "preset": s.preset,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
        }

    def resume_keys(self) -> dict[str, Any]:
        """The part of :attr:`meta` a resume compares (``checkpoints.RESUME_KEYS``)."""
        from benchmark.checkpoints import RESUME_KEYS

        return {k: self.meta[k] for k in RESUME_KEYS}

    @property
    def folder_settings(self) -> dict[str, Any]:
        """What a work dir's marker records: another run with other values is refused there."""
        s = self.settings
        return {"backbone": s.backbone, "image_size": s.image_size, "epochs": s.epochs, "batch_size": s.batch_size}

    @cached_property
    def model_config(self) -> Any:
        return model_config(self.settings, self.protocol)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The RunSpec fields that ``run_benchmark``'s flags set besides protocol, method, config, seed, settings."""
    amp = {} if args.amp_dtype == "protocol" else {"amp_dtype": None if args.amp_dtype == "none" else args.amp_dtype}
    return amp | {
        "data": args.data,
        "work_dir": args.work_dir,
        "device": args.device,
        "select": args.select,
        "resume": args.resume,
        "take_over": args.take_over_work_dir,
        "eval_only": args.eval_only,
        "checkpoint": args.checkpoint,
        "pretrained": args.pretrained,
        "activation_checkpointing": args.activation_checkpointing,
        "workers": args.workers,
        "dist_timeout": args.dist_timeout,
    }


# --------------------------------------------------------------------------- the model


def build_net(
    spec: Any, method_cfg: Any, model_cfg: Any, pretrained: Path | None, activation_checkpointing: str | None = None
) -> Any:
    """The core's ``benchmark.build.build_net`` (``spec``: the method's registry entry), with a bad
    ``--activation-checkpointing`` as a UsageError."""
    from benchmark import build

    check_checkpointing(spec.name, activation_checkpointing, len(model_cfg.backbone.depths))
    return build.build_net(spec, method_cfg, model_cfg, pretrained, activation_checkpointing)


def spec_net(spec: RunSpec) -> Any:
    return build_net(
        spec.method_spec, spec.method_config, spec.model_config, spec.pretrained, spec.activation_checkpointing
    )


def dry_run(spec: RunSpec, quiet: bool = False) -> dict[str, Any]:
    """Build the model (a --pretrained file and --activation-checkpointing are checked too) and report its
    parameter breakdown; printed unless ``quiet``."""
    from benchmark.params import count_parameters

    counts = count_parameters(spec_net(spec), spec.method_spec.adapter_markers)
    s = spec.settings
    out = {
        "method": spec.method,
        "config": spec.config,
        "protocol": {"name": spec.protocol.name, "version": spec.protocol.version},
        "preset": s.preset,
        "backbone": s.backbone,
        "image_size": s.image_size,
        "params": counts,
    }
    if not quiet:
        print(f"{spec.method} on {s.backbone} at {s.image_size}px ({spec.protocol.id}), config {out['config']}")
        for k, label in (
            ("decoders", "decoders"),
            ("adapter", "adapter / LoRA"),
            ("other_trainable_backbone", "other trainable backbone"),
            ("trainable", "total trainable"),
            ("total", "total"),
        ):
            print(f"  {label:<26}{counts[k]:>14,}")
    return out


# --------------------------------------------------------------------------- before anything is written


def check_inputs(spec: RunSpec) -> Any:
    """Every given file and folder checked, and the checkpoint to evaluate read, before any folder is made (an
    unreadable or refused file leaves nothing behind). Returns the checkpoint's contents (None: none given)."""
    from benchmark.checkpoints import read_weights

    check_checkpointing(spec.method, spec.activation_checkpointing, len(spec.model_config.backbone.depths))
    if spec.eval_only and spec.checkpoint is None:
        raise UsageError("--eval-only needs --checkpoint FILE")
    if spec.checkpoint is not None and not spec.checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {spec.checkpoint}: file not found")
    if spec.pretrained is not None:
        read_weights(spec.pretrained)
    checkpoint_data = None if spec.checkpoint is None else read_weights(spec.checkpoint)
    check_data(spec)
    return checkpoint_data


def check_data(spec: RunSpec) -> None:
    if spec.data is not None and not spec.data.is_dir():
        raise FileNotFoundError(f"--data {spec.data}: dataset folder not found")
    if spec.data is None and not spec.settings.synthetic_train:
        from benchmark.dataset import data_source

        raise UsageError(
            f"--data DIR is required with --preset {spec.settings.preset} for protocol {spec.protocol.name} "
            f"({data_source(spec.protocol).OBTAIN})"
        )


@dataclass(frozen=True)
class Processes:
    device: str
    rank: int = 0
    world: int = 1


def resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return choice


def start_processes(spec: RunSpec) -> Processes:
    """The device, and the process group under torchrun; SIGTERM reported."""
    import torch

    device = resolve_device(spec.device)
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if not torch.distributed.is_initialized():
            if device == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group(
                backend="nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=spec.dist_timeout)
            )
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    _report_sigterm(rank, world)
    if spec.settings.batch_size % world:
        raise UsageError(f"batch size {spec.settings.batch_size} is not divisible by {world} processes")
    return Processes(device, rank, world)


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


def run(spec: RunSpec) -> RunResult:
    """One run from its specification: inputs checked, processes started, then :func:`execute`."""
    checkpoint_data = check_inputs(spec)
    return execute(spec, start_processes(spec), checkpoint_data)


# --------------------------------------------------------------------------- the work dir and the data


def make_work_dir(work_dir: Path) -> None:
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


def claim_work_dir(spec: RunSpec, rank: int) -> RunResult | None:
    """Create, lock and claim the run's folder. Returns the recorded result when this very run (same run id and
    settings) already finished there: nothing to do, with or without --resume (a sweep is idempotent the same
    way); --take-over-work-dir runs it again after moving the old files aside."""
    from benchmark import workdir

    work_dir = spec.run_dir
    make_work_dir(work_dir)
    if rank == 0:
        workdir.acquire_lock(work_dir)  # held until this process exits
    rerun = not (spec.eval_only or spec.take_over)
    finished = workdir.finished_result(work_dir) if rerun and workdir.owner(work_dir) == spec.run_id else None
    if finished is not None:
        # other settings under the same run id: refused
        workdir.claim(work_dir, spec.run_id, resume=True, take_over=False, settings=spec.folder_settings)
        print(f"run_benchmark: {work_dir / 'result.json'} records this run as finished; left untouched "
              "(add --take-over-work-dir, without --resume, to run it again)")  # fmt: skip
        return finished
    if rank == 0:
        workdir.claim(work_dir, spec.run_id, resume=spec.resume, take_over=spec.take_over,
                      settings=spec.folder_settings, evaluating=spec.eval_only)  # fmt: skip
        _remove_stale_temp_files(work_dir, work_dir / "checkpoints")
    return None


def _barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def prepare_data(spec: RunSpec, rank: int) -> Path:
    """The dataset root: --data, or data generated once in the run's folder."""
    from benchmark.dataset import dataset_ready
    from benchmark.synth import make_synthetic_dataset

    if spec.data is not None:
        return spec.data
    root = spec.run_dir / "synthetic_data"
    if rank == 0 and not dataset_ready(spec.protocol, root):
        s = spec.settings
        make_synthetic_dataset(root, s.synthetic_train, s.synthetic_val, seed=0, protocol=spec.protocol)
    _barrier()
    return root


def open_datasets(spec: RunSpec, root: Path) -> tuple[Any, Any]:
    """(validation, training) datasets; no training set for an evaluation."""
    from benchmark.dataset import open_dataset
    from benchmark.transforms import build_transforms

    p, size = spec.protocol, spec.settings.image_size
    val = open_dataset(p, root, p.val_split, build_transforms(p, False, seed=spec.seed, image_size=size))
    if spec.eval_only:
        return val, None
    train = build_transforms(p, True, seed=spec.seed, image_size=size)
    return val, open_dataset(p, root, p.train_split, train)


# --------------------------------------------------------------------------- the engine


def engine_setup(protocol: Protocol, **fields: Any) -> Any:
    """``engine.EngineSetup`` with the protocol's optimisation (clip, weight decay, betas, eps) read from the
    protocol object here and nowhere else; ``fields``: the rest."""
    from benchmark import engine

    return engine.EngineSetup(
        protocol=protocol,
        tasks=protocol.task_names,
        clip_grad=protocol.clip_grad,
        weight_decay=protocol.weight_decay,
        betas=protocol.betas,
        eps=protocol.eps,
        **fields,
    )


def setup_for(spec: RunSpec, procs: Processes, net: Any, val_ds: Any, train_ds: Any) -> Any:
    from benchmark.dataset import collate
    from benchmark.losses import MultiTaskLoss
    from benchmark.metrics import build_meters

    s = spec.settings
    per_proc_batch = s.batch_size // procs.world
    return engine_setup(
        spec.protocol,
        net=net,
        loss_fn=MultiTaskLoss(spec.protocol.tasks),
        meters=build_meters(spec.protocol.tasks),
        work_dir=spec.run_dir,
        seed=spec.seed,
        device=procs.device,
        val_dataset=val_ds,
        train_dataset=train_ds,
        batch_size=per_proc_batch,
        val_batch_size=per_proc_batch,
        epochs=s.epochs,
        val_interval=s.val_interval,
        workers=s.workers if spec.workers is None else spec.workers,
        amp_dtype=spec.amp_dtype,
        resume=spec.resume,
        log_interval=s.log_interval,
        meta=dict(spec.meta),
        collate_fn=collate,
        merge=spec.method_spec.merge_for_eval,
    )


@dataclass
class Outcome:
    """What training or evaluation gave: the engine's outcome (None when the run failed), the reported history
    entry and how it was selected, the failure message."""

    engine: Any
    entry: dict[str, Any]
    rule: dict[str, Any]
    failed: str | None = None


def evaluate_checkpoint(spec: RunSpec, setup: Any, checkpoint_data: Any) -> Outcome:
    from benchmark import engine

    load_for_eval(setup.net, spec.checkpoint, spec.method_spec, spec.meta, checkpoint_data)
    outcome = engine.evaluate(setup)
    rule = {"rule": "checkpoint", "epoch": None, "iteration": None, "checkpoint": str(spec.checkpoint)}
    return Outcome(outcome, outcome.history[-1], rule)


def train(spec: RunSpec, setup: Any, world: int) -> Outcome:
    from benchmark import engine, optim

    s = spec.settings
    iters = optim.steps_per_epoch(len(setup.train_dataset), setup.batch_size, world)
    setup.schedule = optim.make_schedule(
        spec.protocol, s.batch_size, iters, s.epochs, peak_lr=s.peak_lr, warmup_epochs=s.warmup_epochs
    )
    try:
        outcome = engine.train(setup)
    except engine.NonFiniteLossError as e:
        print(f"run_benchmark: {e}", file=sys.stderr)
        rule = {"rule": spec.select, "epoch": None, "iteration": None}
        return Outcome(None, {"metrics": {}, "delta_m": None}, rule, failed=str(e))
    entry, rule = select(outcome.history, spec.select)
    return Outcome(outcome, entry, rule)


def select(history: list[dict[str, Any]], rule: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The reported validation: the last one ('final') or the one with the best Δm ('best')."""
    if not history:
        raise RuntimeError("training finished without any validation")
    if rule == "best":
        scored = [h for h in history if h.get("delta_m") is not None]
        best = max(scored, key=lambda h: h["delta_m"]) if scored else history[-1]
        return best, {"rule": "best", "epoch": best["epoch"], "iteration": best["iteration"], "note": "best Δm on val"}
    last = history[-1]
    return last, {"rule": "final", "epoch": last["epoch"], "iteration": last["iteration"]}


def execute(spec: RunSpec, procs: Processes, checkpoint_data: Any = None) -> RunResult:
    """Train (or evaluate) one run in ``spec.run_dir`` and write its result.json (rank 0); the result."""
    from benchmark.engine import set_random_seed
    from benchmark.params import count_parameters

    finished = claim_work_dir(spec, procs.rank)
    if finished is not None:
        return finished
    val_ds, train_ds = open_datasets(spec, prepare_data(spec, procs.rank))
    set_random_seed(spec.seed)  # same initialisation of new (LoRA, decoder) weights on every rank
    net = spec_net(spec).to(procs.device)
    params = count_parameters(net, spec.method_spec.adapter_markers)
    setup = setup_for(spec, procs, net, val_ds, train_ds)
    t_start = time.time()
    if spec.eval_only:
        outcome = evaluate_checkpoint(spec, setup, checkpoint_data)
    else:
        outcome = train(spec, setup, procs.world)
    result = make_result(spec, procs, outcome, params, setup, time.time() - t_start)
    if procs.rank == 0:
        write_result(spec, result, outcome, val_ds.ids, setup.per_image)
    return result


# --------------------------------------------------------------------------- the result


def _notes(spec: RunSpec, outcome: Outcome) -> list[str]:
    notes: list[str] = []
    if spec.settings.debug:
        notes.append(f"preset {spec.settings.preset} / shortened schedule: not the protocol, never tabled")
    if checkpoint_stages(spec.activation_checkpointing, len(spec.model_config.backbone.depths)):
        notes.append(
            f"activation checkpointing ({spec.activation_checkpointing}): block activations recomputed in backward "
            "(cost figures include it)"
        )
    if outcome.failed is not None:
        notes.append(outcome.failed)
    elif outcome.engine.resumed_from:
        notes.append(f"resumed from {outcome.engine.resumed_from}")
    return notes


def _cost(outcome: Outcome, wall_seconds: float) -> dict[str, Any]:
    cost: dict[str, Any] = {"wall_seconds": wall_seconds}
    o = outcome.engine
    if o is not None:
        cost.update(
            train_seconds=o.train_seconds,
            eval_seconds=o.eval_seconds,
            peak_mem_bytes=o.peak_mem_bytes,
            train_images_per_s=(o.train_images / o.train_compute_s) if o.train_compute_s else 0.0,
        )
        if o.peak_mem_reserved_bytes is not None:  # CUDA: what the caching allocator held at its peak
            cost["peak_mem_reserved_bytes"] = o.peak_mem_reserved_bytes
    return cost


def env_info(device: str) -> dict[str, Any]:
    from importlib.metadata import version

    import peft
    import timm
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft.__version__,
        "mmengine": version("mmengine"),  # not imported here: benchmark.engine is the one module that does
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


def make_result(
    spec: RunSpec, procs: Processes, outcome: Outcome, params: Mapping[str, int], setup: Any, wall_seconds: float
) -> RunResult:
    s = spec.settings
    if outcome.failed is not None:
        status = "failed"
    else:
        status = "debug" if s.debug else "success"
    return RunResult(
        run_id=spec.run_id,
        status=status,
        protocol={"name": spec.protocol.name, "version": spec.protocol.version},
        method={"name": spec.method, "config": spec.config},
        seeds=[spec.seed],
        preset=s.preset,
        metrics=outcome.entry["metrics"],
        delta_m={"value": outcome.entry.get("delta_m"), "reference": spec.protocol.reference},
        params=dict(params),
        selection=outcome.rule,
        cost=_cost(outcome, wall_seconds),
        env={
            **env_info(procs.device),
            "world_size": procs.world,
            "amp_dtype": setup.amp_dtype if procs.device == "cuda" else None,  # AMP runs on CUDA only (engine)
            "backbone": s.backbone,
            "image_size": s.image_size,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
        },
        notes=_notes(spec, outcome),
    )


def write_result(
    spec: RunSpec, result: RunResult, outcome: Outcome, image_ids: Sequence[str], blobs: Sequence[bytes]
) -> None:
    """result.json, after its per-image statistics; a one-line summary."""
    path = spec.run_dir / "result.json"
    history = outcome.engine.history if outcome.engine is not None else []
    write_per_image(path, spec.run_id, image_ids, blobs, history, outcome.entry)
    result.write(path)
    dm = outcome.entry.get("delta_m")
    dm_s = f"{dm:+.2f}%" if isinstance(dm, float) else "n/a"
    metrics = result.metrics
    summary = ", ".join(f"{t.name} {t.metric} {metrics[t.name][t.metric]:.4f}" for t in spec.protocol.tasks
                        if t.name in metrics)  # fmt: skip
    trainable = result.params["trainable"]
    print(f"[{result.status}] {spec.run_id}: Δm {dm_s}; {summary}; trainable {trainable:,}; result: {path}")


def write_per_image(result_path, run_id, image_ids, blobs, history, entry) -> None:
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


def load_for_eval(net: Any, path: Path, spec: Any, meta: dict[str, Any] | None = None, data: Any = None) -> None:
    """Load a checkpoint to evaluate (this harness's or the official code's) into ``net`` (``spec``: the method's
    registry entry; ``data``: the file already read)."""
    from benchmark import checkpoints
    from benchmark.checkpoints import read_weights
    from benchmark.safeload import CheckpointError

    # weights-only first; official checkpoints also pickle their yacs config, read as plain data (safeload)
    ckpt = read_weights(path) if data is None else data
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if checkpoints.is_own_checkpoint(ckpt):
        if ckpt.get("method") not in (None, spec.name):
            raise CheckpointError(f"{path}: checkpoint of method {ckpt.get('method')!r}, not {spec.name!r}")
        # settings that change the model: named before the weights are compared (a 64 px checkpoint at 128 px
        # would otherwise be blamed on the frozen weights)
        flags = {"image_size": "--image-size", "backbone": "--preset", "method_config": "--set"}
        for key, flag in flags.items():
            if meta and key in ckpt and key in meta and ckpt[key] != meta[key]:
                raise CheckpointError(
                    f"{path}: trained with {key.replace('_', ' ')} {ckpt[key]!r}, this evaluation uses "
                    f"{meta[key]!r}; evaluate with the settings it was trained with ({flag})"
                )
        checkpoints.load_model_state(net, ckpt, str(path))
        return
    from benchmark.checkpoints import refuse_incomplete, required_state_keys
    from benchmark.official import load_official_state_dict

    if not isinstance(ckpt.get("model", ckpt), dict) or not ckpt.get("model", ckpt):
        raise CheckpointError(f"{path}: holds no weights (expected {{'model': state_dict}} or a state dict)")
    report = load_official_state_dict(net, ckpt.get("model", ckpt), source=str(path))
    # evaluating a partly filled model would table a random one: every trained weight and buffer must be given
    refuse_incomplete(
        str(path), required_state_keys(net) - set(report.loaded), "trained parameter(s) or buffer(s) are"
    )
    print(f"official checkpoint {path}: {report}", file=sys.stderr)
