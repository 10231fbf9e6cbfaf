"""End-to-end behaviour of ``run_benchmark`` on the CPU with the ``tiny`` preset (generated data)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.results import RunResult, validate_dict

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmark.cli", *args],
        capture_output=True,
        text=True,
        env=env or ENV,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One uninterrupted 3-epoch tiny run of full_ft (checkpoint every epoch, keeps the last two)."""
    wd = tmp_path_factory.mktemp("trained")
    p = run("--method", "full_ft", "--preset", "tiny", "--epochs", "3", "--work-dir", str(wd))
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


def test_run_writes_a_valid_debug_result(trained):
    data = json.loads((trained / "result.json").read_text())
    validate_dict(data, "result.json")
    r = RunResult.from_dict(data)
    assert r.status == "debug"  # the tiny preset is not the protocol: never tabled
    assert r.method == {"name": "full_ft", "config": {}}
    assert r.protocol == {"name": "pascal-context", "version": 1}
    assert set(r.metrics) == {"semseg", "human_parts", "sal", "normals"}
    assert 0.0 <= r.metrics["semseg"]["mIoU"] <= 1.0 and r.metrics["normals"]["mean"] > 0
    assert r.selection["rule"] == "final" and r.selection["epoch"] == 3
    assert r.params["trainable"] == r.params["total"] > 0
    assert r.cost["train_images_per_s"] > 0 and r.cost["peak_mem_bytes"] > 0
    assert r.env["torch"] == torch.__version__ and "git_sha" in r.env
    # Δm recomputes from the stored metrics
    from benchmark.metrics import results_delta_m
    from benchmark.protocol import PASCAL_CONTEXT

    assert r.delta_m["value"] == pytest.approx(results_delta_m(r.metrics, PASCAL_CONTEXT), rel=1e-12)
    ckpts = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert ckpts == ["epoch_2.pth", "epoch_3.pth"]


def test_resume_after_a_kill_gives_identical_metrics(trained, tmp_path):
    wd = tmp_path / "resumed"
    shutil.copytree(trained, wd)
    # as if the run had been killed during epoch 3: its checkpoint and result never got written
    (wd / "checkpoints" / "epoch_3.pth").unlink()
    (wd / "result.json").unlink()
    p = run("--method", "full_ft", "--preset", "tiny", "--epochs", "3", "--work-dir", str(wd), "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    a = json.loads((trained / "result.json").read_text())
    b = json.loads((wd / "result.json").read_text())
    assert a["metrics"] == b["metrics"]  # bit-identical on CPU
    assert a["delta_m"] == b["delta_m"]


def test_resume_skips_a_corrupt_last_checkpoint(trained, tmp_path):
    wd = tmp_path / "corrupt"
    shutil.copytree(trained, wd)
    last = wd / "checkpoints" / "epoch_3.pth"
    last.write_bytes(last.read_bytes()[:1000])  # truncated
    (wd / "result.json").unlink()
    p = run("--method", "full_ft", "--preset", "tiny", "--epochs", "3", "--work-dir", str(wd), "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert "skipping unusable checkpoint" in log and "epoch_3.pth" in log
    assert "resumed from" in log and "epoch_2.pth" in log
    a = json.loads((trained / "result.json").read_text())
    b = json.loads((wd / "result.json").read_text())
    assert a["metrics"] == b["metrics"]


def test_eval_only_with_two_processes_equals_one(trained, tmp_path):
    ckpt = trained / "checkpoints" / "epoch_3.pth"
    data = trained / "synthetic_data"
    one = tmp_path / "one"
    p = run("--method", "full_ft", "--preset", "tiny", "--eval-only", "--checkpoint", str(ckpt), "--data", str(data),
            "--work-dir", str(one))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    q = subprocess.run(
        [
            *torchrun,
            "-m",
            "benchmark.cli",
            "--method",
            "full_ft",
            "--preset",
            "tiny",
            "--eval-only",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(data),
            "--work-dir",
            str(two),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert q.returncode == 0, q.stderr[-3000:]
    a = json.loads((one / "result.json").read_text())
    b = json.loads((two / "result.json").read_text())
    assert b["env"]["world_size"] == 2 and a["env"]["world_size"] == 1
    assert a["metrics"] == b["metrics"]
    # the per-image statistics (the bootstrap's input) come back in the same image order from 2 processes
    pa, pb = (gzip.decompress((d / "result.per_image.json.gz").read_bytes()) for d in (one, two))
    assert pa == pb and json.loads(pa)["run_id"] == a["run_id"]
    # and both equal the validation at the end of training
    assert a["metrics"] == json.loads((trained / "result.json").read_text())["metrics"]


def test_nan_loss_stops_with_status_failed_and_keeps_the_checkpoint(tmp_path):
    wd = tmp_path / "nan"
    env = {**ENV, "MTPEFT_FAULT_NAN_ITER": "5"}  # epoch 2 (4 iterations per epoch)
    p = run("--method", "full_ft", "--preset", "tiny", "--work-dir", str(wd), env=env)
    assert p.returncode == 1
    assert "non-finite loss at iteration 5" in p.stderr and "semseg=" in p.stderr
    r = json.loads((wd / "result.json").read_text())
    assert r["status"] == "failed" and any("iteration 5" in n for n in r["notes"])
    ckpts = sorted(x.name for x in (wd / "checkpoints").iterdir())
    assert ckpts == ["epoch_1.pth"]
    from benchmark.checkpoints import read_checkpoint

    assert read_checkpoint(wd / "checkpoints" / "epoch_1.pth")["epoch"] == 1


def test_dry_run_json_gives_the_official_full_ft_count():
    p = run("--method", "full_ft", "--preset", "paper", "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["params"]["trainable"] == 29_464_442
    assert out["params"]["decoders"] == 1_946_624
    assert out["image_size"] == 448 and out["backbone"] == "swin_tiny"


def test_list_shows_methods_with_fields():
    p = run("--list", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert {"full_ft", "single_task", "decoders_only", "lora", "mtlora", "mtlora_plus"} <= set(rows)
    assert any(f["name"] == "rank" for f in rows["lora"]["fields"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--method", "mtlroa", "--dry-run"], "unknown method 'mtlroa'; did you mean mtlora"),
        (["--method", "lora", "--set", "rnak=8", "--dry-run"], "did you mean rank"),
        (["--method", "lora", "--set", "rank=eight", "--dry-run"], "expected an integer"),
        (
            ["--method", "full_ft", "--preset", "paper"],
            "--data DIR is required with --preset paper for protocol "
            "pascal-context (download and check it with `benchmark-data fetch",
        ),
        (["--method", "full_ft", "--preset", "tiny", "--data", "/nonexistent/PASCAL_MT"], "dataset folder not found"),
        (["--method", "full_ft", "--pretrained", "/nonexistent/swin.pth", "--dry-run"], "file not found"),
        (["--method", "full_ft", "--image-size", "100", "--dry-run"], "image size 100"),
        (["--method", "full_ft", "--eval-only", "--preset", "tiny"], "--eval-only needs --checkpoint"),
        (["--method", "full_ft", "--preset", "huge"], "unknown preset 'huge'"),
        (["--method", "lora", "--activation-checkpointing", "--dry-run"], "for the methods mtlora, mtlora_plus"),
        (["--method", "mtlora", "--activation-checkpointing", "5", "--dry-run"], "stage numbers 1-4"),
        (
            ["--method", "lora", "--preset", "tiny", "--activation-checkpointing"],
            "it is available for the methods mtlora",
        ),
        (["--method", "lora", "--protocol", "nyd", "--dry-run"], "unknown protocol 'nyd'; known: ['nyud'"),
        (
            ["--method", "full_ft", "--preset", "paper", "--protocol", "nyud"],
            "`benchmark-data fetch` downloads "
            "PASCAL_MT only; check a folder with `benchmark-data check --protocol nyud DIR`",
        ),
    ],
)
def test_bad_input_is_a_clear_error(args, expected, tmp_path, capsys):
    from benchmark.cli import main

    code = main([*args, "--work-dir", str(tmp_path / "wd")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err
    assert not (tmp_path / "wd").exists()  # refused before any folder is made


def test_activation_checkpointing_none_is_accepted_for_any_method(capsys):
    from benchmark.cli import main

    # 'none' switches nothing on, so a method without a checkpointing backbone takes it
    assert main(["--method", "lora", "--activation-checkpointing", "none", "--dry-run"]) == 0, capsys.readouterr().err
