"""What a method costs: train step, the reference step, evaluation throughput, peak memory, the data pipeline.

    python -m benchmark.perf --methods full_ft,decoders_only,lora,mtlora --img 448 --batch 2 --steps 5 --json perf.json

A method entry is a registered method name, optionally with config overrides in brackets, e.g.
``lora[rank=64,alpha=64,dropout=0]`` or ``mtlora[shared_rank=[16,16,16,16]]``; ``_form=NAME`` in the brackets
forces one LoRA form (``benchmark.lora_ops.FORMS``) on the method's LoRA layers and ``_checkpoint=all`` (or stage
numbers, ``_checkpoint=1+2``) turns on the method's activation checkpointing (its registry entry's
``activation_checkpointing``). Two entries are internal to this tool: ``reference`` (see below) and
``peft_lora_reference[...]``, the ``lora`` config injected with peft's own LoRA layers (the registry entry's
``peft_reference`` variant), the anchor the fast ``lora`` layers are compared with. ``reference`` and ``full_ft`` are always
measured: every step time is also given as a ratio to them.

Measured per method, all in one process with the methods interleaved (in each round every method runs once,
the order rotating), warm-up rounds dropped, medians over the remaining rounds:

- train step: forward, multi-task loss, backward, gradient clipping (max norm 5, as the protocol) and an AdamW
  step on the trainable parameters;
- the reference step: the model with a frozen backbone and trained decoders, backward through the backbone's
  activations (the input image requires a gradient) but no backbone weight gradients: the cost floor of any
  adapter method;
- the FLOPs of one train step (matrix products and convolutions, forward and backward, counted by
  ``torch.utils.flop_counter`` in an untimed step): the arithmetic a method cannot avoid, so that a time ratio
  can be read against its FLOP ratio;
- evaluation images/s (eval mode, no gradients, forward + the protocol's meters' ``stats``) and forward-only
  images/s, both with LoRA-family updates merged into the weights (``benchmark.peft_tools.merge_for_eval``), plus the
  unmerged forward;
- the meters alone: milliseconds per batch each task's meter takes for its ``stats`` on the reference's outputs
  (``meters_ms``), what evaluation adds to the forward for every method alike;
- peak memory, each method in a fresh subprocess (two train steps; ``--memory-jobs`` at a time): on a GPU the
  CUDA max allocated (``peak_mem_bytes``) and max reserved by the caching allocator (``peak_reserved_bytes``),
  both above what the process held before building the model; on the CPU the
  peak resident set size above the bare runtime's (``peak_mem_bytes``: weights, optimiser state, gradients,
  activations and what malloc keeps cached) and, beside it, the peak of live tensor bytes over a third step from
  the profiler's memory timeline (``tensor_peak_bytes``, the CPU analog of CUDA's max allocated);
- the data pipeline: images/s of one worker (1 torch and 1 OpenCV thread) loading and transforming training
  samples at the image size (a generated dataset in the PASCAL_MT layout unless ``--data`` names one).

Precision: fp32 by default; ``--amp bfloat16`` (a bare ``--amp``, as before) or ``--amp float16`` autocast, the
latter with a dynamic ``GradScaler`` (scaled backward, unscale, clip, step or skip, update) as ``run_benchmark``'s
AMP does; the JSON's ``config.amp`` and ``config.grad_scaler`` say which, and fp16 entries count the steps the
scaler skipped (``scaler_skipped_steps``). Forward and evaluation run under the same autocast unless
``--eval-fp32`` (run_benchmark's evaluation is fp32); ``config.eval_amp`` records it.

``--train-only`` skips the forward and evaluation rounds (with ``--compile``: one compiled graph per model).
``--backbone-only`` times the Swin alone (its features into a mean-square loss; no decoders, no evaluation), the
setting of the issue's reference figures on a plain timm Swin-T.

On Linux the timing process asks glibc malloc to keep freed memory (``mallopt``) so that large activations are
not returned to and faulted back from the kernel at every step (what CUDA's caching allocator does on a GPU);
``--no-malloc-tuning`` turns that off. Memory subprocesses never tune malloc.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmark.build import build_net as core_build_net
from benchmark.build import no_checkpointing_message
from benchmark.losses import MultiTaskLoss
from benchmark.method_api import METHODS, MethodSpec, apply_overrides, parse_checkpoint_stages
from benchmark.model import SWIN_VARIANTS, model_config_for
from benchmark.optim import param_groups
from benchmark.params import count_parameters
from benchmark.protocol import PASCAL_CONTEXT, PROTOCOLS, Protocol, get_protocol
from benchmark.tasks import kind_of

SCHEMA = 1
AMP_DTYPES = (None, "bfloat16", "float16")
ANCHORS = ("reference", "full_ft")
# entries internal to this tool: the registered method they build, and the variant of its applier (None: its apply)
INTERNAL: dict[str, tuple[str, str | None]] = {
    "reference": ("decoders_only", None),
    "peft_lora_reference": ("lora", "peft_reference"),
}
CLIP_GRAD = PASCAL_CONTEXT.clip_grad  # docs/protocol.md 2.4 (the same in every protocol of this harness)
WEIGHT_DECAY = PASCAL_CONTEXT.weight_decay


class PerfError(ValueError):
    """Bad input to the perf tool (unknown method, malformed entry, impossible image size, ...)."""


# --------------------------------------------------------------------------- method entries


@dataclass(frozen=True)
class Entry:
    label: str  # as given on the command line, the key of every result
    name: str  # registered method name, or one of INTERNAL
    overrides: tuple[str, ...] = ()  # key=value config overrides
    form: str | None = None  # forced LoRA form (the _form pseudo-override)
    checkpoint: bool | frozenset[int] = False  # MTLoRA's activation checkpointing (the _checkpoint pseudo-override)


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets: ``a[x=1,y=[2,3]],b`` -> ``['a[x=1,y=[2,3]]', 'b']``."""
    from benchmark.keyvalue import split_top_level

    try:
        parts = split_top_level(text, sep, strict=True)
    except ValueError as e:
        raise PerfError(f"--methods {text!r}: {e}") from None
    return [p.strip() for p in parts if p.strip()]


def parse_entry(text: str) -> Entry:
    from benchmark.lora_ops import FORMS

    name, overrides = text, []
    if "[" in text:
        if not text.endswith("]"):
            raise PerfError(f"method entry {text!r}: expected NAME or NAME[key=value,...]")
        name, inner = text[: text.index("[")], text[text.index("[") + 1 : -1]
        overrides = split_top(inner)
    if ":" in text:
        raise PerfError(f"method entry {text!r}: ':' is reserved for --pair")
    form, ckpt = None, False
    rest = []
    for o in overrides:
        if o.startswith("_form="):
            form = o.split("=", 1)[1]
            if form not in FORMS:
                raise PerfError(f"method entry {text!r}: _form={form!r} is not one of {list(FORMS)}")
        elif o.startswith("_checkpoint="):
            try:
                ckpt = parse_checkpoint_stages(o.split("=", 1)[1])
            except ValueError as e:
                raise PerfError(f"method entry {text!r}: {e}") from None
        else:
            rest.append(o)
    try:
        spec(name)
    except KeyError as e:
        raise PerfError(f"method entry {text!r}: {e.args[0]}") from None
    entry = Entry(text, name, tuple(rest), form, ckpt)
    method_config(entry)  # bad overrides fail here, before anything runs
    return entry


def spec(name: str) -> MethodSpec:
    """The registry entry an entry name builds: a registered method, or an internal entry's method with its
    variant applier in place of ``apply``; a KeyError names the known ones."""
    method, variant = INTERNAL.get(name, (name, None))
    found = METHODS.get(method)
    return found if variant is None else dataclasses.replace(found, apply=found.variants[variant])


def method_config(entry: Entry, protocol: Protocol = PASCAL_CONTEXT) -> Any:
    """The entry's validated method config (``lora``'s for peft_lora_reference, decoders_only's for reference)."""
    try:
        cfg = apply_overrides(spec(entry.name).default_config(), entry.overrides)
        cfg.validate(protocol.task_names)
    except ValueError as e:
        raise PerfError(f"method entry {entry.label!r}: {e}") from None
    return cfg


def parse_methods(text: str) -> list[Entry]:
    """Entries of ``--methods``, the anchors (reference, full_ft) first when missing; duplicates are an error."""
    entries = [parse_entry(t) for t in split_top(text)]
    labels = [e.label for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise PerfError(f"--methods: {dup} given twice")
    missing = [Entry(a, a) for a in ANCHORS if a not in labels]
    return missing + entries


# --------------------------------------------------------------------------- building and stepping one method


def model_config(backbone: str, img: int, protocol: Protocol = PASCAL_CONTEXT) -> Any:
    """The multi-task Swin with one head per task of ``protocol``."""
    try:
        return model_config_for(backbone, {t.name: t.out_channels for t in protocol.tasks}, img_size=img)
    except (KeyError, ValueError) as e:
        raise PerfError(f"--backbone {backbone} --img {img}: {e.args[0]}") from None


def build_net(entry: Entry, backbone: str, img: int, protocol: Protocol = PASCAL_CONTEXT) -> nn.Module:
    """The entry's model on a fresh multi-task Swin (seed 0), its trainable set as the method defines it."""
    method_cfg = method_config(entry, protocol)
    if entry.checkpoint and spec(entry.name).activation_checkpointing is None:
        raise PerfError(f"method entry {entry.label!r}: _checkpoint given but {no_checkpointing_message(entry.name)}")
    torch.manual_seed(0)
    try:
        net = core_build_net(
            spec(entry.name), method_cfg, model_config(backbone, img, protocol), None, entry.checkpoint
        )
    except ValueError as e:
        raise PerfError(f"method entry {entry.label!r}: {e}") from None
    if entry.form is not None:
        layers = [m for m in net.modules() if hasattr(m, "form")]
        if not layers:
            raise PerfError(f"method entry {entry.label!r}: _form given but the method has no LoRA layers")
        for m in layers:
            m.form = entry.form
    return net


def make_batch(
    batch: int, img: int, device: torch.device, seed: int = 0, protocol: Protocol = PASCAL_CONTEXT
) -> tuple[Tensor, dict[str, Tensor]]:
    """A random image batch and the protocol's targets, each its task kind's synthetic labels (some 255 = ignore)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, img, img, generator=g)
    targets = {t.name: kind_of(t).random_target(t, batch, img, g) for t in protocol.tasks}
    return image.to(device), {t: v.to(device) for t, v in targets.items()}


@dataclass
class Bench:
    """One method ready to step: model, optimiser, loss, meters and a fixed batch."""

    entry: Entry
    net: nn.Module
    device: torch.device
    amp: str | None = None  # autocast dtype: "bfloat16", "float16" (with a GradScaler, as a real run) or None
    compile: bool = False
    channels_last: bool = False
    batch: int = 2
    img: int = 448
    backbone_only: bool = False  # time the backbone alone (features -> a mean-square loss), no decoders, no eval
    eval_amp: bool = True  # forward / evaluation under the training autocast (False: fp32, as run_benchmark evaluates)
    protocol: Protocol = PASCAL_CONTEXT  # the tasks: targets, loss and meters (the net must have their heads)
    image: Tensor = field(init=False)
    targets: dict[str, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        from benchmark.metrics import build_meters

        self.net.to(self.device)
        self.image, self.targets = make_batch(self.batch, self.img, self.device, protocol=self.protocol)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.image = self.image.contiguous(memory_format=torch.channels_last)
        self.train_image = self.image.clone().requires_grad_(self.entry.name == "reference")
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(param_groups(self.net, WEIGHT_DECAY), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
        self.loss = MultiTaskLoss(self.protocol.tasks)
        self.meters = build_meters(self.protocol.tasks)
        module = self.net.backbone if self.backbone_only else self.net
        self.fn: Callable[[Tensor], Any] = torch.compile(module) if self.compile else module
        if self.amp not in AMP_DTYPES:
            raise PerfError(f"--amp {self.amp!r}: expected one of {[d for d in AMP_DTYPES if d]}")
        # fp16 needs loss scaling, as the engine's AmpOptimWrapper does (dynamic GradScaler; bf16 does not need it)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp == "float16" else None
        self.skipped_steps = 0  # steps the GradScaler skipped (non-finite scaled gradients)

    def _autocast(self, train: bool = True) -> contextlib.AbstractContextManager[Any]:
        if not self.amp or not (train or self.eval_amp):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.amp))

    def train_step(self) -> float:
        self.net.train()
        with self._autocast():
            out = self.fn(self.train_image)
            if self.backbone_only:
                loss = sum(f.float().square().mean() for f in _features(out))
            else:
                loss = self.loss({t: o.float() for t, o in out.items()}, self.targets)["total"]
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, CLIP_GRAD)
            self.opt.step()
        else:  # the order of mmengine's AmpOptimWrapper: scaled backward, unscale, clip, step (or skip), update
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, CLIP_GRAD)
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.skipped_steps += int(self.scaler.get_scale() < scale)  # the scale drops only on a skipped step
        self.train_image.grad = None
        return float(loss.detach())

    @torch.no_grad()
    def forward(self) -> Any:
        self.net.eval()
        with self._autocast(train=False):
            return self.fn(self.image)

    @torch.no_grad()
    def eval_step(self) -> None:
        if self.backbone_only:
            raise RuntimeError("no evaluation in backbone-only mode: the meters need the decoders' outputs")
        out = self.forward()
        for t, m in self.meters.items():
            m.stats(out[t].float(), self.targets[t])


def make_bench(entry: Entry, args: argparse.Namespace, compile: bool | None = None) -> Bench:
    """The entry's model built and wrapped as the command line says (``compile`` overrides ``--compile``)."""
    protocol = get_protocol(args.protocol)
    return Bench(
        entry,
        build_net(entry, args.backbone, args.img, protocol),
        torch.device(args.device),
        args.amp,
        args.compile if compile is None else compile,
        args.channels_last,
        args.batch,
        args.img,
        args.backbone_only,
        not args.eval_fp32,
        protocol,
    )


def meter_times(bench: Bench, rounds: int) -> dict[str, float]:
    """Median milliseconds per batch of each task's meter ``stats`` on ``bench``'s eval outputs (one warm-up call
    each): the part of an evaluation step that does not depend on the method."""
    out = bench.forward()
    times: dict[str, float] = {}
    for t, meter in bench.meters.items():
        pred = out[t].float()
        meter.stats(pred, bench.targets[t])
        samples = []
        for _ in range(max(rounds, 1)):
            start = time.perf_counter()
            meter.stats(pred, bench.targets[t])
            samples.append(time.perf_counter() - start)
        times[t] = 1000.0 * _median(samples)
    return times


def train_step_flops(bench: Bench) -> int:
    """Floating-point operations of one train step of ``bench``: the matrix products and convolutions (forward
    and backward, ``torch.utils.flop_counter``; element-wise work is not counted). The arithmetic floor of the
    step: a time ratio well above the FLOP ratio points at overhead, one near it at the method's own arithmetic."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    fn = bench.fn
    bench.fn = bench.net.backbone if bench.backbone_only else bench.net  # eager: compiling changes no arithmetic
    try:
        with counter:
            bench.train_step()
    finally:
        bench.fn = fn
    return int(counter.get_total_flops())


def _features(out: Any) -> list[Tensor]:
    """The stage features of a backbone output: a list, or {task: list} with per-task streams (MTLoRA)."""
    if isinstance(out, dict):
        return [f for feats in out.values() for f in feats]
    return list(out)


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    benches: Sequence[Bench],
    fn: Callable[[Bench], Any],
    rounds: int,
    warmup: int,
    what: str,
    around: Callable[[Bench], contextlib.AbstractContextManager[Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds of ``fn(bench)`` per method over ``rounds`` rounds after ``warmup`` rounds, methods interleaved."""
    times: dict[str, list[float]] = {b.entry.label: [] for b in benches}
    n = len(benches)
    for r in range(warmup + rounds):
        order = [benches[(i + r) % n] for i in range(n)]  # rotate, so no method always follows the same one
        for b in order:
            with around(b) if around is not None else contextlib.nullcontext():
                _sync(b.device)
                t0 = time.perf_counter()
                fn(b)
                _sync(b.device)
                dt = time.perf_counter() - t0
            if r >= warmup:
                times[b.entry.label].append(dt)
        tag = "warm-up" if r < warmup else "round"
        k = r + 1 if r < warmup else r - warmup + 1
        print(f"[perf] {what}: {tag} {k}/{warmup if r < warmup else rounds} done", file=sys.stderr, flush=True)
    return times


def tune_malloc() -> bool:
    """Keep freed memory in glibc's heap (no mmap for large blocks, no trimming); False where not glibc."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


# --------------------------------------------------------------------------- memory (fresh process per method)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _allocation_peak(step: Callable[[], Any]) -> int | None:
    """Peak bytes of live CPU tensors while ``step`` runs, from the profiler's memory timeline (tensors alive
    before it included): the CPU analog of CUDA's max allocated, blind to malloc's caching. None if the
    (private) timeline API is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
            step()
        _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline("cpu")
        return int(max(sum(s) for s in sizes))
    except Exception:  # the timeline is a private API: degrade to the RSS figures
        return None


def profile_step(entry: Entry, args: argparse.Namespace) -> str:
    """torch.profiler's table (self time per operator, largest first) of one train step after ``--warmup`` + 1."""
    from torch.profiler import ProfilerActivity, profile

    model_config(args.backbone, args.img, get_protocol(args.protocol))
    device = torch.device(args.device)
    if device.type == "cpu" and args.malloc_tuning:
        tune_malloc()
    bench = make_bench(entry, args)
    for _ in range(args.warmup + 1):
        bench.train_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        bench.train_step()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    head = f"{entry.label}: one train step ({args.backbone}, {args.img} px, batch {args.batch}, {args.device})"
    return head + "\n" + prof.key_averages().table(sort_by=key, row_limit=args.profile_rows)


def memory_child(entry: Entry, args: argparse.Namespace) -> dict[str, int]:
    """Run in a fresh process: build the method, take two train steps (a third on the CPU), report peak memory.

    CUDA: ``peak_mem_bytes`` = max allocated. CPU: ``peak_mem_bytes`` = peak RSS over building and two steps
    minus the RSS of the bare runtime (torch alone holds ~0.7 GB): weights, optimiser state, gradients,
    activations and what malloc keeps cached; ``peak_rss_bytes`` is the raw process peak; ``tensor_peak_bytes``
    = the peak of live tensor bytes during a third, profiled step (:func:`_allocation_peak`), blind to malloc.
    """
    import benchmark.metrics  # noqa: F401  (everything the steps import, loaded before the baseline)

    METHODS.load()  # every plug-in imported before the baseline, too

    device = torch.device(args.device)
    out: dict[str, int] = {}
    if device.type == "cuda":
        runtime = torch.cuda.memory_allocated(device)
        runtime_reserved = torch.cuda.memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        runtime = _rss_bytes()
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); CPU memory needs Linux")
    bench = make_bench(entry, args, compile=False)
    built = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()
    for _ in range(2):  # the second step holds the optimiser state too
        bench.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - runtime
        # what the caching allocator took from the device: what other processes on the GPU cannot use
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device) - runtime_reserved
    else:
        peak_rss = _peak_rss_bytes()  # read before the profiled step, whose bookkeeping would count
        out.update(peak_rss_bytes=peak_rss, runtime_rss_bytes=runtime, peak_mem_bytes=peak_rss - runtime)
        alloc = _allocation_peak(bench.train_step)  # a third, profiled step
        if alloc is not None:
            out["tensor_peak_bytes"] = alloc
    out["model_mem_bytes"] = built - runtime
    return {k: int(v) for k, v in out.items()}


def _child_args(args: argparse.Namespace) -> list[str]:
    out = [
        "--backbone",
        args.backbone,
        "--img",
        str(args.img),
        "--batch",
        str(args.batch),
        "--protocol",
        args.protocol,
    ]
    out += ["--device", args.device, "--threads", str(args.threads)]
    out += ["--amp", args.amp] if args.amp else []
    out += ["--channels-last"] if args.channels_last else []
    return out + (["--backbone-only"] if args.backbone_only else [])


def measure_memory_all(entries: Sequence[Entry], args: argparse.Namespace) -> dict[str, dict[str, int]]:
    """Each entry's memory in its own fresh process, ``--memory-jobs`` processes at a time (peaks are per
    process, so parallel children do not disturb each other's figures). A child that fails while others run
    (say, out of GPU memory because of them) is rerun alone; a failure alone is an error."""
    from concurrent.futures import ThreadPoolExecutor

    out: dict[str, dict[str, int]] = {}
    failed: list[Entry] = []

    def one(e: Entry) -> None:
        print(f"[perf] memory: {e.label}", file=sys.stderr, flush=True)
        try:
            out[e.label] = measure_memory(e, args)
        except RuntimeError:
            if args.memory_jobs == 1:
                raise
            failed.append(e)

    with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
        list(pool.map(one, entries))
    for e in failed:
        print(f"[perf] memory: {e.label} again, alone", file=sys.stderr, flush=True)
        out[e.label] = measure_memory(e, args)
    return {e.label: out[e.label] for e in entries}


def measure_memory(entry: Entry, args: argparse.Namespace) -> dict[str, int]:
    cmd = [sys.executable, "-m", "benchmark.perf", "--memory-child", entry.label, *_child_args(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(k, None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"memory subprocess for {entry.label!r} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- data pipeline


def data_throughput(
    img: int,
    n_images: int,
    data_dir: str | None,
    size_range: tuple[int, int],
    workdir: Path,
    protocol: Protocol = PASCAL_CONTEXT,
) -> dict[str, Any]:
    """Images/s of one data-loader worker: load a training sample (files -> arrays) and apply the protocol's train
    transforms."""
    import cv2

    from benchmark.dataset import open_dataset
    from benchmark.synth import make_synthetic_dataset
    from benchmark.transforms import build_transforms

    if data_dir is None:
        root = make_synthetic_dataset(
            workdir / "data", n_train=n_images, n_val=1, seed=0, size_range=size_range, protocol=protocol
        )
        source = f"generated {protocol.dataset} layout, {n_images} images of {size_range[0]}-{size_range[1]} px"
    else:
        root = Path(data_dir)
        source = str(root)
    ds = open_dataset(protocol, root, "train", None, cache_dir=workdir / "cache")
    n = min(n_images, len(ds))
    if n == 0:
        raise PerfError(f"--data {root}: the train split is empty")
    tf = build_transforms(protocol, train=True, seed=0, image_size=img)
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # what a DataLoader worker gets; OpenCV likewise limited to its worker
    cv2.setNumThreads(1)
    try:
        best: tuple[float, float] | None = None
        for epoch in range(2):  # the first pass also warms the file cache; keep the faster
            load = transform = 0.0
            for i in range(n):
                t0 = time.perf_counter()
                raw = ds.load_raw(i)
                t1 = time.perf_counter()
                tf(raw, epoch=epoch, index=i)
                t2 = time.perf_counter()
                load, transform = load + t1 - t0, transform + t2 - t1
            if best is None or load + transform < sum(best):
                best = (load, transform)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    assert best is not None
    load, transform = best
    return {
        "images": n,
        "source": source,
        "train_ips_per_worker": n / (load + transform),
        "transform_ips_per_worker": n / transform,
        "load_ms_per_image": 1e3 * load / n,
        "transform_ms_per_image": 1e3 * transform / n,
    }


# --------------------------------------------------------------------------- the run


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def machine(device: torch.device, threads: int) -> dict[str, Any]:
    import peft
    import timm

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    out: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything ``args`` asks for; returns the JSON-able result."""
    from benchmark.lora_ops import record_forms

    entries = parse_methods(args.methods)
    labels = {e.label for e in entries}
    for a, b in args.pair:
        missing = [x for x in (a, b) if x not in labels]
        if missing:
            raise PerfError(f"--pair {a}:{b}: {missing} not among the measured methods {sorted(labels)}")
    protocol = get_protocol(args.protocol)
    model_config(args.backbone, args.img, protocol)  # a bad size fails before anything runs
    device = torch.device(args.device)
    malloc_tuned = tune_malloc() if args.malloc_tuning and device.type == "cpu" else False
    print(f"[perf] building {len(entries)} models ({args.backbone}, {args.img} px)", file=sys.stderr, flush=True)
    benches = [make_bench(e, args) for e in entries]
    results: dict[str, dict[str, Any]] = {}
    for b in benches:
        with record_forms() as forms:  # one untimed step: the LoRA forms used, and a first warm-up
            b.train_step()
        flops = train_step_flops(b)  # a second untimed step, counted
        counts = count_parameters(b.net)
        results[b.entry.label] = {
            "method": b.entry.name,
            "overrides": list(b.entry.overrides),
            "form": b.entry.form,
            "trainable_params": counts["trainable"],
            "total_params": counts["total"],
            "lora_forms": dict(sorted(forms.items())),
            "step_flops": flops,
        }
    steps = interleaved(benches, Bench.train_step, args.steps, args.warmup, "train step")
    merged_counts: dict[str, int] = {}

    @contextlib.contextmanager
    def merged(b: Bench) -> Iterator[None]:
        with spec(b.entry.name).merge_for_eval(b.net) as n:
            merged_counts[b.entry.label] = n
            yield

    fwd, evl, raw, meters_ms = {}, {}, {}, None
    if not args.train_only:
        fwd = interleaved(benches, Bench.forward, args.steps, 1, "forward (merged)", merged)
        if not args.backbone_only:
            evl = interleaved(benches, Bench.eval_step, args.steps, 1, "eval (merged)", merged)
        raw = interleaved(benches, Bench.forward, args.steps, 1, "forward (unmerged)")
        reference = next(b for b in benches if b.entry.label == "reference")  # parse_methods adds it when missing
        meters_ms = None if args.backbone_only else meter_times(reference, args.steps)
    for b in benches:
        r = results[b.entry.label]
        r["step_s"] = _median(steps[b.entry.label])
        r["step_s_samples"] = steps[b.entry.label]
        if fwd:
            r["forward_ips"] = args.batch / _median(fwd[b.entry.label])
            r["forward_unmerged_ips"] = args.batch / _median(raw[b.entry.label])
            r["forward_s_samples"] = fwd[b.entry.label]
            r["forward_unmerged_s_samples"] = raw[b.entry.label]
        if evl:
            r["eval_ips"] = args.batch / _median(evl[b.entry.label])
            r["eval_vs_forward"] = r["eval_ips"] / r["forward_ips"]
            r["eval_s_samples"] = evl[b.entry.label]
        r["merged_layers"] = merged_counts.get(b.entry.label, 0)
        if b.scaler is not None:
            r["scaler_skipped_steps"] = b.skipped_steps  # fp16: steps skipped while the loss scale settled
    del benches  # free the models before the memory subprocesses run
    if args.memory:
        for label, mem in measure_memory_all(entries, args).items():
            results[label].update(mem)
    ref, full = results["reference"], results["full_ft"]
    for r in results.values():
        r["step_vs_reference"] = r["step_s"] / ref["step_s"]
        r["step_vs_full_ft"] = r["step_s"] / full["step_s"]
        r["flops_vs_full_ft"] = r["step_flops"] / full["step_flops"]
        if args.memory:
            r["mem_vs_reference"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]
            if "tensor_peak_bytes" in r and "tensor_peak_bytes" in ref:
                r["tensor_peak_vs_reference"] = r["tensor_peak_bytes"] / ref["tensor_peak_bytes"]
    pairs = []
    for a, b in args.pair:
        p: dict[str, Any] = {"a": a, "b": b, "step_ratio": results[a]["step_s"] / results[b]["step_s"]}
        if args.memory:
            p["mem_ratio"] = results[a]["peak_mem_bytes"] / results[b]["peak_mem_bytes"]
        pairs.append(p)
    data = None
    if args.data_images > 0:
        print("[perf] data pipeline", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="perf-data-") as tmp:
            data = data_throughput(args.img, args.data_images, args.data, args.data_size, Path(tmp), protocol)
    return {
        "schema": SCHEMA,
        "config": {
            "backbone": args.backbone,
            "protocol": args.protocol,
            "img": args.img,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "device": args.device,
            "amp": args.amp,  # autocast dtype or None (fp32)
            "grad_scaler": args.amp == "float16",
            "compile": args.compile,
            "channels_last": args.channels_last,
            "backbone_only": args.backbone_only,
            "train_only": args.train_only,
            "eval_amp": None if args.eval_fp32 else args.amp,  # the forward / evaluation precision
            "malloc_tuned": malloc_tuned,
            "command": "python -m benchmark.perf " + " ".join(args.argv),
        },
        "machine": machine(device, args.threads),
        "methods": results,
        "pairs": pairs,
        "meters_ms": meters_ms,
        "data": data,
    }


# --------------------------------------------------------------------------- report


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table (plus pairs and the data pipeline line)."""
    cfg, mach = result["config"], result["machine"]
    where = mach.get("gpu") or f"{mach['cpu']}, {mach['torch_threads']} threads"
    prec = {None: "fp32", "bfloat16": "bf16 autocast", "float16": "fp16 autocast + GradScaler"}.get(
        cfg["amp"], cfg["amp"]
    )
    lines = [
        f"{cfg['backbone']} at {cfg['img']}x{cfg['img']}, batch {cfg['batch']}, {prec}, {cfg['device']} ({where}), "
        f"torch {mach['torch']}; medians of {cfg['steps']} rounds after {cfg['warmup']} warm-up, methods interleaved"
        + (", torch.compile" if cfg["compile"] else "")
        + (", channels-last" if cfg["channels_last"] else "")
        + (", backbone only (no decoders: features -> mean-square loss)" if cfg["backbone_only"] else "")
        + (", train step only" if cfg.get("train_only") else "")
        + (", forward / eval in fp32" if cfg["amp"] and "eval_amp" in cfg and cfg["eval_amp"] is None else ""),
        "",
    ]
    has_mem = all("peak_mem_bytes" in r for r in result["methods"].values())
    has_tensor = has_mem and all("tensor_peak_vs_reference" in r for r in result["methods"].values())
    has_reserved = has_mem and all("peak_reserved_bytes" in r for r in result["methods"].values())
    head = [
        "method",
        "trainable",
        "step s",
        "x ref",
        "x full_ft",
        "GFLOP",
        "FLOP x full_ft",
        "fwd img/s",
        "eval img/s",
        "eval/fwd",
        "unmerged fwd",
    ]
    if has_mem:
        head += ["peak MB", "x ref"] + (["tensor peak MB", "x ref"] if has_tensor else [])
        head += ["reserved MB"] if has_reserved else []
    head.append("LoRA forms")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in result["methods"].items():
        row = [
            f"`{label}`",
            f"{r['trainable_params']:,}",
            f"{r['step_s']:.3f}",
            f"{r['step_vs_reference']:.2f}",
            f"{r['step_vs_full_ft']:.2f}",
            f"{r['step_flops'] / 1e9:.1f}",
            f"{r['flops_vs_full_ft']:.2f}",
            f"{r['forward_ips']:.2f}" if "forward_ips" in r else "-",
            f"{r['eval_ips']:.2f}" if "eval_ips" in r else "-",
            f"{r['eval_vs_forward']:.2f}" if "eval_vs_forward" in r else "-",
            f"{r['forward_unmerged_ips']:.2f}" if "forward_unmerged_ips" in r else "-",
        ]
        if has_mem:
            row += [f"{r['peak_mem_bytes'] / 2**20:.0f}", f"{r['mem_vs_reference']:.2f}"]
        if has_tensor:
            row += [f"{r['tensor_peak_bytes'] / 2**20:.0f}", f"{r['tensor_peak_vs_reference']:.2f}"]
        if has_reserved:
            row.append(f"{r['peak_reserved_bytes'] / 2**20:.0f}")
        row.append(", ".join(f"{k} {v}" for k, v in r["lora_forms"].items()) or "-")
        lines.append("| " + " | ".join(row) + " |")
    if result["pairs"]:
        lines.append("")
        for p in result["pairs"]:
            mem = f", peak memory x{p['mem_ratio']:.2f}" if "mem_ratio" in p else ""
            lines.append(f"- `{p['a']}` / `{p['b']}`: step x{p['step_ratio']:.2f}{mem}")
    meters = result.get("meters_ms")
    if meters:
        each = ", ".join(f"{t} {ms:.1f}" for t, ms in meters.items())
        lines += ["", f"Meters alone (ms per batch of {cfg['batch']}, the same for every method): {each}; "
                  f"total {sum(meters.values()):.1f}"]  # fmt: skip
    d = result.get("data")
    if d:
        lines += [
            "",
            f"Data pipeline (one worker, train transforms at {cfg['img']} px, {d['source']}): "
            f"{d['train_ips_per_worker']:.1f} images/s (load {d['load_ms_per_image']:.1f} ms + transforms "
            f"{d['transform_ms_per_image']:.1f} ms per image; transforms alone {d['transform_ips_per_worker']:.1f} "
            "images/s)",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"expected A:B (two method entries), got {text!r}")
    return a.strip(), b.strip()


def _size_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI pixel sizes, got {text!r}") from None
    if not 8 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 8 <= LO <= HI, got {text!r}")
    return lo, hi


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmark.perf", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="full_ft,decoders_only,lora,mtlora", help="comma-separated method entries")
    p.add_argument("--backbone", default="swin_tiny", choices=sorted(SWIN_VARIANTS))
    p.add_argument(
        "--protocol",
        default=PASCAL_CONTEXT.name,
        choices=sorted(PROTOCOLS),
        help="whose tasks the models, targets, loss and meters have (the data-pipeline timing reads a PASCAL_MT folder)",
    )
    p.add_argument("--img", type=_positive, default=448, help="image size (square)")
    p.add_argument("--batch", type=_positive, default=2)
    p.add_argument("--steps", type=_positive, default=5, help="timed rounds (medians over them)")
    p.add_argument("--warmup", type=int, default=2, help="untimed train rounds before the timed ones")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--amp",
        nargs="?",
        const="bfloat16",
        choices=[d for d in AMP_DTYPES if d],
        default=None,
        help="autocast dtype (meant for --device cuda): bfloat16 (also what a bare --amp means) or float16, which "
        "trains with a dynamic GradScaler as run_benchmark's default --amp-dtype float16 does",
    )
    p.add_argument("--threads", type=_positive, default=2, help="torch.set_num_threads on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (off by default: docs/perf.md)")
    p.add_argument("--channels-last", action="store_true", help="channels-last models and input")
    p.add_argument("--backbone-only", action="store_true", help="time the Swin alone (no decoders, no eval)")
    p.add_argument(
        "--eval-fp32",
        action="store_true",
        help="forward and evaluation in fp32 (as run_benchmark evaluates) while --amp applies to the train step",
    )
    p.add_argument(
        "--train-only",
        action="store_true",
        help="time the train step alone (no forward / evaluation rounds): with --compile, one graph per model",
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    p.add_argument(
        "--memory-jobs", type=_positive, default=1, help="memory subprocesses at a time (on a GPU: its memory shared)"
    )
    p.add_argument("--data-images", type=int, default=16, help="images for the data pipeline (0: skip it)")
    p.add_argument("--data", default=None, help="a PASCAL_MT root for the data pipeline (default: generated)")
    p.add_argument("--data-size", type=_size_range, default=(375, 500), help="generated image sizes LO,HI px")
    p.add_argument("--pair", type=_pair, action="append", default=[], help="also report A's cost over B's (A:B)")
    p.add_argument("--json", default=None, help="write the result here (atomically)")
    p.add_argument(
        "--profile",
        metavar="ENTRY",
        default=None,
        help="instead of the table: torch.profiler's per-op self time for one train step of this method entry",
    )
    p.add_argument("--profile-rows", type=int, default=25, help="operators listed by --profile")
    p.add_argument("--no-malloc-tuning", dest="malloc_tuning", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p


def _write_json(path: str, result: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    threads = torch.get_num_threads()
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise PerfError("--device cuda: no CUDA device is available")
        if args.warmup < 0:
            raise PerfError(f"--warmup must be >= 0, got {args.warmup}")
        torch.set_num_threads(args.threads)
        if args.memory_child is not None:
            print(json.dumps(memory_child(parse_entry(args.memory_child), args)))
            return 0
        if args.profile is not None:
            print(profile_step(parse_entry(args.profile), args))
            return 0
        result = run(args)
    except PerfError as e:
        print(f"benchmark.perf: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # called in-process (tests), leave the caller's setting as it was
    print(markdown(result), end="")
    if args.json:
        _write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
