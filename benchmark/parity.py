"""Parity with the official implementation: ``python -m benchmark.parity DIR``.

Runs every fixture found in DIR against this implementation and prints one line per check with its
maximum difference; exits non-zero if any check fails. Fixture kinds (see the fixture README):

- ``dataset_*.pt`` with its dataset folder beside it -> ``benchmark.parity_data.parity_checks`` (PASCAL_MT)
- ``nyud_dataset_*.pt`` with its NYUD_MT folder      -> ``benchmark.parity_data.parity_checks`` (NYUD_MT)
- ``metrics_*.pt``                                   -> ``benchmark.parity_metrics.parity_checks``
- ``nyud_metrics_*.pt``                              -> ``benchmark.parity_metrics.parity_checks`` (NYUDv2)
- ``model_*.pt`` (+ ``model_*_grad.pt``)             -> ``benchmark.official.parity_checks``
- ``tadformer_*.pt`` (+ ``tadformer_*_grad.pt``)     -> ``benchmark.official.parity_checks`` (TADFormer)
- ``train_*.pt`` (+ the model fixture it names)       -> ``benchmark.official_train.parity_checks``

Without DIR, every fixture set of the repository is run: each sub-folder of ``tests/fixtures/`` (lean copies of
the official files made by ``python -m benchmark.lean_fixtures``; see tests/fixtures/README.md). Full official
files are accepted too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    name: str  # e.g. "dataset_public/2008_000002/semseg"
    max_diff: float  # maximum absolute difference found (0.0 for exact checks that pass)
    tol: float  # allowed maximum
    passed: bool
    detail: str = ""  # what differed, where


# fixture kind -> (module with parity_checks(path) -> list[Check], file pattern); modules import lazily so that
# a kind whose implementation is missing or broken fails on its own, never blocking the others
CHECKERS: dict[str, tuple[str, str]] = {
    "dataset": ("benchmark.parity_data", "dataset_*.pt"),
    "nyud_dataset": ("benchmark.parity_data", "nyud_dataset_*.pt"),
    "metrics": ("benchmark.parity_metrics", "metrics_*.pt"),
    "nyud_metrics": ("benchmark.parity_metrics", "nyud_metrics_*.pt"),
    "model": ("benchmark.official", "model_*.pt"),
    "tadformer": ("benchmark.official", "tadformer_*.pt"),  # same checks; the fixture config selects the method
    "train": ("benchmark.official_train", "train_*.pt"),
}
# kinds whose ``*_grad.pt`` files are gradient companions, run with their model fixture
WITH_GRAD_COMPANIONS = ("model", "tadformer")

# the repository's fixture sets: one sub-folder each
FIXTURES_ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


class ParityUsageError(ValueError):
    """A parity run that cannot start (no such folder, no fixtures); the message says which."""


def discover(directory: str | Path, only: str | None = None) -> list[tuple[str, Path]]:
    """(kind, path) of every fixture in ``directory``, sorted; gradient companions are left to their model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ParityUsageError(f"fixture folder not found: {directory}")
    found = []
    for kind, (_, pattern) in CHECKERS.items():
        if only is not None and kind != only:
            continue
        for path in sorted(directory.glob(pattern)):
            if path.is_file() and not (kind in WITH_GRAD_COMPANIONS and path.name.endswith("_grad.pt")):
                found.append((kind, path))
    if not found:
        what = (
            f"{only} fixtures ({CHECKERS[only][1]})"
            if only
            else "fixtures (" + ", ".join(p for _, p in CHECKERS.values()) + ")"
        )
        raise ParityUsageError(f"no {what} in {directory}")
    return found


def discover_sets(root: Path, only: str | None = None) -> list[tuple[str, Path]]:
    """(kind, path) of every fixture in every sub-folder of ``root``; a folder with no known kind is left out."""
    if not root.is_dir():
        raise ParityUsageError(f"no fixture sets: {root} does not exist (run from a checkout of the repository)")
    found: list[tuple[str, Path]] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            found += discover(sub, only)
        except ParityUsageError:
            continue
    if not found:
        raise ParityUsageError(f"no fixtures in any sub-folder of {root}")
    return found


def _shown(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _error(path: Path, detail: str) -> list[Check]:
    return [Check(path.stem, math.inf, 0.0, False, detail)]


def run_fixture(kind: str, path: Path) -> list[Check]:
    """The checks of one fixture; a missing implementation or an exception becomes one failing check."""
    module_name = CHECKERS[kind][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name or module_name.startswith(f"{e.name}."):
            return _error(path, f"not implemented: module {module_name} does not exist")
        return _error(path, f"cannot import {module_name}: {type(e).__name__}: {e}")
    except Exception as e:  # a broken module fails its own fixtures only
        return _error(path, f"cannot import {module_name}: {type(e).__name__}: {e}")
    fn = getattr(module, "parity_checks", None)
    if fn is None:
        return _error(path, f"not implemented: {module_name}.parity_checks does not exist")
    try:
        checks = list(fn(path))
    except Exception as e:
        return _error(path, f"error in {module_name}.parity_checks: {type(e).__name__}: {e}")
    if not checks:
        return _error(path, f"{module_name}.parity_checks returned no checks")
    bad = [c for c in checks if not isinstance(c, Check)]
    if bad:
        return _error(path, f"{module_name}.parity_checks returned {type(bad[0]).__name__}, not Check")
    return checks


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.parity",
        description=(
            "Check this implementation against official-parity fixtures "
            "(dataset_*.pt, metrics_*.pt, model_*.pt, tadformer_*.pt)."
        ),
    )
    parser.add_argument(
        "dir",
        nargs="?",
        help="folder holding the fixtures (default: every fixture set under the repository's tests/fixtures/)",
    )
    parser.add_argument("--only", choices=sorted(CHECKERS), help="run one kind of fixture only")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text lines")
    args = parser.parse_args(argv)
    try:
        if args.dir is not None:
            fixtures = discover(args.dir, args.only)
        else:
            fixtures = discover_sets(FIXTURES_ROOT, args.only)
    except ParityUsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows: list[tuple[str, Path, Check]] = []
    for kind, path in fixtures:
        if not args.json:
            print(f"== {_shown(path)} ({kind})", flush=True)
        for c in run_fixture(kind, path):
            rows.append((kind, path, c))
            if not args.json:
                status = "PASS" if c.passed else "FAIL"
                line = f"{status}  {c.name}  max_diff={_fmt(c.max_diff)}  tol={_fmt(c.tol)}"
                print(line + (f"  {c.detail}" if c.detail else ""), flush=True)
    n_fail = sum(not c.passed for _, _, c in rows)
    n_pass = len(rows) - n_fail
    if args.json:
        doc = {
            "dir": str(Path(args.dir)) if args.dir is not None else str(FIXTURES_ROOT),
            "passed": n_pass,
            "failed": n_fail,
            "checks": [
                {
                    "fixture": path.name,
                    "set": path.parent.name,
                    "kind": kind,
                    **asdict(c),
                    "max_diff": c.max_diff if math.isfinite(c.max_diff) else None,  # JSON has no inf / nan
                }
                for kind, path, c in rows
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(f"{n_pass} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    # run the module as imported, not this __main__ copy: checkers import benchmark.parity.Check, and a
    # second copy of the class would make their checks fail the isinstance test above
    from benchmark.parity import main as _main

    sys.exit(_main())
