"""Tiny deterministic reference runs: one per registered method, metrics committed as golden values.

    python -m benchmark.reference_runs --update                 # regenerate tests/golden/reference_runs.json
    python -m benchmark.reference_runs --update lora mtlora     # regenerate some methods, keep the others
    python -m benchmark.reference_runs --check full_ft lora mtlora

Each reference run is what ``run_benchmark --method NAME --preset tiny --seed 0 --device cpu`` runs (generated data,
swin_micro at 64 px, 2 epochs), as a run specification passed to ``benchmark.run.run`` in a fresh process. A change that moves any of these metrics beyond numerical noise changes what a method
computes: either it is intended (regenerate and say why in the commit) or it is a regression.

Noise model. The same run on the same machine, kernels and thread count gives identical bits; what moves the
metrics is the order of fp32 arithmetic: PyTorch's CPU kernel set (``ATEN_CPU_CAPABILITY``: default, avx2,
avx512) and the thread count (reductions split differently), amplified by two epochs of training and by
threshold metrics (a pixel whose prediction sits at a class boundary flips). ``--update`` therefore runs each
method under every kernel set this CPU has x 1 and 2 threads, besides the native 1-thread run whose metrics are
stored, and records per metric the spread (max - min) over those runs. Another machine is one more such setting:
``--check`` allows RUN_K = 3 times the recorded spread (a deviation within the spread of the sampled settings,
x1.5 for settings not sampled: other CPUs' FMA and vector widths).
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmark.run import RunSpec

from benchmark.protocol import Protocol, get_protocol
from benchmark.tasks import kind_of

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "reference_runs.json"
PRESET = "tiny"
SEED = 0
RUN_K = 3.0  # times the recorded spread across kernel sets and thread counts (see the module docstring)
THREADS = (1, 2)


def checked_metrics(protocol: Protocol) -> dict[str, tuple[str, ...]]:
    """The metrics a reference run pins: per task of ``protocol``, its primary metric, then the extra metrics its
    task kind names (``TaskKind.checked_metrics``: saliency's maxF)."""
    return {t.name: (t.metric, *kind_of(t).checked_metrics) for t in protocol.tasks}


CHECKED_METRICS = checked_metrics(get_protocol("pascal-context"))  # the reference runs use the default protocol


def kernel_sets() -> list[str]:
    """The ``ATEN_CPU_CAPABILITY`` values this CPU can run (x86: default, avx2, avx512 where present)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    sets = ["default"]
    if " avx2" in flags:
        sets.append("avx2")
    if " avx512f" in flags:
        sets.append("avx512")
    return sets


def reference_spec(method: str, work_dir: Path, protocol: str = "pascal-context", **options: Any) -> RunSpec:
    """The reference run of ``method`` as a run specification: the ``tiny`` preset, seed 0, generated data, on
    the CPU, in ``work_dir``; ``options``: more RunSpec fields (e.g. ``activation_checkpointing="all"``)."""
    from benchmark.protocol import get_protocol
    from benchmark.run import RunSpec, resolve_settings

    proto = get_protocol(protocol)
    settings = resolve_settings(proto, PRESET)
    return RunSpec.build(proto, method, (), SEED, settings, work_dir=Path(work_dir), device="cpu", **options)


def run_reference(
    method: str, threads: int = 1, options: dict[str, Any] | None = None, capability: str | None = None
) -> dict[str, Any]:
    """Run one reference run in a fresh process (``benchmark.run.run`` on :func:`reference_spec`; ``options``:
    more RunSpec fields; ``capability``: an ``ATEN_CPU_CAPABILITY`` for it, None = as this process has it): the
    thread count and the kernel set are fixed when torch starts. Returns its result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    env.pop("MTPEFT_FAULT_NAN_ITER", None)
    with tempfile.TemporaryDirectory(prefix=f"refrun-{method}-") as tmp:
        child = "import sys; from benchmark.reference_runs import _run_child; sys.exit(_run_child(sys.argv[1:]))"
        cmd = [sys.executable, "-c", child, method, tmp, json.dumps(options or {})]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"reference run of {method} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def _run_child(argv: Sequence[str]) -> int:
    """In the fresh process of :func:`run_reference`: METHOD WORK_DIR OPTIONS_JSON."""
    from benchmark.run import run

    method, work_dir, options = argv
    result = run(reference_spec(method, Path(work_dir), **json.loads(options)))
    return 1 if result.status == "failed" else 0


def golden_entry(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": result["method"]["config"],
        "metrics": {t: {m: result["metrics"][t][m] for m in ms} for t, ms in CHECKED_METRICS.items()},
        "trainable": result["params"]["trainable"],
    }


def measure(method: str, log: Any = None) -> dict[str, Any]:
    """A golden entry: the native 1-thread run's metrics plus their spread over every kernel set x thread count."""
    native = golden_entry(run_reference(method))
    runs = [native["metrics"]]
    settings = []
    for cap in kernel_sets():
        for threads in THREADS:
            if log:
                log(f"  {method}: ATEN_CPU_CAPABILITY={cap}, {threads} thread(s)")
            runs.append(golden_entry(run_reference(method, threads=threads, capability=cap))["metrics"])
            settings.append(f"{cap}/{threads}")
    native["spread"] = {
        t: {m: max(r[t][m] for r in runs) - min(r[t][m] for r in runs) for m in ms}
        for t, ms in native["metrics"].items()
    }
    native["spread_settings"] = ["native/1", *settings]
    return native


def compare(method: str, golden: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """Differences beyond noise between a golden entry and a fresh result (empty list: the same)."""
    problems = []
    now = golden_entry(result)
    if now["config"] != golden["config"]:
        problems.append(f"{method}: default config changed: {golden['config']} -> {now['config']}")
    if now["trainable"] != golden["trainable"]:
        problems.append(f"{method}: trainable parameters {golden['trainable']:,} -> {now['trainable']:,}")
    spread = golden.get("spread")
    if spread is None:
        return problems + [f"{method}: golden entry has no measured spread; regenerate it with --update {method}"]
    for task, metrics in golden["metrics"].items():
        for m, ref in metrics.items():
            val = now["metrics"][task][m]
            tol = RUN_K * float(spread[task][m])
            if not math.isfinite(val) or abs(val - ref) > tol:
                problems.append(
                    f"{method}: {task}/{m} moved {ref:.6f} -> {val:.6f} (noise bound {tol:.3g} = {RUN_K:g} x the "
                    f"spread over {len(golden.get('spread_settings', []))} kernel/thread settings)"
                )
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
        from benchmark.method_api import method_registry

        registry = method_registry()
        names = args.update or registry.names()
        data = load_golden(args.golden) if args.golden.is_file() else {}
        data.setdefault("preset", PRESET)
        data.setdefault("seed", SEED)
        data["noise_model"] = (
            "metrics: the native 1-thread run; spread: max - min over that run and every ATEN_CPU_CAPABILITY this "
            f"CPU has x {list(THREADS)} threads; --check allows {RUN_K:g} x spread (benchmark/reference_runs.py)"
        )
        runs = data.setdefault("methods", {})
        for name in names:
            registry.get(name)
            print(f"reference run: {name}", file=sys.stderr)
            runs[name] = measure(name, log=lambda line: print(line, file=sys.stderr))
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
