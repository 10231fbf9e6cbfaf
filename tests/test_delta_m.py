"""Δm: primary scores in table units, signs from TaskSpec, references from REFERENCES, the official fixture."""

from __future__ import annotations

import pytest
import torch

from benchmark.metrics import delta_m_terms, primary_scores, results_delta_m
from benchmark.protocol import PASCAL_CONTEXT, REFERENCES, delta_m, get_reference

TASKS = {t.name: t for t in PASCAL_CONTEXT.tasks}

REF = get_reference(PASCAL_CONTEXT.reference).values


@pytest.fixture(scope="module")
def fx(fixture_dir):
    return torch.load(fixture_dir / "metrics_public.pt", weights_only=True)


def _fixture_reference(fx) -> dict[str, float]:
    # keys look like "semseg_mIoU_pct" / "normals_mean_deg": task name, primary metric, unit
    out = {}
    for key, value in fx["delta_m"]["reference_single_task"].items():
        task = max((t for t in TASKS if key.startswith(t + "_")), key=len)
        assert key.startswith(f"{task}_{TASKS[task].metric}_"), key
        out[task] = value
    return out


def test_primary_scores_are_in_table_units():
    results = {"semseg": {"mIoU": 0.5, "other": 9.0}, "human_parts": {"mIoU": 0.25}, "sal": {"mIoU": 1.0}}
    results["normals"] = {"mean": 20.0, "rmse": 20.0, "median": 15.0}
    scores = primary_scores(results, PASCAL_CONTEXT.tasks)
    assert scores == {"semseg": 50.0, "human_parts": 25.0, "sal": 100.0, "normals": 20.0}
    assert primary_scores(results, [TASKS["normals"]]) == {"normals": 20.0}
    with pytest.raises(TypeError, match="TaskSpecs"):
        primary_scores(results, ["normals"])  # a name is not global any more: the protocol's spec is needed


def test_primary_scores_missing_task_or_metric_is_an_error():
    with pytest.raises(KeyError, match="no results for task 'sal'"):
        primary_scores({"semseg": {"mIoU": 0.5}}, [TASKS["semseg"], TASKS["sal"]])
    with pytest.raises(KeyError, match="primary metric 'mean'"):
        primary_scores({"normals": {"rmse": 17.0}}, [TASKS["normals"]])


def test_signs_come_from_higher_is_better():
    ref = {"semseg": 50.0, "normals": 20.0}
    terms = delta_m_terms({"semseg": 55.0, "normals": 18.0}, ref, [TASKS["semseg"], TASKS["normals"]])
    assert terms == pytest.approx({"semseg": 10.0, "normals": 10.0})  # lower normals error is better
    assert delta_m({"semseg": 45.0, "normals": 22.0}, ref, [TASKS["semseg"], TASKS["normals"]]) == pytest.approx(-10.0)


def test_missing_reference_is_an_error_never_a_fallback():
    results = {"semseg": {"mIoU": 0.6}, "human_parts": {"mIoU": 0.6}, "sal": {"mIoU": 0.6}, "normals": {"mean": 17.0}}
    partial = {k: v for k, v in REF.items() if k != "normals"}
    with pytest.raises(KeyError, match="no single-task reference value for task 'normals'"):
        results_delta_m(results, PASCAL_CONTEXT, partial)
    with pytest.raises(KeyError, match="unknown single-task reference"):
        results_delta_m(results, PASCAL_CONTEXT, "no-such-reference")
    with pytest.raises(ValueError, match="is 0"):
        delta_m_terms({"sal": 1.0}, {"sal": 0.0}, [TASKS["sal"]])


def test_fixture_references_are_the_protocol_references(fx):
    assert _fixture_reference(fx) == dict(REF)
    assert set(REF) == set(PASCAL_CONTEXT.task_names)
    assert REFERENCES[PASCAL_CONTEXT.reference].protocol == PASCAL_CONTEXT.name


def test_official_delta_m_reproduced(fx):
    dm = fx["delta_m"]
    results = {t: fx["results"][t] for t in PASCAL_CONTEXT.task_names}
    scores = primary_scores(results, PASCAL_CONTEXT.tasks)
    assert scores == pytest.approx(dm["metrics_used_pct"], abs=1e-9)
    terms = delta_m_terms(scores, REF, PASCAL_CONTEXT.tasks)
    assert terms == pytest.approx(dm["per_task_relative_term_pct"], abs=1e-9)
    assert results_delta_m(results, PASCAL_CONTEXT) == pytest.approx(dm["delta_m_pct"], abs=1e-9)
    assert delta_m(scores, REF, PASCAL_CONTEXT.tasks) == pytest.approx(sum(terms.values()) / 4, abs=1e-12)


def test_worked_example_on_the_published_mtlora_row(fx):
    ex = fx["delta_m_worked_example"]
    assert delta_m(ex["metrics_pct"], REF, PASCAL_CONTEXT.tasks) == pytest.approx(ex["delta_m_pct"], abs=1e-9)
