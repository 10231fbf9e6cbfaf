"""Building a run's network: the multi-task model, its pretrained backbone weights, the method, and the method's
activation checkpointing (reached through its registry entry). One function for the CLI, the perf tool and tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from torch import nn

from benchmark.method_api import METHODS, MethodConfig, MethodSpec, parse_checkpoint_stages
from benchmark.model import ModelConfig, MultiTaskModel

Stages = bool | frozenset[int]


def checkpoint_stages(stages: str | None, n_stages: int) -> Stages:
    """``--activation-checkpointing`` parsed (False when absent); a bad value is a ValueError naming the flag."""
    if stages is None:
        return False
    try:
        return parse_checkpoint_stages(stages, n_stages)
    except ValueError as e:
        raise ValueError(f"--activation-checkpointing: {e}") from None


def no_checkpointing_message(method: str) -> str:
    """Why ``method`` cannot take activation checkpointing, naming the registered methods that can."""
    able = METHODS.with_capability("activation_checkpointing")
    return (
        f"method {method!r} has no checkpointing backbone; it is available for the methods "
        f"{', '.join(able) if able else '(none registered)'}"
    )


def check_checkpointing(spec: MethodSpec, stages: Stages) -> None:
    """A ValueError when ``stages`` switches something on and the method has no activation checkpointing."""
    if stages and spec.activation_checkpointing is None:
        raise ValueError(f"--activation-checkpointing: {no_checkpointing_message(spec.name)}")


def enable_activation_checkpointing(
    net: nn.Module, spec: MethodSpec, stages: str | Stages = "all", n_stages: int = 4
) -> int:
    """Switch on the recomputation of block activations (``stages``: 'all', 'none', 1-based stage numbers, or
    already parsed) through the method's ``activation_checkpointing``; a ValueError where the method has none
    ('none' is accepted for every method). Returns how many backbones took it."""
    value = checkpoint_stages(stages, n_stages) if isinstance(stages, str) else stages
    if not value:
        return 0  # 'none': nothing to switch on, whatever the method
    check_checkpointing(spec, value)
    assert spec.activation_checkpointing is not None
    n = spec.activation_checkpointing(net, value)
    if not n:
        raise ValueError(f"--activation-checkpointing: method {spec.name!r} built no backbone that checkpoints")
    return n


def build_net(
    spec: MethodSpec,
    method_cfg: MethodConfig,
    model_cfg: ModelConfig,
    pretrained: Path | None = None,
    activation_checkpointing: str | Stages | None = None,
) -> nn.Module:
    """Build the multi-task model, load pretrained backbone weights, apply the method, then switch on its
    activation checkpointing (``activation_checkpointing``: as :func:`enable_activation_checkpointing`)."""
    net: Any = MultiTaskModel(model_cfg)
    if pretrained is not None:
        from benchmark.official import load_pretrained_backbone

        report = load_pretrained_backbone(net.backbone, pretrained)
        print(f"pretrained: {report}", file=sys.stderr)
    net = spec.apply(net, method_cfg)
    if activation_checkpointing is not None:
        enable_activation_checkpointing(net, spec, activation_checkpointing, len(model_cfg.backbone.depths))
    return net
