"""The CUDA paths of a run, each test body run on the CPU too (``device`` is "cpu" or "cuda").

The "cuda" cases carry the ``gpu`` mark and are skipped, with the reason, where no CUDA device is present;
``pytest -m gpu`` selects them alone (tools/gpu_check.sh runs that on a GPU machine). The "cpu" cases are
ordinary, cheap tests of the same logic on tiny configs (swin_micro, 64 px, the ``tiny`` preset), so a
CUDA-only branch is the only thing left for the GPU to prove.

Covered: one AMP training step (fp16 with dynamic loss scaling, bf16) of every registered method; one
checkpoint evaluated on the device and on the CPU; a run killed after a checkpoint and resumed; a
one-process NCCL (gloo on the CPU) run; the official-parity model fixtures in fp32 (the ``fixture_dir`` of
conftest.py: tests/fixtures/official_parity in the repository); perf's fp16 step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mmengine.optim import OptimWrapper

from benchmark import checkpoints, engine, optim, perf
from benchmark.losses import MultiTaskLoss
from benchmark.method_api import METHODS
from benchmark.model import MultiTaskModel, model_config_for
from benchmark.official import strict_fp32
from benchmark.params import count_parameters
from benchmark.protocol import PASCAL_CONTEXT

ROOT = Path(__file__).resolve().parents[1]
TASKS = {t.name: t.out_channels for t in PASCAL_CONTEXT.tasks}
IMG = 64
HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device: the GPU cases run on a GPU machine (pytest -m gpu; tools/gpu_check.sh)"
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA)]),
]
AMP_DTYPES = ["float16", "bfloat16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
for _k in [k for k in ENV if k.startswith("MTPEFT_FAULT_")]:
    del ENV[_k]
EPOCHS = "2"  # tiny preset: 16 images, batch 4, so 4 iterations per epoch (0-3, then 4-7)
KILLED = -9


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmark.cli", *args],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=timeout,
        cwd=ROOT,
    )


def tiny(device: str, method: str = "mtlora") -> list[str]:
    return ["--method", method, "--preset", "tiny", "--epochs", EPOCHS, "--device", device]


# --------------------------------------------------------------------------- 1. an AMP step of every method

# fp16: mmengine's dynamic loss scale starts at 2**16 and halves on each step whose scaled gradients overflow
# (the step is skipped, as in a real run). Gradients of this model are far above 2**-8, so a scale that has not
# settled after 24 halvings (2**16 -> 2**-8) means the gradients themselves are not finite.
MAX_SKIPPED = 24


class CpuAmpWrapper(OptimWrapper):
    """mmengine's AmpOptimWrapper, which refuses to exist without CUDA, on the CPU: the same order (scaled
    backward; unscale, clip, step or skip, update) with torch's CPU autocast and GradScaler."""

    def __init__(self, optimizer: torch.optim.Optimizer, clip_grad: dict[str, Any], dtype: str) -> None:
        super().__init__(optimizer=optimizer, clip_grad=clip_grad)
        self.cast_dtype = getattr(torch, dtype)
        self.loss_scaler = torch.amp.GradScaler("cpu")

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        self.loss_scaler.scale(loss).backward(**kwargs)
        self._inner_count += 1

    def step(self, **kwargs: Any) -> None:
        self.loss_scaler.unscale_(self.optimizer)
        self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update()

    @contextlib.contextmanager
    def optim_context(self, model: torch.nn.Module):  # type: ignore[override]
        with super().optim_context(model), torch.autocast("cpu", dtype=self.cast_dtype):
            yield


def amp_wrapper(optimizer: torch.optim.Optimizer, device: str, dtype: str) -> OptimWrapper:
    if device == "cuda":
        wrapper = engine.wrap_optimizer(optimizer, device, dtype, PASCAL_CONTEXT.clip_grad)  # what a run uses
        assert type(wrapper).__name__ == "AmpOptimWrapper"
        return wrapper
    return CpuAmpWrapper(optimizer, dict(max_norm=PASCAL_CONTEXT.clip_grad, norm_type=2), dtype)


@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("device", DEVICES)
def test_amp_step_of_every_method_has_finite_loss_and_grads_on_exactly_the_trainable_set(name, dtype, device):
    spec = METHODS.get(name)
    torch.manual_seed(0)
    net = spec.apply(MultiTaskModel(model_config_for("swin_micro", TASKS, img_size=IMG)), spec.default_config())
    net.to(device).train()
    model = engine.EngineModel(net, MultiTaskLoss(PASCAL_CONTEXT.tasks))
    optimizer = torch.optim.AdamW(optim.param_groups(net, PASCAL_CONTEXT.weight_decay), lr=1e-4)
    wrapper = amp_wrapper(optimizer, device, dtype)
    image, targets = perf.make_batch(2, IMG, torch.device(device))
    params = dict(net.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert len(trainable) and sum(params[n].numel() for n in trainable) == count_parameters(net)["trainable"]
    exempt = [re.compile(p) for p in spec.no_grad_params]
    before = {n: p.detach().clone() for n, p in params.items()}
    skipped = 0
    while True:
        wrapper.zero_grad()
        with wrapper.optim_context(model):
            losses = model(image, mode="loss", **targets)
        loss, _ = model.parse_losses(losses)  # raises NonFiniteLossError on a NaN / inf loss
        assert loss.dtype in (torch.float32, torch.float64), loss.dtype  # never summed in 16 bits
        wrapper.backward(loss)
        with_grad = {n for n, p in params.items() if p.grad is not None}
        finite = all(bool(torch.isfinite(params[n].grad).all()) for n in with_grad)
        # scaled gradients: finite exactly when the scaler's own check finds them finite
        if finite or dtype == "bfloat16" or skipped == MAX_SKIPPED:
            break
        wrapper.step()  # the scaler skips this step and halves the scale, as in a real run
        skipped += 1
    assert finite, f"{name} {dtype}: non-finite gradients after {skipped} skipped steps"
    assert not (with_grad - trainable), f"frozen parameters with a gradient: {sorted(with_grad - trainable)[:5]}"
    lacking = [n for n in trainable - with_grad if not any(r.search(n) for r in exempt)]
    assert not lacking, f"trainable parameters without a gradient: {lacking[:5]}"
    wrapper.step()
    moved = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= trainable, sorted(moved - trainable)[:5]  # the step updates trainable weights only
    for n in trainable:
        assert bool(torch.isfinite(params[n]).all()), n


@pytest.mark.parametrize("device", DEVICES)
def test_perf_fp16_step_uses_a_grad_scaler_and_records_the_precision(device, tmp_path):
    out = tmp_path / "perf.json"
    argv = ["--methods", "lora", "--backbone", "swin_micro", "--img", str(IMG), "--steps", "1", "--warmup", "0"]
    argv += ["--device", device, "--amp", "float16", "--no-memory", "--data-images", "0", "--json", str(out)]
    assert perf.main([*argv, "--no-malloc-tuning"]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["amp"] == "float16" and result["config"]["grad_scaler"] is True
    for r in result["methods"].values():
        assert r["step_s"] > 0 and r["scaler_skipped_steps"] >= 0
    entry = perf.parse_entry("lora")
    bench = perf.Bench(entry, perf.build_net(entry, "swin_micro", IMG), torch.device(device), amp="float16", img=IMG)
    assert isinstance(bench.scaler, torch.amp.GradScaler)
    before = {n: p.detach().clone() for n, p in bench.net.named_parameters() if p.requires_grad}
    assert math.isfinite(bench.train_step())
    moved = [n for n, p in bench.net.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert bench.skipped_steps in (0, 1) and bool(moved) == (bench.skipped_steps == 0)  # a step, or a skip
    bf16 = perf.Bench(entry, perf.build_net(entry, "swin_micro", IMG), torch.device(device), amp="bfloat16", img=IMG)
    assert bf16.scaler is None and math.isfinite(bf16.train_step())
    with pytest.raises(perf.PerfError, match="float8"):
        perf.Bench(entry, perf.build_net(entry, "swin_micro", IMG), torch.device(device), amp="float8", img=IMG)


def test_perf_amp_choices(capsys):
    assert perf.build_parser().parse_args(["--amp"]).amp == "bfloat16"  # the old bare --amp: bf16 autocast
    assert perf.build_parser().parse_args(["--amp", "float16"]).amp == "float16"
    assert perf.build_parser().parse_args([]).amp is None
    with pytest.raises(SystemExit) as e:
        perf.build_parser().parse_args(["--amp", "float8"])
    assert e.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


def test_memory_children_in_parallel_rerun_a_failed_one_alone(monkeypatch):
    """--memory-jobs N: a child that fails beside others (say, out of GPU memory because of them) runs again
    alone; with one job at a time a failure is an error at once."""
    calls: list[str] = []

    def child(entry, args):
        calls.append(entry.label)
        if entry.label == "lora" and calls.count("lora") == 1:
            raise RuntimeError("memory subprocess for 'lora' failed (exit 1): CUDA out of memory")
        return {"peak_mem_bytes": 10 * len(entry.label)}

    monkeypatch.setattr(perf, "measure_memory", child)
    entries = perf.parse_methods("lora,mtlora")
    out = perf.measure_memory_all(entries, argparse.Namespace(memory_jobs=3))
    assert list(out) == [e.label for e in entries]  # in the order of the entries
    assert out["lora"] == {"peak_mem_bytes": 40} and calls.count("lora") == 2 and calls[-1] == "lora"
    calls.clear()
    with pytest.raises(RuntimeError, match="out of memory"):
        perf.measure_memory_all(entries, argparse.Namespace(memory_jobs=1))


# --------------------------------------------------------------------------- 2. runs through run_benchmark


@pytest.fixture(scope="module", params=DEVICES)
def uninterrupted(request, tmp_path_factory) -> tuple[str, Path]:
    """One uninterrupted tiny mtlora run on the device (AMP fp16 on CUDA, the CLI's default there)."""
    device = request.param
    wd = tmp_path_factory.mktemp(f"uninterrupted-{device}")
    p = run_cli(*tiny(device), "--work-dir", str(wd))
    assert p.returncode == 0, p.stderr[-3000:]
    return device, wd


def metrics_of(path: Path) -> dict[str, dict[str, float]]:
    return json.loads(path.read_text())["metrics"]


# CUDA runs are not bit-reproducible across processes: the backward of the decoders' bilinear interpolation
# adds into its input gradient with atomic adds in a varying order (PyTorch has no deterministic CUDA kernel
# for it: torch.use_deterministic_algorithms(True) raises there), and cuDNN autotuning may pick another
# algorithm in another process. Each replayed iteration thus differs from the reference run by rounding in
# single gradient elements, and the metrics can move only through pixels whose decision (argmax, threshold,
# angle bin) sits within that distance of a tie. The allowance: 0.1 % of a task's pixels changing decision
# (1e-3 absolute on the [0, 1] metrics, ~33 of the 8 x 64 x 64 validation pixels), and 1e-3 relative plus one
# 0.05-degree histogram bin on the angle metrics. A resume from another state moves them by far more: on the
# CPU, epoch 2 of this run moves the normals' mean angle from 76.3 to 42.1 degrees and saliency maxF from 0.646
# to 0.680 (the segmentation mIoUs, at this size, by 3e-3 and 0). On the CPU the runs are bit-identical and the
# comparison is exact.
FRACTION_ABS = 1e-3
ANGLE_REL, ANGLE_BIN = 1e-3, 0.05


def assert_same_metrics(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], device: str) -> None:
    assert a.keys() == b.keys() and all(a[t].keys() == b[t].keys() for t in a)
    if device == "cpu":
        assert a == b
        return
    for t in a:
        for m, va in a[t].items():
            vb = b[t][m]
            if t == "normals" and not m.replace(".", "").isdigit():  # angles in degrees
                tol = ANGLE_REL * abs(va) + ANGLE_BIN
            else:  # mIoU, maxF, fractions of pixels below an angle (percent for normals: x100)
                tol = FRACTION_ABS * (100.0 if t == "normals" else 1.0)
            assert abs(va - vb) <= tol, f"{t}/{m}: {va} vs {vb} (tolerance {tol})"


@pytest.mark.slow
def test_kill_after_a_checkpoint_then_resume_ends_with_the_metrics_of_the_uninterrupted_run(uninterrupted, tmp_path):
    device, ref = uninterrupted
    wd = tmp_path / "killed"
    p = run_cli(*tiny(device), "--work-dir", str(wd), env={"MTPEFT_FAULT_KILL_AT_ITER": "6"})  # in epoch 2
    assert p.returncode == KILLED, p.stderr[-2000:]
    assert (wd / "checkpoints" / "epoch_1.pth").is_file() and not (wd / "result.json").exists()
    q = run_cli(*tiny(device), "--work-dir", str(wd), "--resume")
    assert q.returncode == 0, q.stderr[-3000:]
    log = q.stdout + q.stderr
    assert "resumed from" in log and "epoch_1.pth" in log
    ckpt = checkpoints.read_checkpoint(wd / "checkpoints" / "epoch_2.pth")
    if device == "cuda":  # the AMP loss scaler travels in the checkpoint (weights_only load)
        assert ckpt["optimizer"]["loss_scaler"]["scale"] > 0
    result = json.loads((wd / "result.json").read_text())
    assert result["env"]["device"] == device
    assert result["env"]["amp_dtype"] == ("float16" if device == "cuda" else None)
    assert_same_metrics(metrics_of(ref / "result.json"), metrics_of(wd / "result.json"), device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ONE_PROCESS_GROUP = """
import sys, torch, torch.distributed as dist
from mmengine.model import MMDistributedDataParallel as DDP
device, port, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
ddp_init = DDP.__init__
def announce(self, *args, **kwargs):
    print(f"wrapped in DDP, device_ids {kwargs.get('device_ids')}", flush=True)
    ddp_init(self, *args, **kwargs)
DDP.__init__ = announce
backend = "nccl" if device == "cuda" else "gloo"
if device == "cuda":
    torch.cuda.set_device(0)
dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)  # torchrun's env
from benchmark.cli import main
rc = main(argv)
print(f"process group: backend {dist.get_backend()}, world {dist.get_world_size()}")
dist.destroy_process_group()
sys.exit(rc)
"""


@pytest.mark.slow
def test_one_process_group_run_equals_the_run_without_one(uninterrupted, tmp_path):
    """NCCL on CUDA, gloo on the CPU: the engine wraps the model in DDP (one process) and the result is that
    of the same run without a process group (DDP averages gradients over one process: no change)."""
    device, ref = uninterrupted
    wd = tmp_path / "ddp"
    port = str(free_port())
    cmd = [sys.executable, "-c", ONE_PROCESS_GROUP, device, port, *tiny(device), "--work-dir", str(wd)]
    torchrun_env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    p = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **torchrun_env}, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    backend = "nccl" if device == "cuda" else "gloo"
    assert f"process group: backend {backend}, world 1" in p.stdout
    assert f"wrapped in DDP, device_ids {[0] if device == 'cuda' else None}" in p.stdout
    assert_same_metrics(metrics_of(ref / "result.json"), metrics_of(wd / "result.json"), device)


# --------------------------------------------------------------------------- 3. one checkpoint, two devices


class RecordingMeter:
    """A meter that keeps (on the CPU) the logits and targets it is given; stats and reduce are the meter's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.devices: set[torch.device] = set()

    def stats(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        self.devices.add(logits.device)
        self.seen.append((logits.detach().cpu(), target.cpu()))
        return self.inner.stats(logits, target)

    def reduce(self, stats: Any) -> dict[str, float]:
        return self.inner.reduce(stats)

    def logits(self) -> torch.Tensor:
        return torch.cat([x for x, _ in self.seen])


def evaluate_checkpoint(ckpt: Path | None, data: Path, device: str, work_dir: Path) -> tuple[dict, dict[str, Any]]:
    """The engine's evaluation (mmengine's val loop, merged LoRA weights, metrics from per-image statistics)
    of ``ckpt`` on ``device``, in fp32 as every evaluation; returns (metrics, the recording meters)."""
    from mmengine.runner import set_random_seed

    from benchmark.dataset import collate
    from benchmark.metrics import build_meters
    from benchmark.pascal_data import PascalMT
    from benchmark.presets import PRESETS, resolve
    from benchmark.run import build_net
    from benchmark.run import load_for_eval as _load_for_eval
    from benchmark.run import model_config as _model_config
    from benchmark.transforms import build_transforms

    spec = METHODS.get("mtlora")
    settings = resolve(PASCAL_CONTEXT, PRESETS["tiny"], int(EPOCHS))
    set_random_seed(0)  # as run_benchmark --seed 0: the same frozen weights, which the checkpoint checks
    net = build_net(spec, spec.default_config(), _model_config(settings, PASCAL_CONTEXT), None)
    if ckpt is not None:
        _load_for_eval(net, ckpt, spec)
    tasks = PASCAL_CONTEXT.task_names
    meters = {t: RecordingMeter(m) for t, m in build_meters(PASCAL_CONTEXT.tasks).items()}
    val = PascalMT(
        data,
        PASCAL_CONTEXT.val_split,
        tasks,
        build_transforms(PASCAL_CONTEXT, False, 0, image_size=settings.image_size),
    )
    setup = engine.EngineSetup(
        net=net.to(device),
        loss_fn=MultiTaskLoss(PASCAL_CONTEXT.tasks),
        meters=meters,
        protocol=PASCAL_CONTEXT,
        tasks=tasks,
        work_dir=work_dir,
        seed=0,
        device=device,
        val_dataset=val,
        val_batch_size=4,
        workers=0,
        collate_fn=collate,
    )
    metrics = engine.evaluate(setup).final_metrics
    assert {p.device.type for p in net.parameters()} == {device}, "the model left the run's device"
    assert {d.type for m in meters.values() for d in m.devices} == {device}, "evaluated elsewhere"
    return metrics, meters


def test_a_cpu_evaluation_stays_on_the_cpu_where_mmengine_would_take_the_gpu(monkeypatch, tmp_path):
    """mmengine's Runner moves the model to the accelerator it found at import, whatever the run asked for;
    the engine pins it to the run's device. On a machine without CUDA, mmengine is told it found one."""
    import mmengine.device.utils as mm_device

    from benchmark.synth import make_synthetic_dataset

    monkeypatch.setattr(mm_device, "DEVICE", "cuda")
    data = make_synthetic_dataset(tmp_path / "data", n_train=1, n_val=2, seed=0)
    metrics, _ = evaluate_checkpoint(None, data, "cpu", tmp_path / "eval")  # asserts where it ran
    assert set(metrics) == set(TASKS) and mm_device.DEVICE == "cuda"  # mmengine's own setting is left as it was


# fp32 on two devices: the fixture README's error model (a correct fp32 implementation ordering its operations
# differently lands within 1e-5 of the largest output magnitude) bounds the logit differences, with TF32 off
# (TF32 products keep a 10-bit mantissa, ~5e-4 relative: not fp32). Every decision the meters take from the
# logits (argmax class, saliency threshold) can then differ only at a pixel whose CPU margin to the decision
# boundary is within that bound; counts are exact and sums float64, so with no such pixel the metrics agree to
# float64 reduction order (1e-9 relative), and the angle metrics move by at most the angle a logit vector of
# length |v| turns under a perturbation of length sqrt(3) * tol: asin(sqrt(3) * tol / |v|) (its mean, too), plus
# the float32 rounding of the post-processed unit vector on each device (a few 2**-24 per component).
LOGIT_REL = 1e-5
SUM_REL = 1e-9
F32_TURN_DEG = math.degrees(2 * math.sqrt(3) * 2**-21)


def _ambiguous_decisions(task: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> tuple[int, int]:
    """(pixels whose decision differs, those of them within ``tol`` of a tie in ``ref``) for a class task."""
    if task == "sal":  # thresholds on p = sigmoid(logit) (slope <= 1/4), beta thresholds on sigmoid(p) (<= 1/16)
        from benchmark.metrics import SAL_THRESHOLDS, SaliencyMeter

        ts = torch.tensor(list(SAL_THRESHOLDS), dtype=torch.float64)[:, None, None, None]
        bs = SaliencyMeter("sal").beta_thresholds.double()[:, None, None, None]
        p_ref, p_got = torch.sigmoid(ref.double())[:, 0], torch.sigmoid(got.double())[:, 0]
        s_ref, s_got = torch.sigmoid(p_ref), torch.sigmoid(p_got)
        differ = ((p_ref > ts) != (p_got > ts)).any(0) | ((s_ref >= bs) != (s_got >= bs)).any(0)
        eps = 1e-6  # float32 rounding of p on either device
        near = ((p_ref - ts).abs() <= tol / 4 + eps).any(0) | ((s_ref - bs).abs() <= tol / 16 + eps).any(0)
    else:
        top2 = ref.double().topk(2, dim=1).values
        differ = ref.argmax(1) != got.argmax(1)
        near = (top2[:, 0] - top2[:, 1]) <= 2 * tol
    return int(differ.sum()), int((differ & near).sum())


@pytest.mark.slow
def test_a_checkpoint_evaluated_on_the_device_gives_the_cpu_metrics(uninterrupted, tmp_path):
    device, ref = uninterrupted
    ckpt, data = ref / "checkpoints" / "epoch_2.pth", ref / "synthetic_data"
    with strict_fp32(device):
        cpu_metrics, cpu_meters = evaluate_checkpoint(ckpt, data, "cpu", tmp_path / "cpu")
        dev_metrics, dev_meters = evaluate_checkpoint(ckpt, data, device, tmp_path / device)
    assert cpu_metrics.keys() == dev_metrics.keys() == set(TASKS)
    flips: dict[str, int] = {}
    for t in TASKS:
        a, b = cpu_meters[t].logits(), dev_meters[t].logits()
        assert a.shape == b.shape and a.shape[0] == 8, (t, a.shape)
        tol = LOGIT_REL * max(1.0, float(a.abs().max()))
        assert float((a - b).abs().max()) <= tol, f"{t}: logits differ by {float((a - b).abs().max())} > {tol}"
        if t in ("semseg", "human_parts", "sal"):
            differ, near_tie = _ambiguous_decisions(t, a, b, tol)
            assert differ == near_tie, f"{t}: {differ - near_tie} decisions differ away from any tie"
            flips[t] = differ
    for t, n in flips.items():  # with a decision changed at a tie, the metric follows that decision
        for m, va in cpu_metrics[t].items():
            if n == 0:
                assert abs(dev_metrics[t][m] - va) <= SUM_REL * max(1.0, abs(va)), f"{t}/{m}"
    normals = cpu_meters["normals"].logits().double()
    tol = LOGIT_REL * max(1.0, float(normals.abs().max()))
    length = float(normals.norm(dim=1).min())
    turn = math.degrees(math.asin(min(1.0, math.sqrt(3) * tol / length))) if length > 0 else 90.0
    for m in ("mean", "mean_v2"):
        assert abs(dev_metrics["normals"][m] - cpu_metrics["normals"][m]) <= turn + F32_TURN_DEG, m


# --------------------------------------------------------------------------- 4. official parity in fp32


@pytest.mark.parametrize("device", DEVICES)
def test_official_parity_model_fixtures_pass_on_the_device_in_fp32(device, fixture_dir):
    from benchmark.official import parity_checks

    fixtures = sorted(p for p in fixture_dir.glob("model_*.pt") if not p.stem.endswith("_grad"))
    assert fixtures, f"no model_*.pt fixture in {fixture_dir}"
    for path in fixtures:
        checks = parity_checks(path, device=device)
        failed = [f"{c.name}: {c.max_diff:.3g} > {c.tol:.3g} {c.detail}" for c in checks if not c.passed]
        assert not failed, failed
        assert any(c.name.endswith("/outputs/semseg") for c in checks)
    assert torch.backends.cudnn.allow_tf32 is True  # the strict-fp32 switch is restored afterwards
