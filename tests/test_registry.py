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
