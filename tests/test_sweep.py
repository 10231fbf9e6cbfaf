"""Sweeps: grid expansion, the Slurm job parameters (built, never submitted), and a local submitit sweep that is
killed, resumed, fails one job and skips finished ones (CPU, ``tiny`` preset)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import build_parser, main
from benchmark.protocol import PASCAL_CONTEXT
from benchmark.results import RunResult, make_run_id
from benchmark.run import RunSpec
from benchmark.sweep import SweepError, expand_grid, job_command, slurm_parameters, split_alternatives

ENV = {k: v for k, v in os.environ.items() if not k.startswith("MTPEFT_FAULT_")}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


# --------------------------------------------------------------------------- grid


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16,32,64", ["16", "32", "64"]),
        ("[64,64,64,64]", ["[64,64,64,64]"]),
        ("[16,16],[32,32]", ["[16,16]", "[32,32]"]),
        ('{"semseg": 8, "sal": 4},{}', ['{"semseg": 8, "sal": 4}', "{}"]),
        ('"a,b",c', ['"a,b"', "c"]),
        ("0.5", ["0.5"]),
    ],
)
def test_top_level_commas_are_alternatives(text, expected):
    assert split_alternatives(text, "k") == expected


def test_grid_applies_each_key_to_the_methods_that_have_it():
    grid = expand_grid(["full_ft", "lora", "adapter"], ["rank=4,8", "reduction=8"], [0, 1], PASCAL_CONTEXT)
    by_method: dict[str, set] = {}
    for p in grid:
        by_method.setdefault(p.method, set()).add(p.overrides)
    assert by_method == {"full_ft": {()}, "lora": {("rank=4",), ("rank=8",)}, "adapter": {("reduction=8",)}}
    assert len(grid) == (1 + 2 + 1) * 2
    for p in grid:
        assert p.run_id == make_run_id("pascal-context", 1, p.method, p.config, [p.seed])
    assert {p.config["rank"] for p in grid if p.method == "lora"} == {4, 8}
    # the same config twice is one job
    assert len(expand_grid(["lora"], ["rank=4,4"], [0], PASCAL_CONTEXT)) == 1


@pytest.mark.parametrize(
    ("methods", "sets", "expected"),
    [
        (["full_ft", "lora"], ["rnak=4,8"], "none of the selected methods (full_ft, lora) has a config field 'rnak'"),
        (["lora"], ["rnak=4"], "did you mean rank"),
        (["lora"], ["rank=4,,8"], "empty alternative"),
        (["lora"], ["rank=4", "rank=8"], "given twice"),
        (["lora", "adapter"], ["rank=4,eight"], "expected an integer"),
        (["mtlora", "lora"], ["task_rank=0,4"], "mtlora with --set task_rank=0"),
    ],
)
def test_bad_grid_is_an_error_before_anything_runs(methods, sets, expected, tmp_path, capsys):
    with pytest.raises((SweepError, ValueError)) as e:
        expand_grid(methods, sets, [0], PASCAL_CONTEXT)
    assert expected in str(e.value)
    code = main(["--method", *methods, "--set", *sets, "--preset", "tiny", "--executor", "local",
                 "--work-dir", str(tmp_path / "s")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("run_benchmark: error: ") and expected in err
    assert not (tmp_path / "s").exists()


def test_run_ids_are_short_folder_names_distinct_per_config():
    grid = expand_grid(["mtlora"], ["task_rank=4,8"], [3], PASCAL_CONTEXT)
    ids = [p.run_id for p in grid]
    assert len(set(ids)) == 2 and all(len(i) < 80 and "/" not in i and i.endswith("--seed3") for i in ids)
    assert make_run_id("pascal-context", 1, "full_ft", {}, [0]) == "pascal-context.v1--full_ft--default--seed0"


# --------------------------------------------------------------------------- slurm, without submitting


def test_slurm_sweep_dry_run_builds_torchrun_jobs_and_sbatch_parameters(tmp_path, capsys):
    data = tmp_path / "PASCAL_MT"
    data.mkdir()
    sweep_dir = tmp_path / "sweep"
    code = main(["--method", "lora", "full_ft", "--set", "rank=16,32", "--seed", "0", "1", "--preset", "paper",
                 "--data", str(data), "--executor", "slurm", "--slurm-partition", "gpu", "--slurm-account", "proj",
                 "--gpus-per-job", "2", "--slurm-time-min", "600", "--slurm-mem-gb", "64", "--max-parallel", "3",
                 "--work-dir", str(sweep_dir), "--sweep-dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sweep: 6 job(s)" in out and "executor slurm, 2 GPU(s) per job (torchrun, 2 processes)" in out
    jobs = [line.strip() for line in out.splitlines() if line.startswith("    ")]
    assert len(jobs) == 6
    for cmd in jobs:
        assert cmd.startswith(
            f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2 -m benchmark.cli"
        )
        assert "--resume" in cmd and f"--data {data}" in cmd and f"--work-dir {sweep_dir}/pascal-context.v1--" in cmd
    assert sum("--set=rank=16" in c for c in jobs) == 2 and sum("--method full_ft" in c for c in jobs) == 2
    params = json.loads(out.split("slurm executor parameters: ", 1)[1].splitlines()[0])
    assert params == {
        "job_name": "mtpeft", "time": 600, "nodes": 1, "ntasks_per_node": 1, "gpus_per_node": 2, "cpus_per_task": 10,
        "signal_delay_s": 120, "array_parallelism": 3, "partition": "gpu", "account": "proj", "mem": "64GB",
    }  # fmt: skip
    if "sbatch script" in out:  # rendered by submitit itself
        assert "#SBATCH --partition=gpu" in out and "#SBATCH --gpus-per-node=2" in out
    assert not sweep_dir.exists()  # nothing submitted, nothing written


@pytest.mark.parametrize(
    ("given", "passed"),
    [([], None), (["--activation-checkpointing"], "all"), (["--activation-checkpointing", "1,2"], "1,2")],
)
def test_job_command_passes_activation_checkpointing_on(given, passed, tmp_path):
    args = build_parser().parse_args(["--method", "mtlora", "--preset", "tiny", *given])
    cmd = job_command(RunSpec.from_args(args, "mtlora"), args, tmp_path / "job", 1)
    if passed is None:
        assert "--activation-checkpointing" not in cmd
    else:
        assert cmd[cmd.index("--activation-checkpointing") + 1] == passed


def test_slurm_parameters_defaults():
    args = build_parser().parse_args(["--method", "lora", "--executor", "slurm"])
    p = slurm_parameters(args, gpus=1)
    assert p["gpus_per_node"] == 1 and p["ntasks_per_node"] == 1 and p["time"] == 4320
    assert "partition" not in p and "mem" not in p and p["array_parallelism"] == 256


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--max-parallel", "0"], "--max-parallel 0: expected 1 or more"),
        (["--gpus-per-job", "-1"], "--gpus-per-job -1: expected 0 or more"),
        (["--eval-only", "--checkpoint", "x.pth"], "--eval-only / --checkpoint evaluate one checkpoint"),
        (["--preset", "paper"], "--data DIR is required"),
        # lora cannot checkpoint: refused before any job starts, not as a failed job in the middle of the sweep
        (["--activation-checkpointing", "1"], "--activation-checkpointing: method 'lora' has no checkpointing"),
        (["--activation-checkpointing", "9"], "stage numbers 1-4"),
    ],
)
def test_bad_sweep_arguments(extra, expected, tmp_path, capsys):
    code = main(["--method", "lora", "--set", "rank=4,8", "--preset", "tiny", "--work-dir", str(tmp_path / "s"),
                 "--sweep-dry-run", *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert not (tmp_path / "s").exists()


def test_slurm_without_slurm_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun anywhere: never submits, even on a cluster
    code = main(["--method", "lora", "--set", "rank=4,8", "--preset", "tiny", "--executor", "slurm",
                 "--work-dir", str(tmp_path / "s")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--executor slurm: no Slurm on this machine (srun not found)" in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("command.json"))


def test_sweep_refuses_a_folder_holding_a_run_with_other_settings(tmp_path, capsys):
    point = expand_grid(["full_ft"], [], [0], PASCAL_CONTEXT)[0]
    job_dir = tmp_path / "s" / point.run_id
    job_dir.mkdir(parents=True)
    result = RunResult(
        run_id=point.run_id, status="debug", protocol={"name": "pascal-context", "version": 1},
        method={"name": "full_ft", "config": {}}, seeds=[0], preset="smoke", metrics={},
        delta_m={"value": None, "reference": "x"}, params={}, selection={"rule": "final"},
    )  # fmt: skip
    result.write(job_dir / "result.json")
    code = main(["--method", "full_ft", "--seed", "0", "--preset", "tiny", "--executor", "local",
                 "--work-dir", str(tmp_path / "s"), "--sweep-dry-run"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert f"{job_dir / 'result.json'}: this folder holds a finished run with other settings: preset 'smoke'" in err


# --------------------------------------------------------------------------- a local sweep through submitit


def sweep(sweep_dir: Path, *extra: str, fault: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "benchmark.cli", "--preset", "tiny", "--epochs", "2", "--seed", "0",
           "--executor", "local", "--work-dir", str(sweep_dir), *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(fault or {})}, timeout=600)


def summary(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep_summary.json").read_text())


def states(sweep_dir: Path) -> dict[str, str]:
    return {j["method"] + "/" + str(j["config"].get("rank", "-")): j["state"] for j in summary(sweep_dir)["jobs"]}


def test_local_sweep_is_idempotent_resumes_killed_jobs_and_reports_failures(tmp_path):
    sd = tmp_path / "sweep"
    lora = ["--method", "lora", "--set", "rank=4,8"]

    # 1. both jobs killed by SIGKILL in epoch 2 (iteration 5): failed, each with its log
    p = sweep(sd, *lora, fault={"MTPEFT_FAULT_KILL_AT_ITER": "5"})
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert states(sd) == {"lora/4": "failed", "lora/8": "failed"}
    for job in summary(sd)["jobs"]:
        job_dir = Path(job["job_dir"])
        assert job["returncode"] == -9 and job["log"] == str(job_dir / "log.txt") and Path(job["log"]).is_file()
        assert f"(log {job['log']})" in p.stdout
        assert (job_dir / "checkpoints" / "epoch_1.pth").is_file() and not (job_dir / "result.json").exists()
        recorded = json.loads((job_dir / "command.json").read_text())
        assert recorded["command"] == job["command"] and recorded["executor"] == "local"
        assert recorded["command"][:3] == [sys.executable, "-m", "benchmark.cli"] and "--resume" in recorded["command"]
    assert "0 done, 0 skipped, 0 resumed, 2 failed" in p.stdout

    # 2. rerun with a new method: the killed jobs resume from their checkpoint; full_ft (fresh) hits a NaN
    p = sweep(sd, "--method", "lora", "full_ft", "--set", "rank=4,8", fault={"MTPEFT_FAULT_NAN_ITER": "0"})
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert states(sd) == {"lora/4": "resumed", "lora/8": "resumed", "full_ft/-": "failed"}
    failed = next(j for j in summary(sd)["jobs"] if j["state"] == "failed")
    assert "non-finite loss at iteration 0" in failed["detail"] and f"(log {failed['log']})" in p.stdout
    for job in summary(sd)["jobs"]:
        if job["state"] == "resumed":
            assert "epoch_1.pth" in job["detail"]
            assert RunResult.read(Path(job["job_dir"]) / "result.json").status == "debug"
    assert "0 done, 0 skipped, 2 resumed, 1 failed" in p.stdout

    # 3. rerun without faults: finished jobs are skipped (nothing started for them), the failed one reruns
    logs = {j["run_id"]: Path(j["log"]).read_text() for j in summary(sd)["jobs"] if j["state"] == "resumed"}
    p = sweep(sd, "--method", "lora", "full_ft", "--set", "rank=4,8")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert states(sd) == {"lora/4": "skipped", "lora/8": "skipped", "full_ft/-": "done"}
    assert "1 done, 2 skipped, 0 resumed, 0 failed" in p.stdout
    for run_id, text in logs.items():
        assert (sd / run_id / "log.txt").read_text() == text
    ft = next(j for j in summary(sd)["jobs"] if j["method"] == "full_ft")
    assert RunResult.read(Path(ft["job_dir"]) / "result.json").status == "debug"


def test_local_sweep_dry_run_lists_skip_resume_and_run(tmp_path, capsys):
    sd = tmp_path / "s"
    grid = expand_grid(["lora"], ["rank=4,8,16"], [0], PASCAL_CONTEXT)
    dirs = [sd / p.run_id for p in grid]
    (dirs[1] / "checkpoints").mkdir(parents=True)
    (dirs[1] / "checkpoints" / "epoch_1.pth").write_bytes(b"")
    code = main(["--method", "lora", "--set", "rank=4,8,16", "--preset", "tiny", "--executor", "local",
                 "--gpus-per-job", "0", "--work-dir", str(sd), "--sweep-dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    marks = [line.split("]")[0][1:] for line in out.splitlines() if line.startswith("[")]
    assert marks == ["run", "resume", "run"]
    assert "local executor parameters" in out


def test_sweep_flags_are_documented():
    text = build_parser().format_help()
    for flag in ("--executor", "--max-parallel", "--gpus-per-job", "--sweep-dry-run", "--slurm-partition"):
        assert flag in text
    assert "applies to those that have the field" in " ".join(text.split())
    assert build_parser().parse_args(["--set", "a=1", "--set", "b=2"]).set == ["a=1", "b=2"]


def test_sweep_of_mtlora_methods_takes_activation_checkpointing(tmp_path, capsys):
    code = main(["--method", "mtlora", "mtlora_plus", "--preset", "tiny", "--activation-checkpointing", "1",
                 "--work-dir", str(tmp_path / "s"), "--sweep-dry-run"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
