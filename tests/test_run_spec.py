"""The run specification (benchmark/run.py): built once, the same from the command line and from a sweep's grid;
the run id, the config and the keys a resume compares are the specification's; the engine is set up from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from benchmark import checkpoints, method_api, run
from benchmark.cli import build_parser
from benchmark.protocol import NYUD, PASCAL_CONTEXT
from benchmark.results import make_run_id
from benchmark.run import RunSpec
from benchmark.sweep import expand_grid


def _args(*extra: str):
    return build_parser().parse_args(["--method", "lora", "--preset", "tiny", *extra])


def _counting(monkeypatch, name: str, module=run) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_cli_and_sweep_build_the_same_spec_and_run_id():
    args = _args("--set", "rank=8", "--seed", "3", "--work-dir", "somewhere")
    cli = RunSpec.from_args(args, "lora", ["rank=8"], 3)
    settings = run.resolve_settings(PASCAL_CONTEXT, "tiny")
    (point,) = expand_grid(["lora"], ["rank=8"], [3], PASCAL_CONTEXT, settings=settings,
                           options=run.options_from_args(args))  # fmt: skip
    assert point == cli  # every field: protocol, method, overrides, config, seed, settings, options
    assert point.run_id == cli.run_id == make_run_id("pascal-context", 1, "lora", cli.config, [3])
    assert cli.config["rank"] == 8 and cli.run_id.endswith("--seed3")
    assert cli.run_dir == Path("somewhere")
    # stable: a second build from the same flags gives the same id; another seed another one
    assert RunSpec.from_args(_args("--set", "rank=8"), "lora", ["rank=8"], 3).run_id == cli.run_id
    assert dataclasses.replace(cli, seed=4).run_id == cli.run_id.replace("--seed3", "--seed4")


def test_run_id_config_and_meta_are_computed_once(monkeypatch):
    ids = _counting(monkeypatch, "make_run_id")
    spec = RunSpec.from_args(_args(), "lora", ["rank=4"], 0)
    for _ in range(3):
        assert spec.run_id == spec.meta["run_id"]
        assert spec.run_dir == Path("work_dirs") / spec.run_id
    assert len(ids) == 1


def test_overrides_are_applied_once_per_config_in_a_sweep(monkeypatch):
    applied = _counting(monkeypatch, "apply_overrides", method_api)
    grid = expand_grid(["lora"], ["rank=4,8"], [0, 1, 2], PASCAL_CONTEXT)
    assert len(grid) == 6 and len({p.run_id for p in grid}) == 6
    assert len(applied) == 2  # once per config, not per seed
    assert {(p.config["rank"], p.seed) for p in grid} == {(r, s) for r in (4, 8) for s in (0, 1, 2)}


def test_spec_is_frozen():
    spec = RunSpec.from_args(_args(), "lora")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]


def test_resume_keys_come_from_the_spec_and_refuse_another_run(tmp_path):
    spec = RunSpec.from_args(_args("--seed", "5", "--epochs", "3"), "lora", (), 5)
    keys = spec.resume_keys()
    assert tuple(keys) == checkpoints.RESUME_KEYS
    s = spec.settings
    assert keys == {"run_id": spec.run_id, "protocol": "pascal-context.v1", "backbone": s.backbone,
                    "image_size": s.image_size, "seed": 5, "preset": "tiny", "epochs": 3,
                    "batch_size": s.batch_size}  # fmt: skip
    checkpoints.check_resume_settings(dict(spec.meta), spec.meta, tmp_path / "epoch_1.pth")  # its own: accepted
    other = RunSpec.from_args(_args("--seed", "6", "--epochs", "3"), "lora", (), 6)
    with pytest.raises(checkpoints.ResumeMismatchError, match="seed"):
        checkpoints.check_resume_settings(dict(other.meta), spec.meta, tmp_path / "epoch_1.pth")


def test_engine_is_set_up_from_the_spec_and_its_protocol(tmp_path):
    spec = RunSpec.from_args(_args("--work-dir", str(tmp_path), "--workers", "0"), "lora")
    setup = run.setup_for(spec, run.Processes("cpu", 0, 2), net=None, val_ds=None, train_ds=None)
    p = spec.protocol
    assert setup.meta == spec.meta and setup.work_dir == tmp_path and setup.seed == spec.seed
    assert (setup.clip_grad, setup.weight_decay, setup.betas, setup.eps) == (
        p.clip_grad,
        p.weight_decay,
        p.betas,
        p.eps,
    )
    assert tuple(setup.tasks) == p.task_names and setup.protocol is p
    assert setup.batch_size == spec.settings.batch_size // 2 and setup.epochs == spec.settings.epochs
    assert list(setup.meters) == list(p.task_names)


def test_protocol_flag_reaches_the_spec_and_the_model():
    spec = RunSpec.from_args(_args("--protocol", "nyud"), "lora")
    assert spec.protocol is NYUD and spec.run_id.startswith("nyud.v1--lora--")
    assert spec.meta["protocol"] == "nyud.v1"
    assert spec.model_config.tasks == {"semseg": 40, "depth": 1, "normals": 3}


def test_a_preset_value_declared_for_one_protocol_applies_to_that_protocol_only():
    from benchmark.presets import PRESETS, resolve

    smoke = dataclasses.replace(PRESETS["smoke"], per_protocol={"nyud": {"image_size": 96, "synthetic_train": 12}})
    nyud, pascal = resolve(NYUD, smoke), resolve(PASCAL_CONTEXT, smoke)
    assert (nyud.image_size, nyud.synthetic_train) == (96, 12)
    assert (pascal.image_size, pascal.synthetic_train) == (
        PRESETS["smoke"].image_size,
        PRESETS["smoke"].synthetic_train,
    )
    assert nyud.debug and nyud.preset == "smoke"


def test_the_protocol_reaches_data_transforms_synthetic_data_and_meters(monkeypatch, tmp_path):
    """The run's protocol reaches the synthetic data, the transforms, the loader and the meters (fakes of the APIs'
    signatures stand in for the data and compute modules)."""
    import benchmark.dataset
    import benchmark.metrics
    import benchmark.synth
    import benchmark.transforms

    calls: list[tuple] = []

    def build_transforms(protocol, train, *, seed, image_size):
        calls.append(("transforms", protocol.name, train, seed, image_size))
        return f"tf-{train}"

    def open_dataset(protocol, root, split, transform):
        calls.append(("dataset", protocol.name, Path(root), split, transform))
        return split

    def make_synthetic_dataset(out, n_train, n_val, seed=0, *, protocol):
        calls.append(("synth", protocol.name, Path(out), n_train, n_val))

    def build_meters(tasks):
        calls.append(("meters", tuple(t.kind for t in tasks)))
        return {}

    monkeypatch.setattr(benchmark.transforms, "build_transforms", build_transforms)
    monkeypatch.setattr(benchmark.dataset, "open_dataset", open_dataset)
    monkeypatch.setattr(benchmark.synth, "make_synthetic_dataset", make_synthetic_dataset)
    monkeypatch.setattr(benchmark.dataset, "dataset_ready", lambda protocol, root: False)
    monkeypatch.setattr(benchmark.metrics, "build_meters", build_meters)

    spec = RunSpec.from_args(_args("--protocol", "nyud", "--preset", "smoke", "--seed", "2", "--work-dir", str(tmp_path)),
                             "lora")  # fmt: skip
    root = run.prepare_data(spec, rank=0)
    val, train = run.open_datasets(spec, root)
    assert (val, train) == ("val", "train")
    setup = run.setup_for(spec, run.Processes("cpu"), None, val, train)
    assert setup.protocol is spec.protocol and setup.tasks == ("semseg", "depth", "normals")
    s = spec.settings
    assert calls == [
        ("synth", "nyud", tmp_path / "synthetic_data", s.synthetic_train, s.synthetic_val),
        ("transforms", "nyud", False, 2, s.image_size),
        ("dataset", "nyud", root, "val", "tf-False"),
        ("transforms", "nyud", True, 2, s.image_size),
        ("dataset", "nyud", root, "train", "tf-True"),
        ("meters", ("semseg", "depth", "normals")),
    ]


def test_amp_follows_the_protocol_unless_a_flag_says_otherwise(monkeypatch):
    """``Protocol.amp`` is read: the default autocast dtype is float16 where the protocol says AMP and fp32 where
    it does not; an explicit --amp-dtype wins either way."""
    import benchmark.protocol as protocol_mod

    assert RunSpec.from_args(_args(), "lora").amp_dtype == ("float16" if PASCAL_CONTEXT.amp else None)
    no_amp = dataclasses.replace(PASCAL_CONTEXT, amp=False)
    monkeypatch.setitem(protocol_mod.PROTOCOLS, PASCAL_CONTEXT.name, no_amp)
    assert RunSpec.from_args(_args(), "lora").amp_dtype is None
    assert RunSpec.from_args(_args("--amp-dtype", "bfloat16"), "lora").amp_dtype == "bfloat16"
    monkeypatch.setitem(protocol_mod.PROTOCOLS, PASCAL_CONTEXT.name, PASCAL_CONTEXT)
    assert RunSpec.from_args(_args("--amp-dtype", "none"), "lora").amp_dtype is None
