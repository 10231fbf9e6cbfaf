"""The backbone registry: Swin-T/S/B are timm's published sizes, the model is built through the registry, and a new
family or variant is an entry (no edit of benchmark/model.py)."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from torch import nn

from benchmark.backbones import BACKBONES, FAMILIES, BackboneEntry, BackboneFamily, build_backbone
from benchmark.model import MultiTaskModel, model_config_for

# the registry's published Swin sizes and timm's own model of that size (ImageNet 224 px, window 7)
TIMM_NAMES = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
}


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_swin_entries_are_timms_published_sizes(name: str) -> None:
    with torch.device("meta"):  # shapes only: nothing allocated, nothing downloaded
        ref = timm.create_model(TIMM_NAMES[name], pretrained=False)
        ours = build_backbone(BACKBONES.get(name).config).swin
    assert [len(layer.blocks) for layer in ours.layers] == [len(layer.blocks) for layer in ref.layers]
    assert [layer.blocks[0].attn.num_heads for layer in ours.layers] == [
        layer.blocks[0].attn.num_heads for layer in ref.layers
    ]
    assert ours.embed_dim == ref.embed_dim and ours.num_features == ref.num_features
    assert ours.layers[0].blocks[0].window_size == ref.layers[0].blocks[0].window_size
    # the same parameters apart from the classifier and final norm the official backbone does not have
    skip = ("head.", "norm.")
    shapes = {n: p.shape for n, p in ref.named_parameters() if not n.startswith(skip)}
    assert {n: p.shape for n, p in ours.named_parameters()} == shapes


@pytest.mark.parametrize("name", BACKBONES.names())
def test_feature_channels_are_what_the_backbone_returns(name: str) -> None:
    entry = BACKBONES.get(name)
    cfg = dataclasses.replace(entry.config, img_size=64, window_size=2) if name != "swin_micro" else entry.config
    with torch.device("meta"):
        feats = build_backbone(cfg)(torch.empty(1, 3, 64, 64))
    assert tuple(f.shape[1] for f in feats) == entry.feature_channels
    for target in entry.lora_targets:  # every LoRA target names a linear in every block
        with torch.device("meta"):
            block = build_backbone(cfg).swin.layers[0].blocks[0]
        assert isinstance(block.get_submodule(target), nn.Linear), target


def test_unknown_backbone_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown backbone 'swin_tinny'; did you mean swin_tiny") as err:
        model_config_for("swin_tinny", {"sal": 1})
    assert all(n in str(err.value) for n in BACKBONES.names())


@dataclasses.dataclass(frozen=True)
class _ConvConfig:
    width: int = 8
    img_size: int = 32
    drop_path_rate: float = 0.0

    def validate(self) -> None:
        if self.width < 1:
            raise ValueError("width must be >= 1")

    @property
    def feature_channels(self) -> tuple[int, ...]:
        return (self.width,) * 4


class _ConvBackbone(nn.Module):
    def __init__(self, cfg: _ConvConfig) -> None:
        super().__init__()
        self.feature_channels = cfg.feature_channels
        self.stem = nn.Conv2d(3, cfg.width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.stem(x)
        return [nn.functional.avg_pool2d(y, 2**i) for i in range(1, 5)]


def test_a_new_family_is_an_entry(monkeypatch) -> None:
    fam = BackboneFamily("conv_test", _ConvConfig, _ConvBackbone, ())
    monkeypatch.setitem(FAMILIES._items, fam.name, fam)
    monkeypatch.setitem(BACKBONES._items, "conv_test_s", BackboneEntry("conv_test_s", fam, _ConvConfig(width=6)))
    model = MultiTaskModel(model_config_for(BACKBONES.get("conv_test_s").config, {"semseg": 5, "sal": 1}))
    assert isinstance(model.backbone, _ConvBackbone)
    out = model(torch.randn(2, 3, 32, 32))
    assert out["semseg"].shape == (2, 5, 32, 32) and out["sal"].shape == (2, 1, 32, 32)
    with pytest.raises(KeyError, match="no backbone family takes a dict"):
        build_backbone({"width": 3})
