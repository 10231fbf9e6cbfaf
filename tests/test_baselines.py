"""Baseline-specific behaviour beyond the registry contract: VPT's windowed prompts, adapters, single-task copies,
the per-task mode (one copy of the tuned parameters per task), the peft bridge's checks and settings."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition

from baselines.adapter import AdapterSwinBlock
from baselines.peft_bridge import CONFIGS, TUNERS
from baselines.single_task import SingleTaskModels
from baselines.vpt import PromptedWindowAttention, _add_prompts
from benchmark.method_api import METHODS, apply_overrides
from benchmark.model import MultiTaskModel, model_config_for
from benchmark.params import count_parameters
from benchmark.peft_tools import PerTaskBackbone, merge_for_eval

TASKS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3}


def _model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(model_config_for("swin_micro", TASKS))


def _apply(name: str, model: torch.nn.Module, *overrides: str) -> torch.nn.Module:
    spec = METHODS.get(name)
    return spec.apply(model, apply_overrides(spec.default_config(), overrides))


# --------------------------------------------------------------------------- VPT


def _reference_prompted_attention(attn: PromptedWindowAttention, x: torch.Tensor, mask: torch.Tensor | None):
    """Prompts as real extra tokens of every window (they also attend, but their rows are dropped), via SDPA."""
    B_, N, C = x.shape
    P, h = attn.prompt.shape[0], attn.num_heads
    tokens = torch.cat([attn.prompt.unsqueeze(0).expand(B_, -1, -1), x], dim=1)
    q, k, v = attn.qkv(tokens).reshape(B_, P + N, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = torch.zeros(1, h, P + N, P + N)
    bias[..., P:, P:] = attn._get_rel_pos_bias()
    if mask is not None:
        full = torch.zeros(mask.shape[0], P + N, P + N)
        full[:, P:, P:] = mask
        bias = bias + full.repeat(B_ // mask.shape[0], 1, 1).unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)[:, :, P:]
    return attn.proj(out.transpose(1, 2).reshape(B_, N, -1))


@pytest.mark.parametrize("shift", [0, 2])
def test_vpt_prompts_are_extra_keys_values_of_every_window(shift: int) -> None:
    torch.manual_seed(0)
    block = SwinTransformerBlock(dim=16, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=shift).eval()
    assert (block.attn_mask is not None) == bool(shift)  # the shifted case really exercises the -100 mask
    _add_prompts(block.attn, 3)
    assert isinstance(block.attn, PromptedWindowAttention)
    x = torch.randn(2, 8, 8, 16)
    windows = window_partition(torch.roll(x, (-shift, -shift), (1, 2)), (4, 4)).reshape(-1, 16, 16)
    with torch.no_grad():
        got = block.attn(windows, mask=block.attn_mask)
        want = _reference_prompted_attention(block.attn, windows, block.attn_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == windows.shape  # prompts leave no output tokens behind


def test_vpt_prompts_change_the_output_and_only_prompts_train() -> None:
    for name, prompted in (("vpt_shallow", 1), ("vpt_deep", 5)):  # swin_micro has 1 + 1 + 2 + 1 blocks
        base = _model().eval()
        net = _apply(name, copy.deepcopy(base), "num_prompts=4", "per_task=false").eval()
        prompts = [n for n, p in net.backbone.named_parameters() if p.requires_grad]
        assert len(prompts) == prompted and all(n.endswith("attn.prompt") for n in prompts), prompts
        assert prompts[0] == "swin.layers.0.blocks.0.attn.prompt"
        image = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert not torch.allclose(net(image)["semseg"], base(image)["semseg"])


def test_vpt_rejects_no_prompts() -> None:
    with pytest.raises(ValueError, match="num_prompts"):
        _apply("vpt_deep", _model(), "num_prompts=0")


# --------------------------------------------------------------------------- adapter


def test_adapter_bottlenecks_sit_in_every_block_and_keep_pretrained_names() -> None:
    base = _model()
    names_before = {n for n, _ in base.named_parameters()}
    net = _apply("adapter", base, "reduction=4", "train_norms=false", "train_tables=false", "per_task=false")
    blocks = [m for m in net.backbone.modules() if isinstance(m, SwinTransformerBlock)]
    assert blocks and all(isinstance(b, AdapterSwinBlock) for b in blocks)
    for b in blocks:
        assert b.adapter_attn.down.out_features == b.dim // 4 == b.adapter_mlp.down.out_features
    names_after = {n for n, _ in net.named_parameters()}
    assert names_before <= names_after  # nothing renamed
    new = names_after - names_before
    assert new and all(".adapter_attn." in n or ".adapter_mlp." in n for n in new)
    trainable_backbone = {n for n, p in net.named_parameters() if p.requires_grad and "backbone" in n}
    assert trainable_backbone == new


def test_adapter_train_norms_unfreezes_layernorms_only() -> None:
    net = _apply("adapter", _model(), "train_norms=true", "train_tables=false", "per_task=false")
    extra = {n for n, p in net.backbone.named_parameters() if p.requires_grad and "adapter_" not in n}
    assert extra and all(".norm" in n for n in extra)
    assert count_parameters(net, METHODS.get("adapter").adapter_markers)["other_trainable_backbone"] == sum(
        p.numel() for n, p in net.backbone.named_parameters() if n in extra
    )


# --------------------------------------------------------------------------- per-task mode

PER_TASK = sorted(n for n in METHODS.names() if "per_task" in METHODS.get(n).set_names())


def test_every_backbone_side_baseline_has_a_per_task_mode() -> None:
    assert set(PER_TASK) >= {"bitfit", "relative_bias", "vpt_shallow", "vpt_deep", "adapter", "vl_adapter", "lora"}
    assert set(PER_TASK) >= {t.name for t in TUNERS}


@pytest.mark.parametrize("name", PER_TASK)
def test_per_task_mode_gives_each_task_its_own_copy(name: str) -> None:
    """per_task=true: every tuned backbone parameter of the shared form exists once per task, with the same
    starting values, under ``task_params.<task>.<its shared name>``; with equal copies it computes what the shared
    form computes (and so, for identity-at-init methods, what the unmodified model computes)."""
    shared = _apply(name, _model(), "per_task=false")
    tuned = {n: p for n, p in shared.backbone.named_parameters() if p.requires_grad}
    keep = {n for n in tuned if name in ("adapter", "vl_adapter") and "adapter_" not in n}  # shared tables
    reference = _model().eval()
    net = _apply(name, copy.deepcopy(reference), "per_task=true")
    assert isinstance(net.backbone, PerTaskBackbone) and net.backbone.tasks == tuple(TASKS)
    got = {n: p for n, p in net.backbone.named_parameters() if p.requires_grad}
    want = {f"task_params.{t}.{n}" for t in TASKS for n in tuned if n not in keep} | {f"shared.{n}" for n in keep}
    assert set(got) == want
    for n in want:  # every copy starts from the value the shared form starts from
        torch.testing.assert_close(got[n], tuned[n.split(".", 2)[2] if n.startswith("task_params.") else n[7:]])
    counts = count_parameters(net, METHODS.get(name).adapter_markers)
    base = count_parameters(shared, METHODS.get(name).adapter_markers)
    assert counts["adapter"] == len(TASKS) * base["adapter"]
    assert counts["trainable"] - counts["decoders"] == len(TASKS) * (base["trainable"] - base["decoders"]) - (
        len(TASKS) - 1
    ) * sum(tuned[n].numel() for n in keep)
    net.eval(), shared.eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = shared(image), net(image)
    for t in TASKS:
        torch.testing.assert_close(b[t], a[t], rtol=0, atol=1e-6)


def test_per_task_copies_act_on_their_own_task_only() -> None:
    """Changing the semseg copy of the tables changes only semseg's output; its loss reaches only its copy."""
    net = _apply("relative_bias", _model()).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = net(image)
        for p in net.backbone.task_params["semseg"].parameters():
            p.add_(0.5)
        after = net(image)
    assert not torch.allclose(before["semseg"], after["semseg"])
    for t in ("human_parts", "sal", "normals"):
        assert torch.equal(before[t], after[t])
    net.train()
    net(image)["semseg"].square().mean().backward()
    for t in TASKS:
        grads = [p.grad for p in net.backbone.task_params[t].parameters()]
        assert all((g is not None and g.abs().sum() > 0) if t == "semseg" else g is None for g in grads), t


def test_per_task_backbone_holds_no_tuned_parameter_outside_forward() -> None:
    net = _apply("vpt_deep", _model(), "num_prompts=3")
    assert not any(n.endswith("attn.prompt") for n, _ in net.backbone.shared.named_parameters())
    state = net.state_dict()
    assert sum(k.endswith("attn.prompt") for k in state) == len(TASKS) * 5  # 5 blocks in swin_micro
    twin = _apply("vpt_deep", _model(1), "num_prompts=3")
    twin.load_state_dict(state)  # strict: the same keys, so checkpoints round-trip
    net.eval(), twin.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for t, out in net(image).items():
            assert torch.equal(out, twin(image)[t])


def test_merge_for_eval_leaves_per_task_adapters_alone() -> None:
    """Per-task LoRA cannot be folded into one set of weights: merge_for_eval merges nothing and the outputs stay
    bit for bit the same; the shared form still merges (its numerics are tested with the LoRA tests)."""
    image = torch.randn(1, 3, 64, 64)
    net = _apply("lora", _model(), "per_task=true").eval()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_()
        want = net(image)
        with merge_for_eval(net) as n_merged:
            got = net(image)
    assert n_merged == 0
    for t in TASKS:
        assert torch.equal(got[t], want[t])
    with merge_for_eval(_apply("lora", _model(), "per_task=false")) as n_shared:
        assert n_shared > 0


def test_adapter_per_task_keeps_one_set_of_trainable_tables_and_vl_adapter_shares_all() -> None:
    net = _apply("adapter", _model())
    shared = {n for n, p in net.backbone.shared.named_parameters() if p.requires_grad}
    assert shared and all("relative_position_bias_table" in n for n in shared)
    assert all("adapter_" in n for t in TASKS for n, _ in net.backbone.task_params[t].named_parameters())
    vl = _apply("vl_adapter", _model())
    assert not isinstance(vl.backbone, PerTaskBackbone)
    trainable = {n for n, p in vl.backbone.named_parameters() if p.requires_grad}
    assert trainable and all("adapter_" in n or "relative_position_bias_table" in n for n in trainable)
    assert any("relative_position_bias_table" in n for n in trainable)


# --------------------------------------------------------------------------- single_task


def test_single_task_copies_are_independent_and_carry_a_prior_load() -> None:
    model = _model()
    with torch.no_grad():  # stands in for a pretrained load done before apply
        model.backbone.swin.patch_embed.proj.bias.fill_(0.25)
    net = _apply("single_task", model)
    assert isinstance(net, SingleTaskModels) and list(net.backbones) == list(TASKS)
    ids = [{id(p) for p in net.backbones[t].parameters()} for t in TASKS]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    assert not ({id(p) for p in model.backbone.parameters()} & set().union(*ids))
    for t in TASKS:
        assert torch.all(net.backbones[t].swin.patch_embed.proj.bias == 0.25)
    # task t's output depends on its own backbone only
    image = torch.randn(1, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        before = net(image)
        net.backbones["sal"].swin.patch_embed.proj.weight.mul_(2)
        after = net(image)
    assert not torch.equal(before["sal"], after["sal"])
    for t in ("semseg", "human_parts", "normals"):
        assert torch.equal(before[t], after[t])


# --------------------------------------------------------------------------- peft bridge


def test_bridge_registers_one_method_per_tuner_with_settable_fields() -> None:
    assert {t.name for t in TUNERS} >= {"dora", "loha", "lokr", "ia3", "vera", "oft"}
    for t in TUNERS:
        spec = METHODS.get(t.name)
        assert spec.config_cls is CONFIGS[t.name]
        assert [f[0] for f in spec.fields()] == [f.name for f in t.fields] + ["per_task"]


@pytest.mark.parametrize(
    ("name", "overrides", "marker"),
    [
        ("dora", ("rank=2", 'targets=["qkv"]'), "lora_"),
        ("loha", ("rank=2", "alpha=4"), "hada_"),
        ("lokr", ("rank=2", "decompose_both=true"), "lokr_"),
        ("ia3", ('targets=["fc1", "fc2"]', 'feedforward=["fc2"]'), "ia3_"),
        ("vera", ("rank=16", "prng_key=3"), "vera_lambda"),
        ("oft", ("block_size=4",), "oft_"),
    ],
)
def test_bridge_settings_reach_peft(name: str, overrides: tuple[str, ...], marker: str) -> None:
    base = _model()
    default = count_parameters(_apply(name, _model(), *()), METHODS.get(name).adapter_markers)["adapter"]
    net = _apply(name, base, *overrides)
    adapter = count_parameters(net, METHODS.get(name).adapter_markers)["adapter"]
    assert adapter > 0 and adapter != default
    assert all(marker in n for n, p in net.backbone.named_parameters() if p.requires_grad)


def test_dora_rank_and_targets_give_the_closed_form_count() -> None:
    # DoRA = LoRA (rank * (in + out)) + one magnitude per output row; qkv only: in C, out 3C
    net = _apply("dora", _model(), "rank=2", 'targets=["qkv"]')
    qkv = [m for n, m in net.backbone.named_modules() if n.endswith("attn.qkv.base_layer")]
    want = sum(2 * (m.in_features + m.out_features) + m.out_features for m in qkv)
    assert count_parameters(net, ("lora_",))["adapter"] == want


def test_oft_rejects_a_block_size_that_does_not_divide_a_width() -> None:
    with pytest.raises(ValueError, match="block_size 5 does not divide"):
        _apply("oft", _model(), "block_size=5")


def test_ia3_feedforward_must_be_a_target() -> None:
    with pytest.raises(ValueError, match="feedforward_modules"):
        _apply("ia3", _model(), 'targets=["qkv"]', 'feedforward=["fc2"]')


@pytest.mark.parametrize("name", ["lora", "dora", "loha", "vera"])
def test_rank_and_dropout_are_validated(name: str) -> None:
    with pytest.raises(ValueError, match="rank must be >= 1"):
        _apply(name, _model(), "rank=0")
    with pytest.raises(ValueError, match="dropout must be in"):
        key = "rank_dropout" if name == "loha" else "dropout"
        _apply(name, _model(), f"{key}=1.5")


def test_vera_shared_projections_travel_with_the_backbone() -> None:
    net = _apply("vera", _model())
    state = net.backbone.state_dict()
    keys_a = [k for k in state if ".vera_A." in k]
    assert keys_a, "the shared projection must be saved with the backbone"
    assert all(torch.equal(state[keys_a[0]], state[k]) for k in keys_a)  # one shared tensor, many references
    twin = copy.deepcopy(net)
    layers = [m for m in twin.backbone.modules() if hasattr(m, "vera_A") and m.vera_A is not None]
    assert len({id(m.vera_A) for m in layers}) == 1  # still shared after a copy


# --------------------------------------------------------------------------- --list


def test_list_shows_each_configuration_and_the_row_it_reproduces(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmark.cli import main

    assert main(["--list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert (
        "3.43 M printed" in listed["vpt_deep"]["reproduces"]
        and "50 prompt tokens" in listed["vpt_deep"]["configuration"]
    )
    assert listed["vl_adapter"]["reproduces"].startswith("MTLoRA Table 1 'VL-Adapter'")
    assert listed["lora"]["reproduces"].startswith("none: ") and "unknown" in listed["lora"]["reproduces"]
    assert "per_task=false" in listed["relative_bias"]["configuration"]  # the shared form is named
    assert main(["--list"]) == 0
    text = capsys.readouterr().out
    block = text.split("vpt_deep  (", 1)[1].split("\nvpt_shallow", 1)[0]
    assert "    configuration: 50 prompt tokens per task in every block" in block
    assert "    reproduces: MTLoRA Table 1 'VPT-deep'" in block and "--set per_task=...  [bool]  default true" in block
