"""CI reruns a representative subset of the committed tiny reference runs (tests/golden/reference_runs.json)."""

from __future__ import annotations

import copy

import pytest

from benchmark.method_api import METHODS
from benchmark.reference_runs import RUN_K, compare, golden_entry, load_golden, run_reference


def test_every_registered_method_has_a_golden_reference_run():
    golden = load_golden()
    assert golden["preset"] == "tiny" and golden["seed"] == 0
    assert sorted(golden["methods"]) == METHODS.names()


@pytest.mark.parametrize("method", ["full_ft", "lora", "mtlora"])
def test_reference_run_reproduces_its_golden_metrics(method):
    golden = load_golden()["methods"][method]
    assert compare(method, golden, run_reference(method)) == []


def test_activation_checkpointing_trains_the_same_mtlora():
    # the recomputation replays the dropout and drop-path draws: the same training, within the runs' noise bounds
    golden = load_golden()["methods"]["mtlora"]
    result = run_reference("mtlora", options={"activation_checkpointing": "all"})
    assert compare("mtlora", golden, result) == []
    assert any("activation checkpointing" in n for n in result["notes"])


def test_compare_reports_a_moved_metric_and_a_changed_count():
    golden = load_golden()["methods"]["full_ft"]
    result = {"method": {"config": golden["config"]}, "params": {"trainable": golden["trainable"] + 1},
              "metrics": copy.deepcopy(golden["metrics"])}  # fmt: skip
    result["metrics"]["normals"]["mean"] += 0.5
    problems = compare("full_ft", golden, result)
    assert any("normals/mean moved" in p for p in problems)
    assert any("trainable parameters" in p for p in problems)
    assert compare("full_ft", golden, {**result, "params": {"trainable": golden["trainable"]},
                                       "metrics": golden["metrics"]}) == []  # fmt: skip
    assert golden_entry({**result, "method": {"config": {}}})["trainable"] == golden["trainable"] + 1


def test_bounds_are_the_recorded_spread_across_kernels_and_threads():
    golden = load_golden()
    entry = golden["methods"]["full_ft"]
    assert "ATEN_CPU_CAPABILITY" in golden["noise_model"]
    assert {"native/1", "default/1", "default/2", "avx2/1"} <= set(entry["spread_settings"])
    result = {"method": {"config": entry["config"]}, "params": {"trainable": entry["trainable"]},
              "metrics": copy.deepcopy(entry["metrics"])}  # fmt: skip
    spread = entry["spread"]["sal"]["mIoU"]
    result["metrics"]["sal"]["mIoU"] = entry["metrics"]["sal"]["mIoU"] + RUN_K * spread * 0.99
    assert compare("full_ft", entry, result) == []
    result["metrics"]["sal"]["mIoU"] = entry["metrics"]["sal"]["mIoU"] + RUN_K * spread * 1.01 + 1e-12
    assert any("sal/mIoU moved" in p and "spread" in p for p in compare("full_ft", entry, result))
    # an entry made before spreads were measured cannot be checked: it asks to be regenerated
    old = {k: v for k, v in entry.items() if k not in ("spread", "spread_settings")}
    assert any("--update full_ft" in p for p in compare("full_ft", old, result))


def test_checked_metrics_are_the_protocols_primary_metrics_plus_the_kinds_extras():
    from benchmark.protocol import NYUD, PASCAL_CONTEXT
    from benchmark.reference_runs import CHECKED_METRICS, checked_metrics

    assert CHECKED_METRICS == checked_metrics(PASCAL_CONTEXT)
    for entry in load_golden()["methods"].values():  # the golden file pins exactly these
        assert {t: tuple(ms) for t, ms in entry["metrics"].items()} == CHECKED_METRICS
    assert checked_metrics(NYUD) == {t.name: (t.metric,) for t in NYUD.tasks}
