"""Tiny deterministic reference runs: one per registered method, metrics committed as golden values.

    python -m benchmark.reference_runs --update                 # regenerate tests/golden/reference_runs.json
    python -m benchmark.reference_runs --check full_ft lora mtlora

Each reference run is ``run_benchmark --method NAME --preset tiny --seed 0`` on the CPU (generated data, swin_micro
at 64 px, 2 epochs). A change that moves any of these metrics beyond numerical noise changes what a method
computes: either it is intended (regenerate and say why in the commit) or it is a regression.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "reference_runs.json"
PRESET = "tiny"
SEED = 0
# Noise measured on CPU (mtlora): identical bits for the same machine and thread count; 1 vs 2 threads moved
# saliency by 4e-5 and the normals mean by 0.029 degrees (reduction order). The bounds are about 5x that;
# the runs always use 1 thread. Anything beyond them is a real change.
ABS_TOL = {"fraction": 2.5e-4, "degrees": 0.15}
CHECKED_METRICS = {"semseg": ("mIoU",), "human_parts": ("mIoU",), "sal": ("mIoU", "maxF"), "normals": ("mean",)}


def run_reference(method: str, threads: int = 1, extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run one reference run in a fresh process (``extra_args``: more run_benchmark flags); returns its result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("MTPEFT_FAULT_NAN_ITER", None)
    with tempfile.TemporaryDirectory(prefix=f"refrun-{method}-") as tmp:
        cmd = [sys.executable, "-m", "benchmark.cli", "--method", method, "--preset", PRESET, "--seed", str(SEED),
               "--work-dir", tmp, *extra_args]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"reference run of {method} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def golden_entry(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": result["method"]["config"],
        "metrics": {t: {m: result["metrics"][t][m] for m in ms} for t, ms in CHECKED_METRICS.items()},
        "trainable": result["params"]["trainable"],
    }


def compare(method: str, golden: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """Differences beyond noise between a golden entry and a fresh result (empty list: the same)."""
    problems = []
    now = golden_entry(result)
    if now["config"] != golden["config"]:
        problems.append(f"{method}: default config changed: {golden['config']} -> {now['config']}")
    if now["trainable"] != golden["trainable"]:
        problems.append(f"{method}: trainable parameters {golden['trainable']:,} -> {now['trainable']:,}")
    for task, metrics in golden["metrics"].items():
        for m, ref in metrics.items():
            val = now["metrics"][task][m]
            tol = ABS_TOL["degrees" if task == "normals" else "fraction"]
            if not math.isfinite(val) or abs(val - ref) > tol:
                problems.append(f"{method}: {task}/{m} moved {ref:.6f} -> {val:.6f} (noise bound {tol})")
    return problems


def load_golden(path: Path = GOLDEN) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no golden reference runs; create them with --update")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.reference_runs", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--update", nargs="*", metavar="METHOD", help="regenerate (all registered methods if none named)")
    g.add_argument("--check", nargs="*", metavar="METHOD", help="rerun and compare (all golden methods if none named)")
    p.add_argument("--golden", type=Path, default=GOLDEN)
    args = p.parse_args(argv)
    if args.update is not None:
        from methods import METHODS

        names = args.update or METHODS.names()
        data = load_golden(args.golden) if args.golden.is_file() else {}
        data.setdefault("preset", PRESET)
        data.setdefault("seed", SEED)
        runs = data.setdefault("methods", {})
        for name in names:
            METHODS.get(name)
            print(f"reference run: {name}", file=sys.stderr)
            runs[name] = golden_entry(run_reference(name))
        data["methods"] = dict(sorted(runs.items()))
        args.golden.parent.mkdir(parents=True, exist_ok=True)
        from benchmark.results import atomic_write_json

        atomic_write_json(args.golden, data)
        print(f"wrote {args.golden} ({len(data['methods'])} methods)")
        return 0
    data = load_golden(args.golden)
    names = args.check or sorted(data["methods"])
    problems: list[str] = []
    for name in names:
        if name not in data["methods"]:
            problems.append(f"{name}: no golden entry in {args.golden}")
            continue
        problems += compare(name, data["methods"][name], run_reference(name))
    for line in problems:
        print(f"FAIL  {line}")
    print(
        f"{len(names) - len({x.split(':')[0] for x in problems})} passed, {len({x.split(':')[0] for x in problems})} failed"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
