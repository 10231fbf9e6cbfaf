"""run_benchmark with external weights: official MTLoRA checkpoints (--eval-only) and Swin weights (--pretrained)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.runner import set_random_seed

from benchmark import checkpoints
from benchmark.cli import main
from benchmark.method_api import METHODS
from benchmark.official import to_official_state_dict
from benchmark.presets import PRESETS, resolve
from benchmark.protocol import PASCAL_CONTEXT
from benchmark.run import build_net
from benchmark.run import model_config as _model_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmark.cli", *args], capture_output=True, text=True, env=ENV, timeout=300
    )


@pytest.fixture(scope="module")
def trained_mtlora(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("mtlora")
    p = cli("--method", "mtlora", "--preset", "tiny", "--epochs", "1", "--work-dir", str(wd))
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


def _tiny_net(method: str = "mtlora"):
    spec = METHODS.get(method)
    settings = resolve(PASCAL_CONTEXT, PRESETS["tiny"], 1)
    set_random_seed(0)
    return build_net(spec, spec.default_config(), _model_config(settings, PASCAL_CONTEXT), None)


def test_eval_only_reads_an_official_mtlora_checkpoint(trained_mtlora, tmp_path):
    net = _tiny_net()
    ckpt = checkpoints.read_checkpoint(trained_mtlora / "checkpoints" / "epoch_1.pth")
    checkpoints.load_model_state(net, ckpt, "epoch_1.pth")
    official = to_official_state_dict(net)
    assert any(k.endswith("attn.qkv.linear.weight") for k in official)  # official key names
    # official training checkpoints also pickle their config object: not loadable with weights_only=True
    path = tmp_path / "official_ckpt.pth"
    from fake_yacs import CfgNode

    torch.save({"model": official, "config": CfgNode({"MODEL": CfgNode({"TYPE": "swin"})}), "epoch": 299}, path)
    wd = tmp_path / "eval"
    p = cli("--method", "mtlora", "--preset", "tiny", "--eval-only", "--checkpoint", str(path),
            "--data", str(trained_mtlora / "synthetic_data"), "--work-dir", str(wd))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "official checkpoint" in p.stderr
    got = json.loads((wd / "result.json").read_text())
    want = json.loads((trained_mtlora / "result.json").read_text())
    assert got["metrics"] == want["metrics"]
    assert got["selection"]["rule"] == "checkpoint"


def test_eval_only_refuses_a_checkpoint_of_another_method(trained_mtlora, tmp_path, capsys):
    code = main(["--method", "lora", "--preset", "tiny", "--eval-only",
                 "--checkpoint", str(trained_mtlora / "checkpoints" / "epoch_1.pth"),
                 "--data", str(trained_mtlora / "synthetic_data"), "--work-dir", str(tmp_path / "x")])  # fmt: skip
    assert code != 0
    assert "checkpoint of method 'mtlora', not 'lora'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "result.json").exists()


def test_pretrained_swin_weights_in_both_layouts(tmp_path):
    net = _tiny_net("full_ft")
    swin = net.backbone.swin
    torch.manual_seed(1)
    timm_sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in swin.state_dict().items()}
    # timm layout
    torch.save(timm_sd, tmp_path / "timm.pth")
    # original Swin release layout: {'model': ...}, patch merging at the end of the previous stage, a head
    orig = {}
    for k, v in timm_sd.items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample", f"layers.{i - 1}.downsample")
        orig[k] = v
    orig["head.weight"] = torch.zeros(1000, 192)
    torch.save({"model": orig}, tmp_path / "orig.pth")
    for name in ("timm.pth", "orig.pth"):
        p = cli("--method", "full_ft", "--preset", "tiny", "--dry-run", "--pretrained", str(tmp_path / name))
        assert p.returncode == 0, p.stderr[-2000:]
        assert "pretrained" in p.stderr
    # the weights really land where they belong
    from benchmark.official import load_pretrained_backbone

    fresh = _tiny_net("full_ft")
    load_pretrained_backbone(fresh.backbone, tmp_path / "orig.pth")
    got = fresh.backbone.swin.state_dict()
    for k, v in timm_sd.items():
        if v.is_floating_point() and "relative_position_index" not in k:
            assert torch.equal(got[k], v), k


def test_pretrained_file_that_matches_nothing_is_an_error(tmp_path, capsys):
    torch.save({"model": {"encoder.weight": torch.zeros(3, 3)}}, tmp_path / "other.pth")
    code = main(["--method", "full_ft", "--preset", "tiny", "--dry-run", "--pretrained", str(tmp_path / "other.pth")])
    err = capsys.readouterr().err
    assert code != 0 and "other.pth" in err
