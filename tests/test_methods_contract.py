"""Registry-driven contract tests: every registered method gets them for free (timm style), on a ~2M-param CPU Swin,
once per protocol (its task list, heads and task kinds: PASCAL-Context's 4 tasks, NYUDv2's 3).

A method's own promises are read from its ``MethodSpec`` (``identity_at_init``, ``no_grad_params``), never
hard-coded here.
"""

from __future__ import annotations

import copy
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark.losses import MultiTaskLoss
from benchmark.method_api import METHODS
from benchmark.model import MultiTaskModel, model_config_for
from benchmark.params import count_parameters
from benchmark.protocol import PASCAL_CONTEXT, PROTOCOLS, Protocol
from benchmark.tasks import kind_of

TASKS = {t.name: t.out_channels for t in PASCAL_CONTEXT.tasks}
IMG = 64
ROOT = Path(__file__).resolve().parents[1]
# modules of methods/ and baselines/ that are infrastructure, not methods
NOT_METHODS = {"methods", "methods.base", "benchmark.lora_ops", "baselines"}


def _heads(protocol: Protocol) -> dict[str, int]:
    return {t.name: t.out_channels for t in protocol.tasks}


def _model(seed: int = 0, protocol: Protocol = PASCAL_CONTEXT) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(model_config_for("swin_micro", _heads(protocol)))


def _image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _applied(name: str, protocol: Protocol = PASCAL_CONTEXT) -> torch.nn.Module:
    spec = METHODS.get(name)
    return spec.apply(_model(protocol=protocol), spec.default_config())


PROTOCOL_LIST = [PROTOCOLS[n] for n in sorted(PROTOCOLS)]
by_protocol = pytest.mark.parametrize("protocol", PROTOCOL_LIST, ids=lambda p: p.name)


@pytest.mark.parametrize("name", METHODS.names())
def test_default_config_round_trips_through_json(name: str) -> None:
    spec = METHODS.get(name)
    cfg = spec.default_config()
    text = json.dumps(cfg.to_dict())
    back = spec.config_cls.from_dict(json.loads(text))
    assert back == cfg
    assert type(back) is spec.config_cls
    for protocol in PROTOCOL_LIST:
        cfg.validate(protocol.task_names)


@by_protocol
@pytest.mark.parametrize("name", METHODS.names())
def test_outputs_gradients_and_breakdown(name: str, protocol: Protocol) -> None:
    """One training step on the protocol's tasks: the protocol's loss on its task kinds' random targets."""
    spec = METHODS.get(name)
    net = _applied(name, protocol)
    net.train()
    out = net(_image())
    assert list(out) == list(protocol.task_names)
    for task, n_out in _heads(protocol).items():
        assert tuple(out[task].shape) == (2, n_out, IMG, IMG), task
        assert torch.isfinite(out[task]).all(), task

    g = torch.Generator().manual_seed(2)
    targets = {t.name: kind_of(t).random_target(t, 2, IMG, g) for t in protocol.tasks}
    losses = MultiTaskLoss(protocol.tasks)(out, targets)
    assert all(torch.isfinite(v) for v in losses.values()), {k: float(v) for k, v in losses.items()}
    losses["total"].backward()
    exempt = [re.compile(p) for p in spec.no_grad_params]
    trainable_no_grad, frozen_with_grad = [], []
    for pname, p in net.named_parameters():
        if p.requires_grad and p.grad is None and not any(r.search(pname) for r in exempt):
            trainable_no_grad.append(pname)
        if not p.requires_grad and p.grad is not None:
            frozen_with_grad.append(pname)
    assert not trainable_no_grad, f"{name}: trainable parameters without a gradient: {trainable_no_grad[:5]}"
    assert not frozen_with_grad, f"{name}: frozen parameters with a gradient: {frozen_with_grad[:5]}"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()), "nothing learns"

    counts = count_parameters(net, spec.adapter_markers)
    decoder_params = [p for n, p in net.named_parameters() if "backbone" not in n]
    assert decoder_params and all(p.requires_grad for p in decoder_params), "decoders must stay trainable"
    assert counts["decoders"] + counts["adapter"] + counts["other_trainable_backbone"] == counts["trainable"]
    assert 0 < counts["trainable"] <= counts["total"]
    assert counts["adapter"] >= 0 and counts["other_trainable_backbone"] >= 0
    if spec.adapter_markers:
        assert counts["adapter"] > 0, f"{name}: its adapter markers {spec.adapter_markers} match nothing trainable"


@pytest.mark.parametrize("name", METHODS.names())
def test_parameters_added_are_counted_as_adapter(name: str) -> None:
    """Every parameter a method adds to the shared model is trainable and counted as "adapter"."""
    spec = METHODS.get(name)
    base = _model()
    before = count_parameters(base)["total"]
    net = spec.apply(base, spec.default_config())
    if net is not base:
        pytest.skip(f"{name} returns a new module; nothing is added to the shared model")
    counts = count_parameters(net, spec.adapter_markers)
    assert counts["total"] - before <= counts["adapter"]


@by_protocol
@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).identity_at_init])
def test_starts_from_the_unmodified_model(name: str, protocol: Protocol) -> None:
    spec = METHODS.get(name)
    reference = _model(protocol=protocol).eval()
    net = spec.apply(copy.deepcopy(reference), spec.default_config()).eval()
    image = _image()
    with torch.no_grad():
        want, got = reference(image), net(image)
    assert list(got) == list(protocol.task_names)
    for task in protocol.task_names:
        torch.testing.assert_close(got[task], want[task], rtol=0, atol=1e-6, msg=f"{name}/{task}")


@pytest.mark.parametrize("name", METHODS.names())
def test_apply_survives_deepcopy(name: str) -> None:
    """Runners copy models (EMA, single_task); a copy must compute the same outputs as the original."""
    net = _applied(name).eval()
    twin = copy.deepcopy(net)
    image = _image(1)
    with torch.no_grad():
        a, b = net(image), twin(image)
    for task in TASKS:
        torch.testing.assert_close(a[task], b[task], rtol=0, atol=0)


def _method_modules() -> list[str]:
    found = []
    for pkg in ("methods", "baselines"):
        for info in pkgutil.iter_modules([str(ROOT / pkg)]):
            found.append(f"{pkg}.{info.name}")
    return sorted(m for m in found if m not in NOT_METHODS)


@pytest.mark.parametrize("module", _method_modules())
def test_every_method_module_registers_a_name(module: str) -> None:
    registered = {METHODS.get(n).apply.__module__ for n in METHODS.names()}
    assert module in registered, (
        f"{module} registers no method: give it a @register_method apply, and list it in benchmark.method_api.PLUGINS"
    )


def test_reading_the_registry_registers_every_module() -> None:
    """A fresh process reading the core's registry (as the CLI does) registers every plug-in module: catches a
    module missing from ``benchmark.method_api.PLUGINS``."""
    code = (
        "import json; from benchmark.method_api import METHODS; "
        "print(json.dumps(sorted({METHODS.get(n).apply.__module__ for n in METHODS.names()})))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    registered = set(json.loads(done.stdout.strip().splitlines()[-1]))
    missing = [m for m in _method_modules() if m not in registered]
    assert not missing, f"modules whose methods the core's registry does not register: {missing}"


def test_mtlora_task_streams_heads_and_breakdown_follow_the_protocol() -> None:
    """MTLoRA at 3 tasks (NYUDv2) and 4 (PASCAL-Context): task LoRA, task streams and heads per protocol task; the
    breakdown is its formula on the module shapes (task-specific part T x sum of r (in + out) over the task-LoRA
    linears, shared part sum of r_shared (in + out), independent of T)."""
    from methods.mtlora import MTLoRALinear

    spec = METHODS.get("mtlora")
    cfg = spec.default_config()
    parts: dict[str, dict[str, int]] = {}
    for protocol in PROTOCOL_LIST:
        net = spec.apply(_model(protocol=protocol), cfg)
        n_tasks = len(protocol.tasks)
        assert net.backbone.tasks == protocol.task_names  # one residual stream per protocol task
        assert list(net.decoders) == list(protocol.task_names)
        linears = [m for m in net.modules() if isinstance(m, MTLoRALinear)]
        with_tasks = [m for m in linears if m.tasks]
        assert with_tasks and all(m.tasks == protocol.task_names for m in with_tasks)
        per_task = sum(cfg.task_rank * (m.in_features + m.out_features) for m in with_tasks)
        shared = sum(m.shared_rank * (m.in_features + m.out_features) for m in linears)
        params = dict(net.named_parameters())
        task_counted = sum(p.numel() for n, p in params.items() if ".lora_tasks_" in n)
        shared_counted = sum(p.numel() for n, p in params.items() if ".lora_shared_" in n)
        assert task_counted == n_tasks * per_task
        assert shared_counted == shared
        counts = count_parameters(net, spec.adapter_markers)
        assert counts["adapter"] == n_tasks * per_task + shared
        head_sizes = {t: sum(p.numel() for p in net.decoders[t].parameters()) for t in protocol.task_names}
        assert counts["decoders"] == sum(head_sizes.values())
        parts[protocol.name] = {"per_task": per_task, "shared": shared, "other": counts["other_trainable_backbone"]}
    # the same backbone: only the task-specific part moves with the number of tasks
    assert len({tuple(p.values()) for p in parts.values()}) == 1, parts


@by_protocol
@pytest.mark.parametrize("name", METHODS.names())
def test_task_specific_modules_follow_the_protocols_task_list(name: str, protocol: Protocol) -> None:
    """Every module that keeps a task list (MTLoRA / TADFormer streams, task LoRA, task filters) keeps the
    protocol's, in its order, and every per-task dict is keyed by exactly those tasks (the order of the stacked
    task streams is the task list's)."""
    net = _applied(name, protocol)
    lists = [(n, getattr(m, a)) for n, m in net.named_modules() for a in ("tasks", "task_names") if hasattr(m, a)]
    for where, tasks in lists:
        if where == "":  # the model itself
            assert tuple(tasks) == protocol.task_names
        elif tasks:  # a layer without task parts keeps an empty list
            assert tuple(tasks) == protocol.task_names, (where, tasks)
    for where, m in net.named_modules():
        if isinstance(m, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and set(m.keys()) & set(protocol.task_names):
            assert sorted(m.keys()) == sorted(protocol.task_names), where  # (a ParameterDict sorts its keys)
