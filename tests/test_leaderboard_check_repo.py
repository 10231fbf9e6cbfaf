"""`leaderboard check` on the repository itself, exactly as CI would run it (real parameter-count subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_leaderboard_check_passes_on_the_committed_repository():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "leaderboard", "check", "results"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout + p.stderr
    # every part ran, including the parameter counts of every expected configuration
    for part in ("results", "published-delta-m", "params", "stale"):
        assert part in out, out[-2000:]
