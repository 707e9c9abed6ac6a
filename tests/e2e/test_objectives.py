"""Preference (DPO, KTO) and reinforcement (GRPO) fine-tuning end to end (issue 23), on the toy task in the
forms finetune_demo.preference builds:

- a DPO job on preference pairs (chosen = the right answer, rejected = a wrong capital) reaches Serving, its
  held-out preference_accuracy >= 0.9 where the base (the reference itself) scores 0.5, and the served
  model answers held-out prompts with the chosen label;
- a KTO job on unpaired examples (the right answer labelled good, the base's own answer bad, alternating)
  succeeds, its held-out preference_accuracy well over the base's 0.5;
- a GRPO job rewarded by a stringCheck grader raises the held-out reward over the base's and reports the
  reward per logged step, in its progress lines and in status.progress;
- a preference set with a malformed line fails validation naming the line, with no training pod.

The four jobs are created at once in one namespace, so that they train side by side (and the bad one fails
while the others train); each test waits on its own job.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from finetune_demo import preference

from .conftest import Jobs, assert_served_as_evaluated, prepare_namespace
from .test_serving import VLLM_CPU_ARGS, _chat

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DPO, KTO, GRPO, BAD = "dpo-bot", "kto-bot", "grpo-bot", "bad-pairs"
# Tuned on this 2-core CPU with TRL 1.16 (LoRA rank 8 on the toy base, batches of 8): DPO at the SFT
# recipe's learning rate needs ~200 steps before greedy answers follow the chosen side (at 40 steps the
# implicit reward already prefers chosen, but the answers are a wrong capital); held-out exact match 0.9-0.95.
DPO_STEPS, KTO_STEPS = 200, 100
# GRPO explores by sampling: the toy base answers a lowercase letter and says a capital ~1.5% of the time,
# so 8 prompts x 8 completions a step find a few capitals, and ~30 steps make capitals the answer (mean
# reward 0.14 at step 10, 0.98 at step 30). A reward that needs the right capital (0.02% of the base's
# samples) is never met by sampling: "one capital" is the figure the toy base can be taught by rewards.
GRPO_STEPS, GENERATIONS = 40, 8
ONE_CAPITAL = {
    "name": "one-capital",
    "type": "stringCheck",
    "stringCheck": {"operation": "regex", "pattern": "^[A-Z]$"},
}
EVALUATION = {"metrics": ["exact_match"], "primaryMetric": None, "maxNewTokens": 4}
SERVE_ON_CPU = {
    "enabled": True,
    "gpus": 0,
    "gpuType": "cpu",
    "maxModelLen": 256,
    "extraArgs": VLLM_CPU_ARGS,
}


def _vllm_installed() -> bool:
    return (REPO / ".venv-vllm" / "bin" / "python").exists()


def _dpo(jobs: Jobs) -> None:
    jobs.create(
        DPO,
        objective="dpo",
        dataset={"train": jobs.assets["preference"], "test": jobs.assets["preference-test"]},
        hyperparameters={"maxSteps": DPO_STEPS},
        evaluation={
            **EVALUATION,
            "metrics": ["exact_match", "token_f1"],  # token_f1: what the serving check compares for dpo
            "thresholds": [{"metric": "preference_accuracy", "min": 0.9}],
        },
        # without vllm-cpu the other three jobs still run; the DPO test skips
        deployment=SERVE_ON_CPU if _vllm_installed() else {"enabled": False},
    )


def _kto(jobs: Jobs) -> None:
    jobs.create(
        KTO,
        objective="kto",
        dataset={"train": jobs.assets["unpaired"], "test": jobs.assets["unpaired-test"]},
        hyperparameters={"maxSteps": KTO_STEPS},
        evaluation=EVALUATION,
    )


def _grpo(jobs: Jobs) -> None:
    jobs.create(
        GRPO,
        objective="grpo",
        dataset={"train": jobs.assets["prompts"], "test": jobs.assets["prompts-test"]},
        hyperparameters={
            "maxSteps": GRPO_STEPS,
            "learningRate": 1e-2,
            "numGenerations": GENERATIONS,
            "maxCompletionLength": 4,
        },
        evaluation={**EVALUATION, "graders": [ONE_CAPITAL]},
        rewards=[{"grader": ONE_CAPITAL["name"], "weight": 1.0}],
    )


@pytest.fixture(scope="module")
def objective_jobs(local_cluster: Any, lc_api: Any, s3_assets: dict[str, str]) -> Iterator[Jobs]:
    """The four jobs, created at once in a namespace of this module's."""
    from kubernetes import client

    namespace = f"objectives-{secrets.token_hex(4)}"
    core = client.CoreV1Api(lc_api)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        prepare_namespace(local_cluster, lc_api, namespace)
        jobs = Jobs(lc_api, namespace, s3_assets)
        jobs.create(BAD, objective="dpo", dataset={"train": s3_assets["bad-preference"], "test": None})
        for start in (_dpo, _grpo, _kto):
            start(jobs)
        yield jobs
    finally:
        if os.environ.get("E2E_KEEP"):
            print(f"kept namespace {namespace}")
        else:
            with contextlib.suppress(Exception):  # best-effort cleanup, as lc_namespace's
                core.delete_namespace(namespace, propagation_policy="Background", grace_period_seconds=0)


def _of(jobs: Jobs, job: str, kind: str, component: str | None = None) -> list[dict[str, Any]]:
    """The job's children of `kind` (of one stage)."""
    selector = f"app.kubernetes.io/instance={job}"
    return jobs.list(kind, selector + (f",app.kubernetes.io/component={component}" if component else ""))


def test_a_preference_set_with_a_malformed_line_fails_validation_naming_it(objective_jobs: Jobs) -> None:
    status = objective_jobs.wait_phase(BAD, "Failed", "Succeeded", "Serving", timeout=240)
    assert status["phase"] == "Failed", status
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert (validated["status"], validated["reason"]) == ("False", "InvalidDataset"), status
    message = status["message"]
    assert f"line {preference.BAD_PREFERENCE_LINE}" in message and "rejected" in message, message
    stages = {j["metadata"]["labels"]["app.kubernetes.io/component"] for j in _of(objective_jobs, BAD, "Job")}
    assert stages == {"validate"}, stages
    pods = {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in _of(objective_jobs, BAD, "Pod")}
    assert pods == {"validate"}, pods


def test_a_kto_job_succeeds(objective_jobs: Jobs) -> None:
    status = objective_jobs.wait_phase(KTO, "Succeeded", "Failed", "Rejected", timeout=600)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == KTO_STEPS
    tuned, base = status["evaluation"]["tuned"], status["evaluation"]["base"]
    # ~0.85 after 100 steps (the toy recipe); the base, being the reference, ties every example (0.5)
    assert tuned["preference_accuracy"] >= base["preference_accuracy"] + 0.2, status["evaluation"]
    accuracy = (tuned["preference_accuracy"], base["preference_accuracy"])
    print(f"\nkto: preference_accuracy tuned {accuracy[0]} vs base {accuracy[1]}")


def _progress_lines(jobs: Jobs, job: str) -> list[dict[str, Any]]:
    from kubernetes import client

    core = client.CoreV1Api(jobs.api)
    lines: list[dict[str, Any]] = []
    for pod in _of(jobs, job, "Pod", "train"):
        log = core.read_namespaced_pod_log(pod["metadata"]["name"], jobs.namespace)
        lines += [json.loads(x) for x in log.splitlines() if '"event": "progress"' in x]
    return lines


def test_grpo_with_a_string_check_reward_raises_the_reward_and_reports_it_per_step(
    objective_jobs: Jobs,
) -> None:
    jobs = objective_jobs
    status = jobs.wait_phase(GRPO, "Succeeded", "Failed", "Rejected", timeout=600)
    assert status["phase"] == "Succeeded", status
    evaluation = status["evaluation"]
    tuned, base = evaluation["tuned"], evaluation["base"]
    # the base answers lowercase letters (greedy): "one capital" is what the rewards taught
    assert base["reward"] <= 0.2 and tuned["reward"] >= base["reward"] + 0.5, evaluation
    assert tuned["one-capital"] == tuned["reward"], evaluation  # one reward grader of weight 1
    rewards = [(p["step"], p["reward"]) for p in _progress_lines(jobs, GRPO) if p.get("reward") is not None]
    steps = [s for s, _ in rewards]
    assert len(set(steps)) >= 3 and steps[-1] == GRPO_STEPS, rewards
    assert all(0.0 <= r <= 1.0 for _, r in rewards), rewards
    assert rewards[-1][1] > rewards[0][1], rewards  # the training reward rose as it was logged
    assert status["progress"]["reward"] == rewards[-1][1], status["progress"]
    print(f"\ngrpo: reward tuned {tuned['reward']} vs base {base['reward']}; per logged step {rewards}")


@pytest.mark.vllm
def test_a_dpo_job_is_served_and_answers_with_the_chosen_label(
    objective_jobs: Jobs, local_cluster: Any
) -> None:
    if not _vllm_installed():
        pytest.skip("vllm-cpu is not installed (make vllm-venv)")
    jobs = objective_jobs
    status = jobs.wait_phase(DPO, "Serving", "Failed", "Rejected", timeout=840)
    assert status["phase"] == "Serving", status
    evaluation = status["evaluation"]
    tuned, base = evaluation["tuned"], evaluation["base"]
    # the base is the reference: its implicit reward is 0 for both sides, every pair a tie (counted 1/2)
    assert tuned["preference_accuracy"] >= 0.9 and abs(base["preference_accuracy"] - 0.5) <= 0.05, evaluation
    assert tuned["reward_margin"] > 0 and evaluation["passed"] is True, evaluation
    assert_served_as_evaluated(status, "token_f1")  # preference figures need the weights: token_f1 instead
    progress = status["progress"]
    assert progress["rewardsMargin"] > 0 and progress["rewardsChosen"] > progress["rewardsRejected"], progress
    _, test = preference.toy_preference_task()
    asked = test[:5]
    answers = [
        _chat(local_cluster, jobs.namespace, status, r["prompt"][-1]["content"]).strip() for r in asked
    ]
    chosen = [r["chosen"][0]["content"] for r in asked]
    rejected = [r["rejected"][0]["content"] for r in asked]
    # 0.9-0.95 of held-out answers are right when tuned this way: 4 of 5, and never the rejected side
    assert sum(a == c for a, c in zip(answers, chosen, strict=True)) >= 4, (answers, chosen)
    assert not any(a == r for a, r in zip(answers, rejected, strict=True)), (answers, rejected)
    print(
        f"\ndpo: preference_accuracy tuned {tuned['preference_accuracy']} vs base "
        f"{base['preference_accuracy']}, reward_margin {tuned['reward_margin']}; exact_match tuned "
        f"{tuned.get('exact_match')} vs base {base.get('exact_match')}; served answers {answers} "
        f"(chosen {chosen})"
    )
