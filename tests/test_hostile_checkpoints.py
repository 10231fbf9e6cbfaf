"""Hostile and careless files given to every flag that reads one: nothing in them runs, incomplete weights are
refused, and damaged files get one line naming them (issue 15, items 1 and 2)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.runner import set_random_seed

import benchmark.parity as parity
from benchmark import workdir
from benchmark.cli import main
from benchmark.method_api import METHODS
from benchmark.official import to_official_state_dict
from benchmark.presets import PRESETS, resolve
from benchmark.protocol import PASCAL_CONTEXT
from benchmark.results import make_run_id
from benchmark.run import build_net
from benchmark.run import model_config as _model_config
from benchmark.safeload import CheckpointError, OfficialConfig, safe_load

FORMATS = ("zip", "legacy", "plain_pickle")


class _Payload:
    """Creates ``marker`` when unpickled by a loader that calls what a file names."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write(obj: object, path: Path, fmt: str) -> Path:
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":  # the pre-1.6 format: a pickle stream, not a zip archive
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return path


def _evil(tmp_path: Path, fmt: str, name: str = "evil.pth") -> tuple[Path, Path]:
    marker = tmp_path / f"PWNED_{fmt}"
    payload = {"model": {"x": [0.0, 1.0]}, "extra": _Payload(marker)}
    return _write(payload, tmp_path / name, fmt), marker


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.err + out.out  # mmengine's log (with the resume warning) goes to stdout


# --------------------------------------------------------------------------- nothing runs


@pytest.mark.parametrize("fmt", FORMATS)
def test_harmful_pretrained_file_runs_nothing(tmp_path, capsys, fmt):
    path, marker = _evil(tmp_path, fmt)
    code, err = _run(capsys, "--method", "lora", "--preset", "tiny", "--dry-run", "--pretrained", str(path))
    assert code == 2, err
    assert f"checkpoint {path}: cannot be read: it holds posix.mkdir, which is not allowed" in err
    assert "nothing from the file was run" in err and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_harmful_eval_checkpoint_runs_nothing(tmp_path, capsys, fmt):
    path, marker = _evil(tmp_path, fmt)
    wd = tmp_path / "wd"
    code, err = _run(capsys, "--method", "lora", "--preset", "tiny", "--eval-only", "--checkpoint", str(path),
                     "--work-dir", str(wd))  # fmt: skip
    assert code == 2, err
    assert "it holds posix.mkdir, which is not allowed" in err
    assert not marker.exists() and not wd.exists()  # read before any folder is made


@pytest.mark.parametrize("fmt", FORMATS)
def test_harmful_checkpoint_found_by_resume_runs_nothing(tmp_path, capsys, fmt):
    spec = METHODS.get("lora")
    run_id = make_run_id("pascal-context", 1, "lora", spec.default_config().to_dict(), [0])
    wd = tmp_path / "wd"
    (wd / "checkpoints").mkdir(parents=True)
    (wd / workdir.OWNER_NAME).write_text(f'{{"run_id": "{run_id}"}}')
    _, marker = _evil(tmp_path, fmt, name="wd/checkpoints/epoch_1.pth")
    code, err = _run(capsys, "--method", "lora", "--preset", "tiny", "--epochs", "1", "--resume",
                     "--work-dir", str(wd))  # fmt: skip
    assert code == 0, err
    assert "skipping unusable checkpoint" in err and "posix.mkdir, which is not allowed" in err
    assert not marker.exists()
    assert (wd / "result.json").is_file()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["model", "dataset", "metrics"])
def test_harmful_parity_fixture_runs_nothing(tmp_path, capsys, fmt, kind):
    folder = tmp_path / "fx"
    folder.mkdir()
    _, marker = _evil(tmp_path, fmt, name=f"fx/{kind}_evil.pt")
    assert parity.main([str(folder)]) == 1
    out = capsys.readouterr().out
    fail = [ln for ln in out.splitlines() if ln.startswith("FAIL")]
    assert len(fail) == 1 and "cannot be read: it holds posix.mkdir" in fail[0] and f"{kind}_evil.pt" in fail[0]
    assert not marker.exists()


def test_harmful_gradient_companion_runs_nothing(tmp_path, capsys):
    folder = tmp_path / "fx"
    folder.mkdir()
    # a model fixture that loads (plain data) next to a harmful _grad companion: the model part fails first on its
    # missing keys; the companion is read by the same reader as any fixture
    _, marker = _evil(tmp_path, "legacy", name="fx/model_x_grad.pt")
    with pytest.raises(CheckpointError, match="posix.mkdir"):
        safe_load(folder / "model_x_grad.pt", "gradient fixture")
    assert not marker.exists()


def test_numpy_objects_other_than_numbers_are_refused(tmp_path):
    marker = tmp_path / "PWNED_np"
    for obj, refused in (
        (np.array([1, 2]), "numpy"),  # arrays are rebuilt by numpy's own reconstructor: not on the list
        (np.dtype("O"), "a numpy dtype 'O8'"),
        ({"x": _Payload(marker)}, "posix.mkdir"),
    ):
        path = _write({"v": obj}, tmp_path / "n.pth", "zip")
        with pytest.raises(CheckpointError, match="which is not allowed") as e:
            safe_load(path)
        assert f"it holds {refused}" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "cannot be read: empty file (0 bytes)"),
        (bytes(range(7, 250)) * 3, "cannot be read: not a PyTorch file"),
        (b"just some text, not a zip\n", "cannot be read: not a PyTorch file"),
        (b"PK\x03\x04" + b"\x00" * 60, "cannot be read (truncated or corrupt?)"),
        (b"\x80\x02garbage", "cannot be read (truncated or corrupt?)"),
    ],
    ids=["empty", "random", "text", "cut_zip", "cut_pickle"],
)
def test_damaged_fixture_files_get_one_line(tmp_path, capsys, content, expected):
    folder = tmp_path / "fx"
    folder.mkdir()
    (folder / "metrics_bad.pt").write_bytes(content)
    assert parity.main([str(folder)]) == 1
    out = capsys.readouterr()
    fail = [ln for ln in out.out.splitlines() if ln.startswith("FAIL")]
    assert len(fail) == 1 and expected in fail[0] and "metrics_bad.pt" in fail[0]
    for noise in ("IndexError", "pop from empty list", "weights_only", "Traceback"):
        assert noise not in out.out + out.err


# --------------------------------------------------------------------------- what an official checkpoint needs


def _tiny_net(method: str = "mtlora"):
    spec = METHODS.get(method)
    settings = resolve(PASCAL_CONTEXT, PRESETS["tiny"], 1)
    set_random_seed(0)
    return build_net(spec, spec.default_config(), _model_config(settings, PASCAL_CONTEXT), None)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_official_checkpoint_with_its_config_is_read_as_plain_data(tmp_path, fmt):
    from fake_yacs import CfgNode

    net = _tiny_net()
    sd = net.state_dict()  # an OrderedDict with _metadata, as the official code saves it
    cfg = CfgNode({"MODEL": CfgNode({"TYPE": "swin", "DEPTHS": [2, 2, 6, 2]}), "TAGS": {"a", "b"}})
    extra = {"max_accuracy": np.float64(0.75), "best_epoch": np.int64(7), "big": np.dtype(">f4").type(1.5)}
    path = _write(
        {"model": sd, "config": cfg, "epoch": 299, "optimizer": {"state": {}}, **extra}, tmp_path / "c.pth", fmt
    )
    got = safe_load(path)
    for k, v in extra.items():
        assert got[k] == v and got[k].dtype == v.dtype, k
    assert type(got["config"]) is OfficialConfig and type(got["config"]["MODEL"]) is OfficialConfig
    assert got["config"]["MODEL"]["DEPTHS"] == [2, 2, 6, 2] and got["config"]["TAGS"] == {"a", "b"}
    assert not got["config"].__dict__  # the CfgNode's flags are dropped: inert data only
    assert got["epoch"] == 299 and list(got["model"]) == list(sd)
    assert all(torch.equal(got["model"][k], v) for k, v in sd.items())


def test_eval_refuses_a_checkpoint_that_fits_almost_nothing(tmp_path, capsys):
    net = _tiny_net()
    official = to_official_state_dict(net)
    one = {k: v for k, v in official.items() if k.endswith("attn.qkv.linear.weight")}
    path = tmp_path / "one.pth"
    torch.save({"model": dict(list(one.items())[:1])}, path)
    wd = tmp_path / "wd"
    code, err = _run(capsys, "--method", "mtlora", "--preset", "tiny", "--eval-only", "--checkpoint", str(path),
                     "--work-dir", str(wd))  # fmt: skip
    assert code == 2, err
    from benchmark.checkpoints import required_state_keys
    from benchmark.official import official_to_local_key

    missing = sorted(required_state_keys(net) - {official_to_local_key(k) for k in list(one)[:1]})
    assert f"{path}: {len(missing)} trained parameter(s) or buffer(s) are missing from the file: {missing[0]}" in err
    assert not (wd / "result.json").exists()


def test_eval_refuses_an_own_checkpoint_without_a_buffer(tmp_path, capsys):
    from benchmark import checkpoints

    net = _tiny_net("lora")
    state = checkpoints.trainable_state(net)
    dropped = next(k for k in state if k.endswith("running_mean"))
    del state[dropped]
    payload = {
        "format": checkpoints.CKPT_FORMAT,
        "version": checkpoints.CKPT_VERSION,
        "method": "lora",
        "model": state,
    }
    path = tmp_path / "epoch_1.pth"
    torch.save(payload, path)
    code, err = _run(capsys, "--method", "lora", "--preset", "tiny", "--eval-only", "--checkpoint", str(path),
                     "--work-dir", str(tmp_path / "wd"))  # fmt: skip
    assert code == 2, err
    assert f"1 trained parameter(s) or buffer(s) are missing from the file: {dropped}" in err


def test_eval_refuses_an_empty_model_dict(tmp_path, capsys):
    path = tmp_path / "empty_model.pth"
    torch.save({"model": {}}, path)
    code, err = _run(capsys, "--method", "lora", "--preset", "tiny", "--eval-only", "--checkpoint", str(path),
                     "--work-dir", str(tmp_path / "wd"))  # fmt: skip
    assert code == 2 and f"{path}: holds no weights" in err


def test_zero_byte_checkpoint_is_named(tmp_path, capsys):
    path = tmp_path / "zero.pth"
    path.write_bytes(b"")
    code, err = _run(capsys, "--method", "lora", "--preset", "tiny", "--eval-only", "--checkpoint", str(path),
                     "--work-dir", str(tmp_path / "wd"))  # fmt: skip
    assert code == 2 and f"checkpoint {path}: cannot be read: empty file (0 bytes)" in err


def test_pretrained_file_leaving_backbone_weights_unset_is_refused(tmp_path, capsys):
    net = _tiny_net("full_ft")
    sd = dict(net.backbone.swin.state_dict())
    del sd["layers.1.blocks.0.mlp.fc1.weight"]
    sd["head.fc.weight"] = torch.zeros(10, 4)  # a classifier: ignored, as before
    path = tmp_path / "swin.pth"
    torch.save(sd, path)
    code, err = _run(capsys, "--method", "full_ft", "--preset", "tiny", "--dry-run", "--pretrained", str(path))
    assert code == 2, err
    assert (
        f"--pretrained {path}: 1 Swin backbone weight(s) are missing from the file: layers.1.blocks.0.mlp.fc1" in err
    )
