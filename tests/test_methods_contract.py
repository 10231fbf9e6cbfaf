"""Registry-driven contract tests: every registered method gets them for free (timm style), on a ~2M-param CPU Swin.

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

from benchmark.method_api import METHODS
from benchmark.model import MultiTaskModel, model_config_for
from benchmark.params import count_parameters

TASKS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3}
IMG = 64
ROOT = Path(__file__).resolve().parents[1]
# modules of methods/ and baselines/ that are infrastructure, not methods
NOT_METHODS = {"methods", "methods.base", "benchmark.lora_ops", "baselines"}


def _model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel(model_config_for("swin_micro", TASKS))


def _image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _applied(name: str) -> torch.nn.Module:
    spec = METHODS.get(name)
    return spec.apply(_model(), spec.default_config())


@pytest.mark.parametrize("name", METHODS.names())
def test_default_config_round_trips_through_json(name: str) -> None:
    spec = METHODS.get(name)
    cfg = spec.default_config()
    text = json.dumps(cfg.to_dict())
    back = spec.config_cls.from_dict(json.loads(text))
    assert back == cfg
    assert type(back) is spec.config_cls
    cfg.validate(tuple(TASKS))


@pytest.mark.parametrize("name", METHODS.names())
def test_outputs_gradients_and_breakdown(name: str) -> None:
    spec = METHODS.get(name)
    net = _applied(name)
    net.train()
    out = net(_image())
    assert set(out) == set(TASKS)
    for task, n_out in TASKS.items():
        assert tuple(out[task].shape) == (2, n_out, IMG, IMG), task
        assert torch.isfinite(out[task]).all(), task

    weights = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=weights)).mean() for o in out.values())
    loss.backward()
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


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).identity_at_init])
def test_starts_from_the_unmodified_model(name: str) -> None:
    spec = METHODS.get(name)
    reference = _model().eval()
    net = spec.apply(copy.deepcopy(reference), spec.default_config()).eval()
    image = _image()
    with torch.no_grad():
        want, got = reference(image), net(image)
    for task in TASKS:
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
