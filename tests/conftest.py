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
