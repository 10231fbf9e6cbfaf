"""Work folders never lose a run (issue 15, item 3): an exclusive lock for the life of a run, ownership by one
run id, and rotation / clean-up of this harness's own files only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark import workdir
from benchmark.cli import main
from benchmark.method_api import METHODS
from benchmark.results import make_run_id

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for _k in [k for k in ENV if k.startswith("MTPEFT_FAULT_")]:
    del ENV[_k]
TINY = ["--preset", "tiny", "--epochs", "1"]


def _run_id(method: str) -> str:
    return make_run_id("pascal-context", 1, method, METHODS.get(method).default_config().to_dict(), [0])


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.err + out.out


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmark.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished lora run (tiny, one epoch)."""
    wd = tmp_path_factory.mktemp("finished") / "wd"
    p = subprocess.run([sys.executable, "-m", "benchmark.cli", "--method", "lora", *TINY, "--work-dir", str(wd)],
                       capture_output=True, text=True, env=ENV, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


def test_a_second_run_in_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    wd = tmp_path / "wd"
    wd.mkdir()
    workdir.acquire_lock(wd)  # this process holds the folder, as a running run_benchmark does
    try:
        p = subprocess.run([sys.executable, "-m", "benchmark.cli", "--method", "lora", *TINY, "--work-dir", str(wd)],
                           capture_output=True, text=True, env=ENV, timeout=300)  # fmt: skip
    finally:
        workdir.release_lock(wd)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"--work-dir {wd}: in use by another run (pid {os.getpid()}" in p.stderr
    assert sorted(x.name for x in wd.iterdir()) == [workdir.LOCK_NAME]  # nothing else was written


def test_two_runs_started_together_in_one_folder(tmp_path):
    wd = tmp_path / "wd"
    procs = [_popen("--method", "lora", *TINY, "--work-dir", str(wd)) for _ in range(2)]
    outs = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in outs)
    assert codes == [0, 2], [err[-1500:] for _, _, err in outs]
    refused = next(err for code, _, err in outs if code == 2)
    # refused by the lock while the other runs, or by ownership when it has already finished
    assert "in use by another run (pid" in refused or "already holds this run's files" in refused
    winner = next(out for code, out, _ in outs if code == 0)
    result = json.loads((wd / "result.json").read_text())
    assert result["run_id"] == _run_id("lora") and str(wd / "result.json") in winner


def test_a_folder_of_another_run_is_refused_then_taken_over_without_loss(finished, tmp_path, capsys):
    wd = tmp_path / "wd"
    (wd / "checkpoints").mkdir(parents=True)
    for name in ("result.json", workdir.OWNER_NAME):
        (wd / name).write_bytes((finished / name).read_bytes())
    theirs = (finished / "checkpoints" / "epoch_1.pth").read_bytes()
    for epoch in (5, 6):  # the other run's later checkpoints: before, the rotation kept these and not ours
        (wd / "checkpoints" / f"epoch_{epoch}.pth").write_bytes(theirs)
    before = (wd / "result.json").read_bytes()
    code, err = _cli(capsys, "--method", "full_ft", *TINY, "--work-dir", str(wd))
    assert code == 2
    assert f"--work-dir {wd}: holds the files of another run ({_run_id('lora')}; this run is" in err
    assert (wd / "result.json").read_bytes() == before
    code, err = _cli(capsys, "--method", "full_ft", *TINY, "--work-dir", str(wd), "--take-over-work-dir")
    assert code == 0, err
    assert json.loads((wd / "result.json").read_text())["run_id"] == _run_id("full_ft")
    assert sorted(p.name for p in (wd / "checkpoints").glob("epoch_*.pth")) == ["epoch_1.pth"]
    (moved,) = (wd / workdir.REPLACED_DIR).iterdir()
    assert moved.name.startswith(_run_id("lora"))
    assert (moved / "result.json").read_bytes() == before
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["epoch_5.pth", "epoch_6.pth"]


def test_a_rerun_without_resume_does_not_overwrite_a_finished_run(finished, tmp_path, capsys):
    wd = tmp_path / "wd"
    wd.mkdir()
    for name in ("result.json", workdir.OWNER_NAME):
        (wd / name).write_bytes((finished / name).read_bytes())
    before = (wd / "result.json").read_bytes()
    code, err = _cli(capsys, "--method", "lora", *TINY, "--work-dir", str(wd))
    assert code == 0 and "records this run as finished; left untouched" in err  # the same run: nothing to do
    assert (wd / "result.json").read_bytes() == before
    code, err = _cli(capsys, "--method", "lora", "--preset", "tiny", "--epochs", "2", "--work-dir", str(wd))
    assert code == 2 and "records a finished run with other settings: epochs 1 (this run: 2)" in err
    assert (wd / "result.json").read_bytes() == before
    # a run of this id that did not finish (a checkpoint, no result): continuing it needs --resume
    (wd / "result.json").unlink()
    (wd / "checkpoints").mkdir()
    (wd / "checkpoints" / "epoch_1.pth").write_bytes((finished / "checkpoints" / "epoch_1.pth").read_bytes())
    code, err = _cli(capsys, "--method", "lora", *TINY, "--work-dir", str(wd))
    assert code == 2 and "already holds this run's files" in err and "Add --resume" in err
    (wd / "result.json").write_bytes(before)
    shutil.rmtree(wd / "checkpoints")
    # an evaluation into the training run's folder (the default --work-dir of both) is told where to write
    ckpt = finished / "checkpoints" / "epoch_1.pth"
    code, err = _cli(
        capsys, "--method", "lora", *TINY, "--work-dir", str(wd), "--eval-only", "--checkpoint", str(ckpt)
    )
    assert code == 2 and "an evaluation writes its own result.json: give it another --work-dir" in err
    assert (wd / "result.json").read_bytes() == before


def test_resume_of_a_finished_run_leaves_it_untouched(finished, capsys):
    before = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file() and p.name != workdir.LOCK_NAME}
    code, err = _cli(capsys, "--method", "lora", *TINY, "--work-dir", str(finished), "--resume")
    assert code == 0
    assert f"{finished / 'result.json'} records this run as finished; left untouched" in err
    after = {p: p.read_bytes() for p in finished.rglob("*") if p.is_file() and p.name != workdir.LOCK_NAME}
    assert after == before
    # the same run with other settings: refused, not silently "finished"
    code, err = _cli(capsys, "--method", "lora", "--preset", "tiny", "--epochs", "2", "--work-dir", str(finished),
                     "--resume")  # fmt: skip
    assert code == 2 and "records a finished run with other settings: epochs 1 (this run: 2)" in err


def test_only_the_harness_own_temp_files_are_cleaned(tmp_path, capsys):
    wd = tmp_path / "wd"
    (wd / "checkpoints").mkdir(parents=True)
    mine = [wd / "notes.tmp", wd / ".draft.tmp", wd / "checkpoints" / ".x.tmp", wd / ".result.json.abc.tmp"]
    for p in mine:
        p.write_text("the user's")
    ours = wd / "checkpoints" / ".epoch_1.pth.mtpeft-k2j4h1.tmp"  # what a killed atomic write leaves
    ours.write_bytes(b"half")
    code, err = _cli(capsys, "--method", "lora", *TINY, "--work-dir", str(wd))
    assert code == 0, err
    assert all(p.read_text() == "the user's" for p in mine)
    assert not ours.exists() and f"removed {ours}, left by an interrupted write" in err


def test_a_folder_with_only_a_refused_runs_marker_is_free(tmp_path, capsys):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / workdir.OWNER_NAME).write_text(json.dumps({"run_id": _run_id("full_ft")}))  # it wrote nothing else
    assert workdir.owner(wd) is None
    code, err = _cli(capsys, "--method", "lora", *TINY, "--work-dir", str(wd))
    assert code == 0, err
    assert json.loads((wd / workdir.OWNER_NAME).read_text())["run_id"] == _run_id("lora")


@pytest.mark.parametrize("kind", ["file", "under_a_file", "unwritable"])
def test_work_dir_that_cannot_be_a_folder(tmp_path, capsys, kind):
    if kind == "file":
        wd = tmp_path / "f"
        wd.write_text("x")
        want = f"--work-dir {wd}: exists and is not a folder"
    elif kind == "under_a_file":
        (tmp_path / "f").write_text("x")
        wd = tmp_path / "f" / "wd"
        want = f"--work-dir {wd}: a part of this path is a file"
    else:
        if os.geteuid() == 0:
            wd = Path("/proc/self/wd")  # not creatable, even for root
            want = f"--work-dir {wd}: cannot create the folder"
        else:
            ro = tmp_path / "ro"
            ro.mkdir(mode=0o500)
            wd = ro / "wd"
            want = f"--work-dir {wd}: cannot create the folder"
    code, err = _cli(capsys, "--method", "lora", *TINY, "--work-dir", str(wd))
    assert code == 2 and want in err and "Traceback" not in err
