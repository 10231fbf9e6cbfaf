"""Helpers of ``tools/gpu_check.sh``: the environment record, the generated data of the paper run, that run's
cost read from its own logs, and the summary of a whole check.

    python tools/gpu_report.py env --device cuda --out OUT/env.json
    python tools/gpu_report.py paper-data DIR --train 1280 --val 64 --unique 64
    python tools/gpu_report.py paper-run WORK_DIR --out OUT/paper_run.json
    python tools/gpu_report.py summary OUT

Exit codes: 0 done; 2 bad input (a missing file or folder, a device that is not there), with one message.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages, whatever the working directory
    sys.path.insert(0, str(ROOT))

# PASCAL-Context as the MTLoRA protocol uses it (PASCAL-MT splits): what a paper run trains and validates on.
PASCAL_CONTEXT_TRAIN_IMAGES = 4998
PASCAL_CONTEXT_VAL_IMAGES = 5105
# the distributions whose versions the record names (what the GPU machine lacks travels as wheels)
PACKAGES = (
    "torch",
    "timm",
    "peft",
    "mmengine",
    "mmcv-lite",
    "mmsegmentation",
    "submitit",
    "numpy",
    "opencv-python-headless",
)


class ReportError(ValueError):
    """Bad input: printed as one line, exit code 2."""


def _write_json(path: Path, data: Any) -> None:
    from benchmark.results import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None


# --------------------------------------------------------------------------- env


def env_record(device: str) -> dict[str, Any]:
    """Versions, the device and what the run will use; a ReportError if ``device`` is cuda and none is there."""
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "packages": {},
        "imports": {},
    }
    for dist in PACKAGES:
        try:
            out["packages"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out["packages"][dist] = None
    for module in ("mmengine", "mmcv", "submitit", "timm", "peft", "cv2"):
        try:
            m = importlib.import_module(module)
            out["imports"][module] = {"version": getattr(m, "__version__", None), "file": getattr(m, "__file__", None)}
        except Exception as e:  # record, never stop: the tests say what it breaks
            out["imports"][module] = {"error": f"{type(e).__name__}: {e}"}
    from benchmark.metrics import _mmseg_intersect_and_union

    out["iou_counts"] = "mmseg" if _mmseg_intersect_and_union() is not None else "torch fallback (mmseg unavailable)"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ReportError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_bytes": int(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "bf16_supported": bool(torch.cuda.is_bf16_supported()),
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        }
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            out["gpu"]["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            out["gpu"]["nvidia_smi"] = f"unavailable: {e}"
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        out["git_sha"] = sha.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_sha"] = None
    return out


# --------------------------------------------------------------------------- data of the paper run


def paper_data(out: Path, n_train: int, n_val: int, unique: int, seed: int = 0) -> dict[str, int]:
    """A generated PASCAL_MT dataset at PASCAL's image sizes (375-500 px) with ``n_train`` train and ``n_val``
    val images, each split made of at most ``unique`` generated ones repeated under new ids (hard links where
    the file system allows): generating an image costs far more than loading it, and a cost measurement only
    needs the sizes to be real."""
    from benchmark.synth import make_synthetic_dataset

    if n_train < 1 or n_val < 1 or unique < 1:
        raise ReportError(f"paper-data: --train, --val and --unique must be >= 1, got {n_train}, {n_val}, {unique}")
    make_synthetic_dataset(
        out, n_train=min(unique, n_train), n_val=min(unique, n_val), seed=seed, size_range=(375, 500)
    )
    return {
        "train": _repeat_split(out, "train", n_train),
        "val": _repeat_split(out, "val", n_val),
        "unique_train": min(unique, n_train),
        "unique_val": min(unique, n_val),
    }


def _repeat_split(root: Path, split: str, n: int) -> int:
    from benchmark.pascal_data import FILES, SPLIT_FILE

    listing = root / SPLIT_FILE.format(split=split)
    base = listing.read_text().split()
    ids = list(base)
    while len(ids) < n:
        k = len(ids) - len(base)
        src, new = base[k % len(base)], f"{base[k % len(base)]}r{k // len(base) + 1}"
        for pattern in FILES.values():
            f = root / pattern.format(id=src)
            if f.is_file():
                g = root / pattern.format(id=new)
                try:
                    os.link(f, g)
                except OSError:
                    shutil.copyfile(f, g)
        ids.append(new)
    listing.write_text("".join(f"{i}\n" for i in ids))
    return len(ids)


# --------------------------------------------------------------------------- the paper run's cost


def _scalars(work_dir: Path) -> list[dict[str, Any]]:
    """mmengine's per-log-interval records of the run (``<timestamp>/vis_data/scalars.json``, one per line)."""
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    if not files:
        raise ReportError(f"{work_dir}: no */vis_data/scalars.json (not an mmengine work dir, or nothing logged)")
    rows = []
    for line in files[-1].read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def paper_run_cost(
    work_dir: Path,
    train_images: int = PASCAL_CONTEXT_TRAIN_IMAGES,
    val_images: int = PASCAL_CONTEXT_VAL_IMAGES,
) -> dict[str, Any]:
    """What a full paper run would cost, from a bounded run's own logs and result.

    mmengine logs, per log interval and at the end of each epoch, ``time`` (seconds per iteration, data wait
    included) and ``data_time`` averaged over the last iterations (its window of 10) and, on CUDA, ``memory``
    (MB, max allocated). The last train record is the steady state. The ETA multiplies it by the protocol's
    iterations (``train_images // batch`` per epoch, the last partial batch dropped, times the epochs) and adds
    the validations (every ``eval_interval`` epochs and after the last) at the run's validation seconds per batch.
    """
    from benchmark.protocol import get_protocol

    result = _read_json(work_dir / "result.json")
    rows = _scalars(work_dir)
    train = [r for r in rows if "loss" in r and "time" in r]
    if not train:
        raise ReportError(f"{work_dir}: the logs hold no training record (did the run train an epoch?)")
    val = [r for r in rows if "loss" not in r and "time" in r]
    last = train[-1]
    env, cost = result.get("env", {}), result.get("cost", {})
    protocol = get_protocol(result.get("protocol", {}).get("name", "pascal-context"))
    batch = int(env.get("batch_size") or protocol.batch_size)
    iters_per_epoch = train_images // batch
    epochs = protocol.epochs
    evals = epochs // protocol.eval_interval + (1 if epochs % protocol.eval_interval else 0)
    val_batches = math.ceil(val_images / batch)
    train_s = iters_per_epoch * epochs * float(last["time"])
    val_s_per_batch = float(val[-1]["time"]) if val else None
    eval_s = evals * val_batches * val_s_per_batch if val_s_per_batch is not None else None
    out: dict[str, Any] = {
        "work_dir": str(work_dir),
        "status": result.get("status"),
        "device": env.get("device"),
        "gpu": env.get("gpu"),
        "amp_dtype": env.get("amp_dtype"),
        "backbone": env.get("backbone"),
        "image_size": env.get("image_size"),
        "batch_size": batch,
        "iterations_run": int(last.get("iter", last.get("step", 0))),
        "iteration_s": float(last["time"]),
        "data_time_s": float(last.get("data_time", math.nan)),
        "images_per_s": batch / float(last["time"]),
        "compute_images_per_s": cost.get("train_images_per_s"),  # result.json: without the data wait
        "memory_mb_logged": last.get("memory"),
        "peak_mem_bytes": cost.get("peak_mem_bytes"),
        "peak_mem_reserved_bytes": cost.get("peak_mem_reserved_bytes"),
        "val_s_per_batch": val_s_per_batch,
        "paper": {
            "train_images": train_images,
            "val_images": val_images,
            "epochs": epochs,
            "iterations_per_epoch": iters_per_epoch,
            "validations": evals,
            "train_eta_s": train_s,
            "eval_eta_s": eval_s,
            "total_eta_s": train_s + (eval_s or 0.0),
            "total_eta_h": (train_s + (eval_s or 0.0)) / 3600.0,
        },
        "log_record": last,
    }
    return out


# --------------------------------------------------------------------------- summary of a check


def _stages(outdir: Path) -> list[dict[str, Any]]:
    path = outdir / "stages.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _perf_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    batch = data["config"]["batch"]
    rows = []
    for label, r in data["methods"].items():
        rows.append(
            {
                "method": label,
                "train_img_s": batch / r["step_s"],
                "eval_img_s": r.get("eval_ips"),
                "peak_alloc_mib": r["peak_mem_bytes"] / 2**20 if "peak_mem_bytes" in r else None,
                "peak_reserved_mib": r["peak_reserved_bytes"] / 2**20 if "peak_reserved_bytes" in r else None,
                "time_x_full_ft": r["step_vs_full_ft"],
                "flops_x_full_ft": r["flops_vs_full_ft"],
            }
        )
    return rows


def summary(outdir: Path) -> dict[str, Any]:
    """Every stage's outcome and the figures of the JSON files the check wrote (those that exist)."""
    if not outdir.is_dir():
        raise ReportError(f"{outdir}: not a folder")
    out: dict[str, Any] = {"stages": _stages(outdir)}
    env = outdir / "env.json"
    if env.is_file():
        e = _read_json(env)
        out["device"] = (e.get("gpu") or {}).get("name") or e.get("device")
        out["torch"] = e.get("packages", {}).get("torch")
    perf: dict[str, Any] = {}
    for name in ("perf_gpu_all", "perf_gpu_mtlora_bf16", "perf_gpu_compile"):
        path = outdir / f"{name}.json"
        if path.is_file():
            data = _read_json(path)
            perf[name] = {"command": data["config"]["command"], "amp": data["config"]["amp"], "rows": _perf_rows(data)}
    out["perf"] = perf
    if "perf_gpu_all" in perf and "perf_gpu_mtlora_bf16" in perf:
        fp16 = {r["method"]: r for r in perf["perf_gpu_all"]["rows"]}
        out["bf16_vs_fp16_train"] = {
            r["method"]: r["train_img_s"] / fp16[r["method"]]["train_img_s"]
            for r in perf["perf_gpu_mtlora_bf16"]["rows"]
            if r["method"] in fp16
        }
    if "perf_gpu_all" in perf and "perf_gpu_compile" in perf:
        eager = {r["method"]: r for r in perf["perf_gpu_all"]["rows"]}
        out["compiled_vs_eager_train"] = {
            r["method"]: r["train_img_s"] / eager[r["method"]]["train_img_s"]
            for r in perf["perf_gpu_compile"]["rows"]
            if r["method"] in eager
        }
    paper = outdir / "paper_run.json"
    if paper.is_file():
        p = _read_json(paper)
        out["paper_run"] = {k: p.get(k) for k in ("device", "iteration_s", "images_per_s", "peak_mem_bytes", "paper")}
    return out


def markdown(s: dict[str, Any]) -> str:
    lines = [
        f"device: {s.get('device')}, torch {s.get('torch')}",
        "",
        "| stage | status | rc | s |",
        "|---|---|---|---|",
    ]
    for st in s["stages"]:
        lines.append(f"| {st['stage']} | {st['status']} | {st['rc']} | {st['seconds']} |")
    all_ = s["perf"].get("perf_gpu_all")
    if all_:
        lines += ["", f"`{all_['command']}`", ""]
        lines += ["| method | train img/s | eval img/s | alloc MiB | reserved MiB | time x full_ft | FLOP x full_ft |"]
        lines.append("|---|---|---|---|---|---|---|")
        for r in all_["rows"]:
            cells = [r["train_img_s"], r["eval_img_s"], r["peak_alloc_mib"], r["peak_reserved_mib"]]
            text = [f"{c:.1f}" if isinstance(c, float) else "-" for c in cells]
            lines.append(
                f"| `{r['method']}` | "
                + " | ".join(text)
                + f" | {r['time_x_full_ft']:.2f} | {r['flops_x_full_ft']:.2f} |"
            )
    for key, title in (
        ("bf16_vs_fp16_train", "bf16 / fp16 train img/s"),
        ("compiled_vs_eager_train", "compiled / eager"),
    ):
        if s.get(key):
            lines += ["", f"{title}: " + ", ".join(f"`{k}` {v:.2f}" for k, v in s[key].items())]
    if s.get("paper_run"):
        p = s["paper_run"]
        lines += [
            "",
            f"paper run: {p['iteration_s']:.3f} s/iteration ({p['images_per_s']:.1f} img/s), peak "
            f"{'allocated' if p.get('device') == 'cuda' else 'resident'} {(p['peak_mem_bytes'] or 0) / 2**30:.2f} GiB; "
            f"{p['paper']['epochs']} epochs: {p['paper']['total_eta_h']:.1f} h",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/gpu_report.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("env", help="record versions and the device")
    e.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    e.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("paper-data", help="generate the paper run's dataset")
    d.add_argument("out", type=Path)
    d.add_argument("--train", type=int, required=True)
    d.add_argument("--val", type=int, required=True)
    d.add_argument("--unique", type=int, default=64, help="distinct generated train images (the rest repeat them)")
    r = sub.add_parser("paper-run", help="the cost of a paper run from a bounded run's work dir")
    r.add_argument("work_dir", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--train-images", type=int, default=PASCAL_CONTEXT_TRAIN_IMAGES)
    r.add_argument("--val-images", type=int, default=PASCAL_CONTEXT_VAL_IMAGES)
    s = sub.add_parser("summary", help="summary.json and a markdown digest of a check's folder")
    s.add_argument("outdir", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "env":
            _write_json(args.out, env_record(args.device))
        elif args.command == "paper-data":
            print(json.dumps(paper_data(args.out, args.train, args.val, args.unique)))
        elif args.command == "paper-run":
            if not args.work_dir.is_dir():
                raise ReportError(f"{args.work_dir}: work dir not found")
            cost = paper_run_cost(args.work_dir, args.train_images, args.val_images)
            _write_json(args.out, cost)
            print(json.dumps({k: cost[k] for k in ("iteration_s", "data_time_s", "images_per_s", "peak_mem_bytes")}))
            print(f"300-epoch ETA: {cost['paper']['total_eta_h']:.2f} h")
        else:
            s = summary(args.outdir)
            _write_json(args.outdir / "summary.json", s)
            print(markdown(s), end="")
    except (ReportError, FileExistsError) as e:
        print(f"gpu_report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
