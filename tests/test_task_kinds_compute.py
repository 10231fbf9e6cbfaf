"""The compute side of the task kinds (benchmark.tasks): every task of every protocol gets its loss, official
post-processing, meter and valid synthetic targets from its kind, and they fit together."""

from __future__ import annotations

import math

import pytest
import torch

from benchmark.metrics import Meter
from benchmark.protocol import PROTOCOLS, TaskSpec
from benchmark.tasks import TASK_KINDS, kind_of

SPECS = [(p.name, t) for p in PROTOCOLS.values() for t in p.tasks]


def test_every_registered_kind_is_used_by_a_protocol():
    assert {t.kind for _, t in SPECS} == set(TASK_KINDS.names())


@pytest.mark.parametrize(("protocol", "spec"), SPECS, ids=[f"{p}-{t.name}" for p, t in SPECS])
def test_kind_loss_postprocess_meter_and_targets_fit_together(protocol: str, spec: TaskSpec) -> None:
    kind = kind_of(spec)
    g = torch.Generator().manual_seed(0)
    target = kind.random_target(spec, 3, (8, 10), g)
    assert target.dtype == torch.float32 and target.shape[0] == 3 and target.shape[2:] == (8, 10)
    again = kind.random_target(spec, 3, (8, 10), torch.Generator().manual_seed(0))
    assert torch.equal(target, again)  # the generator alone decides
    logits = torch.randn(3, spec.out_channels, 8, 10, generator=g, requires_grad=True)
    loss = kind.loss(logits, target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    post = kind.postprocess(logits.detach())
    assert post.shape[0] == 3 and post.shape.numel() in (3 * 8 * 10, 3 * 8 * 10 * spec.out_channels)
    meter = kind.meter(spec)
    assert isinstance(meter, Meter) and meter.task == spec.name
    r = meter.reduce([meter.stats(logits.detach(), target.double())])
    assert spec.metric in r and math.isfinite(r[spec.metric])
    if spec.bounds is not None:
        lo, hi = spec.bounds
        assert lo <= r[spec.metric] <= hi


def test_segmentation_meter_has_the_protocols_class_count():
    semseg = {p.name: p.task("semseg") for p in PROTOCOLS.values()}
    sizes = {name: kind_of(t).meter(t).num_classes for name, t in semseg.items()}
    assert sizes == {name: t.out_channels for name, t in semseg.items()} and len(set(sizes.values())) == 2
