from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the official-parity fixtures, in the repository (lean form, see tests/fixtures/README.md)
FIXTURES = ROOT / "tests" / "fixtures" / "official_parity"

try:  # the leaderboard tests run in a torch-free environment too (tox -e leaderboard)
    import torch
except ImportError:
    torch = None
else:
    torch.set_num_threads(int(os.environ.get("MTPEFT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"official parity fixtures not found at {FIXTURES} (they are part of the repository)")
    return FIXTURES


# --------------------------------------------------------------------------- fp32 tolerances from an error model
# Two float32 computations of the same quantity that order their arithmetic differently (batched vs per-task
# streams, a fused kernel vs a library's, another CPU kernel set or thread count) each deviate from the exact value
# by fp32 rounding noise, reductions included. The yardstick is the reference computation itself run in float64:
# e = max|ref32 - ref64| per tensor is that noise as it is on this machine and kernel. The other computation has
# noise of the same kind, so |other - ref32| <= |other - exact| + |exact - ref32| ~ 2 e; e is one sample, hence
# FP32_K = 3 times it. The floor covers tensors whose exact value is ~0 (gradients of conv biases before a
# train-mode BatchNorm, sums of cancelling terms): FP32_FLOOR_ULPS fp32 ulps (2**-24 each) of the largest magnitude
# among all the compared tensors, the size of the terms that cancel.
FP32_K = 3.0
FP32_FLOOR_ULPS = 16


def fp32_tolerances(ref32: dict, ref64: dict) -> dict:
    """name -> allowed max|other32 - ref32| for each tensor, from the float64 run of the reference (see above)."""
    if not ref32:
        return {}
    top = max(float(v.detach().double().abs().max()) for v in ref64.values())
    floor = FP32_FLOOR_ULPS * 2.0**-24 * top
    return {
        n: FP32_K * float((ref32[n].detach().double() - ref64[n].detach().double()).abs().max()) + floor for n in ref32
    }
