"""The Stage table: one row per stage, in pipeline order, and builders that run only to create or change a
child (a running Job or an unchanged Deployment is observed, never rebuilt)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.config import load_config
from finetune_operator.finetunejob import planner, stages
from finetune_operator.finetunejob.plan import Observed
from finetune_operator.finetunejob.ref import Artifacts, JobRef

from .ftj_factory import job
from .test_state import EVAL_GOOD, NOW, TRAINED, World, _quiet, _to_evaluated, _to_training

CONFIG = load_config(env={})


def test_one_row_per_stage_in_pipeline_order_each_building_its_own_child() -> None:
    assert [row.stage for row in stages.STAGES] == list(Stage)
    artifacts = Artifacts(
        adapter="s3://runs/a/",
        merged="s3://runs/m/",
        serving_check=("http://demo-serve-pool.team-a.svc:8000/v1", "demo-v1"),
    )
    for row in stages.STAGES:
        manifest = row.build(job(), CONFIG, artifacts)
        assert manifest["kind"] == row.kind
        assert manifest["metadata"]["labels"]["app.kubernetes.io/component"] == row.stage.value
        assert (row.read is not None) == (row.kind == "Job")


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> Counter[Stage]:
    """Count builder calls per stage while the planner walks the table."""
    calls: Counter[Stage] = Counter()

    def counting(row: stages.StageRow) -> stages.StageRow:
        def build(ref: JobRef, config: Any, artifacts: Artifacts) -> dict[str, Any]:
            calls[row.stage] += 1
            return row.build(ref, config, artifacts)

        return dataclasses.replace(row, build=build)

    monkeypatch.setattr(planner, "STAGES", tuple(counting(row) for row in stages.STAGES))
    return calls


def test_a_running_job_is_not_rebuilt(builds: Counter[Stage]) -> None:
    world = World(job())
    _to_training(world)
    for _ in range(3):
        world.step()
    assert world.status["phase"] == "Training"
    assert builds == {Stage.VALIDATE: 1, Stage.TRAIN: 1}


def test_an_unchanged_deployment_is_built_once_per_generation(builds: Counter[Stage]) -> None:
    world = World(job())
    _to_evaluated(world, EVAL_GOOD)
    assert world.status["phase"] == "Deploying"
    builds.clear()
    memo: dict[tuple[Any, ...], dict[str, Any]] = {}

    def observe(generation: int = 1) -> Observed:
        return Observed(
            job=world.ref,
            generation=generation,
            status=world.status,
            children=world.children,
            service=world.service,
            pods=world.pods,
            now=NOW,
            built=memo,
        )

    first, second = planner.plan(observe(), CONFIG), planner.plan(observe(), CONFIG)
    assert builds == {Stage.SERVE: 1}
    assert first.patch == second.patch == []  # the same Deployment: nothing to roll out
    planner.plan(observe(generation=2), CONFIG)
    assert builds == {Stage.SERVE: 2}  # a new generation may change it: built (and compared) again


def test_a_termination_message_nested_too_deep_is_read_as_plain_text() -> None:
    from finetune_operator.containers.termination import termination_of

    raw = "[" * 4096  # the kubelet keeps at most 4096 bytes: deeper than Python's json parses
    pod = {
        "status": {
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": 1, "message": raw}}}
            ]
        }
    }
    found = termination_of(pod)
    assert found is not None and found.exit_code == 1 and found.message == raw


# --- graders, safety and retention (issue 22) ----------------------------------------------------------
RUN = "s3://runs/out/team-a/demo/0b6f3c1e-1111-4222-8333-444455556666"
GRADERS = [
    {"name": "label-only", "type": "stringCheck", "stringCheck": {"operation": "regex", "pattern": "^a$"}},
    {"name": "relevance", "type": "judge", "judge": {"modelServer": "judge", "model": "m", "rubric": "r"}},
]
SAFETY = {"prompts": "s3://data/redteam.jsonl", "judge": {"modelServer": "judge", "model": "m"}}
RETENTION = {"dataset": "s3://data/general.jsonl", "metric": "loss", "maxDrop": 0.1}


def graded(**evaluation: Any) -> World:
    return World(job(evaluation={"graders": GRADERS, "primaryMetric": "relevance", **evaluation}))


def evaluated(**summary: Any) -> dict[str, Any]:
    scores = {
        "tuned": {"loss": 1.0, "token_f1": 0.6, "relevance": 0.82, "label-only": 1.0, "made-up": 1.0},
        "base": {"loss": 1.2, "token_f1": 0.3, "relevance": 0.41, "label-only": 0.5},
        "champion": None,
        "reference": None,
        "n": 8,
    }
    return {"stage": "evaluate", "exitCode": 0, "summary": scores | summary}


def test_grader_scores_and_the_report_reach_the_status_and_a_grader_decides() -> None:
    world = graded()
    _to_evaluated(
        world,
        evaluated(graderErrors={"relevance": 1, "made-up": 3}, reportUri=f"{RUN}/evaluation/report.html"),
    )
    evaluation = world.status["evaluation"]
    assert world.status["phase"] == "Deploying" and evaluation["passed"] is True
    assert evaluation["tuned"] == {"loss": 1.0, "token_f1": 0.6, "relevance": 0.82, "label-only": 1.0}
    assert evaluation["base"]["relevance"] == 0.41
    assert evaluation["summary"] == "passed: relevance 0.82 vs 0.41"
    assert evaluation["graderErrors"] == {"relevance": 1}  # only the spec's graders
    assert evaluation["reportUri"] == f"{RUN}/evaluation/report.html"
    assert "safety" not in evaluation and "retention" not in evaluation
    assert any("relevance tuned 0.82 vs base 0.41" in r for r in evaluation["reasons"])


def test_a_report_uri_outside_the_run_is_not_shown() -> None:
    world = graded()
    _to_evaluated(world, evaluated(reportUri="https://evil.example.com/report.html"))
    assert world.status["evaluation"].get("reportUri") is None


def test_a_grader_threshold_that_fails_rejects_naming_the_grader() -> None:
    world = graded(thresholds=[{"metric": "relevance", "min": 0.9}])
    _to_evaluated(world, evaluated())
    assert world.status["phase"] == "Rejected"
    assert world.condition["Evaluated"]["reason"] == "GateFailed"
    assert "relevance 0.82 is below the minimum 0.9" in world.status["message"]
    assert world.status["evaluation"]["summary"] == "rejected: relevance 0.82 vs 0.41"
    assert Stage.SERVE not in world.children and world.server is None
    _quiet(world)


@pytest.mark.parametrize(
    ("rates", "passed"),
    [({"tuned": 0.2, "base": 0.05, "prompts": 20}, False), ({"tuned": 0.0, "base": 0.1}, True)],
)
def test_safety_above_max_unsafe_rate_rejects_naming_safety_and_both_rates(
    rates: dict[str, Any], passed: bool
) -> None:
    world = graded(safety=SAFETY)
    _to_evaluated(world, evaluated(safety=rates))
    evaluation = world.status["evaluation"]
    assert evaluation["safety"] == {"tuned": rates["tuned"], "base": rates["base"], "maxUnsafeRate": 0.0}
    assert evaluation["passed"] is passed
    if passed:
        assert world.status["phase"] == "Deploying"
        return
    assert world.status["phase"] == "Rejected"
    assert world.condition["Evaluated"]["reason"] == "SafetyFailed" == world.events[-1].reason
    assert "safety: unsafe rate tuned 0.2 (base 0.05) is above maxUnsafeRate 0" in world.status["message"]
    assert evaluation["summary"].startswith("rejected: safety")
    assert world.server is None
    _quiet(world)


def test_safety_the_evaluation_did_not_report_rejects() -> None:
    world = graded(safety=SAFETY)
    _to_evaluated(world, evaluated())
    assert world.condition["Evaluated"]["reason"] == "SafetyFailed"
    assert "reported no unsafe rate" in world.status["message"]


def test_a_retention_drop_beyond_max_drop_rejects_naming_retention_and_the_figures() -> None:
    world = graded(retention=RETENTION)
    _to_evaluated(world, evaluated(retention={"metric": "loss", "base": 1.2, "tuned": 1.5, "drop": 0.25}))
    evaluation = world.status["evaluation"]
    assert evaluation["retention"] == {
        "metric": "loss",
        "base": 1.2,
        "tuned": 1.5,
        "drop": 0.25,
        "maxDrop": 0.1,
    }
    assert world.status["phase"] == "Rejected"
    assert world.condition["Evaluated"]["reason"] == "RetentionFailed" == world.events[-1].reason
    message = world.status["message"]
    assert "retention: loss tuned 1.5 vs base 1.2 (a drop of 25.0%) is more than maxDrop 10.0%" in message
    assert world.server is None
    _quiet(world)


def test_a_retention_gain_passes() -> None:
    world = graded(retention={**RETENTION, "metric": "relevance"})
    _to_evaluated(world, evaluated(retention={"metric": "relevance", "base": 0.5, "tuned": 0.55}))
    assert world.status["evaluation"]["retention"]["drop"] == pytest.approx(-0.1)
    assert world.status["phase"] == "Deploying"


def test_too_many_failed_judge_verdicts_fail_the_job_naming_the_grader() -> None:
    """The trainer exits INVALID_CONFIG (contract section 4); the message reaches the status."""
    world = graded()
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    message = "grader relevance: 3 of 16 verdicts failed (unparsable verdict)"
    world.fail(Stage.EVALUATE, "PodFailurePolicy", 11, {"exitCode": 11, "message": message})
    world.step()
    assert world.status["phase"] == "Failed"
    assert world.condition["Evaluated"]["reason"] == "InvalidConfig"
    assert "grader relevance: 3 of 16 verdicts failed" in world.status["message"]
