"""Every example loads through the models and the CRD (schema + CEL), and means what its name says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_demo import toymodel
from finetune_operator.api.crdgen import build_crd
from finetune_operator.api.finetunejob import FineTuneJob, parse_finetunejob, spec_to_dict
from finetune_operator.serving_contract import pool_url
from localcluster.crdvalidation import CRDValidator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
POLICY = "policy.yaml"  # a FineTunePolicy
SERVER = "model-server.yaml"  # a ModelServer and a FineTuneJob attached to it
SCHEDULE = "finetuneschedule.yaml"  # a FineTuneSchedule (issue 24)
NOT_JOBS = (POLICY, SERVER, SCHEDULE)  # every other example is one FineTuneJob
EXPECTED = {
    POLICY,
    SCHEDULE,
    "demo.yaml",
    "lora-mistral-small-3-a100-80gb.yaml",
    "qlora-a100-40gb.yaml",
    "full-finetune-4xa100.yaml",
    "kueue-queued.yaml",
    "multi-node-full-finetune-2x8xa100.yaml",
    "graded-job.yaml",
    "dpo-job.yaml",
    "kto-job.yaml",
    "grpo-job.yaml",
}


@pytest.fixture(scope="module")
def validator() -> CRDValidator:
    return CRDValidator(build_crd(), "v1alpha1")


def load(name: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all((EXAMPLES / name).read_text()))
    assert len(docs) == 1
    return dict(docs[0])


def admitted(name: str, validator: CRDValidator) -> FineTuneJob:
    obj = load(name)
    stored = validator.admit(obj)
    job = parse_finetunejob(stored)
    assert parse_finetunejob(obj).spec == job.spec
    parsed = spec_to_dict(job.spec)
    if "gpus" not in stored["spec"]["deployment"]:  # its default follows the GPU type: the model's alone
        parsed["deployment"].pop("gpus")
    assert parsed == stored["spec"], "model and CRD defaults differ"
    return job


def test_the_expected_examples_exist() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} >= EXPECTED


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name not in NOT_JOBS))
def test_example_is_accepted_by_models_and_crd(name: str, validator: CRDValidator) -> None:
    job = admitted(name, validator)
    assert job.metadata.name and len(job.metadata.name) <= 63


def test_demo_runs_on_cpu(validator: CRDValidator) -> None:
    spec = admitted("demo.yaml", validator).spec
    assert spec.resources.gpus == 0 and spec.resources.gpu_type == "cpu"
    assert spec.base_model.uri == "s3://finetune-demo/models/tiny-llama"
    assert spec.dataset.train == "s3://finetune-demo/data/train.jsonl"
    assert (
        spec.storage.output == "s3://finetune-demo/runs"
        and spec.storage.credentials_secret == "s3-credentials"
    )
    # the toy recipe (finetune_demo.toymodel): a few epochs over the data, no step cap that cuts them short
    assert spec.method == "lora" and spec.hyperparameters.max_steps is None
    hp = toymodel.TOY_HYPERPARAMETERS
    assert spec.hyperparameters.epochs == hp["epochs"] and spec.hyperparameters.batch_size == hp["batchSize"]
    assert spec.evaluation.thresholds and spec.evaluation.thresholds[0].metric == "exact_match"
    assert spec.evaluation.thresholds[0].min is not None and spec.evaluation.thresholds[0].min >= 0.9
    assert spec.deployment.enabled and spec.deployment.mode == "adapter" and spec.deployment.gpus == 0
    # serving on CPU follows from training on CPU: the example need not say gpus 0 twice
    assert "gpus" not in load("demo.yaml")["spec"]["deployment"]


def test_gpu_examples(validator: CRDValidator) -> None:
    lora = admitted("lora-mistral-small-3-a100-80gb.yaml", validator).spec
    assert lora.method == "lora" and lora.resources.gpus == 1 and lora.resources.gpu_type == "a100-80gb"
    assert "Mistral-Small" in lora.base_model.uri
    qlora = admitted("qlora-a100-40gb.yaml", validator).spec
    assert qlora.method == "qlora" and qlora.resources.gpus == 1 and qlora.resources.gpu_type == "a100-40gb"
    full = admitted("full-finetune-4xa100.yaml", validator).spec
    assert full.method == "full" and full.resources.gpus == 4 and full.deployment.mode == "merged"


def test_multi_node_example(validator: CRDValidator) -> None:
    spec = admitted("multi-node-full-finetune-2x8xa100.yaml", validator).spec
    assert spec.resources.nodes == 2 and spec.resources.gpus == 8 and spec.resources.queue_name
    assert spec.method == "full" and spec.hyperparameters.strategy == "auto"


def test_kueue_example(validator: CRDValidator) -> None:
    spec = admitted("kueue-queued.yaml", validator).spec
    assert spec.resources.queue_name and spec.evaluation.thresholds
    assert spec.deployment.enabled is False


def test_graded_example_gates_on_its_own_graders(validator: CRDValidator) -> None:
    """examples/graded-job.yaml (docs/evaluation.md's worked example): one grader of each type, gated on all
    three, a judge as the primary metric, safety and retention gates, the serving check (keys as stored)."""
    ev = validator.admit(load("graded-job.yaml"))["spec"]["evaluation"]
    graders = {g["name"]: g for g in ev["graders"]}
    assert [g["type"] for g in ev["graders"]] == ["jsonSchema", "stringCheck", "judge"]
    assert {t["metric"] for t in ev["thresholds"]} == set(graders) and ev["primaryMetric"] == "resolves"
    judge = graders["resolves"]["judge"]
    assert judge["modelServer"] and "apiKeySecret" not in judge and "url" not in judge  # no key leaves
    assert ev["safety"]["judge"]["url"].startswith("https://") and ev["safety"]["judge"]["apiKeySecret"]
    assert ev["retention"]["metric"] == "loss" and ev["retention"]["maxDrop"] == 0.05
    check = load("graded-job.yaml")["spec"]["deployment"]["servingCheck"]
    assert check == {"examples": 200, "tolerance": 0.02}


def test_preference_examples_train_on_their_objective_s_format_and_gate_on_its_figure(
    validator: CRDValidator,
) -> None:
    """examples/dpo-job.yaml and kto-job.yaml (docs/objectives.md): LoRA / QLoRA (the adapter-disabled base is
    the reference), the objective's dataset format, gated on held-out preference_accuracy."""
    for name, objective, fmt in (
        ("dpo-job.yaml", "dpo", "preference"),
        ("kto-job.yaml", "kto", "unpaired-preference"),
    ):
        spec = admitted(name, validator).spec
        assert spec.objective == objective and spec.dataset.format == fmt
        assert spec.method in ("lora", "qlora") and spec.hyperparameters.beta is not None
        assert [t.metric for t in spec.evaluation.thresholds] == ["preference_accuracy"]
        assert not spec.rewards and spec.hyperparameters.num_generations is None


def test_grpo_example_is_rewarded_by_the_graders_it_is_gated_on(validator: CRDValidator) -> None:
    """examples/grpo-job.yaml: every reward is a deterministic grader of evaluation.graders, and the gate is
    on `reward`, the weighted mean of the same graders on the held-out prompts."""
    spec = admitted("grpo-job.yaml", validator).spec
    assert spec.objective == "grpo" and spec.dataset.format == "prompt-only"
    graders = {g.name: g for g in spec.evaluation.graders}
    assert spec.rewards and {r.grader for r in spec.rewards} == set(graders)
    assert all(graders[r.grader].deterministic for r in spec.rewards)
    assert [t.metric for t in spec.evaluation.thresholds] == ["reward"]
    hp = spec.hyperparameters
    assert hp.num_generations and hp.max_completion_length and hp.max_completion_length <= hp.max_seq_length


def _judge_servers(evaluation: dict[str, Any]) -> set[str]:
    judges = [(g.get("judge") or {}) for g in evaluation.get("graders") or []]
    judges.append((evaluation.get("safety") or {}).get("judge") or {})
    return {j["modelServer"] for j in judges if j.get("modelServer")}


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml") if p.name not in NOT_JOBS))
def test_trainer_accepts_the_stored_spec(name: str, validator: CRDValidator) -> None:
    """CONTRACT.md: the trainer gets `.spec` as the API server stores it; it must accept every example."""
    trainer_config = pytest.importorskip("finetune_trainer.config")
    stored = validator.admit(load(name))
    document = {
        "runPrefix": f"{stored['spec']['storage']['output']}/default/{stored['metadata']['name']}/uid-1",
        "job": {"namespace": "default", "name": stored["metadata"]["name"], "uid": "uid-1"},
        "spec": stored["spec"],
        # What the operator adds for judges on a ModelServer (finetunejob/builders.model_server_urls).
        "modelServerUrls": {
            server: pool_url(server, "default", 8000)
            for server in _judge_servers(stored["spec"].get("evaluation") or {})
        },
    }
    config = trainer_config.parse_config(json.dumps(document))
    assert config.spec.method == stored["spec"]["method"]
    assert config.spec.hyperparameters.learning_rate == stored["spec"]["hyperparameters"]["learningRate"]


def test_policy_example_loads_and_refuses_what_it_says(validator: CRDValidator) -> None:
    """examples/policy.yaml passes the FineTunePolicy CRD and models, and of the job examples admits the
    LoRA and QLoRA ones (with thresholds) and refuses full fine-tuning on 4 GPUs, naming the rule."""
    from finetune_operator.api.crdgen import FINETUNEPOLICY
    from finetune_operator.api.finetunepolicy import parse_policy
    from finetune_operator.finetunepolicy import enforcement as policy

    obj = load(POLICY)
    stored = CRDValidator(build_crd(FINETUNEPOLICY), "v1alpha1").admit(obj)
    team = parse_policy(stored)
    assert team.name == "team-defaults"
    assert policy.applicable([team], {"tier": "team"}) and not policy.applicable([team], {})
    view = policy.PolicyView((team,))
    lora = admitted("lora-mistral-small-3-a100-80gb.yaml", validator).spec
    assert policy.violation(lora, view) is None
    assert policy.filled_defaults(lora, view) == {"queueName": "team-gpus", "priorityClassName": "batch-low"}
    full = admitted("full-finetune-4xa100.yaml", validator).spec
    assert policy.violation(full, view) == (
        "denied by FineTunePolicy team-defaults: spec.resources.gpus 4 is more than maxGpusPerJob 2"
    )


def test_model_server_example_is_a_pool_and_a_job_attached_to_it(validator: CRDValidator) -> None:
    from finetune_operator.api.crdgen import MODELSERVER
    from finetune_operator.api.finetunejob import parse_spec
    from finetune_operator.api.modelserver import parse_modelserver_spec

    server, job = yaml.safe_load_all((EXAMPLES / SERVER).read_text())
    stored = CRDValidator(build_crd(MODELSERVER), "v1alpha1").admit(server)
    pool = parse_modelserver_spec(stored["spec"])
    spec = parse_spec(validator.admit(job)["spec"])
    assert (
        spec.deployment.server == server["metadata"]["name"] and spec.deployment.model_name == "support-bot"
    )
    assert spec.base_model.uri == pool.base_model.uri and spec.lora.rank <= pool.max_lora_rank


def test_schedule_example_retrains_weekly_and_on_new_examples_against_the_pool() -> None:
    """The example passes the CRD and the operator's own checks (cron, time zone, template) and its runs
    challenge the pool example's model name."""
    from datetime import UTC, datetime, timedelta

    from finetune_operator.api.crdgen import FINETUNESCHEDULE
    from finetune_operator.config import load_config
    from finetune_operator.finetuneschedule.planner import ScheduleObserved, plan_schedule

    schedule = load(SCHEDULE)
    stored = CRDValidator(build_crd(FINETUNESCHEDULE), "v1alpha1").admit(schedule)
    server = next(iter(yaml.safe_load_all((EXAMPLES / SERVER).read_text())))
    server = {**server, "spec": {**server["spec"], "capture": {"destination": "s3://my-bucket/capture"}}}
    monday = datetime(2026, 12, 7, 2, 0, 30, tzinfo=UTC)  # 03:00 in Berlin
    observed = ScheduleObserved(
        "team-a",
        "support-bot-weekly",
        "u",
        1,
        monday - timedelta(days=1),
        stored["spec"],
        {},
        monday,
        server=server,
    )
    planned = plan_schedule(observed, load_config(env={}))
    assert [m["metadata"]["name"] for m in planned.create] == ["support-bot-weekly-1-data"], planned.status
    assert planned.status["lastScheduleTime"] == "2026-12-07T02:00:00Z"  # the cron run, not the trigger
    source = stored["spec"]["dataset"]["fromCapture"]
    assert source["modelServer"] == server["metadata"]["name"] and source["model"] in server["spec"]["models"]
