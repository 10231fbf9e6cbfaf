"""Parity with the official implementation: ``python -m benchmark.parity DIR``.

Runs every fixture found in DIR against this implementation and prints one line per check with its
maximum difference; exits non-zero if any check fails. Fixture kinds (see the fixture README):

- ``dataset_*.pt`` with its dataset folder beside it -> ``benchmark.dataset.parity_checks``
- ``metrics_*.pt``                                   -> ``benchmark.metrics.parity_checks``
- ``model_*.pt`` (+ ``model_*_grad.pt``)             -> ``benchmark.official.parity_checks``
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str  # e.g. "dataset_public/2008_000002/semseg"
    max_diff: float  # maximum absolute difference found (0.0 for exact checks that pass)
    tol: float  # allowed maximum
    passed: bool
    detail: str = ""  # what differed, where


# The CLI (main) is written in the metrics/parity commit.
