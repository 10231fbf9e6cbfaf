"""tools/gpu_report.py, the helper of tools/gpu_check.sh: environment record, paper-run data and cost, summary.
(tools/gpu_check.sh itself is dry-run on the CPU with GPU_CHECK_DEVICE=cpu; docs/perf.md.)"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmark.protocol import PASCAL_CONTEXT

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "tools" / "gpu_report.py")
assert _spec is not None and _spec.loader is not None
gpu_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_report)


def _work_dir(tmp_path: Path, train_times: list[float], val_time: float | None, with_result: bool = True) -> Path:
    """A work dir as run_benchmark + mmengine leave it: result.json and <timestamp>/vis_data/scalars.json."""
    wd = tmp_path / "run"
    vis = wd / "20260101_000000" / "vis_data"
    vis.mkdir(parents=True)
    rows = [
        {"lr": 1e-5, "data_time": 0.01, "loss": 9.0, "time": t, "epoch": 1, "iter": 10 * (i + 1), "memory": 9000}
        for i, t in enumerate(train_times)
    ]
    if val_time is not None:
        rows.append({"semseg/mIoU": 0.1, "data_time": 0.02, "time": val_time, "step": 1})
    (vis / "scalars.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if with_result:
        result = {
            "status": "debug",
            "protocol": {"name": "pascal-context", "version": 1},
            "cost": {"train_images_per_s": 300.0, "peak_mem_bytes": 2**33, "peak_mem_reserved_bytes": 2**34},
            "env": {"device": "cuda", "gpu": "GPU X", "amp_dtype": "float16", "batch_size": 32, "image_size": 448},
        }
        (wd / "result.json").write_text(json.dumps(result))
    return wd


def test_paper_run_cost_is_the_last_logged_iteration_time_times_the_protocols_iterations(tmp_path):
    wd = _work_dir(tmp_path, train_times=[0.9, 0.25], val_time=0.5)
    cost = gpu_report.paper_run_cost(wd, train_images=4998, val_images=5105)
    assert cost["iteration_s"] == 0.25 and cost["iterations_run"] == 20  # the steady state, not the warm-up
    assert cost["images_per_s"] == 32 / 0.25 and cost["memory_mb_logged"] == 9000
    assert cost["peak_mem_reserved_bytes"] == 2**34 and cost["amp_dtype"] == "float16"
    p = cost["paper"]
    iters = 4998 // 32  # the last partial batch is dropped
    evals = math.ceil(PASCAL_CONTEXT.epochs / PASCAL_CONTEXT.eval_interval)
    assert p["iterations_per_epoch"] == iters and p["epochs"] == PASCAL_CONTEXT.epochs
    assert p["validations"] == evals
    assert p["train_eta_s"] == pytest.approx(iters * PASCAL_CONTEXT.epochs * 0.25)
    assert p["eval_eta_s"] == pytest.approx(evals * math.ceil(5105 / 32) * 0.5)
    assert p["total_eta_h"] == pytest.approx((p["train_eta_s"] + p["eval_eta_s"]) / 3600)


def test_paper_run_cost_without_validation_records_counts_training_only(tmp_path):
    cost = gpu_report.paper_run_cost(_work_dir(tmp_path, [0.3], None))
    assert cost["paper"]["eval_eta_s"] is None and cost["paper"]["total_eta_s"] == cost["paper"]["train_eta_s"]


@pytest.mark.parametrize(
    "case, match",
    [("no_dir", "work dir not found"), ("no_result", "result.json: file not found"), ("no_logs", "scalars.json")],
)
def test_paper_run_bad_input_is_one_message_and_exit_2(case, match, tmp_path, capsys):
    if case == "no_dir":
        wd = tmp_path / "absent"
    elif case == "no_result":
        wd = _work_dir(tmp_path, [0.3], None, with_result=False)
    else:
        wd = tmp_path / "empty"
        wd.mkdir()
        (wd / "result.json").write_text("{}")
    out = tmp_path / "paper_run.json"
    assert gpu_report.main(["paper-run", str(wd), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_report: error:") and match in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_paper_data_repeats_generated_images_under_new_ids(tmp_path):
    from benchmark.pascal_data import PascalMT

    root = tmp_path / "data"
    assert gpu_report.main(["paper-data", str(root), "--train", "5", "--val", "3", "--unique", "2"]) == 0
    ids = (root / "ImageSets" / "Context" / "train.txt").read_text().split()
    val = (root / "ImageSets" / "Context" / "val.txt").read_text().split()
    assert len(ids) == len(set(ids)) == 5 and len(val) == len(set(val)) == 3 and not set(ids) & set(val)
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 8
    ds = PascalMT(root, "train", tuple(t.name for t in PASCAL_CONTEXT.tasks), transform=None, cache_dir=tmp_path / "c")
    assert len(ds) == 5
    first, copy = ds.load_raw(0), ds.load_raw(2)  # the third id repeats the first generated image
    assert ids[2] == f"{ids[0]}r1"
    for key in ("image", "semseg", "sal", "normals"):
        assert (first[key] == copy[key]).all(), key
    assert 375 <= min(first["image"].shape[:2]) and max(first["image"].shape[:2]) <= 500  # PASCAL's sizes
    assert gpu_report.main(["paper-data", str(root), "--train", "5", "--val", "1"]) == 2  # never overwrites


def test_env_record_names_the_versions_and_refuses_a_missing_device(tmp_path, capsys):
    out = tmp_path / "env.json"
    assert gpu_report.main(["env", "--device", "cpu", "--out", str(out)]) == 0
    env = json.loads(out.read_text())
    assert env["device"] == "cpu" and env["packages"]["torch"] == torch.__version__.split("+")[0]
    assert env["imports"]["mmengine"]["version"] and env["iou_counts"] in (
        "mmseg",
        "torch fallback (mmseg unavailable)",
    )
    if not torch.cuda.is_available():
        bad = tmp_path / "cuda.json"
        assert gpu_report.main(["env", "--device", "cuda", "--out", str(bad)]) == 2
        assert "no CUDA device" in capsys.readouterr().err and not bad.exists()


def _perf(methods: dict[str, float], amp: str, batch: int = 32) -> dict:
    full = methods["full_ft"]
    return {
        "config": {"batch": batch, "amp": amp, "command": f"python -m benchmark.perf --amp {amp}"},
        "methods": {
            m: {
                "step_s": s,
                "eval_ips": 100.0,
                "peak_mem_bytes": 2**30,
                "peak_reserved_bytes": 2**31,
                "step_vs_full_ft": s / full,
                "flops_vs_full_ft": 0.5,
            }
            for m, s in methods.items()
        },
    }


def test_summary_tables_every_stage_and_ratio(tmp_path, capsys):
    out = tmp_path / "check"
    out.mkdir()
    (out / "stages.jsonl").write_text(
        '{"stage": "env", "status": "passed", "rc": 0, "seconds": 3, "limit_s": 60}\n'
        '{"stage": "perf_compile", "status": "timed_out", "rc": 124, "seconds": 240, "limit_s": 240}\n'
    )
    (out / "env.json").write_text(json.dumps({"device": "cuda", "gpu": {"name": "GPU X"}, "packages": {"torch": "2"}}))
    (out / "perf_gpu_all.json").write_text(json.dumps(_perf({"full_ft": 0.4, "mtlora": 0.2}, "float16")))
    (out / "perf_gpu_mtlora_bf16.json").write_text(json.dumps(_perf({"full_ft": 0.5, "mtlora": 0.25}, "bfloat16")))
    assert gpu_report.main(["summary", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["device"] == "GPU X" and [st["status"] for st in s["stages"]] == ["passed", "timed_out"]
    rows = {r["method"]: r for r in s["perf"]["perf_gpu_all"]["rows"]}
    assert rows["mtlora"]["train_img_s"] == 32 / 0.2 and rows["mtlora"]["time_x_full_ft"] == 0.5
    assert rows["mtlora"]["peak_reserved_mib"] == 2048
    assert s["bf16_vs_fp16_train"]["mtlora"] == pytest.approx(0.2 / 0.25)
    assert "compiled_vs_eager_train" not in s and "paper_run" not in s  # absent stages are absent, not zero
    text = capsys.readouterr().out
    assert "| perf_compile | timed_out | 124 | 240 |" in text and "| `mtlora` | 160.0 |" in text


@pytest.mark.parametrize(
    "argv, env, message",
    [([], {}, "usage: tools/gpu_check.sh OUTDIR"), (["OUT"], {"GPU_CHECK_DEVICE": "tpu"}, "must be cuda or cpu")],
)
def test_gpu_check_bad_arguments(argv, env, message, tmp_path):
    argv = [str(tmp_path / a) for a in argv]
    p = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
    assert p.returncode == 2 and message in p.stderr
    assert not (tmp_path / "OUT" / "stages.jsonl").exists()  # nothing ran
