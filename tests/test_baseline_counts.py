"""Trainable-parameter counts at the paper config (Swin-T, 448, four PASCAL-Context tasks), built on the meta device.

The exact integers are the official code's measured counts (docs/protocol.md 3.6); the closed forms are that
section's arithmetic. Meta tensors have shapes but no storage, so building four Swin-T copies costs nothing.
"""

from __future__ import annotations

import pytest
import torch

from benchmark.model import MultiTaskModel, model_config_for
from benchmark.params import count_parameters
from benchmark.protocol import PASCAL_CONTEXT
from methods import METHODS
from methods.base import apply_overrides

DECODERS = 1_946_624  # docs/protocol.md 3.4: total of the four task decoders
SWIN_T_BACKBONE = 27_517_818  # 29,464,442 - 1,946,624


def _counts(name: str, *overrides: str) -> dict[str, int]:
    spec = METHODS.get(name)
    cfg = apply_overrides(spec.default_config(), overrides)
    p = PASCAL_CONTEXT
    with torch.device("meta"):
        model = MultiTaskModel(
            model_config_for(p.backbone, {t.name: t.out_channels for t in p.tasks}, img_size=p.image_size)
        )
        net = spec.apply(model, cfg)
    return count_parameters(net, spec.adapter_markers)


def test_full_ft() -> None:
    c = _counts("full_ft")
    assert c["trainable"] == c["total"] == 29_464_442
    assert c["decoders"] == DECODERS and c["other_trainable_backbone"] == SWIN_T_BACKBONE


def test_decoders_only() -> None:
    c = _counts("decoders_only")
    assert c["trainable"] == c["decoders"] == DECODERS
    assert c["total"] == 29_464_442


def test_single_task() -> None:
    c = _counts("single_task")
    assert c["trainable"] == c["total"] == 112_017_896 == 4 * SWIN_T_BACKBONE + DECODERS
    assert c["decoders"] == DECODERS


@pytest.mark.parametrize("rank", [16, 4])
def test_lora_matches_the_closed_form(rank: int) -> None:
    # docs/protocol.md 3.6: qkv 4rC + proj 2rC + fc1 5rC + fc2 5rC = 16rC per block, sum over blocks d_s C_s = 4416
    c = _counts("lora", f"rank={rank}")
    assert c["adapter"] == 70_656 * rank
    assert c["trainable"] == 70_656 * rank + DECODERS and c["other_trainable_backbone"] == 0


def test_relative_bias_matches_the_closed_form() -> None:
    c = _counts("relative_bias")
    assert c["adapter"] == 169 * (2 * 3 + 2 * 6 + 6 * 12 + 2 * 24) == 23_322  # (2*7-1)^2 x heads per block
    assert c["trainable"] == 23_322 + DECODERS


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_builds_at_the_paper_config(name: str) -> None:
    c = _counts(name)
    assert c["decoders"] == DECODERS
    assert c["decoders"] + c["adapter"] + c["other_trainable_backbone"] == c["trainable"] <= c["total"]
