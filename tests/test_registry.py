"""The method registry and typed ``--set`` overrides: helpful misses, strict types, every field settable."""

from __future__ import annotations

import dataclasses
import json

import pytest

from baselines.lora import LoRAConfig
from benchmark.method_api import METHODS, MethodConfig, apply_overrides, register_method


def test_unknown_method_lists_known_ones_and_the_closest() -> None:
    with pytest.raises(KeyError) as err:
        METHODS.get("lroa")
    msg = str(err.value)
    assert "unknown method 'lroa'" in msg
    assert "did you mean lora" in msg
    known = msg.split("Known: ", 1)[1]
    assert all(name in known for name in METHODS.names())


def test_registering_a_name_twice_fails_loudly() -> None:
    with pytest.raises(KeyError, match="registered twice"):
        register_method("lora", config=LoRAConfig, paper="dup")(lambda model, cfg: model)
    assert METHODS.get("lora").config_cls is LoRAConfig


def test_overrides_parse_each_type() -> None:
    cfg = apply_overrides(LoRAConfig(), ["rank=8", "alpha=32", "dropout=0", 'targets=["qkv", "fc2"]'])
    assert cfg == LoRAConfig(rank=8, alpha=32.0, dropout=0.0, targets=("qkv", "fc2"))
    assert isinstance(cfg.alpha, float) and isinstance(cfg.targets, tuple)
    assert LoRAConfig() == LoRAConfig(rank=16)  # the original is untouched (frozen dataclass, replace)


def test_unknown_override_key_suggests_the_closest_field() -> None:
    with pytest.raises(ValueError) as err:
        apply_overrides(LoRAConfig(), ["rnak=8"])
    msg = str(err.value)
    assert "rnak" in msg and "did you mean rank" in msg and "valid fields: rank, alpha, dropout, targets" in msg


@pytest.mark.parametrize(
    ("item", "expect"),
    [
        ("rank=abc", "expected an integer"),
        ("rank=1.5", "expected an integer"),
        ("rank=true", "expected an integer"),
        ("alpha=big", "expected a number"),
        ("targets=5", "expected a list"),
        ("targets=[1, 2]", "expected a string"),
        ("rank", "expected key=value"),
    ],
)
def test_wrong_override_types_are_rejected(item: str, expect: str) -> None:
    with pytest.raises(ValueError, match=expect):
        apply_overrides(LoRAConfig(), [item])


def test_bool_fields_take_only_booleans() -> None:
    cfg = METHODS.get("adapter").default_config()
    assert apply_overrides(cfg, ["train_norms=false"]).train_norms is False
    with pytest.raises(ValueError, match="expected true/false"):
        apply_overrides(cfg, ["train_norms=1"])


def test_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['rnak'\]"):
        LoRAConfig.from_dict({"rnak": 8})


@pytest.mark.parametrize("name", METHODS.names())
def test_every_config_field_is_settable_from_text(name: str) -> None:
    """Each field's default, written as --set text, parses back to itself; configs are frozen, plain data."""
    spec = METHODS.get(name)
    cfg = spec.default_config()
    assert issubclass(spec.config_cls, MethodConfig)
    assert dataclasses.is_dataclass(cfg) and spec.config_cls.__dataclass_params__.frozen
    for field, _type, default in spec.fields():
        text = (
            default
            if isinstance(default, str)
            else json.dumps(list(default) if isinstance(default, tuple) else default)
        )
        assert apply_overrides(cfg, [f"{field}={text}"]) == cfg, field
    assert spec.paper and spec.description


def test_alias_and_single_value_for_a_per_stage_tuple():
    from benchmark.method_api import METHODS, apply_overrides

    mt = METHODS.get("mtlora")
    assert apply_overrides(mt.default_config(), ["rank=16"]).shared_rank == (16, 16, 16, 16)
    assert apply_overrides(mt.default_config(), ["shared_rank=[16,16,32,64]"]).shared_rank == (16, 16, 32, 64)
    assert "rank" in mt.set_names() and "rank" not in mt.default_config().to_dict()
    # string tuples are never broadcast
    lora = METHODS.get("lora")
    assert apply_overrides(lora.default_config(), ['targets=["qkv"]']).targets == ("qkv",)
    with pytest.raises(ValueError, match="targets"):
        apply_overrides(lora.default_config(), ["targets=qkv"])


def test_the_core_imports_the_plugins_only_when_the_registry_is_read():
    """``benchmark.method_api`` names the plug-ins as strings: importing it loads none; the first read loads all."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, json; from benchmark.method_api import METHODS, PLUGINS; "
        "before = [m for m in PLUGINS if m in sys.modules]; n = len(METHODS); "
        "after = [m for m in PLUGINS if m in sys.modules]; print(json.dumps([before, after, n, list(PLUGINS)]))"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after, n, plugins = json.loads(done.stdout.strip().splitlines()[-1])
    assert before == [] and after == plugins and n == len(METHODS.names())


def test_capabilities_are_reached_through_the_registry():
    import torch

    from benchmark.build import build_net, no_checkpointing_message
    from benchmark.model import model_config_for

    able = METHODS.with_capability("activation_checkpointing")
    assert able == [n for n in METHODS.names() if METHODS.get(n).activation_checkpointing is not None]
    assert "mtlora" in able and "lora" not in able
    assert no_checkpointing_message("lora").endswith(", ".join(able))
    cfg = model_config_for("swin_micro", {"semseg": 21, "sal": 1})
    torch.manual_seed(0)
    net = build_net(METHODS.get("mtlora"), METHODS.get("mtlora").default_config(), cfg, None, "1,3")
    assert net.backbone.checkpoint == frozenset({0, 2})
    with pytest.raises(ValueError, match="--activation-checkpointing: method 'lora' has no checkpointing backbone"):
        build_net(METHODS.get("lora"), METHODS.get("lora").default_config(), cfg, None, "all")
    # every method has a merge; the official-checkpoint support is declared by the two official code bases' methods
    assert all(callable(METHODS.get(n).merge_for_eval) for n in METHODS.names())
    assert sorted(n for n in METHODS.names() if METHODS.get(n).official is not None) == ["mtlora", "tadformer"]
    assert set(METHODS.get("lora").variants) == {"peft_reference"}
