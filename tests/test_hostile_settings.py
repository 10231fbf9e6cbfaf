"""Flags and config fields checked against their real ranges at parse time, before any folder is created, and
contradicting flags refused (issue 15, item 4 and the answers on flags); property tests of the ``--set`` grammar."""

from __future__ import annotations

import math
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmengine.runner import set_random_seed

from benchmark import checkpoints
from benchmark.cli import SEED_MAX, main
from benchmark.method_api import METHODS
from benchmark.presets import PRESETS, resolve
from benchmark.protocol import PASCAL_CONTEXT
from benchmark.run import build_net, layer_widths
from benchmark.run import model_config as _model_config
from benchmark.sweep import SweepError, config_range_error, expand_grid, split_alternatives

TINY_DIMS = layer_widths(_model_config(resolve(PASCAL_CONTEXT, PRESETS["tiny"]), PASCAL_CONTEXT))


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs 0: expected a whole number, 1 or more"),
        (["--epochs", "-1"], "--epochs -1: expected a whole number, 1 or more"),
        (["--image-size", "0"], "--image-size 0: expected a whole number, 1 or more"),
        (["--image-size", "-64"], "--image-size -64: expected a whole number, 1 or more"),
        (["--seed", "-1"], f"--seed -1: expected a whole number from 0 to {SEED_MAX}"),
        (["--seed", str(2**40)], f"--seed {2**40}: expected a whole number from 0 to {SEED_MAX}"),
        (["--workers", "-1"], "--workers -1: expected a whole number, 0 or more"),
        (["--dist-timeout", "nan"], "--dist-timeout nan: expected a positive, finite number of seconds"),
        (
            ["--set", "rank=1000000000"],
            f"--set rank=1000000000: field 'rank': rank 1000000000 is outside 0 .. {max(TINY_DIMS)}",
        ),
        (["--set", "alpha=NaN"], "--set alpha=NaN: field 'alpha': expected a finite number, got nan"),
        (["--set", "alpha=Infinity"], "--set alpha=Infinity: field 'alpha': expected a finite number, got inf"),
        (["--set", "dropout=1"], "dropout must be in [0, 1), got 1.0"),
        (["--eval-only", "--resume"], "--eval-only and --resume: evaluation does not continue a training run"),
        (["--dry-run", "--eval-only"], "--dry-run and --eval-only: --dry-run only builds the model"),
        (["--checkpoint", "x.pth"], "--checkpoint is only read with --eval-only"),
        (["--take-over-work-dir", "--resume"], "--take-over-work-dir and --resume"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_bad_settings_are_refused_before_any_folder(tmp_path, capsys, args, message):
    wd = tmp_path / "wd"
    code, err = _cli(capsys, "--method", "lora", "--preset", "tiny", "--work-dir", str(wd), *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not wd.exists()


def test_per_stage_rank_is_bounded_by_its_stage_width(capsys):
    ranks = [8, 8, 8, TINY_DIMS[3] + 1]
    code, err = _cli(capsys, "--method", "mtlora", "--preset", "tiny", "--dry-run",
                     "--set", f"shared_rank=[{','.join(map(str, ranks))}]")  # fmt: skip
    assert code == 2
    assert f"field 'shared_rank' (stage 4): rank {ranks[3]} is outside 0 .. {TINY_DIMS[3]}" in err
    ok = [min(8, d) for d in TINY_DIMS[:3]] + [TINY_DIMS[3]]  # exactly the width is allowed
    assert config_range_error({"shared_rank": ok}, TINY_DIMS) is None


def test_a_sweep_with_one_bad_alternative_is_refused_before_any_job(tmp_path, capsys):
    code, err = _cli(capsys, "--method", "lora", "mtlora", "--preset", "tiny", "--set", "rank=8,100000",
                     "--work-dir", str(tmp_path / "sw"))  # fmt: skip
    assert code == 2 and "with --set rank=100000: field" in err and "rank 100000 is outside" in err
    assert not (tmp_path / "sw").exists()


def test_eval_names_a_checkpoint_trained_at_another_image_size(tmp_path, capsys):
    spec = METHODS.get("lora")
    settings_ = resolve(PASCAL_CONTEXT, PRESETS["tiny"], 1)
    set_random_seed(0)
    net = build_net(spec, spec.default_config(), _model_config(settings_, PASCAL_CONTEXT), None)
    payload = {"format": checkpoints.CKPT_FORMAT, "version": checkpoints.CKPT_VERSION, "method": "lora", "image_size": 128,
               "model": checkpoints.trainable_state(net)}  # fmt: skip
    path = tmp_path / "epoch_1.pth"
    torch.save(payload, path)
    code, err = _cli(capsys, "--method", "lora", "--preset", "tiny", "--eval-only", "--checkpoint", str(path),
                     "--work-dir", str(tmp_path / "wd"))  # fmt: skip
    assert code == 2
    assert f"{path}: trained with image size 128, this evaluation uses 64" in err and "--image-size" in err
    assert "--pretrained" not in err


# --------------------------------------------------------------------------- the --set grammar (property tests)

TEXT = st.text(alphabet=string.printable + "äß€\u00a0", max_size=40)


@given(TEXT)
def test_split_alternatives_gives_values_or_the_documented_error(text):
    try:
        alts = split_alternatives(text, "k")
    except SweepError as e:
        assert str(e).startswith("--set k=") and "empty alternative" in str(e)
        return
    assert alts and all(a == a.strip() and a for a in alts)


@given(st.lists(st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=8), min_size=1))
def test_plain_alternatives_round_trip(values):
    assert split_alternatives(",".join(values), "k") == values


@given(st.lists(st.integers(-5, 99), min_size=1, max_size=5), st.integers(1, 3))
def test_bracketed_lists_stay_one_value(items, copies):
    value = "[" + ",".join(map(str, items)) + "]"
    assert split_alternatives(",".join([value] * copies), "k") == [value] * copies


METHOD_FIELDS = [
    (m, name) for m in ("lora", "mtlora", "adapter", "vpt_deep", "loha") for name in METHODS.get(m).set_names()
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(METHOD_FIELDS), TEXT)
def test_any_set_value_gives_a_config_or_a_clear_error(field, text):
    method, name = field
    try:
        grid = expand_grid([method], [f"{name}={text}"], [0], PASCAL_CONTEXT, TINY_DIMS)
    except ValueError as e:  # SweepError, the registry's and the ranges' messages: all name the key
        assert name in str(e) or "--set" in str(e) or method in str(e), str(e)
        return
    for point in grid:
        assert config_range_error(point.config, TINY_DIMS) is None
        for value in _numbers(point.config):
            assert math.isfinite(value)


def _numbers(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
