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
from .test_state import EVAL_GOOD, NOW, World, _to_evaluated, _to_training

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
    from finetune_operator.finetunejob.outcome import termination_of

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
