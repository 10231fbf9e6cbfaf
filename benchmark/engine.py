"""Runner glue: the only module that imports mmengine.

MMEngine's ``Runner`` does the loop, hooks, logging, LR schedule, AMP and DDP wrapping. What is ours:

- ``EngineModel`` adapts ``MultiTaskModel`` + ``MultiTaskLoss`` to mmengine's ``BaseModel`` and stops the run
  on a non-finite loss before any weight is touched;
- ``EngineMetric`` feeds our pure ``(stats, reduce)`` meters, one entry per image, so mmengine's result
  collection over ranks (pad + interleave + truncate) gives exactly the single-process metrics;
- checkpoints are our own files (trainable weights + buffers + optimizer + schedulers + RNG), written
  atomically and loaded with ``weights_only=True``: mmengine 0.10.7 cannot reload its own checkpoints
  under torch >= 2.6, and a PEFT checkpoint should not carry a frozen backbone;
- ``EpochSampler`` shards a seeded per-epoch permutation over ranks after dropping the global remainder,
  so every sample is seen at most once per epoch across processes and all ranks run the same number
  of iterations.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mmengine
import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import BaseModel
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import _ParamScheduler
from mmengine.runner import Runner, set_random_seed  # noqa: F401  (the run seeds through here: mmengine stays in this module)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from benchmark.checkpoints import (
    CKPT_FORMAT,
    CKPT_PATTERN,
    CKPT_VERSION,
    check_resume_settings,
    frozen_fingerprint,
    is_own_checkpoint,
    list_checkpoints,
    load_model_state,
    read_checkpoint,
    save_checkpoint,
    trainable_state,
)
from benchmark.method_api import MergeForEval
from benchmark.metrics import per_image_blob, results_delta_m
from benchmark.optim import Schedule, param_groups
from benchmark.peft_tools import merge_for_eval
from benchmark.protocol import Protocol
from benchmark.safeload import CheckpointError  # one error type for every checkpoint problem

MMENGINE_VERSION: str = mmengine.__version__  # for the run record (mmengine is imported here only)

# Fault injection for the test-suite only (tests/test_run_benchmark.py, tests/test_faults.py). Read at the
# moment of use, inert unless set; iterations are global and 0-based.
FAULT_NAN_ITER = "MTPEFT_FAULT_NAN_ITER"  # the total loss becomes NaN at this iteration
FAULT_INF_ITER = "MTPEFT_FAULT_INF_ITER"  # the first task's loss (hence the total) becomes +inf at this iteration
FAULT_KILL_AT_ITER = "MTPEFT_FAULT_KILL_AT_ITER"  # SIGKILL this process before this iteration
FAULT_RANK = "MTPEFT_FAULT_RANK"  # restrict the three above to this rank (default: every rank)
FAULT_KILL_WORKER_SAMPLE = "MTPEFT_FAULT_KILL_WORKER_SAMPLE"  # SIGKILL the data-loader worker loading this index


def _fault_at(name: str, iteration: int) -> bool:
    value = os.environ.get(name)
    if not value or int(value) != iteration:
        return False
    rank = os.environ.get(FAULT_RANK)
    return rank is None or rank == "" or int(rank) == get_dist_info()[0]


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer step when the loss is NaN or infinite."""


class RunAborted(RuntimeError):
    """The run stopped for an operational reason (a crashed data worker, a dead peer process); the message says
    what happened and what to do. The CLI prints it without a traceback and exits 1."""


class DataWorkerError(RunAborted):
    """A data-loader worker process died (killed, out of memory, segfault in a decoder)."""


class DistributedError(RunAborted):
    """A collective operation failed: another process died or did not answer within the timeout."""


# --------------------------------------------------------------------------- model and metric adapters


class EngineModel(BaseModel):
    def __init__(self, net: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self._is_init = True  # never let mmengine re-initialise (timm's Swin has an init_weights)
        self.current_iter = 0

    def forward(self, image: Tensor, mode: str = "tensor", meta: Any = None, **targets: Tensor) -> Any:
        out = self.net(image)
        if mode == "loss":
            losses = self.loss_fn(out, targets)
            if _fault_at(FAULT_NAN_ITER, self.current_iter):
                losses = {**losses, "total": losses["total"] * float("nan")}
            if _fault_at(FAULT_INF_ITER, self.current_iter):
                first = next(t for t in losses if t != "total")
                losses = {**losses, first: losses[first] + float("inf"), "total": losses["total"] + float("inf")}
            logged = {f"l_{t}": v.detach() for t, v in losses.items() if t != "total"}
            return {"loss": losses["total"], **logged}
        if mode == "predict":
            n = image.shape[0]
            return [{t: (out[t][i : i + 1], targets[t][i : i + 1]) for t in out} for i in range(n)]
        return out

    def parse_losses(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        total = losses["loss"]
        if not torch.isfinite(total).all():
            terms = {k[2:]: float(v) for k, v in losses.items() if k.startswith("l_")}
            listed = ", ".join(f"{t}={v:.6g}" for t, v in terms.items())
            bad = [t for t, v in terms.items() if not math.isfinite(v)]
            culprit = (
                f"non-finite term(s): {', '.join(bad)}" if bad else "every term is finite, their weighted sum is not"
            )
            raise NonFiniteLossError(
                f"non-finite loss at iteration {self.current_iter}: total={float(total.detach()):.6g} ({listed}; {culprit}); "
                "the run stops, the last good checkpoint is kept"
            )
        log_vars = {"loss": total.detach(), **{k: v for k, v in losses.items() if k != "loss"}}
        return total, log_vars


class EngineMetric(BaseMetric):
    """Per-image statistics of our meters; reduced once at the end (DDP-safe through mmengine)."""

    def __init__(self, meters: Mapping[str, Any], per_image: list[bytes] | None = None) -> None:
        super().__init__(collect_device="cpu")
        self.meters = dict(meters)
        self.per_image = per_image  # receives each validation's per-image statistics (gzip JSON), in order

    def process(self, data_batch: Any, data_samples: Sequence[dict[str, tuple[Tensor, Tensor]]]) -> None:
        for sample in data_samples:
            stats = {}
            for t, (logits, target) in sample.items():
                s = self.meters[t].stats(logits.float(), target)
                stats[t] = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in s.items()}
            self.results.append(stats)

    def compute_metrics(self, results: list) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, meter in self.meters.items():
            for k, v in meter.reduce([r[t] for r in results]).items():
                out[f"{t}/{k}"] = float(v)
        if self.per_image is not None:
            self.per_image.append(per_image_blob(self.meters, results))
        return out


def split_metrics(flat: Mapping[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, v in flat.items():
        if "/" in key:
            t, m = key.split("/", 1)
            out.setdefault(t, {})[m] = float(v)
    return out


# --------------------------------------------------------------------------- sampling


class EpochSampler(Sampler[int]):
    """Seeded per-epoch shuffle, global remainder dropped, then sharded ``rank::world``."""

    def __init__(self, dataset_len: int, batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.n = dataset_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world = get_dist_info()
        self.epoch = 0
        self.per_rank = (self.n // (batch_size * self.world)) * batch_size
        if self.per_rank == 0:
            raise ValueError(
                f"{self.n} training images cannot fill one batch of {batch_size} per process on {self.world} "
                "process(es); use a smaller batch or more data"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = order[: self.per_rank * self.world]
        return iter(order[self.rank :: self.world])

    def __len__(self) -> int:
        return self.per_rank


# --------------------------------------------------------------------------- data-loader workers


class TrackedDataset(Dataset):
    """Wraps a dataset read by worker processes and records, in shared memory, which sample each worker is
    loading, so that a worker that dies (killed, out of memory, crash in a decoder) can be reported with the
    file it was reading. Attributes (``set_epoch``, ``ids``, ...) are those of the wrapped dataset."""

    def __init__(self, inner: Dataset, workers: int) -> None:
        self.inner = inner
        # one row per worker: (pid, sample index being loaded or -1)
        self.inflight = torch.full((max(workers, 1), 2), -1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:  # during unpickling
            raise AttributeError(name)
        return getattr(inner, name)

    def __getitem__(self, index: int) -> Any:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.inner[index]
        row = self.inflight[info.id]
        row[0], row[1] = os.getpid(), index
        fault = os.environ.get(FAULT_KILL_WORKER_SAMPLE)
        if fault and int(fault) == index:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        out = self.inner[index]
        row[1] = -1
        return out

    def describe(self, index: int) -> str:
        """The sample's image file where the dataset names it, else its index."""
        ids, image_path = getattr(self.inner, "ids", None), getattr(self.inner, "image_path", None)
        if ids is not None and image_path is not None and 0 <= index < len(ids):
            return f"{image_path(index)} (sample {index}, id {ids[index]})"
        return f"sample {index} of {type(self.inner).__name__}"

    def loading(self, pids: Sequence[int] | None = None) -> list[str]:
        """What the workers with these pids (default: all) were loading when they stopped."""
        out = []
        for pid, index in self.inflight.tolist():
            if index >= 0 and (not pids or pid in pids):
                out.append(self.describe(index))
        return out


_WORKER_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)")


def _worker_crash(err: BaseException, datasets: Sequence[Any]) -> DataWorkerError | None:
    """Turn PyTorch's "DataLoader worker (pid X) exited unexpectedly / is killed by signal" into an error that
    names the file being loaded."""
    text = str(err)
    m = _WORKER_DIED.search(text)
    if m is None or not isinstance(err, RuntimeError):
        return None
    pids = [int(x) for x in m.group(1).replace(",", " ").split()]
    files = [f for ds in datasets if isinstance(ds, TrackedDataset) for f in ds.loading(pids)]
    what = "; ".join(files) if files else "an unknown sample (it died outside __getitem__)"
    first = text.strip().splitlines()[0]
    return DataWorkerError(
        f"a data-loader worker died while loading {what}: {first} "
        "If that file is damaged, replace it (benchmark-data check DIR lists bad files); if the worker ran out of "
        "memory, lower --workers. Nothing was written for the unfinished epoch; --resume continues from the last "
        "checkpoint"
    )


_DIST_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout", "socket")


def _distributed_failure(err: BaseException) -> DistributedError | None:
    if not _distributed() or isinstance(err, (NonFiniteLossError, RunAborted)):
        return None
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(err).strip()
    if not (isinstance(err, dist_error) or any(k in text.lower() for k in _DIST_MARKERS)):
        return None
    rank, world = get_dist_info()
    first = text.splitlines()[0] if text else type(err).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # drop gloo's "[.../pair.cc:545] " and advice
    return DistributedError(
        f"rank {rank} of {world}: a collective operation failed, so another process died or did not answer within "
        f"--dist-timeout ({first}). Check that process's log for the cause; rerun with --resume to continue from "
        "the last checkpoint"
    )


def _release_loader_workers(err: BaseException) -> None:
    """Free the data-loader iterators that the failed loop's frames still hold, so their worker processes are
    shut down now. Left to interpreter exit, each worker's join times out (5 s per worker) before the exit."""
    import gc
    import traceback

    traceback.clear_frames(err.__traceback__)  # frame locals only: the printed traceback keeps every line
    gc.collect()


def _translate_failure(err: BaseException, datasets: Sequence[Any]) -> BaseException | None:
    return _worker_crash(err, datasets) or _distributed_failure(err)


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    np_state = np.random.get_state()
    state["numpy"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    state["numpy_pos"] = int(np_state[2])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- hooks


class MergeForEvalHook(Hook):
    """Validate with the method's updates folded into the frozen weights (``merge``: the method's
    ``MethodSpec.merge_for_eval``, by default the generic ``benchmark.peft_tools.merge_for_eval``); the exact
    weights are restored before anything else (checkpointing) sees the model again."""

    priority = "HIGH"  # after_val_epoch: unmerge before BenchmarkHook (LOW) saves a checkpoint

    def __init__(self, net: nn.Module, merge: MergeForEval = merge_for_eval) -> None:
        self.net = net
        self.merge = merge
        self._stack: contextlib.ExitStack | None = None

    def before_val_epoch(self, runner: Runner) -> None:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.merge(self.net))

    def after_val_epoch(self, runner: Runner, metrics: dict[str, float] | None = None) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None


class BenchmarkHook(Hook):
    """Epoch seeding of the data, checkpoints, resume, validation history and timing."""

    priority = "LOW"

    def __init__(
        self,
        engine_model: EngineModel,
        ckpt_dir: Path,
        meta: dict[str, Any],
        protocol: Protocol,
        tasks: Sequence[str],
        ckpt_interval: int = 1,
        keep: int = 2,
        resume: bool = False,
    ) -> None:
        self.engine_model = engine_model
        self.ckpt_dir = ckpt_dir
        self.meta = meta
        self.protocol = protocol
        self.tasks = tuple(tasks)
        self.ckpt_interval = ckpt_interval
        self.keep = keep
        self.resume = resume
        self.history: list[dict[str, Any]] = []
        self.resumed_from: str | None = None
        self.train_compute_s = 0.0
        self.train_images = 0
        self._t0 = 0.0
        self._fingerprint = ""
        self._training = False

    # -- resume
    def after_train(self, runner: Runner) -> None:
        self._training = False

    def before_train(self, runner: Runner) -> None:
        self._training = True
        self._fingerprint = frozen_fingerprint(self.engine_model.net)
        if not self.resume:
            return
        for path in reversed(list_checkpoints(self.ckpt_dir)):
            try:
                ckpt = read_checkpoint(path)
                if not is_own_checkpoint(ckpt):
                    raise CheckpointError(f"{path}: not a checkpoint of this harness")
                check_resume_settings(ckpt, self.meta, path)
                load_model_state(self.engine_model.net, ckpt, str(path))
            except CheckpointError as e:
                print_log(f"resume: skipping unusable checkpoint: {e}", logger="current", level=logging.WARNING)
                continue
            runner.optim_wrapper.load_state_dict(ckpt["optimizer"])
            for sched, state in zip(runner.param_schedulers, ckpt["schedulers"], strict=True):
                sched.load_state_dict(state)
            runner.train_loop._epoch = ckpt["epoch"]
            runner.train_loop._iter = ckpt["iter"]
            self.history = list(ckpt.get("history", []))
            self.train_compute_s = float(ckpt.get("train_compute_s", 0.0))
            self.train_images = int(ckpt.get("train_images", 0))
            _set_rng_state(ckpt["rng"])
            self.resumed_from = str(path)
            print_log(f"resumed from {path} (epoch {ckpt['epoch']}, iteration {ckpt['iter']})", logger="current")
            return
        print_log("resume: no usable checkpoint found, starting from scratch", logger="current", level=logging.WARNING)

    # -- per epoch / iteration
    def before_train_epoch(self, runner: Runner) -> None:
        ds = runner.train_dataloader.dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(runner.epoch)

    def before_train_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None) -> None:
        self.engine_model.current_iter = runner.iter
        if _fault_at(FAULT_KILL_AT_ITER, runner.iter):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        self._t0 = time.perf_counter()

    def after_train_iter(self, runner: Runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.train_compute_s += time.perf_counter() - self._t0
        _, world = get_dist_info()
        self.train_images += int(data_batch["image"].shape[0]) * world

    def after_train_epoch(self, runner: Runner) -> None:
        epoch = runner.epoch + 1  # mmengine increments the epoch after this hook
        if not self._val_due(runner, epoch):
            self._maybe_save(runner, epoch)

    def _val_due(self, runner: Runner, epoch: int) -> bool:
        loop = runner.train_loop
        return (
            runner.val_loop is not None
            and epoch >= loop.val_begin
            and (epoch % loop.val_interval == 0 or epoch == loop.max_epochs)
        )

    def _maybe_save(self, runner: Runner, epoch: int) -> None:
        """Checkpoint at the end of an epoch, after its validation if one is due, so that a resumed run
        replays exactly what an uninterrupted one does (history and RNG state included)."""
        if epoch % self.ckpt_interval and epoch != runner.max_epochs:
            return
        rank, _ = get_dist_info()
        if rank != 0:
            return
        payload = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            **self.meta,
            "model": trainable_state(self.engine_model.net),
            "frozen_fingerprint": self._fingerprint,
            "optimizer": runner.optim_wrapper.state_dict(),
            "schedulers": [s.state_dict() for s in runner.param_schedulers],
            "epoch": epoch,
            "iter": runner.iter,
            "rng": _rng_state(),
            "history": self.history,
            "train_compute_s": self.train_compute_s,
            "train_images": self.train_images,
        }
        save_checkpoint(self.ckpt_dir / f"epoch_{epoch}.pth", payload)
        # rotation: only this harness's names (epoch_<N>.pth, in a folder this run owns: benchmark.workdir), and
        # only checkpoints up to this one; a later one (left by a run that a corrupt checkpoint set back) stays
        # until this run overwrites it
        ours = [p for p in list_checkpoints(self.ckpt_dir) if int(CKPT_PATTERN.match(p.name).group(1)) <= epoch]
        for old in ours[: -self.keep]:
            old.unlink(missing_ok=True)

    def after_val_epoch(self, runner: Runner, metrics: dict[str, float] | None = None) -> None:
        m = split_metrics(metrics or {})
        entry: dict[str, Any] = {"epoch": runner.epoch, "iteration": runner.iter, "metrics": m}
        try:
            entry["delta_m"] = results_delta_m(m, self.protocol)
        except KeyError:
            entry["delta_m"] = None
        self.history.append(entry)
        if entry["delta_m"] is not None:
            print_log(f"validation after epoch {runner.epoch}: Δm = {entry['delta_m']:+.3f}%", logger="current")
        if self._training:  # runner.epoch is already the number of finished epochs here
            self._maybe_save(runner, runner.epoch)


# --------------------------------------------------------------------------- optimiser and schedule


def wrap_optimizer(
    optimizer: torch.optim.Optimizer, device: str, amp_dtype: str | None, clip_grad: float | None
) -> OptimWrapper:
    """The update a run uses: on CUDA with ``amp_dtype`` ("float16" / "bfloat16") autocast plus mmengine's
    dynamic loss scaling (scaled backward, unscale, clip, step or skip on non-finite gradients, rescale);
    otherwise fp32 (AMP is never used on the CPU). Gradients are clipped to ``clip_grad`` (L2) either way."""
    clip = dict(max_norm=clip_grad, norm_type=2) if clip_grad is not None else None
    if device == "cuda" and amp_dtype:
        return AmpOptimWrapper(optimizer=optimizer, clip_grad=clip, dtype=amp_dtype)
    return OptimWrapper(optimizer=optimizer, clip_grad=clip)


def lr_schedulers(schedule: Schedule, optim_wrapper: OptimWrapper) -> list[Any]:
    """The mmengine schedulers that follow ``schedule`` (stepped after every train iteration)."""
    return [WarmupCosineLR(optim_wrapper, schedule)]


class WarmupCosineLR(LRSchedulerMixin, _ParamScheduler):
    """mmengine scheduler setting every group's rate to ``Schedule.lr_at(step)`` after each iteration.

    Stepped by mmengine's ``ParamSchedulerHook`` after every train iteration (``by_epoch=False``); its state is
    the step counters only (plain numbers, so checkpoints stay loadable with ``weights_only=True``).
    """

    def __init__(self, optimizer: Any, schedule: Schedule) -> None:
        self.peak_lr, self.warmup_lr, self.min_lr = schedule.peak_lr, schedule.warmup_lr, schedule.min_lr
        self.warmup_iters, self.total_iters = schedule.warmup_iters, schedule.total_iters
        self.official_lr_lag = schedule.official_lr_lag
        super().__init__(optimizer, begin=0, by_epoch=False)

    def _get_value(self) -> list[float]:
        s = Schedule(
            self.peak_lr, self.warmup_lr, self.min_lr, self.warmup_iters, self.total_iters, self.official_lr_lag
        )
        lr = s.lr_at(self.last_step)
        return [lr for _ in self.optimizer.param_groups]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # only the counters: the rates follow from this run's settings (which --resume checks), and a checkpoint
        # written before this class (two chained mmengine schedulers) carries the same counters
        for key in ("last_step", "_global_step", "_last_value"):
            if key in state_dict:
                setattr(self, key, state_dict[key])


def last_grad_norm() -> float:
    """The gradient norm the last optimiser step logged (``train/grad_norm`` in mmengine's message hub)."""
    from mmengine.logging import MessageHub

    return float(MessageHub.get_current_instance().get_scalar("train/grad_norm").current())


def build_optim_wrapper(
    net: nn.Module,
    peak_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    clip_grad: float | None,
    device: str = "cpu",
    amp_dtype: str | None = None,
) -> OptimWrapper:
    """The optimiser of a run: AdamW over ``param_groups``, gradients clipped to ``clip_grad`` (L2, all groups)."""
    optimizer = torch.optim.AdamW(param_groups(net, weight_decay), lr=peak_lr, betas=betas, eps=eps)
    return wrap_optimizer(optimizer, device, amp_dtype, clip_grad)


# --------------------------------------------------------------------------- the run


@dataclass
class EngineSetup:
    net: nn.Module
    loss_fn: nn.Module
    meters: Mapping[str, Any]
    protocol: Protocol
    tasks: Sequence[str]
    work_dir: Path
    seed: int
    device: str
    val_dataset: Dataset
    train_dataset: Dataset | None = None
    batch_size: int = 32  # per process
    val_batch_size: int = 32
    epochs: int = 300
    val_interval: int = 5
    workers: int = 4
    schedule: Schedule | None = None
    amp_dtype: str | None = None  # "float16" / "bfloat16" on CUDA, None = fp32
    clip_grad: float = 5.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    resume: bool = False
    ckpt_interval: int = 1
    log_interval: int = 10
    meta: dict[str, Any] = field(default_factory=dict)
    collate_fn: Any = None
    # evaluation with merged adapters: the method's ``MethodSpec.merge_for_eval`` (the generic merge by default)
    merge: MergeForEval = merge_for_eval
    # one entry per validation run by this process (rank 0), in the order of the history entries it appends
    per_image: list[bytes] = field(default_factory=list)


@dataclass
class EngineOutcome:
    history: list[dict[str, Any]]
    train_seconds: float
    eval_seconds: float
    train_compute_s: float
    train_images: int
    peak_mem_bytes: int
    resumed_from: str | None
    final_metrics: dict[str, dict[str, float]]
    peak_mem_reserved_bytes: int | None = None  # CUDA: the caching allocator's peak (None on the CPU)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _runner_common(s: EngineSetup, model: EngineModel) -> dict[str, Any]:
    dist = _distributed()
    val_sampler = _val_sampler(s.val_dataset)
    val_loader = DataLoader(
        _tracked(s.val_dataset, s.workers),
        batch_size=s.val_batch_size,
        sampler=val_sampler,
        num_workers=s.workers,
        collate_fn=s.collate_fn,
        persistent_workers=False,
    )
    kw: dict[str, Any] = dict(
        model=model,
        work_dir=str(s.work_dir),
        val_dataloader=val_loader,
        val_cfg=dict(),
        val_evaluator=Evaluator(EngineMetric(s.meters, s.per_image)),
        default_hooks=dict(
            checkpoint=None,
            logger=dict(type="LoggerHook", interval=s.log_interval),
        ),
        launcher="pytorch" if dist else "none",
        env_cfg=dict(
            cudnn_benchmark=s.device == "cuda", dist_cfg=dict(backend="nccl" if s.device == "cuda" else "gloo")
        ),
        randomness=dict(seed=s.seed, diff_rank_seed=True),
        log_level="INFO",
    )
    if dist:
        # mmengine reads the wrapper config from ``cfg``; device_ids=None is what CPU (gloo) DDP needs
        kw["cfg"] = dict(
            model_wrapper_cfg=dict(
                type="MMDistributedDataParallel",
                device_ids=None if s.device == "cpu" else [torch.cuda.current_device()],
                broadcast_buffers=False,
                # some methods own trainable parameters that no output uses (MTLoRA: the last shared fc2 LoRA)
                find_unused_parameters=True,
            )
        )
    return kw


@contextlib.contextmanager
def runner_device(device: str) -> Iterator[None]:
    """Build a Runner on ``device``: mmengine moves the model to the first accelerator it finds
    (``mmengine.device.get_device()``, fixed at import) whatever the run asked for, so ``--device cpu`` on a
    GPU machine would train and evaluate on the GPU. The device mmengine reports is the run's own meanwhile."""
    import mmengine.device.utils as mm_device

    saved = mm_device.DEVICE
    mm_device.DEVICE = device
    try:
        yield
    finally:
        mm_device.DEVICE = saved


def _tracked(dataset: Dataset, workers: int) -> Dataset:
    return TrackedDataset(dataset, workers) if workers > 0 else dataset


def _val_sampler(dataset: Dataset) -> Sampler[int]:
    from mmengine.dataset import DefaultSampler

    # pads to a multiple of the world size; mmengine's collect_results interleaves and truncates the padding
    return DefaultSampler(dataset, shuffle=False, round_up=True)


def _peak_reserved(device: str) -> int | None:
    return int(torch.cuda.max_memory_reserved()) if device == "cuda" else None


def _peak_mem(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def train(s: EngineSetup) -> EngineOutcome:
    """Train with the protocol's optimiser and schedule, validate every ``val_interval`` epochs and at the end."""
    assert s.train_dataset is not None and s.schedule is not None
    model = EngineModel(s.net, s.loss_fn)
    ckpt_dir = s.work_dir / "checkpoints"
    train_loader = DataLoader(
        _tracked(s.train_dataset, s.workers),
        batch_size=s.batch_size,
        sampler=EpochSampler(len(s.train_dataset), s.batch_size, s.seed, shuffle=True),
        num_workers=s.workers,
        collate_fn=s.collate_fn,
        drop_last=True,
        persistent_workers=False,  # workers must see the dataset's epoch (set per epoch for augmentation seeds)
    )
    optim_wrapper = build_optim_wrapper(
        s.net, s.schedule.peak_lr, s.weight_decay, s.betas, s.eps, s.clip_grad, s.device, s.amp_dtype
    )
    hook = BenchmarkHook(model, ckpt_dir, s.meta, s.protocol, s.tasks, s.ckpt_interval, resume=s.resume)
    kw = _runner_common(s, model)
    with runner_device(s.device):
        runner = Runner(
            train_dataloader=train_loader,
            train_cfg=dict(by_epoch=True, max_epochs=s.epochs, val_interval=s.val_interval),
            optim_wrapper=optim_wrapper,
            param_scheduler=lr_schedulers(s.schedule, optim_wrapper),
            custom_hooks=[hook, MergeForEvalHook(s.net, s.merge)],
            **kw,
        )
    t0 = time.perf_counter()
    try:
        runner.train()
    except Exception as e:
        _release_loader_workers(e)
        clear = _translate_failure(e, [train_loader.dataset, kw["val_dataloader"].dataset])
        if clear is None:
            raise
        raise clear from e
    train_seconds = time.perf_counter() - t0
    final = hook.history[-1]["metrics"] if hook.history else {}
    return EngineOutcome(
        history=hook.history,
        train_seconds=train_seconds,
        eval_seconds=0.0,
        train_compute_s=hook.train_compute_s,
        train_images=hook.train_images,
        peak_mem_bytes=_peak_mem(s.device),
        resumed_from=hook.resumed_from,
        final_metrics=final,
        peak_mem_reserved_bytes=_peak_reserved(s.device),
    )


def evaluate(s: EngineSetup) -> EngineOutcome:
    """Evaluate the model as it is (weights already loaded) on the validation set."""
    model = EngineModel(s.net, s.loss_fn)
    kw = _runner_common(s, model)
    with runner_device(s.device):
        runner = Runner(custom_hooks=[MergeForEvalHook(s.net, s.merge)], **kw)
    t0 = time.perf_counter()
    try:
        flat = runner.val()
    except Exception as e:
        _release_loader_workers(e)
        clear = _translate_failure(e, [kw["val_dataloader"].dataset])
        if clear is None:
            raise
        raise clear from e
    seconds = time.perf_counter() - t0
    metrics = split_metrics(flat)
    entry: dict[str, Any] = {"epoch": None, "iteration": None, "metrics": metrics}
    try:
        entry["delta_m"] = results_delta_m(metrics, s.protocol)
    except KeyError:
        entry["delta_m"] = None
    return EngineOutcome(
        history=[entry],
        train_seconds=0.0,
        eval_seconds=seconds,
        train_compute_s=0.0,
        train_images=0,
        peak_mem_bytes=_peak_mem(s.device),
        resumed_from=None,
        final_metrics=metrics,
        peak_mem_reserved_bytes=_peak_reserved(s.device),
    )
