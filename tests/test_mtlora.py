"""MTLoRA / MTLoRA+: placement, freezing, task-branch semantics, batched == per-task reference, merging, bad input."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import fp32_tolerances
from torch import nn

from benchmark.backbones import SwinConfig
from benchmark.method_api import METHODS
from benchmark.model import MultiTaskModel, model_config_for
from methods.mtlora import MTLoRABackbone, MTLoRAConfig, MTLoRALinear, MTLoRAPlusConfig, merged

TASKS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3}
# 2 blocks per stage so that the task block (the last one) is a shifted-window block in stages 1-3
SWIN = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, img_size=64)
IMG = 64


def _model(method: str = "mtlora", tasks: dict[str, int] = TASKS, seed: int = 0, **fields) -> MultiTaskModel:
    torch.manual_seed(seed)
    spec = METHODS.get(method)
    cfg = spec.config_cls(**{"shared_rank": (4, 6, 8, 10), **fields})
    return spec.apply(MultiTaskModel(model_config_for(SWIN, tasks, drop_path_rate=0.0)), cfg)


def _randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero; give every LoRA factor random values so that every branch matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # as the parity fixture


def _image(batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- registry and config


def test_registered_with_paper_defaults() -> None:
    for name, cls in (("mtlora", MTLoRAConfig), ("mtlora_plus", MTLoRAPlusConfig)):
        spec = METHODS.get(name)
        assert spec.config_cls is cls
        assert spec.adapter_markers == ("lora_",)
    cfg = MTLoRAConfig()
    assert cfg.shared_rank == (64, 64, 64, 64) and cfg.task_rank == 4
    assert cfg.shared_scale == 4.0 and cfg.task_scale == 4.0 and cfg.lora_dropout == 0.05
    assert cfg.shared_targets == ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert cfg.task_targets == ("attn.proj", "mlp.fc1", "mlp.fc2")
    assert cfg.patch_merging == "full" and MTLoRAPlusConfig().patch_merging == "lora"


def test_config_round_trips_with_overrides() -> None:
    cfg = MTLoRAConfig(shared_rank=(8, 16, 32, 64), task_ranks={"sal": 2}, task_scales={"normals": 2.0})
    back = MTLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


# --------------------------------------------------------------------------- structure and freezing


def test_lora_placement_ranks_and_scales() -> None:
    model = _model(task_ranks={"sal": 2}, task_scales={"normals": 1.5})
    assert isinstance(model.backbone, MTLoRABackbone)
    for i, layer in enumerate(model.backbone.layers):
        for j, blk in enumerate(layer.blocks):
            last = j == len(layer.blocks) - 1
            for target in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                lin = blk.get_submodule(target)
                assert isinstance(lin, MTLoRALinear), (i, j, target)
                assert lin.shared_rank == (4, 6, 8, 10)[i] and lin.shared_scale == 4.0
                assert tuple(lin.lora_shared_A.shape) == (lin.shared_rank, lin.in_features)
                assert tuple(lin.lora_shared_B.shape) == (lin.out_features, lin.shared_rank)
                want_tasks = last and target != "attn.qkv"  # qkv is never task-specific
                assert lin.tasks == (tuple(TASKS) if want_tasks else ()), (i, j, target)
                if want_tasks:
                    assert lin.lora_tasks_A["sal"].shape[0] == 2 and lin.lora_tasks_A["semseg"].shape[0] == 4
                    assert dict(zip(lin.tasks, lin.task_scales, strict=True))["normals"] == 1.5
                    assert dict(zip(lin.tasks, lin.task_scales, strict=True))["semseg"] == 4.0
        if i > 0:  # mtlora: plain, fully trainable reductions
            red = layer.downsample.reduction
            assert not isinstance(red, MTLoRALinear) and red.weight.requires_grad


def test_trainable_set_mtlora_and_plus() -> None:
    for method in ("mtlora", "mtlora_plus"):
        model = _model(method)
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                assert p.requires_grad, name  # decoders untouched
                continue
            expected = (
                "lora_" in name
                or "patch_embed" in name
                or "norm" in name
                or "relative_position_bias_table" in name
                or (method == "mtlora" and "downsample.reduction" in name)
            )
            assert p.requires_grad == expected, (method, name)
        if method == "mtlora_plus":
            for i, layer in enumerate(model.backbone.layers):
                if i == 0:
                    continue
                red = layer.downsample.reduction
                assert isinstance(red, MTLoRALinear) and not red.tasks
                assert red.shared_rank == (4, 6, 8, 10)[i - 1]  # the rank of the stage the merging closes
                assert not red.weight.requires_grad and red.lora_shared_A.requires_grad


def test_starts_as_the_frozen_model_and_outputs_per_task_features() -> None:
    torch.manual_seed(0)
    plain = MultiTaskModel(model_config_for(SWIN, TASKS, drop_path_rate=0.0)).eval()
    spec = METHODS.get("mtlora")
    model = spec.apply(copy.deepcopy(plain), spec.config_cls(shared_rank=(4, 4, 4, 4))).eval()
    image = _image()
    with torch.no_grad():
        feats = model.backbone(image)
        want, got = plain(image), model(image)
    assert set(feats) == set(TASKS)
    for t in TASKS:
        assert [tuple(f.shape) for f in feats[t]] == [(2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2), (2, 128, 2, 2)]
        torch.testing.assert_close(got[t], want[t], rtol=0, atol=1e-6)


def test_task_branch_formula_of_one_layer() -> None:
    """shared = Wx + b + s B A x; task t = Wx + b + s_t B_t A_t u_t (no shared term, W sees the shared input)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lin = MTLoRALinear(base, shared_rank=3, shared_scale=4.0, task_ranks={"a": 2, "b": 3}, task_scales={"b": 0.5})
    _randomize_lora(lin)
    x, u = torch.randn(7, 6), torch.randn(2, 7, 6)
    w, b = base.weight, base.bias
    shared = x @ w.T + b + 4.0 * (x @ lin.lora_shared_A.T @ lin.lora_shared_B.T)
    task_a = x @ w.T + b + 4.0 * (u[0] @ lin.lora_tasks_A["a"].T @ lin.lora_tasks_B["a"].T)
    task_b = x @ w.T + b + 0.5 * (u[1] @ lin.lora_tasks_A["b"].T @ lin.lora_tasks_B["b"].T)
    for batched in (True, False):
        s, t = lin.forward_tasks(x, u, batched=batched)
        torch.testing.assert_close(s, shared, rtol=0, atol=1e-6)
        torch.testing.assert_close(t[0], task_a, rtol=0, atol=1e-6)
        torch.testing.assert_close(t[1], task_b, rtol=0, atol=1e-6)
        # without task inputs the task LoRA sees the (dropped-out) shared input
        _, t2 = lin.forward_tasks(x, None, batched=batched)
        torch.testing.assert_close(t2[0], x @ w.T + b + 4.0 * (x @ lin.lora_tasks_A["a"].T @ lin.lora_tasks_B["a"].T))
    torch.testing.assert_close(lin(x), shared, rtol=0, atol=1e-6)


def test_lora_dropout_only_on_the_shared_input() -> None:
    torch.manual_seed(0)
    lin = MTLoRALinear(nn.Linear(6, 5), shared_rank=3, task_ranks={"a": 2}, dropout=0.5).train()
    _randomize_lora(lin)
    x, u = torch.randn(64, 6), torch.randn(1, 64, 6)
    _, t1 = lin.forward_tasks(x, u)
    _, t2 = lin.forward_tasks(x, u)
    torch.testing.assert_close(t1, t2, rtol=0, atol=0)  # task inputs reach the task LoRA without dropout
    s1, s2 = lin(x), lin(x)
    assert not torch.equal(s1, s2)  # the shared branch is dropped out


# --------------------------------------------------------------------------- batched == per-task reference


@pytest.mark.parametrize("method", ["mtlora", "mtlora_plus"])
def test_batched_task_streams_equal_the_per_task_reference(method: str) -> None:
    model = _model(method, task_ranks={"sal": 2, "normals": 6}, task_scales={"human_parts": 2.5}, lora_dropout=0.0)
    _randomize_lora(model)
    image = _image()

    def run(
        batched: bool, train: bool, dtype=torch.float32
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        net = copy.deepcopy(model).to(dtype)
        net.backbone.batched = batched
        net.train(train)
        out = net(image.to(dtype))
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).mean() for o in out.values())
        loss.backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        return {k: v.detach() for k, v in out.items()}, grads

    # tolerances: the per-task reference run in float64 as the yardstick of fp32 noise (tests/conftest.py)
    for train in (False, True):
        out_b, grad_b = run(True, train)
        out_r, grad_r = run(False, train)
        out_64, grad_64 = run(False, train, torch.float64)
        tol = fp32_tolerances(out_r, out_64)
        for t in TASKS:
            assert float((out_b[t] - out_r[t]).abs().max()) <= tol[t], (train, t, tol[t])
        assert grad_b.keys() == grad_r.keys() == grad_64.keys()
        tol = fp32_tolerances(grad_r, grad_64)
        for n in grad_r:
            assert float((grad_b[n] - grad_r[n]).abs().max()) <= tol[n], (train, n, tol[n])


def test_frozen_weights_get_no_gradient_and_unused_shared_branch_has_none() -> None:
    model = _model(lora_dropout=0.0)
    _randomize_lora(model)
    model.train()
    out = model(_image())
    sum(o.square().mean() for o in out.values()).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    no_grad = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    # as officially: the last stage's shared stream feeds no decoder, so its last fc2 shared LoRA is unused
    assert no_grad == [
        "backbone.swin.layers.3.blocks.1.mlp.fc2.lora_shared_A",
        "backbone.swin.layers.3.blocks.1.mlp.fc2.lora_shared_B",
    ]
    for t in TASKS:  # every task's LoRA in every stage learns
        for i in range(4):
            g = model.backbone.layers[i].blocks[1].mlp.fc1.lora_tasks_A[t].grad
            assert g is not None and g.abs().sum() > 0, (t, i)


def test_task_streams_are_task_specific() -> None:
    """Changing one task's LoRA changes that task's output only."""
    model = _model()
    _randomize_lora(model)
    model.eval()
    image = _image()
    with torch.no_grad():
        before = model(image)
        model.backbone.layers[2].blocks[1].mlp.fc2.lora_tasks_B["sal"].mul_(1.5)
        after = model(image)
    for t in TASKS:
        changed = not torch.equal(before[t], after[t])
        assert changed == (t == "sal"), t


# --------------------------------------------------------------------------- merging


@pytest.mark.parametrize("method", ["mtlora", "mtlora_plus"])
def test_merged_evaluation_matches_and_restores_weights(method: str) -> None:
    model = _model(method)
    _randomize_lora(model)
    model.eval()
    image = _image()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model(image)
        with merged(model):
            n_merged = sum(m.merged for m in model.backbone.lora_linears())
            got = model(image)
            with pytest.raises(RuntimeError, match="unmerge"):
                model.train()(image)
            model.eval()
            saved = model.state_dict()  # a checkpoint taken while merged still holds the frozen weights
            with pytest.raises(RuntimeError, match="unmerge"):
                model.load_state_dict(saved)
        again = model(image)
    # every LoRA'd linear without task branches is merged: 8 blocks x 4 linears - 4 task blocks x 3 (+ 3 reductions)
    assert n_merged == 8 * 4 - 4 * 3 + (3 if method == "mtlora_plus" else 0)
    for t in TASKS:
        scale = max(1.0, float(want[t].abs().max()))
        assert float((got[t] - want[t]).abs().max()) <= 1e-5 * scale, t
        torch.testing.assert_close(again[t], want[t], rtol=0, atol=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n  # unmerge restores the exact frozen weights
        assert torch.equal(saved[n], weights[n]), n


def test_merge_on_backbone_and_on_a_model_without_mtlora() -> None:
    model = _model()
    assert model.backbone.merge() > 0
    assert all(not m.merged or not m.tasks for m in model.backbone.lora_linears())
    model.backbone.unmerge()
    assert not any(m.merged for m in model.backbone.lora_linears())
    with pytest.raises(ValueError, match="no MTLoRA backbone"):
        with merged(MultiTaskModel(model_config_for("swin_micro", TASKS))):
            pass


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"shared_rank": (8, 0, 8, 8)}, "shared_rank"),
        ({"shared_rank": (8, -2, 8, 8)}, "shared_rank"),
        ({"shared_rank": ()}, "shared_rank"),
        ({"task_rank": 0}, "task_rank"),
        ({"task_ranks": {"sal": -1}}, "task_ranks"),
        ({"task_ranks": {"depth": 4}}, "depth"),
        ({"task_scales": {"edge": 2.0}}, "edge"),
        ({"task_targets": ("attn.qkv", "mlp.fc1")}, "task_targets"),
        ({"shared_targets": ("attn.q",)}, "shared_targets"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"patch_merging": "partial"}, "patch_merging"),
        ({"merging_rank": (4, 0, 4)}, "merging_rank"),
        ({"task_blocks": ((1,), (1,))}, "task_blocks"),
    ],
)
def test_bad_config_is_a_clear_value_error(fields: dict, match: str) -> None:
    cfg = MTLoRAConfig(**fields)
    with pytest.raises(ValueError, match=match):
        cfg.validate(tuple(TASKS))
    with pytest.raises(ValueError, match=match):  # apply validates too
        METHODS.get("mtlora").apply(MultiTaskModel(model_config_for("swin_micro", TASKS)), cfg)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"shared_rank": (8, 8, 8)}, r"3 ranks .* 4 stages"),
        ({"shared_rank": (8, 8, 8, 8, 8)}, r"5 ranks .* 4 stages"),
        ({"merging_rank": (4, 4)}, "merging_rank"),
        ({"task_blocks": ((0,), (0,), (5,), (0,))}, r"stage 3 has 2 blocks, got indices \[5\]"),
        ({"task_blocks": ((0,), (-2,), (1,), (0,))}, r"stage 2 has 1 blocks"),
    ],
)
def test_config_that_does_not_fit_the_backbone(fields: dict, match: str) -> None:
    cfg = MTLoRAConfig(**fields)
    cfg.validate(tuple(TASKS))  # fine in itself
    with pytest.raises(ValueError, match=match):
        METHODS.get("mtlora").apply(MultiTaskModel(model_config_for("swin_micro", TASKS)), cfg)


def test_applying_twice_is_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="already applied"):
        METHODS.get("mtlora").apply(model, MTLoRAConfig(shared_rank=(4, 4, 4, 4)))


def test_non_last_task_blocks_are_inert_as_officially() -> None:
    """task_blocks may list any block; only a stage's last block feeds the decoders (official stage loop)."""
    model = _model(task_blocks=((0, 1), (1,), (), (1,)), lora_dropout=0.0)
    _randomize_lora(model)
    blocks = model.backbone.layers
    assert blocks[0].blocks[0].attn.proj.tasks == tuple(TASKS)
    assert blocks[2].blocks[1].attn.proj.tasks == ()
    model.train()
    feats = model.backbone(_image())
    sum(f.square().mean() for fs in feats.values() for f in fs).backward()
    assert blocks[0].blocks[0].mlp.fc1.lora_tasks_A["sal"].grad is None  # computed officially, then discarded
    # stage 3 has no task stream: every task gets the shared feature
    torch.testing.assert_close(feats["sal"][2], feats["semseg"][2], rtol=0, atol=0)
    assert dataclasses.asdict(MTLoRAConfig(task_blocks=((0, 1),)))["task_blocks"] == ((0, 1),)
