"""TADFormer: exact parameter counts, official parity, batched == per-task reference, merging, filters, bad input.

The parity tests need the lean TADFormer fixtures in tests/fixtures/tadformer_parity/ (tadformer_paper_public.pt,
tadformer_paper_public_grad.pt, tadformer_release_public.pt, tadformer_release_public_grad.pt).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fp32_tolerances
from torch import nn

from benchmark.backbones import SwinConfig
from benchmark.method_api import METHODS
from benchmark.model import MultiTaskModel, model_config_for
from benchmark.official import build_from_fixture_config, parity_checks
from benchmark.params import count_parameters
from benchmark.peft_tools import merge_for_eval
from benchmark.reference_runs import compare, load_golden, run_reference
from methods.tadformer import (
    DynamicTaskFilter,
    TADFormerBackbone,
    TADFormerConfig,
    TADFormerLinear,
    TADFormerReleaseConfig,
    config_from_fixture,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "tadformer_parity"
TASKS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3}
# 2 blocks per stage so that the task-adapted block (the last one) is a shifted-window block in stages 1-3
SWIN = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, img_size=64)
IMG = 64
VARIANTS = ("tadformer", "tadformer_release")

# Trainable counts at Swin-T, 448 px, 4 tasks, decoders included (issue 14; the official code's counting rule;
# the paper prints 3.56 / 4.78 / 7.38 M for the dynamic filter)
OFFICIAL_TRAINABLE = {
    ("tadformer", 16): 3_557_502,
    ("tadformer", 32): 4_776_126,
    ("tadformer", 64): 7_379_262,
    ("tadformer_release", 16): 3_532_350,
    ("tadformer_release", 32): 4_670_526,
    ("tadformer_release", 64): 6_946_878,
}
DECODERS = 1_946_624
# the parts the two variants share at Swin-T: task_prompts_up 387,072 + prompt_layernorm 8,832 + prompts 384 +
# gates 4 (names containing "prompt", counted as adapter here) and LayerNorms 23,232 + relative-position tables
# 23,322 + patch-embedding conv 4,704 (other trainable backbone); together the official breakdown's "extra"
PROMPT = 396_292
OTHER = 51_258
OFFICIAL_EXTRA = 447_550


def _model(method: str = "tadformer", seed: int = 0, **fields) -> MultiTaskModel:
    torch.manual_seed(seed)
    spec = METHODS.get(method)
    cfg = spec.config_cls(**{"shared_rank": (4, 6, 8, 10), **fields})
    return spec.apply(MultiTaskModel(model_config_for(SWIN, TASKS, drop_path_rate=0.0)), cfg)


def _randomize(model: nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero and the gates at 0: give LoRA factors, filters and gates random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_shared" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "prompt_gate" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def _image(batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _failed(checks) -> list[str]:
    return [f"{c.name}: {c.max_diff:.3g} > {c.tol:.3g} {c.detail}" for c in checks if not c.passed]


# --------------------------------------------------------------------------- registry and counts


def test_registered_with_paper_defaults() -> None:
    assert METHODS.get("tadformer").config_cls is TADFormerConfig
    assert METHODS.get("tadformer_release").config_cls is TADFormerReleaseConfig
    cfg = TADFormerConfig()
    assert cfg.shared_rank == (64, 64, 64, 64) and cfg.shared_scale == 4.0 and cfg.lora_dropout == 0.05
    assert cfg.task_filter == "dynamic" and TADFormerReleaseConfig().task_filter == "static"
    for name in VARIANTS:
        spec = METHODS.get(name)
        assert spec.adapter_markers == ("lora_", "prompt") and not spec.identity_at_init


def _counts(method: str, rank: int, device: str = "meta", img_size: int = 448) -> dict[str, int]:
    spec = METHODS.get(method)
    with torch.device(device):
        model = spec.apply(
            MultiTaskModel(model_config_for("swin_tiny", TASKS, img_size)), spec.config_cls(shared_rank=(rank,) * 4)
        )
    return count_parameters(model, spec.adapter_markers)


@pytest.mark.parametrize("key", list(OFFICIAL_TRAINABLE), ids=[f"{m}-r{r}" for m, r in OFFICIAL_TRAINABLE])
def test_counts_equal_the_official_code(key: tuple[str, int]) -> None:
    method, r = key
    counts = _counts(method, r)
    # r (in + out) per linear: qkv 4C, proj 2C, fc1 5C, fc2 5C = 16 C per block; sum of C over Swin-T's blocks 4,416
    shared_lora = 16 * r * 4416
    # 12 task-adapted layers: a DTF is 9r^2 + 27r, a static filter 4 tasks x (9r + r)
    filters = 12 * (9 * r * r + 27 * r if method == "tadformer" else 4 * (9 * r + r))
    assert counts["trainable"] == OFFICIAL_TRAINABLE[key]
    assert counts["decoders"] == DECODERS
    assert counts["other_trainable_backbone"] == OTHER == OFFICIAL_EXTRA - PROMPT
    assert counts["adapter"] == shared_lora + filters + PROMPT == OFFICIAL_TRAINABLE[key] - DECODERS - OTHER


@pytest.mark.parametrize("method, variant", [("tadformer", "paper"), ("tadformer_release", "release")])
def test_counts_equal_the_fixtures_paper_configurations(method: str, variant: str) -> None:
    """The official breakdown at Swin-T 448 that the fixture records for each rank (trainable, decoders, total)."""
    fx = torch.load(FIXTURES / f"tadformer_{variant}_public.pt", map_location="cpu", weights_only=True)
    paper = fx["trainable"]["paper_config_counts"]
    assert sorted(paper) == ["16", "32", "64"]
    for r, ref in paper.items():
        counts = _counts(method, int(r))
        got = {"trainable": counts["trainable"], "decoder": counts["decoders"], "total": counts["total"]}
        assert got == {k: ref[k] for k in got}, r
        assert counts["adapter"] - PROMPT == ref["lora"], r  # the official "lora" field: names with "lora" only


def test_counts_do_not_depend_on_image_size_or_meta_device() -> None:
    assert _counts("tadformer", 16, device="cpu", img_size=224) == _counts("tadformer", 16)


@pytest.mark.parametrize("method, rank", [("tadformer", 64), ("tadformer_release", 64)])
def test_cli_dry_run_prints_the_paper_count(method: str, rank: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "--method", method, "--set", f"rank={rank}", "--preset", "paper",
         "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    m = re.search(r"total trainable\s+([\d,]+)", done.stdout)
    assert m and int(m.group(1).replace(",", "")) == OFFICIAL_TRAINABLE[(method, rank)], done.stdout


def test_trainable_set() -> None:
    model = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for n in frozen:  # only the base linears and the patch-merging reductions
        assert re.search(r"\.(qkv|proj|fc1|fc2)\.(weight|bias)$|downsample\.reduction\.weight$", n), n
    assert "backbone.swin.task_prompts" in trainable
    assert "backbone.swin.layers.0.prompt_gate" in trainable
    assert "backbone.swin.layers.1.downsample.task_prompts_up.weight" in trainable
    assert "backbone.swin.layers.1.downsample.norm.weight" in trainable
    assert "backbone.swin.layers.0.blocks.0.attn.proj.prompt_layernorm.weight" in trainable  # in every block
    # filters only in the task-adapted (last) block of each stage, on proj / fc1 / fc2
    filters = {n.split(".lora_filter")[0] for n in trainable if ".lora_filter." in n}
    want = {f"backbone.swin.layers.{i}.blocks.1.{t}" for i in range(4) for t in ("attn.proj", "mlp.fc1", "mlp.fc2")}
    assert filters == want


def test_trainable_without_gradient_is_only_the_unused_prompt_layernorms() -> None:
    model = _model(lora_dropout=0.0)
    _randomize(model)
    model.train()
    out = model(_image())
    sum(o.square().mean() for o in out.values()).backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert no_grad == [f"backbone.swin.layers.{i}.blocks.0.attn.proj.prompt_layernorm.{k}"
                       for i in range(4) for k in ("bias", "weight")]  # fmt: skip
    for n, p in model.named_parameters():
        assert p.requires_grad or p.grad is None, n


# --------------------------------------------------------------------------- official parity


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_public_fixture_passes_every_check(variant: str) -> None:
    path = FIXTURES / f"tadformer_{variant}_public.pt"
    checks = parity_checks(path)
    assert not _failed(checks), _failed(checks)
    names = {c.name for c in checks}
    stem = path.stem
    for t in TASKS:  # the run covers every kind of comparison (no vacuous pass)
        # full-resolution or lean (subsampled) outputs, whichever the fixture holds
        assert any(n.startswith(f"{stem}/outputs") and n.endswith(f"/{t}") for n in names), t
        assert f"{stem}/head_outputs_before_resize/{t}" in names
        assert f"{stem}/debug/stage3/{t}" in names
        assert f"{stem}_grad/loss/{t}" in names
        assert f"{stem}_grad/bn/{t}/running_var" in names
    for n in ("load_state_dict", "trainable/names", "trainable/numel", "counts/trainable", "counts/lora"):
        assert f"{stem}/{n}" in names
    for n in ("loss/total", "grad_norms", "trainable_without_grad", "global_grad_norm", "frozen_no_grad"):
        assert f"{stem}_grad/{n}" in names
    assert sum(n.startswith(f"{stem}_grad/grad/") for n in names) == 20


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_float64_gradients_equal_the_officials_float64_gradients(variant: str) -> None:
    """A tighter check than the fp32 one: this model run in float64 against the official float64 gradients.

    Error model: in float64 both sides' own rounding is ~1e-12 relative, so the only slack needed is for the
    fixture's float32-stored inputs; the bound is 1/100 of the official model's own fp32-vs-fp64 gradient spread
    (the fixture's ``max_rel_l2_diff_grad_fp32_vs_fp64_over_params``), far below what an fp32 comparison can see.
    """
    from dataclasses import replace

    from benchmark.losses import MultiTaskLoss
    from benchmark.official import load_official_state_dict, official_to_local_key
    from benchmark.protocol import PASCAL_CONTEXT

    fx = torch.load(FIXTURES / f"tadformer_{variant}_public.pt", map_location="cpu", weights_only=True)
    g = torch.load(FIXTURES / f"tadformer_{variant}_public_grad.pt", map_location="cpu", weights_only=True)
    rep = g["reproducibility"]
    tol = 1e-2 * float(rep["max_rel_l2_diff_grad_fp32_vs_fp64_over_params"])
    model, _ = build_from_fixture_config(fx["config"], drop_path_rate=0.0, lora_dropout=0.0)
    load_official_state_dict(model, fx["state_dict"])
    model.double().train()
    spec = {t.name: t for t in PASCAL_CONTEXT.tasks}
    specs = [replace(spec[t], loss_weight=float(g["loss_weights"][t])) for t in model.tasks]
    out = model(fx["input"].double())
    MultiTaskLoss(specs)(out, {t: x.double() for t, x in g["targets"].items()})["total"].backward()
    params = dict(model.named_parameters())
    refs = rep["grads_fp64_same_model_representative"]
    assert len(refs) >= 10
    for name, ref in refs.items():
        got = params[official_to_local_key(name)].grad
        rel = float((got - ref.double()).norm() / ref.double().norm())
        assert rel <= tol, (name, rel, tol)


def test_injected_mistakes_fail_the_output_check() -> None:
    """The output comparison is not vacuous: mistakes the fixture README lists move the outputs far past it.

    Error model for the head outputs (before the final resize, present in full and lean fixtures): this fp32 model
    and the official fp32 run each differ from exact arithmetic by about the official fp32-vs-fp64 figure, so
    3x that figure per task bounds a correct implementation.
    """
    from benchmark.official import load_official_state_dict

    fx = torch.load(FIXTURES / "tadformer_release_public.pt", map_location="cpu", weights_only=True)
    noise = fx["reproducibility"]["max_abs_diff_fp32_vs_fp64_same_model"]

    def outputs_pass(mutate) -> bool:
        model, _ = build_from_fixture_config(fx["config"])
        load_official_state_dict(model, fx["state_dict"])
        mutate(model)
        model.eval()
        with torch.no_grad():
            feats = model.backbone(fx["input"])
            heads = {t: model.decoders[t](feats[t]) for t in model.tasks}
        refs = fx["head_outputs_before_resize"]
        return all(float((heads[t] - ref).abs().max()) <= 3 * noise[t] for t, ref in refs.items())

    def swap_prompts(model: nn.Module) -> None:  # two task prompts swapped
        with torch.no_grad():
            p = model.backbone.swin.task_prompts
            p[[0, 1]] = p[[1, 0]]

    def gate_on_the_wrong_branch(model: nn.Module) -> None:  # sigmoid(-g) = 1 - sigmoid(g)
        with torch.no_grad():
            for layer in model.backbone.layers:
                layer.prompt_gate.neg_()

    assert outputs_pass(lambda m: None)
    assert not outputs_pass(swap_prompts)
    assert not outputs_pass(gate_on_the_wrong_branch)


def test_parity_cli_runs_the_tadformer_fixtures(tmp_path: Path) -> None:
    from benchmark.parity import discover

    found = discover(FIXTURES)
    assert [(k, p.name) for k, p in found] == [
        ("tadformer", "tadformer_paper_public.pt"),
        ("tadformer", "tadformer_release_public.pt"),
    ]


def test_fixture_config_is_read_not_assumed() -> None:
    fx = torch.load(FIXTURES / "tadformer_paper_public.pt", map_location="cpu", weights_only=True)
    config = fx["config"]
    cfg = config_from_fixture(config)
    assert cfg.task_filter == "dynamic" and cfg.shared_rank == (config["lora"]["shared_rank"],) * 4
    assert cfg.lora_dropout == config["lora"]["lora_dropout_train_only"]
    model, _ = build_from_fixture_config(config)
    assert isinstance(model.backbone, TADFormerBackbone)
    assert model.tasks == tuple(config["tasks"])
    for bad, match in (
        ({"prompts": {**config["prompts"], "per_task_len": 2}}, "per_task_len"),
        ({"task_filter": {**config["task_filter"], "type": "gaussian"}}, "task_filter.type"),
        ({"task_filter": {**config["task_filter"], "stride": 2}}, "stride"),
        ({"task_filter": {**config["task_filter"], "kernel_size": 4, "padding": 2}}, "filter_kernel"),
        ({"task_adapted_blocks": [[0], [1], [5], [1]]}, "task_adapted_blocks"),
        ({"lora": {**config["lora"], "task_specific_lora_matrices": True}}, "task_specific_lora_matrices"),
    ):
        with pytest.raises(ValueError, match=match):
            config_from_fixture({**config, **bad})


# --------------------------------------------------------------------------- the computation


@pytest.mark.parametrize("size", [3, 5])
def test_dynamic_filter_matches_its_definition(size: int) -> None:
    torch.manual_seed(0)
    filt = DynamicTaskFilter(3, size)
    taps = size * size
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    filt = filt.double()
    got = filt(a)
    for n in range(2):
        g = a[n].mean(dim=(1, 2))
        k = (filt.conv.weight.view(3 * taps, 3) @ g + filt.conv.bias).view(3, taps)
        k = (k - k.mean(1, keepdim=True)) / (k.std(1, unbiased=True, keepdim=True) + 1e-10)
        k = k.flatten() * filt.chan_FilterNorm.std + filt.chan_FilterNorm.mean
        want = F.conv2d(a[n : n + 1], k.view(3, 1, size, size), padding=size // 2, groups=3)
        torch.testing.assert_close(got[n : n + 1], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", VARIANTS)
def test_batched_task_streams_equal_the_per_task_reference(method: str) -> None:
    model = _model(method, lora_dropout=0.0)
    _randomize(model)
    image = _image()

    def run(batched: bool, train: bool, dtype: torch.dtype = torch.float32):
        net = copy.deepcopy(model).to(dtype)
        net.backbone.batched = batched
        net.train(train)
        out = net(image.to(dtype))
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).mean() for o in out.values())
        loss.backward()
        return {k: v.detach() for k, v in out.items()}, {
            n: p.grad for n, p in net.named_parameters() if p.grad is not None
        }

    # The two paths are the same algebra in another order. In float64 they must agree to float64 rounding: the
    # per-task path's fp32 error e = max|r32 - r64| scaled by the ulp ratio 2**-29 (fp64 vs fp32 mantissa), x3
    # for a single sample, plus a 16-ulp floor of the largest magnitude; any real difference between the paths
    # (a wrong stream, scale or merge order) is many orders above that. (A float32 comparison adds nothing: each
    # path's fp32 noise can only be measured against its own float64 run, and then the bound follows from the
    # triangle inequality; on some kernels the batched fp32 task-prompt gradient is 20x the per-task path's noise.)
    for train in (False, True):
        out_r, grad_r = run(False, train)
        out_b64, grad_b64 = run(True, train, torch.float64)
        out_r64, grad_r64 = run(False, train, torch.float64)
        assert grad_r.keys() == grad_b64.keys() == grad_r64.keys()
        for ref32, ours64, ref64 in ((out_r, out_b64, out_r64), (grad_r, grad_b64, grad_r64)):
            tol_r = fp32_tolerances(ref32, ref64)
            top = max(float(v.abs().max()) for v in ref64.values())
            for n in ref64:
                tol64 = 2.0**-29 * tol_r[n] + 16 * 2.0**-53 * top
                assert float((ours64[n] - ref64[n]).abs().max()) <= tol64, (train, n, tol64)


def test_task_streams_are_task_specific() -> None:
    """Changing one task's static filter changes that task's output only; a gate moves every task."""
    model = _model("tadformer_release")
    _randomize(model)
    model.eval()
    image = _image()
    with torch.no_grad():
        before = model(image)
        model.backbone.layers[2].blocks[1].mlp.fc1.lora_filter["sal"].conv2d.weight.mul_(1.5)
        after = model(image)
        for t in TASKS:
            assert (not torch.equal(before[t], after[t])) == (t == "sal"), t
        model.backbone.layers[1].prompt_gate.add_(0.5)
        gated = model(image)
    for t in TASKS:
        assert not torch.equal(gated[t], after[t]), t


@pytest.mark.parametrize("method", VARIANTS)
def test_merged_evaluation_matches_and_restores_weights(method: str) -> None:
    model = _model(method)
    _randomize(model)
    model.eval()
    image = _image()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model(image)
        with merge_for_eval(model) as n_merged:
            got = model(image)
            unmerged = sorted(n for n, m in model.named_modules() if isinstance(m, TADFormerLinear) and not m.merged)
        again = model(image)
    # every LoRA'd linear but proj / fc1 / fc2 of the 4 task-adapted blocks: 8 blocks x 4 - 4 x 3
    assert n_merged == 8 * 4 - 4 * 3
    assert unmerged == sorted(f"backbone.swin.layers.{i}.blocks.1.{t}" for i in range(4)
                              for t in ("attn.proj", "mlp.fc1", "mlp.fc2"))  # fmt: skip
    for t in TASKS:
        scale = max(1.0, float(want[t].abs().max()))
        assert float((got[t] - want[t]).abs().max()) <= 1e-5 * scale, t
        torch.testing.assert_close(again[t], want[t], rtol=0, atol=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_lora_dropout_draws_on_the_shared_input_only_in_training() -> None:
    model = _model(lora_dropout=0.5)
    _randomize(model)
    image = _image()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(image)["sal"], model(image)["sal"])
        model.train()
        torch.manual_seed(0)
        a = model(image)["sal"]
        torch.manual_seed(1)
        b = model(image)["sal"]
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"shared_rank": (8, 0, 8, 8)}, "shared_rank"),
        ({"shared_rank": ()}, "shared_rank"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"shared_scale": float("nan")}, "shared_scale"),
        ({"task_filter": "gaussian"}, "task_filter"),
        ({"filter_kernel": 4}, "filter_kernel"),
    ],
)
def test_bad_config_is_a_clear_value_error(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TADFormerConfig(**fields).validate(tuple(TASKS))


def test_config_that_does_not_fit_the_backbone() -> None:
    with pytest.raises(ValueError, match="4 stages"):
        _model(shared_rank=(4, 4))


def test_applying_twice_is_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="already applied"):
        METHODS.get("tadformer").apply(model, TADFormerConfig(shared_rank=(4, 6, 8, 10)))


def test_cli_bad_task_filter_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "--method", "tadformer", "--set", "task_filter=gaussian",
         "--preset", "smoke", "--dry-run", "--work-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "task_filter" in done.stderr and "gaussian" in done.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- tiny reference runs


def test_reference_run_reproduces_its_golden_metrics() -> None:
    golden = load_golden()["methods"]["tadformer"]
    assert compare("tadformer", golden, run_reference("tadformer")) == []


def test_best_validation_selection_picks_the_best_delta_m(tmp_path: Path) -> None:
    """TADFormer's paper reports the epoch with the best validation Δm: ``--select best`` picks and labels it."""
    work = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "--method", "tadformer_release", "--preset", "tiny", "--seed", "0",
         "--select", "best", "--work-dir", str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((work / "result.json").read_text())
    sel = result["selection"]
    last = sorted(work.glob("checkpoints/epoch_*.pth"), key=lambda f: int(f.stem.split("_")[1]))[-1]
    history = torch.load(last, map_location="cpu", weights_only=True)["history"]
    assert len(history) == 2
    best = max(history, key=lambda h: h["delta_m"])
    assert sel["rule"] == "best" and sel["epoch"] == best["epoch"] and "best" in sel["note"]
    assert result["delta_m"]["value"] == best["delta_m"]
    assert result["metrics"]["sal"]["maxF"] == best["metrics"]["sal"]["maxF"]
