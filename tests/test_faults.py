"""Fault injection on the CPU with the ``tiny`` preset: kills, crashes, bad data, a dead DDP peer, a full disk.

Every scenario runs ``run_benchmark`` in a subprocess with one of the test-only ``MTPEFT_FAULT_*`` variables
(benchmark/engine.py, benchmark/results.py) and checks what the user gets: the exit code, one clear message,
files that are complete or absent (never half-written), and a resumed run equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.checkpoints import read_checkpoint
from benchmark.results import RunResult

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
for _k in [k for k in ENV if k.startswith("MTPEFT_FAULT_")]:
    del ENV[_k]
EPOCHS = "2"  # 4 iterations per epoch: iterations 0-3 in epoch 1, 4-7 in epoch 2
BASE = ["--method", "full_ft", "--preset", "tiny", "--epochs", EPOCHS]
KILLED = -9  # subprocess return code of a process killed by SIGKILL


def run(*args: str, fault: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmark.cli", *args],
        capture_output=True,
        text=True,
        env={**ENV, **(fault or {})},
        timeout=timeout,
    )


def comparable(path: Path) -> dict:
    """result.json without what legitimately differs between two runs of the same thing (timings, notes)."""
    data = json.loads(path.read_text())
    for key in ("cost", "notes"):
        data.pop(key)
    for key in ("git_sha", "git_dirty"):  # the checkout may change while a test runs (provenance, not the run)
        data["env"].pop(key, None)
    return data


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run; checkpoints epoch_1.pth and epoch_2.pth, result.json."""
    wd = tmp_path_factory.mktemp("reference")
    p = run(*BASE, "--work-dir", str(wd))
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


def copy_run(reference: Path, dst: Path, keep_epochs: int, keep_result: bool = False) -> Path:
    """A copy of the reference run as if it had stopped after ``keep_epochs`` epochs."""
    shutil.copytree(reference, dst)
    for ckpt in (dst / "checkpoints").glob("epoch_*.pth"):
        if int(ckpt.stem.split("_")[1]) > keep_epochs:
            ckpt.unlink()
    if not keep_result:
        (dst / "result.json").unlink()
    return dst


# --------------------------------------------------------------------------- kills


def test_sigkill_at_a_random_iteration_then_resume_is_identical(reference, tmp_path):
    it = random.Random().randint(1, 7)
    wd = tmp_path / "killed"
    p = run(*BASE, "--work-dir", str(wd), fault={"MTPEFT_FAULT_KILL_AT_ITER": str(it)})
    assert p.returncode == KILLED, f"iteration {it}: {p.stderr[-2000:]}"
    assert not (wd / "result.json").exists()
    q = run(*BASE, "--work-dir", str(wd), "--resume")
    assert q.returncode == 0, f"iteration {it}: {q.stderr[-3000:]}"
    if it >= 4:  # killed in epoch 2: epoch 1's checkpoint is used
        assert "resumed from" in q.stdout + q.stderr and "epoch_1.pth" in q.stdout + q.stderr, it
    assert comparable(wd / "result.json") == comparable(reference / "result.json"), f"killed at iteration {it}"


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(reference, tmp_path):
    wd = tmp_path / "ckpt_write"
    p = run(*BASE, "--work-dir", str(wd), fault={"MTPEFT_FAULT_KILL_IN_WRITE": "epoch_2.pth"})
    assert p.returncode == KILLED, p.stderr[-2000:]
    ckpts = wd / "checkpoints"
    assert sorted(x.name for x in ckpts.glob("epoch_*.pth")) == ["epoch_1.pth"]
    assert len(temp_files(ckpts)) == 1  # the half-written copy, never named epoch_2.pth
    assert read_checkpoint(ckpts / "epoch_1.pth")["epoch"] == 1
    assert not (wd / "result.json").exists()
    q = run(*BASE, "--work-dir", str(wd), "--resume")
    assert q.returncode == 0, q.stderr[-3000:]
    assert "left by an interrupted write" in q.stderr and temp_files(ckpts) == []
    assert comparable(wd / "result.json") == comparable(reference / "result.json")


def test_sigkill_while_writing_the_result_leaves_no_partial_result(reference, tmp_path):
    wd = copy_run(reference, tmp_path / "result_write", keep_epochs=2)
    p = run(*BASE, "--work-dir", str(wd), "--resume", fault={"MTPEFT_FAULT_KILL_IN_WRITE": "result.json"})
    assert p.returncode == KILLED, p.stderr[-2000:]
    assert not (wd / "result.json").exists()
    assert len(temp_files(wd)) == 1
    assert read_checkpoint(wd / "checkpoints" / "epoch_2.pth")["epoch"] == 2
    q = run(*BASE, "--work-dir", str(wd), "--resume")
    assert q.returncode == 0, q.stderr[-3000:]
    assert temp_files(wd) == []
    assert comparable(wd / "result.json") == comparable(reference / "result.json")


# --------------------------------------------------------------------------- non-finite loss


def test_inf_loss_stops_with_status_failed_naming_the_iteration_and_term(tmp_path):
    wd = tmp_path / "inf"
    p = run(*BASE, "--work-dir", str(wd), fault={"MTPEFT_FAULT_INF_ITER": "5"})
    assert p.returncode == 1, p.stderr[-2000:]
    assert "non-finite loss at iteration 5: total=inf" in p.stderr
    assert "semseg=inf" in p.stderr and "non-finite term(s): semseg" in p.stderr
    r = RunResult.read(wd / "result.json")
    assert r.status == "failed" and any("iteration 5" in n for n in r.notes)
    assert sorted(x.name for x in (wd / "checkpoints").glob("epoch_*.pth")) == ["epoch_1.pth"]
    assert read_checkpoint(wd / "checkpoints" / "epoch_1.pth")["epoch"] == 1


# --------------------------------------------------------------------------- data


def train_ids(data: Path) -> list[str]:
    return (data / "ImageSets" / "Context" / "train.txt").read_text().split()


def test_data_worker_crash_names_the_file(reference, tmp_path):
    data = reference / "synthetic_data"
    wd = tmp_path / "worker"
    index = 3
    p = run(*BASE, "--work-dir", str(wd), "--data", str(data), "--workers", "2",
            fault={"MTPEFT_FAULT_KILL_WORKER_SAMPLE": str(index)})  # fmt: skip
    assert p.returncode == 1, p.stderr[-2000:]
    image = data / "JPEGImages" / f"{train_ids(data)[index]}.jpg"
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("run_benchmark: error: a data-loader worker died while loading"), last
    assert str(image) in last and "killed by signal" in last
    assert "Traceback" not in p.stderr
    assert not (wd / "result.json").exists() and temp_files(wd) == []
    assert not list(wd.glob("checkpoints/epoch_*.pth"))  # it died in epoch 1


def test_unreadable_image_mid_epoch_names_the_file(reference, tmp_path):
    wd = copy_run(reference, tmp_path / "bad_image", keep_epochs=1)
    image = wd / "synthetic_data" / "JPEGImages" / f"{train_ids(wd / 'synthetic_data')[5]}.jpg"
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 3] + b"\x00garbage" * 64)  # damaged after the run was set up
    before = (wd / "checkpoints" / "epoch_1.pth").read_bytes()
    p = run(*BASE, "--work-dir", str(wd), "--resume", "--workers", "2")
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"run_benchmark: error: {image}: "), last
    assert "expected an RGB JPEG image" in last and "Traceback" not in p.stderr
    assert "resumed from" in p.stdout + p.stderr  # it failed during epoch 2
    assert not (wd / "result.json").exists() and temp_files(wd) == [] and temp_files(wd / "checkpoints") == []
    assert sorted(x.name for x in (wd / "checkpoints").glob("epoch_*.pth")) == ["epoch_1.pth"]
    assert (wd / "checkpoints" / "epoch_1.pth").read_bytes() == before


# --------------------------------------------------------------------------- distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_peer_killed_survivor_exits_with_a_clear_error_then_resumes(tmp_path):
    """Two processes started the way a cluster launcher (srun) starts them, without torchrun's agent; rank 1
    dies by SIGKILL in epoch 2. Rank 0 must not hang: it exits with an error naming the cause."""
    wd = tmp_path / "ddp"
    port, timeout_s = str(free_port()), 20
    procs, logs = [], []
    for rank in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MTPEFT_FAULT_KILL_AT_ITER": "5", "MTPEFT_FAULT_RANK": "1"}  # fmt: skip
        logs.append(tmp_path / f"rank{rank}.log")
        with logs[-1].open("w") as log:
            cmd = [
                sys.executable,
                "-m",
                "benchmark.cli",
                *BASE,
                "--work-dir",
                str(wd),
                "--dist-timeout",
                str(timeout_s),
            ]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    ended: dict[int, float] = {}
    deadline = time.time() + 240
    while len(ended) < 2 and time.time() < deadline:
        for rank, proc in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.1)
    for proc in procs:  # never leave a process behind, even when the test fails
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out0 = logs[0].read_text()
    assert len(ended) == 2, "a process was still running after 240 s:\n" + out0[-2000:]
    assert procs[1].returncode == KILLED, logs[1].read_text()[-2000:]
    assert procs[0].returncode == 1, out0[-3000:]
    assert ended[0] - ended[1] < timeout_s + 10  # the survivor noticed, at the latest after --dist-timeout
    last = out0.strip().splitlines()[-1]
    assert last.startswith("run_benchmark: error: rank 0 of 2: a collective operation failed"), last
    assert "--resume" in last
    assert not (wd / "result.json").exists()
    assert sorted(x.name for x in (wd / "checkpoints").glob("epoch_*.pth")) == ["epoch_1.pth"]

    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    q = subprocess.run(
        [*torchrun, "-m", "benchmark.cli", *BASE, "--work-dir", str(wd), "--resume", "--dist-timeout", "20"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert q.returncode == 0, q.stderr[-3000:]
    r = RunResult.read(wd / "result.json")
    assert r.env["world_size"] == 2 and r.selection["epoch"] == 2
    assert any("resumed from" in n and "epoch_1.pth" in n for n in r.notes)


# --------------------------------------------------------------------------- disk full


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_files(reference, tmp_path):
    wd = copy_run(reference, tmp_path / "full_ckpt", keep_epochs=1)
    before = (wd / "checkpoints" / "epoch_1.pth").read_bytes()
    p = run(*BASE, "--work-dir", str(wd), "--resume", fault={"MTPEFT_FAULT_ENOSPC": "epoch_2.pth"})
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"run_benchmark: error: disk full while writing {wd / 'checkpoints' / 'epoch_2.pth'}")
    assert "Traceback" not in p.stderr
    assert (wd / "checkpoints" / "epoch_1.pth").read_bytes() == before
    assert not (wd / "checkpoints" / "epoch_2.pth").exists() and temp_files(wd / "checkpoints") == []
    assert not (wd / "result.json").exists()


def test_disk_full_while_writing_the_result_keeps_the_previous_result(reference, tmp_path):
    wd = copy_run(reference, tmp_path / "full_result", keep_epochs=2, keep_result=True)
    # a result that --resume rewrites (a failed run's; a finished run's is left untouched, never rewritten)
    data = json.loads((wd / "result.json").read_text())
    (wd / "result.json").write_text(json.dumps({**data, "status": "failed"}))
    before = (wd / "result.json").read_bytes()
    p = run(*BASE, "--work-dir", str(wd), "--resume", fault={"MTPEFT_FAULT_ENOSPC": "result.json"})
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"run_benchmark: error: disk full while writing {wd / 'result.json'}"), last
    assert (wd / "result.json").read_bytes() == before and temp_files(wd) == []


# --------------------------------------------------------------------------- PEFT checkpoints


def state_bytes(net, optimizer_moments: int = 2) -> int:
    """Bytes of what a checkpoint stores for this model: trainable weights and buffers, plus AdamW's moments."""
    trainable = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    persistent = set(net.state_dict())
    buffers = sum(b.numel() * b.element_size() for n, b in net.named_buffers() if n in persistent)
    return trainable * (1 + optimizer_moments) + buffers


def build(method: str, preset: str):
    from benchmark.method_api import METHODS
    from benchmark.model import model_config_for
    from benchmark.presets import PRESETS, resolve
    from benchmark.protocol import PASCAL_CONTEXT as P
    from benchmark.run import build_net

    s = resolve(P, PRESETS[preset])
    cfg = model_config_for(s.backbone, {t.name: t.out_channels for t in P.tasks}, img_size=s.image_size,
                           drop_path_rate=P.drop_path_rate, decoder_channels=P.decoder_channels,
                           head_channels=P.head_channels)  # fmt: skip
    spec = METHODS.get(method)
    return build_net(spec, spec.default_config(), cfg, None)


def test_peft_checkpoint_holds_trainable_state_only_and_reloads_exactly(reference, tmp_path, capsys):
    wd = tmp_path / "mtlora"
    args = ["--method", "mtlora", "--preset", "tiny", "--epochs", "1"]  # default config: shared rank 64
    p = run(*args, "--work-dir", str(wd))
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt_path = wd / "checkpoints" / "epoch_1.pth"
    ckpt = read_checkpoint(ckpt_path)
    net = build("mtlora", "tiny")
    trainable = {n for n, q in net.named_parameters() if q.requires_grad}
    frozen = {n for n, q in net.named_parameters() if not q.requires_grad}
    assert frozen and trainable <= set(ckpt["model"]) and not frozen & set(ckpt["model"])
    persistent_buffers = {n for n, _ in net.named_buffers()} & set(net.state_dict())
    assert set(ckpt["model"]) == trainable | persistent_buffers

    # sizes: each file is its model's trainable state (+ buffers, AdamW moments) within 2 % of container overhead
    full_path = reference / "checkpoints" / "epoch_2.pth"
    sizes = {"mtlora": ckpt_path.stat().st_size, "full_ft": full_path.stat().st_size}
    expected = {m: state_bytes(build(m, "tiny")) for m in sizes}
    for m in sizes:
        assert sizes[m] == pytest.approx(expected[m], rel=0.02), (m, sizes[m], expected[m])
    paper = {m: state_bytes(build(m, "paper")) for m in ("mtlora", "full_ft")}
    with capsys.disabled():
        print(
            f"\ncheckpoint bytes: tiny mtlora {sizes['mtlora']:,} vs full_ft {sizes['full_ft']:,} "
            f"({sizes['mtlora'] / sizes['full_ft']:.3f}); paper (computed) mtlora {paper['mtlora']:,} vs "
            f"full_ft {paper['full_ft']:,} ({paper['mtlora'] / paper['full_ft']:.3f})"
        )
    assert paper["mtlora"] < paper["full_ft"] / 3  # at the protocol's Swin-T the frozen backbone dominates

    # a freshly built model + the checkpoint evaluates exactly as at the end of training
    q = run(*args, "--eval-only", "--checkpoint", str(ckpt_path), "--data", str(wd / "synthetic_data"),
            "--work-dir", str(tmp_path / "eval"))  # fmt: skip
    assert q.returncode == 0, q.stderr[-3000:]
    trained = json.loads((wd / "result.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert evaluated["metrics"] == trained["metrics"] and evaluated["delta_m"] == trained["delta_m"]


# --------------------------------------------------------------------------- bad weights, checkpoints, settings


def cli(capsys, *args: str) -> tuple[int, str]:
    from benchmark.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_corrupt_pretrained_weights_are_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "swin.pth"
    bad.write_bytes(b"garbage, not a checkpoint")
    code, err = cli(capsys, "--method", "full_ft", "--preset", "tiny", "--pretrained", str(bad),
                    "--work-dir", str(tmp_path / "wd"))  # fmt: skip
    assert code == 2 and f"{bad}: cannot be read" in err and "Traceback" not in err
    assert not (tmp_path / "wd" / "result.json").exists() and not (tmp_path / "wd" / "checkpoints").exists()


def test_pretrained_file_without_swin_weights_is_a_clear_error(tmp_path, capsys):
    import torch

    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, other)
    code, err = cli(capsys, "--method", "full_ft", "--preset", "tiny", "--pretrained", str(other),
                    "--work-dir", str(tmp_path / "wd"))  # fmt: skip
    assert code == 2 and f"{other}: no key matches a Swin backbone" in err
    assert not (tmp_path / "wd" / "result.json").exists()


def test_eval_only_with_a_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "epoch_3.pth"
    bad.write_bytes(b"\x80\x02garbage")
    code, err = cli(capsys, "--method", "full_ft", "--preset", "tiny", "--eval-only", "--checkpoint", str(bad),
                    "--work-dir", str(tmp_path / "wd"))  # fmt: skip
    assert code == 2 and f"checkpoint {bad}: cannot be read (truncated or corrupt?)" in err
    assert "weights_only` set to `False`" not in err  # never advise unpickling an untrusted file
    assert not (tmp_path / "wd" / "result.json").exists()


def test_eval_only_with_another_methods_checkpoint_is_a_clear_error(tmp_path, capsys):
    import torch

    from benchmark.checkpoints import CKPT_FORMAT, CKPT_VERSION

    ckpt = tmp_path / "lora.pth"
    torch.save({"format": CKPT_FORMAT, "version": CKPT_VERSION, "method": "lora", "model": {}}, ckpt)
    code, err = cli(capsys, "--method", "full_ft", "--preset", "tiny", "--eval-only", "--checkpoint", str(ckpt),
                    "--work-dir", str(tmp_path / "wd"))  # fmt: skip
    assert code == 2 and f"{ckpt}: checkpoint of method 'lora', not 'full_ft'" in err
    assert not (tmp_path / "wd" / "result.json").exists()


def test_resume_with_other_settings_is_refused(reference, tmp_path):
    wd = copy_run(reference, tmp_path / "other", keep_epochs=1)
    before = {p.name: p.read_bytes() for p in (wd / "checkpoints").iterdir()}
    p = run("--method", "full_ft", "--preset", "tiny", "--epochs", "3", "--work-dir", str(wd), "--resume")
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert f"--resume: {wd / 'checkpoints' / 'epoch_1.pth'} belongs to a different run: epochs 2 (this run: 3)" in last
    assert {q.name: q.read_bytes() for q in (wd / "checkpoints").iterdir()} == before
    assert not (wd / "result.json").exists()
