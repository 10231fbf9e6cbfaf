"""The optimiser and LR schedule equal the official ones (timm's CosineLRScheduler, docs/protocol.md 2.4)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from mmengine.optim import OptimWrapper
from timm.scheduler import CosineLRScheduler

from benchmark.engine import EpochSampler, lr_schedulers
from benchmark.model import MultiTaskModel, model_config_for
from benchmark.optim import make_schedule, param_groups
from benchmark.protocol import PASCAL_CONTEXT


def test_peak_lr_follows_the_batch_rule():
    assert PASCAL_CONTEXT.peak_lr(32) == pytest.approx(3.125e-5, rel=1e-12)
    s = make_schedule(PASCAL_CONTEXT, 32, iters_per_epoch=156, epochs=300)
    assert s.warmup_iters == 20 * 156 and s.total_iters == 300 * 156
    assert s.warmup_lr == pytest.approx(3.125e-8) and s.min_lr == pytest.approx(3.125e-7)


def test_schedule_matches_timm_cosine_per_iteration():
    iters, epochs, warm = 7, 12, 3  # scaled-down protocol: same formula, fewer steps
    p = PASCAL_CONTEXT
    sched = make_schedule(p, 32, iters_per_epoch=iters, epochs=epochs, warmup_epochs=warm)
    w = torch.nn.Parameter(torch.zeros(2, 2))
    ours = torch.optim.AdamW([w], lr=sched.peak_lr)
    wrapper = OptimWrapper(optimizer=ours)
    schedulers = lr_schedulers(sched, wrapper)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=sched.peak_lr)
    ref = CosineLRScheduler(
        ref_opt,
        t_initial=(epochs - warm) * iters,
        lr_min=sched.min_lr,
        warmup_lr_init=sched.warmup_lr,
        warmup_t=warm * iters,
        cycle_limit=1,
        t_in_epochs=False,
        warmup_prefix=True,
    )
    for k in range(epochs * iters):
        ref.step_update(k)
        assert ours.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), k
        for s in schedulers:
            s.step()


def test_weight_decay_groups_follow_the_official_rule():
    net = MultiTaskModel(model_config_for("swin_micro", {"semseg": 21}))
    decay, no_decay = param_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    dec = {names[id(p)] for p in decay["params"]}
    nodec = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # relative-position tables are 2-D and get weight decay (the official model has no no_weight_decay list)
    assert any(n.endswith("relative_position_bias_table") for n in dec)
    assert all(not n.endswith(".bias") for n in dec)
    assert any(n.endswith("norm1.weight") for n in nodec)
    assert len(dec) + len(nodec) == sum(1 for _ in net.parameters())


def test_epoch_sampler_sees_each_sample_once_across_ranks(monkeypatch):
    n, batch = 23, 4
    shards = []
    for rank in range(2):
        monkeypatch.setattr("benchmark.engine.get_dist_info", lambda r=rank: (r, 2))
        s = EpochSampler(n, batch, seed=3)
        s.set_epoch(5)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == 8  # 23 // (4*2) * 4
    allidx = shards[0] + shards[1]
    assert len(set(allidx)) == len(allidx) == 16
    monkeypatch.setattr("benchmark.engine.get_dist_info", lambda: (0, 1))
    single = EpochSampler(n, batch, seed=3)
    single.set_epoch(5)
    order = list(single)[:16]
    # the same global order, dealt round-robin over ranks
    assert shards[0] == order[0::2] and shards[1] == order[1::2]
    single.set_epoch(6)
    assert list(single) != order + list(single)[16:]


def test_scheduler_state_is_counters_only_and_resumes_older_checkpoints():
    """The scheduler's state is plain numbers (weights_only checkpoints); a resumed run continues the same rates,
    also from a checkpoint written by the two chained mmengine schedulers used before."""
    from mmengine.optim import LinearLR

    sched = make_schedule(PASCAL_CONTEXT, 32, iters_per_epoch=5, epochs=6, warmup_epochs=2)

    def fresh():
        w = torch.nn.Parameter(torch.zeros(1))
        wrapper = OptimWrapper(optimizer=torch.optim.AdamW([w], lr=sched.peak_lr))
        return wrapper, lr_schedulers(sched, wrapper)

    wrapper, (s,) = fresh()
    for _ in range(7):
        s.step()
    state = s.state_dict()
    assert all(isinstance(v, (int, float, bool, str, list, type(None))) for v in state.values()), state
    wrapper2, (s2,) = fresh()
    s2.load_state_dict(state)
    s.step(), s2.step()
    assert wrapper2.optimizer.param_groups[0]["lr"] == wrapper.optimizer.param_groups[0]["lr"] == sched.lr_at(8)
    old_wrapper = OptimWrapper(optimizer=torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=sched.peak_lr))
    old = LinearLR(old_wrapper, start_factor=0.1, by_epoch=False, begin=0, end=11)
    for _ in range(7):
        old.step()
    wrapper3, (s3,) = fresh()
    s3.load_state_dict(old.state_dict())
    s3.step()
    assert wrapper3.optimizer.param_groups[0]["lr"] == sched.lr_at(8)


def test_official_lr_lag_repeats_the_first_rate():
    sched = make_schedule(PASCAL_CONTEXT, 32, iters_per_epoch=3, epochs=4, warmup_epochs=1)
    lagged = replace(sched, official_lr_lag=True)
    assert lagged.lr_at(0) == lagged.lr_at(1) == sched.lr_at(0) == sched.warmup_lr
    assert [lagged.lr_at(k) for k in range(1, 12)] == [sched.lr_at(k) for k in range(0, 11)]
    assert sched.lr_at(3) == sched.peak_lr and sched.lr_at(12) == sched.min_lr
