"""Training-loop parity: a ``train_*.pt`` fixture (a short official training run) against this harness.

The model is built from the ``config`` of the companion model fixture named in ``uses_state_dict_of`` and loaded
with its ``state_dict``; it is then trained with the pieces a real run uses: ``benchmark.engine.build_optim_wrapper``
(AdamW over ``optim.param_groups``, clipping in mmengine's ``OptimWrapper``), the run's ``Schedule`` built by
``optim.make_schedule`` from the fixture's config learning rates (with ``official_lr_lag``, the official
one-iteration lag, see docs/protocol.md), the run's ``MultiTaskLoss`` with the fixture's task weights, and
``EngineModel.train_step`` followed by the schedulers' step, which is what mmengine's loop and its
``ParamSchedulerHook`` do every iteration. Every setting is read from the file.

Error model of the tolerances. The fixture measures how far three correct official runs drift apart after the
same twelve steps (fp32 vs fp64, 1 vs 2 threads, AVX2 vs generic kernels) and keeps the largest difference per
quantity (``reproducibility``): its noise floor ``N``. This implementation does the same arithmetic in another
order, i.e. it is one more correct run: ``|ours - official| <= |ours - exact| + |exact - official|``, each term
bounded by the floor, so ``2 N``; the floor is the largest of only three samples of that spread, and a fourth run
may exceed it, hence ``K = 3`` times the floor (the fixture README: "a few times the noise floor"). This
implementation's own arithmetic can be noisier than the official one (another reduction order, batched task
streams; a ReLU of a decoder head that flips in one run and not in another), so for the trajectory (losses,
gradient norm) the floor is the larger of the fixture's and this harness's own drift, measured by training a
float64 twin of the same model with the same code: ``|fp32 - fp64|`` per iteration. Where the floor is per
iteration, a check uses the largest floor up to that iteration (rounding differences only accumulate along a run). Scalar summaries of a tensor get the bound that the per-tensor floor implies
(Cauchy-Schwarz: ``|sum(d)| <= sqrt(n) ||d||``). Learning rates are the fp64 closed form evaluated in the same order
(a few roundings: 1e-14 relative), and group membership, weight decay, clipping decisions and step counts are exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmark.parity import Check
from benchmark.safeload import safe_load

K = 3.0  # times the fixture's noise floor, see the module docstring
LR_REL_TOL = 1e-14  # fp64 closed form, same order of operations: a few roundings of 2**-53


def _noise(repro: Mapping[str, Any]) -> dict[str, Any]:
    """Per-parameter noise floor: name -> (max_abs, rel_l2, diff/update), the max over the recorded comparisons."""
    per: dict[str, list[float]] = {}
    for comp in repro.values():
        table = (
            comp.get("per_param_max_abs__max_abs_over_tensor_max__rel_l2__diff_over_update")
            if isinstance(comp, Mapping)
            else None
        )
        for name, (max_abs, _, rel_l2, over_update) in (table or {}).items():
            old = per.get(name, [0.0, 0.0, 0.0])
            per[name] = [max(old[0], max_abs), max(old[1], rel_l2), max(old[2], over_update)]
    return per


def _param_bounds(fx: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """name -> (max abs, L2 norm) of the difference the noise floor allows in that final trainable parameter."""
    final, repro = fx["final"], fx["reproducibility"]
    per = _noise(repro)
    zero_grad = set(final.get("params_with_exactly_zero_gradient", []))
    zero_abs = float(repro["noise_floor"]["zero_gradient_params_max_abs_diff"])
    out = {}
    for name, ref in final["trainable"].items():
        n = int(ref["numel"])
        if name in zero_grad or name not in per:  # rounding-noise gradients: the fixture's absolute floor for them
            out[name] = (zero_abs, zero_abs * math.sqrt(n))
        else:
            out[name] = (per[name][0], per[name][1] * float(ref["l2"]))
    return out


def _running_max(xs: list[float]) -> list[float]:
    out, m = [], 0.0
    for x in xs:
        m = max(m, float(x))
        out.append(m)
    return out


def _ratio_check(name: str, worst: float, where: str, rule: str, extra_fail: str = "") -> Check:
    """A check over many values: ``max_diff`` is the worst |diff| / tolerance, which passes at <= 1."""
    ok = worst <= 1.0 and not extra_fail
    return Check(name, worst, 1.0, ok, f"worst {where}; tol: {rule}" + (f"; {extra_fail}" if extra_fail else ""))


def _companion(path: Path, fx: Mapping[str, Any]) -> Path:
    uses = fx.get("uses_state_dict_of")
    if not isinstance(uses, str) or not uses or Path(uses).name != uses:
        raise ValueError(f"{path}: uses_state_dict_of must name a model fixture file beside it, got {uses!r}")
    model_path = path.with_name(uses)
    if not model_path.is_file():
        raise FileNotFoundError(f"{path}: its model fixture {model_path} does not exist")
    return model_path


def parity_checks(train_fixture_path: Path) -> list[Check]:
    """Every comparison between this harness's training loop and one official ``train_*.pt`` fixture."""
    from benchmark import engine, optim
    from benchmark.official import (
        build_from_fixture_config,
        fixture_loss,
        load_official_state_dict,
        official_to_local_key,
    )
    from benchmark.protocol import PASCAL_CONTEXT

    path = Path(train_fixture_path)
    fx = safe_load(path, "train fixture")
    model_path = _companion(path, fx)
    for key in ("settings", "batches", "trajectory", "param_groups", "final", "reproducibility"):
        if key not in fx:
            raise ValueError(f"train fixture {path}: missing key {key!r}")
    model_fx = safe_load(model_path, "model fixture")
    st, stem = fx["settings"], path.stem
    if st.get("accumulation_steps", 1) != 1 or st.get("amp", False) or st.get("clip_grad") is None:
        raise ValueError(f"{path}: only accumulation_steps 1, no AMP and a clip_grad value are supported")
    sched = st.get("scheduler", {})
    expected = {"warmup_prefix": True, "t_in_epochs": False, "cycle_limit": 1, "noise_range_t": None}
    other = {k: sched[k] for k, v in expected.items() if k in sched and sched[k] != v}
    if other:
        raise ValueError(f"{path}: scheduler settings {other} are not the official schedule this harness implements")
    checks: list[Check] = []

    # ---- the model, the loss, the optimiser and the schedule a run builds
    net, _ = build_from_fixture_config(
        model_fx["config"], drop_path_rate=float(st["drop_path_rate"]), lora_dropout=float(st["lora_dropout"])
    )
    report = load_official_state_dict(net, model_fx["state_dict"])
    checks.append(
        Check(f"{stem}/load_state_dict", 0.0 if report.complete else 1.0, 0.0, report.complete, report.summary())
    )
    loss_fn = fixture_loss(net, st["loss_weights"], path)
    ipe, epochs = int(st["iterations_per_epoch"]), int(st["epochs"])
    total_batch = int(st["batch_size"]) * int(st.get("world_size", 1))
    protocol = replace(
        PASCAL_CONTEXT,
        base_lr=float(st["config_base_lr"]),
        warmup_lr=float(st["config_warmup_lr"]),
        min_lr=float(st["config_min_lr"]),
        warmup_epochs=float(st["warmup_epochs"]),
    )
    schedule = replace(optim.make_schedule(protocol, total_batch, ipe, epochs), official_lr_lag=True)
    for key, ours in (
        ("peak_lr", schedule.peak_lr),
        ("warmup_lr_init", schedule.warmup_lr),
        ("min_lr", schedule.min_lr),
    ):
        ref = float(st[key])
        d = abs(ours - ref)
        tol = LR_REL_TOL * abs(ref)
        checks.append(
            Check(
                f"{stem}/settings/{key}",
                d,
                tol,
                d <= tol,
                f"ours {ours:.17g} official {ref:.17g}; tol: 1e-14 rel (fp64 lr scaling)",
            )
        )
    # ---- the run, and its float64 twin (the yardstick of this harness's own fp32 drift, see the docstring)
    initial = {n: p.detach().clone() for n, p in net.named_parameters()}
    wrapper, ours_traj = _train(engine, net, loss_fn, schedule, st, fx["batches"], torch.float32)
    net64, _ = build_from_fixture_config(
        model_fx["config"], drop_path_rate=float(st["drop_path_rate"]), lora_dropout=float(st["lora_dropout"])
    )
    load_official_state_dict(net64, model_fx["state_dict"])
    _, traj64 = _train(engine, net64.double(), loss_fn, schedule, st, fx["batches"], torch.float64)

    # ---- parameter groups: which trainable parameter gets which weight decay
    local_name = {id(p): n for n, p in net.named_parameters()}
    for gi, (ours_g, ref_g) in enumerate(zip(wrapper.optimizer.param_groups, fx["param_groups"], strict=False)):
        ours_names = {local_name[id(p)] for p in ours_g["params"]}
        ref_names = {official_to_local_key(n) for n in ref_g.get("trainable_names", ref_g["names"])} - {None}
        extra, lacking = sorted(ours_names - ref_names), sorted(ref_names - ours_names)
        ok = not extra and not lacking and float(ours_g["weight_decay"]) == float(ref_g["weight_decay"])
        checks.append(
            Check(
                f"{stem}/param_groups/{gi}",
                float(len(extra) + len(lacking)),
                0.0,
                ok,
                f"weight_decay ours {ours_g['weight_decay']} official {ref_g['weight_decay']}; only here: {extra[:3]}; "
                f"only official: {lacking[:3]}; tol: exact",
            )
        )
    n_groups = len(wrapper.optimizer.param_groups)
    checks.append(
        Check(
            f"{stem}/param_groups/count",
            float(abs(n_groups - len(fx["param_groups"]))),
            0.0,
            n_groups == len(fx["param_groups"]),
            "tol: exact",
        )
    )

    checks += _trajectory_checks(stem, fx, ours_traj, traj64, float(st["clip_grad"]))
    checks += _final_checks(stem, fx, net, initial, official_to_local_key)
    return checks


def _train(
    engine: Any, net: torch.nn.Module, loss_fn: Any, schedule: Any, st: Mapping[str, Any], batches: list, dtype: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """Train ``net`` as a run does (optimiser, schedulers, ``EngineModel.train_step``); returns the wrapper and
    the recorded trajectory. ``dtype``: the image's dtype (float64 for the twin run; labels are float64 always)."""
    betas = tuple(float(b) for b in st["betas"])
    wrapper = engine.build_optim_wrapper(
        net, schedule.peak_lr, float(st["weight_decay"]), betas, float(st["eps"]), float(st["clip_grad"])
    )
    schedulers = engine.lr_schedulers(schedule, wrapper)
    model = engine.EngineModel(net, loss_fn)
    trainable = [p for p in net.parameters() if p.requires_grad]
    traj = []
    for i in range(int(st["total_iterations"])):
        batch = batches[i % int(st["num_batches"])]
        data = {"image": batch["image"].float().to(dtype), **{t: batch[t].to(torch.float64) for t in net.tasks}}
        net.train()
        model.current_iter = i
        lrs = [float(g["lr"]) for g in wrapper.optimizer.param_groups]
        wds = [float(g["weight_decay"]) for g in wrapper.optimizer.param_groups]
        log = model.train_step(data, wrapper)
        for s in schedulers:  # mmengine's ParamSchedulerHook.after_train_iter
            s.step()
        with torch.no_grad():
            flat = torch.cat([p.detach().double().flatten() for p in trainable])
        traj.append(
            {
                "lr": lrs,
                "weight_decay": wds,
                "loss_total": float(log["loss"]),
                "loss": {t: float(log[f"l_{t}"]) for t in net.tasks},
                "loss_dtypes": {
                    **{t: str(log[f"l_{t}"].dtype)[6:] for t in net.tasks},
                    "total": str(log["loss"].dtype)[6:],
                },
                "grad_norm": engine.last_grad_norm(),
                "sum": float(flat.sum()),
                "sumsq": float(flat.pow(2).sum()),
            }
        )
    return wrapper, traj


def _own_drift(ours: list[dict[str, Any]], twin: list[dict[str, Any]], get: Any) -> list[float]:
    """Per iteration: |fp32 - fp64| / |fp64| of one recorded value between this harness's two runs."""
    return [abs(get(a) - get(b)) / abs(get(b)) if get(b) else 0.0 for a, b in zip(ours, twin, strict=True)]


def _trajectory_checks(
    stem: str, fx: Mapping[str, Any], ours: list[dict[str, Any]], twin: list[dict[str, Any]], clip: float
) -> list[Check]:
    ref, floor = fx["trajectory"], fx["reproducibility"]["noise_floor"]
    checks = []
    if len(ours) != len(ref):
        return [
            Check(f"{stem}/trajectory/length", abs(len(ours) - len(ref)), 0.0, False, f"{len(ours)} vs {len(ref)}")
        ]
    # the relative noise floor per iteration: the larger of the official runs' recorded drift and this harness's
    # own fp32-vs-fp64 drift of the same run, as a running maximum (drift only accumulates along a run)
    own_loss = _own_drift(ours, twin, lambda r: r["loss_total"])
    own_gn = _own_drift(ours, twin, lambda r: r["grad_norm"])
    loss_floor = _running_max(
        [max(a, b) for a, b in zip(floor["trajectory_loss_total_rel_diff_per_iteration"], own_loss, strict=True)]
    )
    gn_floor = _running_max(
        [max(a, b) for a, b in zip(floor["trajectory_grad_norm_rel_diff_per_iteration"], own_gn, strict=True)]
    )
    task_floor = {
        t: max(float(v), *_own_drift(ours, twin, lambda r, t=t: r["loss"][t]))
        for t, v in floor["trajectory_task_loss_max_rel_diff"].items()
    }
    # lr and weight decay per group: exact rule
    worst_lr, where_lr, wd_bad = 0.0, "", []
    for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
        for g, (a, b) in enumerate(zip(o["lr"], r["lr"], strict=True)):
            q = abs(a - b) / (LR_REL_TOL * abs(b))
            if q >= worst_lr:
                worst_lr, where_lr = q, f"iteration {i} group {g}: ours {a:.17g} official {b:.17g}"
        if [float(x) for x in r["weight_decay"]] != o["weight_decay"]:
            wd_bad.append(i)
    checks.append(_ratio_check(f"{stem}/trajectory/lr", worst_lr, where_lr, "1e-14 relative (fp64 closed form)"))
    checks.append(
        Check(
            f"{stem}/trajectory/weight_decay",
            float(len(wd_bad)),
            0.0,
            not wd_bad,
            f"iterations differing: {wd_bad}; tol: exact",
        )
    )
    # losses, per-task losses and dtypes
    for key, rule in (
        (
            "loss_total",
            "3 x running max of the per-iteration total-loss floor (relative; the fixture's or own fp32-vs-fp64, the larger)",
        ),
    ):
        worst, where = 0.0, ""
        for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
            tol = K * loss_floor[i] * abs(float(r[key]))
            q = abs(o[key] - float(r[key])) / tol
            if q >= worst:
                worst, where = q, f"iteration {i}: ours {o[key]:.10g} official {float(r[key]):.10g} (tol {tol:.3g})"
        checks.append(_ratio_check(f"{stem}/trajectory/{key}", worst, where, rule))
    for t in ref[0]["loss"]:
        worst, where = 0.0, ""
        for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
            tol = K * float(task_floor[t]) * abs(float(r["loss"][t]))
            q = abs(o["loss"][t] - float(r["loss"][t])) / tol
            if q >= worst:
                worst, where = (
                    q,
                    f"iteration {i}: ours {o['loss'][t]:.10g} official {float(r['loss'][t]):.10g} (tol {tol:.3g})",
                )
        checks.append(
            _ratio_check(
                f"{stem}/trajectory/loss/{t}",
                worst,
                where,
                f"3 x the {t} loss floor (relative; the fixture's or own fp32-vs-fp64, the larger)",
            )
        )
    bad_dt = [
        i
        for i, (o, r) in enumerate(zip(ours, ref, strict=True))
        if "loss_dtypes" in r and o["loss_dtypes"] != dict(r["loss_dtypes"])
    ]
    checks.append(
        Check(
            f"{stem}/trajectory/loss_dtypes",
            float(len(bad_dt)),
            0.0,
            not bad_dt,
            f"iterations differing: {bad_dt}; tol: exact",
        )
    )
    # gradient norm before clipping, and the clipping decision it implies
    worst, where, clip_bad = 0.0, "", []
    for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
        tol = K * gn_floor[i] * float(r["grad_norm"])
        q = abs(o["grad_norm"] - float(r["grad_norm"])) / tol
        if q >= worst:
            worst, where = (
                q,
                f"iteration {i}: ours {o['grad_norm']:.8g} official {float(r['grad_norm']):.8g} (tol {tol:.3g})",
            )
        if (min(1.0, clip / (o["grad_norm"] + 1e-6)) < 1.0) != bool(r["clipped"]):
            clip_bad.append(i)
    checks.append(
        _ratio_check(
            f"{stem}/trajectory/grad_norm",
            worst,
            where,
            "3 x running max of the per-iteration grad-norm floor (relative; the fixture's or own fp32-vs-fp64, the larger)",
        )
    )
    checks.append(
        Check(
            f"{stem}/trajectory/clipped",
            float(len(clip_bad)),
            0.0,
            not clip_bad,
            f"iterations differing: {clip_bad}; tol: exact",
        )
    )
    # float64 sum and sum of squares over all trainable parameters after each step: bounded by the final
    # per-parameter floor (sqrt(n) ||d|| and 2 ||p|| ||d||; the drift only grows along the run)
    bounds, trained = _param_bounds(fx), fx["final"]["trainable"]
    d_l2 = math.sqrt(sum(b[1] ** 2 for b in bounds.values()))
    n = sum(int(r["numel"]) for r in trained.values())
    p_l2 = math.sqrt(sum(float(r["l2"]) ** 2 for r in trained.values()))
    for key, tol in (("sum", K * math.sqrt(n) * d_l2), ("sumsq", K * (2 * p_l2 * d_l2 + d_l2**2))):
        worst, where = 0.0, ""
        for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
            q = abs(o[key] - float(r[f"trainable_{key}_after_step"])) / tol
            if q >= worst:
                worst, where = (
                    q,
                    f"iteration {i}: ours {o[key]:.12g} official {float(r[f'trainable_{key}_after_step']):.12g} (tol {tol:.3g})",
                )
        checks.append(
            _ratio_check(
                f"{stem}/trajectory/trainable_{key}_after_step",
                worst,
                where,
                "3 x the bound the final per-parameter floor implies",
            )
        )
    return checks


def _final_checks(
    stem: str, fx: Mapping[str, Any], net: torch.nn.Module, initial: Mapping[str, Tensor], to_local: Any
) -> list[Check]:
    final, repro = fx["final"], fx["reproducibility"]
    floor = repro["noise_floor"]
    per, bounds = _noise(repro), _param_bounds(fx)
    zero_grad = set(final.get("params_with_exactly_zero_gradient", []))
    zero_abs = float(floor["zero_gradient_params_max_abs_diff"])
    params = dict(net.named_parameters())
    checks = []
    worst = {k: (0.0, "") for k in ("first16", "sum", "abs_sum", "l2")}
    missing = []
    for name, ref in final["trainable"].items():
        p = params.get(to_local(name) or "")
        if p is None or not p.requires_grad:
            missing.append(name)
            continue
        x = p.detach().double().flatten()
        n = x.numel()
        max_abs, d_l2 = bounds[name]
        tols = {
            "first16": K * max_abs,
            "sum": K * min(math.sqrt(n) * d_l2, n * max_abs),
            "abs_sum": K * min(math.sqrt(n) * d_l2, n * max_abs),
            "l2": K * d_l2,
        }
        ours = {"sum": float(x.sum()), "abs_sum": float(x.abs().sum()), "l2": float(x.norm())}
        diffs = {k: abs(ours[k] - float(ref[k])) for k in ours}
        k16 = ref["first16"].numel()
        diffs["first16"] = float((x[:k16] - ref["first16"].double()).abs().max())
        for k, d in diffs.items():
            q = d / tols[k] if tols[k] > 0 else (0.0 if d == 0 else math.inf)
            if q >= worst[k][0]:
                worst[k] = (q, f"{name}: diff {d:.3g} tol {tols[k]:.3g}")
    for k, (q, where) in worst.items():
        checks.append(
            _ratio_check(
                f"{stem}/final/trainable/{k}",
                q,
                where,
                "3 x per-parameter floor (max abs; rel l2 x l2, sqrt(n) x that for sums); zero-gradient biases: 3 x their floor",
                f"not trainable here: {missing[:3]}" if missing else "",
            )
        )
    # full values of selected parameters: distance over the distance moved, against the per-parameter floor
    for name, ref in final.get("selected_full", {}).items():
        local = to_local(name) or ""
        p = params.get(local)
        if p is None:
            checks.append(Check(f"{stem}/final/selected/{name}", math.inf, 0.0, False, "no such parameter here"))
            continue
        ours, ref64, init = p.detach().double(), ref.double(), initial[local].double()
        if name in zero_grad:
            d = float((ours - ref64).abs().max())
            tol = K * zero_abs
            detail = "max abs diff; tol: 3 x the fixture's zero-gradient floor"
        else:
            moved = float((ref64 - init).norm())
            d = float((ours - ref64).norm()) / moved if moved > 0 else float((ours - ref64).norm())
            tol = K * float(floor["per_param_diff_l2_over_update_l2"].get(name, per[name][2]))
            detail = "||ours - official|| / ||official - initial||; tol: 3 x the fixture's per-parameter floor"
        checks.append(Check(f"{stem}/final/selected/{name}", d, tol, d <= tol, detail))
    # never updated, frozen, BatchNorm buffers
    never = [
        n
        for n in final.get("trainable_params_never_updated", [])
        if not torch.equal(params[to_local(n)], initial[to_local(n)])
    ]
    checks.append(
        Check(f"{stem}/final/never_updated", float(len(never)), 0.0, not never, f"moved: {never}; tol: bitwise")
    )
    frozen_moved = sorted(n for n, p in params.items() if not p.requires_grad and not torch.equal(p, initial[n]))
    checks.append(
        Check(
            f"{stem}/final/frozen_unchanged",
            float(len(frozen_moved)),
            0.0,
            not frozen_moved and not final.get("frozen_params_changed"),
            f"moved here: {frozen_moved[:3]}; tol: bitwise",
        )
    )
    buffers = dict(net.named_buffers())
    rel_bn = K * float(floor["bn_buffers_max_abs_diff_over_tensor_max_abs"])
    for name, ref in final.get("bn_buffers_full", {}).items():
        b = buffers.get(to_local(name) or "")
        if b is None:
            checks.append(Check(f"{stem}/final/bn/{name}", math.inf, 0.0, False, "no such buffer here"))
            continue
        d = float((b.double() - ref.double()).abs().max())
        tol = rel_bn * float(ref.abs().max())
        checks.append(
            Check(f"{stem}/final/bn/{name}", d, tol, d <= tol, "tol: 3 x the fixture's BatchNorm floor x max|ref|")
        )
    for name, ref in final.get("bn_buffers", {}).items():
        if name.endswith("num_batches_tracked"):
            b = buffers.get(to_local(name) or "")
            ok = b is not None and int(b) == int(ref["value"])
            checks.append(
                Check(f"{stem}/final/bn/{name}", 0.0 if ok else 1.0, 0.0, ok, f"official {ref['value']}; tol: exact")
            )
    # eval outputs after training, on batches[0]
    net.eval()
    with torch.no_grad():
        out = net(fx["batches"][0]["image"].float())
    rel_out = floor["eval_outputs_max_abs_diff_over_max_abs_output"]
    for t, ref in final.get("eval_outputs_batch0", {}).items():
        o = out[t].double()
        shape_ok = list(o.shape) == [int(s) for s in ref["shape"]]
        if not shape_ok:
            checks.append(
                Check(f"{stem}/final/eval/{t}", math.inf, 0.0, False, f"shape {list(o.shape)} vs {ref['shape']}")
            )
            continue
        sub = ref["subsample"].double()
        step_h, step_w = o.shape[2] // sub.shape[2], o.shape[3] // sub.shape[3]
        tol = K * float(rel_out[t]) * float(o.abs().max())
        d = float((o[:, :, ::step_h, ::step_w] - sub).abs().max())
        checks.append(
            Check(
                f"{stem}/final/eval/{t}/subsample",
                d,
                tol,
                d <= tol,
                "tol: 3 x the fixture's eval-output floor x max|output|",
            )
        )
        for key, ours_v in (("sum", float(o.sum())), ("abs_sum", float(o.abs().sum()))):
            d = abs(ours_v - float(ref[key]))
            tol_s = tol * o.numel()
            checks.append(
                Check(f"{stem}/final/eval/{t}/{key}", d, tol_s, d <= tol_s, "tol: numel x the element tolerance")
            )
    return checks
