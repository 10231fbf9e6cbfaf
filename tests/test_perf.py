"""benchmark.perf runs and reports; the fast LoRA paths compute what peft / the reference paths compute; merged
evaluation equals unmerged and restores the weights exactly. No timing is asserted here (docs/perf.md has them)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import fp32_tolerances
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from timm.models.swin_transformer import SwinTransformerBlock
from torch import nn

import methods.mtlora as mtlora_mod
from baselines.lora import FastLoraLinear, LoRAConfig, inject, peft_config, set_lora_form
from benchmark import perf
from benchmark.lora_ops import choose_form, drop_positions, fast_dropout, lora_linear, record_forms
from benchmark.method_api import METHODS, apply_overrides, parse_checkpoint_stages
from benchmark.model import MultiTaskModel, model_config_for
from benchmark.peft_tools import merge_for_eval
from methods.mtlora import MTLoRALinear

TASKS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3}


def _model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(model_config_for("swin_micro", TASKS))


def _randomize(net: nn.Module, marker: str = "lora_", seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if marker in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    got, want = got.detach(), want.detach()
    tol = rel * max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= tol, float((got - want).abs().max())


# --------------------------------------------------------------------------- the perf tool


def test_profile_prints_the_operators_of_one_train_step(capsys: pytest.CaptureFixture) -> None:
    argv = ["--profile", "mtlora[shared_rank=[4,4,4,4]]", "--backbone", "swin_micro", "--img", "64", "--warmup", "0"]
    assert perf.main([*argv, "--profile-rows", "5", "--no-malloc-tuning"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mtlora[shared_rank=[4,4,4,4]]: one train step (swin_micro, 64 px, batch 2, cpu)")
    assert "aten::" in out and "Self CPU" in out
    assert perf.main(["--profile", "mtlroa", "--backbone", "swin_micro", "--img", "64"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_checkpoint_stages_parse_and_bad_values_are_errors() -> None:
    assert parse_checkpoint_stages("all") is True and parse_checkpoint_stages("none") is False
    assert parse_checkpoint_stages("1") == frozenset({0}) and parse_checkpoint_stages("2+4") == frozenset({1, 3})
    for bad in ("0", "5", "first", "1,,x", "tasks"):
        with pytest.raises(ValueError, match="stage numbers 1-4"):
            parse_checkpoint_stages(bad)


def test_step_flops_of_full_ft_exceed_the_reference_by_the_backbone_weight_gradients() -> None:
    # full_ft computes every backbone weight gradient (as many FLOPs as the layer's forward product); the
    # reference computes none but, its image requiring a gradient, the patch embedding's input gradient, which
    # costs what that convolution's weight gradient does. So the difference is the forward FLOPs of the
    # backbone's linears, counted here from their shapes.
    linear_flops = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal linear_flops
        linear_flops += 2 * out.numel() * module.in_features

    flops = {}
    for name in ("full_ft", "reference"):
        entry = perf.parse_entry(name)
        bench = perf.Bench(entry, perf.build_net(entry, "swin_micro", 64), torch.device("cpu"), batch=2, img=64)
        if name == "full_ft":
            hooks = [m.register_forward_hook(count) for m in bench.net.backbone.modules() if isinstance(m, nn.Linear)]
            bench.forward()  # the same products as the train step's forward
            for h in hooks:
                h.remove()
        flops[name] = perf.train_step_flops(bench)
    assert linear_flops > 0
    assert flops["full_ft"] - flops["reference"] == linear_flops


def test_perf_runs_two_steps_and_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "perf.json"
    argv = ["--methods", "lora,mtlora[shared_rank=[4,4,4,4]]", "--backbone", "swin_micro", "--img", "64"]
    argv += ["--steps", "2", "--warmup", "0", "--data-images", "2", "--data-size", "40,60", "--no-malloc-tuning"]
    argv += ["--pair", "mtlora[shared_rank=[4,4,4,4]]:lora", "--json", str(out)]
    assert perf.main(argv) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    labels = ["reference", "full_ft", "lora", "mtlora[shared_rank=[4,4,4,4]]"]
    assert list(result["methods"]) == labels  # the anchors are added, first
    for label in labels:
        r = result["methods"][label]
        assert len(r["step_s_samples"]) == 2 and r["step_s"] > 0
        for key in ("forward_ips", "eval_ips", "forward_unmerged_ips", "peak_mem_bytes", "tensor_peak_bytes"):
            assert r[key] > 0, (label, key)
        assert r["trainable_params"] > 0
        assert math.isclose(r["step_vs_reference"], r["step_s"] / result["methods"]["reference"]["step_s"])
        assert math.isclose(r["step_vs_full_ft"], r["step_s"] / result["methods"]["full_ft"]["step_s"])
        assert f"| `{label}` |" in text
    assert result["methods"]["reference"]["step_vs_reference"] == 1.0
    assert result["methods"]["lora"]["lora_forms"] == {"factored+dropout": 20}  # the default has dropout
    assert result["methods"]["lora"]["merged_layers"] == 20 and result["methods"]["full_ft"]["merged_layers"] == 0
    assert result["pairs"][0]["step_ratio"] > 0 and result["pairs"][0]["mem_ratio"] > 0
    assert result["data"]["train_ips_per_worker"] > 0 and result["data"]["images"] == 2
    assert result["config"]["img"] == 64 and result["machine"]["torch"] == torch.__version__
    assert "| method | trainable | step s | x ref | x full_ft | GFLOP | FLOP x full_ft |" in text
    assert "Data pipeline" in text
    assert list(result["meters_ms"]) == list(TASKS) and all(ms > 0 for ms in result["meters_ms"].values())
    assert "Meters alone (ms per batch of 2" in text
    for label in labels:
        r = result["methods"][label]
        assert math.isclose(r["flops_vs_full_ft"], r["step_flops"] / result["methods"]["full_ft"]["step_flops"])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--methods", "loraa"], "loraa"),
        (["--methods", "lora[rank=64"], "unbalanced"),
        (["--methods", "lora[rnk=4]"], "rnk"),
        (["--methods", "lora[_form=fused]"], "_form"),
        (["--methods", "full_ft[_form=hybrid]"], "no LoRA layers"),
        (["--methods", "lora,lora"], "twice"),
        (["--methods", "lora", "--pair", "lora:mtlora"], "mtlora"),
        (["--methods", "lora", "--img", "65"], "65"),
    ],
)
def test_bad_input_is_one_clear_error(argv: list[str], match: str, capsys: pytest.CaptureFixture) -> None:
    argv = [*argv, "--backbone", "swin_micro", "--steps", "1", "--no-memory", "--data-images", "0"]
    if "--img" not in argv:
        argv += ["--img", "64"]
    assert perf.main([*argv, "--no-malloc-tuning"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # progress lines may come first
    assert last.startswith("benchmark.perf: error:") and match in last and "Traceback" not in err


def test_method_entries_split_outside_brackets() -> None:
    assert perf.split_top("a[x=1,y=[2,3]],b") == ["a[x=1,y=[2,3]]", "b"]
    entries = perf.parse_methods("mtlora[shared_rank=[8,8,8,8],_form=factored],peft_lora_reference[rank=4]")
    assert [e.label for e in entries][:2] == ["reference", "full_ft"]
    e = entries[2]
    assert e.name == "mtlora" and e.overrides == ("shared_rank=[8,8,8,8]",) and e.form == "factored"
    assert entries[3].name == "peft_lora_reference" and entries[3].overrides == ("rank=4",)


def test_reference_entry_backpropagates_to_the_image_only() -> None:
    entry = perf.parse_entry("reference")
    bench = perf.Bench(entry, perf.build_net(entry, "swin_micro", 64), torch.device("cpu"), img=64)
    assert all(not p.requires_grad for p in bench.net.backbone.parameters())
    assert bench.train_image.requires_grad
    bench.net.train()
    out = bench.net(bench.train_image)
    sum(o.mean() for o in out.values()).backward()
    assert bench.train_image.grad is not None and bench.train_image.grad.abs().sum() > 0


# --------------------------------------------------------------------------- the fast LoRA layer vs peft


def _layer_pair(rank: int, dropout: float, d_in: int = 24, d_out: int = 40) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("fc1", nn.Linear(d_in, d_out))
    cfg = LoRAConfig(rank=rank, alpha=2.0 * rank, dropout=dropout, targets=("fc1",))
    ref, fast = copy.deepcopy(holder), copy.deepcopy(holder)
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(cfg, fast=False), ref)
    inject_adapter_in_model(peft_config(cfg, fast=True), fast)
    _randomize(ref)
    fast.load_state_dict(ref.state_dict())
    assert type(ref.fc1) is PeftLoraLinear and type(fast.fc1) is FastLoraLinear
    assert list(ref.state_dict()) == list(fast.state_dict())  # same parameter names: lora_A.default.weight, ...
    return ref, fast


def _out_and_grads(layer: nn.Module, x: torch.Tensor, seed: int = 7) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), {**grads, "x": x.grad}


@pytest.mark.parametrize("form", ["factored", "materialised", "hybrid", "auto"])
def test_fast_lora_layer_equals_peft_without_dropout(form: str) -> None:
    ref, fast = _layer_pair(rank=8, dropout=0.0)
    set_lora_form(fast, form)
    x = torch.randn(3, 17, 24)  # 3-D input, as Swin's attention windows
    for train in (True, False):
        ref.train(train)
        fast.train(train)
        y_ref, g_ref = _out_and_grads(ref, x)
        y_fast, g_fast = _out_and_grads(fast, x)
        _close(y_fast, y_ref)
        assert g_ref.keys() == g_fast.keys() and {
            "fc1.lora_A.default.weight",
            "fc1.lora_B.default.weight",
            "x",
        } <= set(g_ref)
        for n in g_ref:
            _close(g_fast[n], g_ref[n])
        ref.zero_grad()
        fast.zero_grad()


def test_fast_lora_layer_with_dropout_equals_peft_with_the_same_mask() -> None:
    """With dropout only the factored form is exact; given F.dropout (peft's mask for the same seed) it is peft."""
    ref, fast = _layer_pair(rank=8, dropout=0.3)
    ref.train()
    x = torch.randn(5, 24)
    y_ref, g_ref = _out_and_grads(ref, x)
    lin = fast.fc1
    xr = x.clone().requires_grad_(True)
    torch.manual_seed(7)
    y = lora_linear(
        xr,
        lin.base_layer.weight,
        lin.base_layer.bias,
        lin.lora_A["default"].weight,
        lin.lora_B["default"].weight,
        lin.scaling["default"],
        0.3,
        True,
        "factored",
        dropout=F.dropout,
    )
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    _close(y.detach(), y_ref)
    _close(xr.grad, g_ref["x"])
    _close(lin.lora_A["default"].weight.grad, g_ref["fc1.lora_A.default.weight"])
    _close(lin.lora_B["default"].weight.grad, g_ref["fc1.lora_B.default.weight"])
    for form in ("materialised", "hybrid"):
        with pytest.raises(ValueError, match="not exact with dropout"):
            lora_linear(
                x,
                lin.base_layer.weight,
                None,
                lin.lora_A["default"].weight,
                lin.lora_B["default"].weight,
                1.0,
                0.3,
                True,
                form,
            )
    with record_forms() as forms:  # the layer itself picks the factored form while dropout is active
        fast.train()(x)
        fast.eval()(x)
    assert forms["factored+dropout"] == 1 and sum(forms.values()) == 2


def test_fast_lora_layer_falls_back_to_peft_when_merged_or_disabled() -> None:
    ref, fast = _layer_pair(rank=4, dropout=0.0)
    x = torch.randn(6, 24)
    with torch.no_grad():
        want = ref(x)
        fast.fc1.merge()
        with record_forms() as forms:
            _close(fast(x), want)
        fast.fc1.unmerge()
        fast.fc1.enable_adapters(False)
        with record_forms() as forms2:
            _close(fast(x), F.linear(x, fast.fc1.base_layer.weight, fast.fc1.base_layer.bias))
    assert not forms and not forms2  # peft's own forward ran


def test_lora_model_equals_peft_injection() -> None:
    base = _model()
    cfg = LoRAConfig(rank=8, alpha=16.0, dropout=0.0)
    ref, fast = inject(copy.deepcopy(base), cfg, fast=False), inject(copy.deepcopy(base), cfg, fast=True)
    _randomize(ref)
    fast.load_state_dict(ref.state_dict())
    assert sum(isinstance(m, FastLoraLinear) for m in fast.modules()) == 20
    image = torch.randn(2, 3, 64, 64)
    ref64 = copy.deepcopy(ref).double()
    for net in (ref, fast, ref64):
        net.train()
    outs = {}
    for key, net, x in (("ref", ref, image), ("fast", fast, image), ("ref64", ref64, image.double())):
        torch.manual_seed(3)  # same drop-path draws in all three
        outs[key] = net(x)
        sum(o.square().mean() for o in outs[key].values()).backward()
    # tolerances: the PEFT reference run in float64 as the yardstick of fp32 noise (tests/conftest.py)
    tol = fp32_tolerances(outs["ref"], outs["ref64"])
    for t in TASKS:
        assert float((outs["fast"][t] - outs["ref"][t]).abs().max()) <= tol[t], t
    grads = {k: {n: p.grad for n, p in net.named_parameters() if p.grad is not None} for k, net in
             (("ref", ref), ("fast", fast), ("ref64", ref64))}  # fmt: skip
    assert grads["ref"].keys() == grads["ref64"].keys()
    tol = fp32_tolerances(grads["ref"], grads["ref64"])
    for n, p in fast.named_parameters():
        assert (p.grad is None) == (n not in grads["ref"]), n
        if p.grad is not None:
            assert float((p.grad - grads["ref"][n]).abs().max()) <= tol[n], (n, tol[n])


def test_form_choice_follows_the_cost_of_the_layer() -> None:
    # Swin-T at 448, rank 64: the narrow first stage materialises, the wide last stage stays low rank
    assert choose_form(2 * 112 * 112, 96, 288, 64, dropout=False, train=True, input_grad=True) == "materialised"
    assert choose_form(2 * 14 * 14, 768, 3072, 64, dropout=False, train=True, input_grad=True) in (
        "hybrid",
        "factored",
    )
    assert choose_form(2 * 14 * 14, 768, 3072, 64, dropout=True, train=True, input_grad=True) == "factored"
    assert choose_form(25088, 96, 288, 64, dropout=False, train=False, input_grad=False) == "materialised"


# --------------------------------------------------------------------------- dropout


def test_fast_dropout_is_bernoulli_inverted_dropout() -> None:
    torch.manual_seed(0)
    p, n = 0.05, 200_000
    x = torch.rand(n) + 0.5  # no zeros, so the mask is readable from the output
    x.requires_grad_(True)
    torch.manual_seed(5)
    y = fast_dropout(x, p, True)
    kept = y != 0
    frac = 1 - float(kept.float().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)  # five standard deviations
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    y.backward(torch.ones(n))
    torch.testing.assert_close(x.grad, kept.float() / (1 - p), rtol=1e-6, atol=0)  # the same mask backwards
    torch.manual_seed(5)
    assert torch.equal(fast_dropout(x.detach(), p, True), y.detach())  # reproducible from the seed
    assert fast_dropout(x, p, False) is x and fast_dropout(x, 0.0, True) is x


def test_drop_positions_are_sorted_unique_in_range() -> None:
    torch.manual_seed(1)
    for n, p in ((10, 0.2), (1000, 0.01), (50_000, 0.25)):
        pos = drop_positions(n, p)
        assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all())
        assert pos.numel() == 0 or (int(pos[0]) >= 0 and int(pos[-1]) < n)
    # per-position rate: every position is dropped with probability p (no edge effects)
    hits = torch.zeros(20)
    for _ in range(4000):
        hits[drop_positions(20, 0.1)] += 1
    assert float((hits / 4000 - 0.1).abs().max()) < 5 * math.sqrt(0.1 * 0.9 / 4000)


# --------------------------------------------------------------------------- MTLoRA hot paths


def test_mtlora_layer_batched_equals_reference_with_dropout_and_grads() -> None:
    torch.manual_seed(0)
    lin = MTLoRALinear(
        nn.Linear(12, 10), shared_rank=6, task_ranks={"a": 2, "b": 3}, task_scales={"b": 2.5}, dropout=0.1
    ).train()
    _randomize(lin)
    x = torch.randn(4, 5, 12)
    u = torch.randn(2, 4, 5, 12)
    for x_tasks in (None, u):
        results = []
        for batched in (True, False):
            lin.zero_grad()
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(11)  # the same dropout mask in both paths
            s, t = lin.forward_tasks(xi, x_tasks, batched=batched)
            (s.square().sum() + (t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum()).backward()
            results.append(
                (
                    s.detach(),
                    t.detach(),
                    xi.grad,
                    {n: p.grad.clone() for n, p in lin.named_parameters() if p.grad is not None},
                )
            )
        (s1, t1, gx1, g1), (s2, t2, gx2, g2) = results
        _close(s1, s2)
        _close(t1, t2)
        _close(gx1, gx2)
        assert g1.keys() == g2.keys() and "lora_tasks_A.a" in g1
        for n in g1:
            _close(g1[n], g2[n])


@pytest.mark.parametrize("form", ["factored", "auto", "materialised", "hybrid"])
def test_mtlora_shared_forms_agree(form: str) -> None:
    torch.manual_seed(0)
    lin = MTLoRALinear(nn.Linear(12, 10), shared_rank=6, shared_scale=4.0)
    lin.weight.requires_grad_(False)  # as apply() leaves it
    lin.bias.requires_grad_(False)
    _randomize(lin)
    x = torch.randn(7, 12)
    want = x @ lin.weight.T + lin.bias + 4.0 * (x @ lin.lora_shared_A.T @ lin.lora_shared_B.T)
    lin.form = form
    xi = x.clone().requires_grad_(True)
    y = lin(xi)
    _close(y.detach(), want)
    y.sum().backward()
    xr = x.clone().requires_grad_(True)
    a, b = (
        lin.lora_shared_A.detach().clone().requires_grad_(True),
        lin.lora_shared_B.detach().clone().requires_grad_(True),
    )
    (xr @ lin.weight.T + 4.0 * (xr @ a.T @ b.T)).sum().backward()
    _close(xi.grad, xr.grad)
    _close(lin.lora_shared_A.grad, a.grad)
    _close(lin.lora_shared_B.grad, b.grad)
    assert lin.weight.grad is None and lin.bias.grad is None  # frozen weights never get gradients


# --------------------------------------------------------------------------- materialised LoHa / LoKr / VeRA


@pytest.mark.parametrize(
    ("name", "marker", "overrides"),
    [
        ("loha", "hada_", ()),
        ("loha", "hada_", ("module_dropout=0.5", "rank_dropout=0.3")),  # the same draws, in the same order
        ("lokr", "lokr_", ()),
        ("vera", "vera_lambda", ()),
    ],
)
def test_materialised_delta_layers_equal_peft(name: str, marker: str, overrides: tuple[str, ...]) -> None:
    from baselines.peft_bridge import FAST_LAYERS

    spec = METHODS.get(name)
    base = spec.apply(_model(), apply_overrides(spec.default_config(), overrides))
    _randomize(base, marker=marker, std=0.2)
    assert sum(type(m) in FAST_LAYERS.values() for m in base.modules()) == 20  # swin_micro: 5 blocks x 4
    image = torch.randn(2, 3, 64, 64)
    results = []
    for fast in (True, False):
        net = copy.deepcopy(base)  # the train step moves BatchNorm statistics
        for m in net.modules():
            if type(m) in FAST_LAYERS.values():
                m.fast = fast
        torch.manual_seed(3)
        out = net.train()(image)
        torch.manual_seed(3)
        # gradients through the backbone's features: the decoders' train-mode BatchNorm would amplify rounding
        sum(f.square().mean() for f in net.backbone(image)).backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        with torch.no_grad():
            evals = net.eval()(image)
        results.append((out, grads, evals))
    (out_fast, g_fast, e_fast), (out_peft, g_peft, e_peft) = results
    assert g_fast.keys() == g_peft.keys() and g_peft and all(marker in n for n in g_peft)
    for t in TASKS:
        _close(out_fast[t], out_peft[t])
        _close(e_fast[t], e_peft[t])
    for n in g_peft:
        _close(g_fast[n], g_peft[n])


# --------------------------------------------------------------------------- merged evaluation


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("lora", ()),
        ("mtlora", ()),
        ("mtlora_plus", ()),
        ("dora", ()),
        ("loha", ()),
        ("vera", ()),
        ("ia3", ()),
        ("oft", ()),
        ("full_ft", ()),
    ],
)
def test_merge_for_eval_matches_unmerged_and_restores_weights(name: str, overrides: tuple[str, ...]) -> None:
    spec = METHODS.get(name)
    net = spec.apply(_model(), apply_overrides(spec.default_config(), overrides))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every trainable backbone parameter away from its identity initialisation
        for n, p in net.named_parameters():
            if p.requires_grad and "backbone" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    net.eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = net(image)
        with merge_for_eval(net) as n_merged:
            got = net(image)
        again = net(image)
    assert (n_merged > 0) == (name != "full_ft")
    for t in TASKS:
        _close(got[t], want[t], rel=1e-5)
        assert torch.equal(again[t], want[t]), t
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k  # weights restored bit for bit


@pytest.mark.parametrize("stages", ["all", "1", "2+4"])
def test_mtlora_checkpointing_gives_the_same_outputs_and_gradients(stages: str) -> None:
    spec = METHODS.get("mtlora")
    base = spec.apply(_model(), apply_overrides(spec.default_config(), ["shared_rank=[4,4,4,4]"]))  # dropout 0.05
    _randomize(base, std=0.05)
    image = torch.randn(2, 3, 64, 64)
    results = []
    for ckpt in (False, True):
        net = copy.deepcopy(base).train()
        net.backbone.checkpoint = parse_checkpoint_stages(stages) if ckpt else False
        torch.manual_seed(4)  # dropout and drop-path draws are replayed by the recomputation
        out = net(image)
        sum(o.square().mean() for o in out.values()).backward()
        results.append((out, {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
    (out0, g0), (out1, g1) = results
    for t in TASKS:
        _close(out1[t], out0[t])
    assert g0.keys() == g1.keys()
    floor = 1e-6 * max(float(g.abs().max()) for g in g0.values())
    for n in g0:
        assert float((g1[n] - g0[n]).abs().max()) <= 1e-5 * float(g0[n].abs().max()) + floor, n


# (stages, the stages whose task region is recomputed, how many plain blocks are recomputed)
CHECKPOINT_CASES = [("none", [], 0), ("1", [0], 0), ("3", [2], 1), ("2+4", [1, 3], 0), ("all", [0, 1, 2, 3], 1)]


@pytest.mark.parametrize(("stages", "task_again", "plain_again"), CHECKPOINT_CASES)
def test_checkpointing_recomputes_exactly_the_chosen_regions(monkeypatch, stages, task_again, plain_again) -> None:
    # forward + backward: a checkpointed block runs its forward a second time, any other block only once (a task
    # block is recomputed with the merging of its task streams, one region; what that saves is measured by perf)
    # swin_micro has depths 1, 1, 2, 1: a task block (the last) per stage and one plain block, in stage 3.
    spec = METHODS.get("mtlora")
    net = spec.apply(_model(), apply_overrides(spec.default_config(), ["shared_rank=[4,4,4,4]"])).train()
    assert [len(layer.blocks) for layer in net.backbone.layers] == [1, 1, 2, 1]
    net.backbone.checkpoint = parse_checkpoint_stages(stages)
    stage_of = {id(b): i for i, layer in enumerate(net.backbone.layers) for b in layer.blocks}
    calls: dict[str, list[int]] = {"task": [], "plain": []}
    task_block, plain_forward = mtlora_mod._task_block_forward, SwinTransformerBlock.forward

    def counted_task(blk, *args):
        calls["task"].append(stage_of[id(blk)])
        return task_block(blk, *args)

    def counted_plain(blk, *args):
        calls["plain"].append(stage_of[id(blk)])
        return plain_forward(blk, *args)

    monkeypatch.setattr(mtlora_mod, "_task_block_forward", counted_task)
    monkeypatch.setattr(SwinTransformerBlock, "forward", counted_plain)
    out = net(torch.randn(2, 3, 64, 64))
    assert sorted(calls["task"]) == [0, 1, 2, 3] and calls["plain"] == [2]
    sum(o.square().mean() for o in out.values()).backward()
    assert sorted(calls["task"]) == sorted([0, 1, 2, 3] + task_again)
    assert calls["plain"] == [2] * (1 + plain_again)


@pytest.mark.parametrize("protocol", ["pascal-context", "nyud"])
def test_bench_steps_on_the_protocols_tasks(protocol: str) -> None:
    """make_batch, the loss and the meters follow the protocol: its task kinds' synthetic targets and heads."""
    from benchmark.protocol import get_protocol

    p = get_protocol(protocol)
    image, targets = perf.make_batch(2, 32, torch.device("cpu"), protocol=p)
    assert image.shape == (2, 3, 32, 32) and list(targets) == list(p.task_names)
    for t in p.tasks:
        y = targets[t.name]
        assert y.shape[:2] == (2, 3 if t.out_channels == 3 else 1) and y.shape[2:] == (32, 32), t.name
        if t.kind != "saliency":  # every other kind's synthetic labels hold some ignore (255) pixels
            assert (y == 255).any() and ((y != 255).any()), t.name
    entry = perf.parse_entry("mtlora")
    net = perf.build_net(entry, "swin_micro", 64, protocol=p)
    assert set(net.decoders) == set(p.task_names)
    bench = perf.Bench(entry, net, torch.device("cpu"), batch=2, img=64, protocol=p)
    assert list(bench.meters) == list(p.task_names)
    bench.train_step()
    bench.eval_step()
    assert all(torch.isfinite(q).all() for q in bench.params)


def test_perf_cli_on_the_nyud_protocol(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "perf.json"
    argv = ["--protocol", "nyud", "--methods", "mtlora", "--backbone", "swin_micro", "--img", "64", "--steps", "1"]
    argv += ["--warmup", "0", "--data-images", "0", "--no-malloc-tuning", "--json", str(out)]
    assert perf.main(argv) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["config"]["protocol"] == "nyud"
    assert list(result["meters_ms"]) == ["semseg", "depth", "normals"]
    assert result["methods"]["mtlora"]["step_s"] > 0
