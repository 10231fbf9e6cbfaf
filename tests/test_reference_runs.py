"""CI reruns a representative subset of the committed tiny reference runs (tests/golden/reference_runs.json)."""

from __future__ import annotations

import copy

import pytest

from benchmark.reference_runs import compare, golden_entry, load_golden, run_reference
from methods import METHODS


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
    result = run_reference("mtlora", extra_args=["--activation-checkpointing"])
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
