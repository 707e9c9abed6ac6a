"""The pure state machine, driven through whole pipelines: each step observes a small simulated world
(children with the statuses the Job/Deployment controllers would set), applies the plan, and checks what a
user sees in the status and Events."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from finetune_operator.api.conditions import Reason
from finetune_operator.api.finetunejob_status import Stage
from finetune_operator.api.modelserver import parse_modelserver_spec
from finetune_operator.config import load_config
from finetune_operator.finetunejob.plan import Observed, Plan
from finetune_operator.finetunejob.planner import plan
from finetune_operator.finetunejob.ref import JobRef
from finetune_operator.finetunepolicy.enforcement import PolicyView
from finetune_operator.k8s.actions import Event
from finetune_operator.modelserver.builders import PoolRef
from finetune_operator.modelserver.planner import PoolObserved, plan_pool

from .ftj_factory import job, pending_pod, terminated_pod, with_status

CONFIG = load_config(env={})
NOW = datetime(2026, 1, 1, 2, 0, 0, tzinfo=UTC)
VALID = {
    "stage": "validate",
    "exitCode": 0,
    "reason": "OK",
    "message": "ok",
    "summary": {
        "format": "chat",
        "train": 900,
        "validation": 0,
        "test": 100,
        "trainTokens": 3_240_000,
        "removed": {"duplicate": 3},
        "errors": {},
    },
}
TRAINED = {
    "stage": "train",
    "exitCode": 0,
    "reason": "OK",
    "message": "done",
    "summary": {
        "step": 200,
        "totalSteps": 200,
        "loss": 0.42,
        "adapter": "s3://runs/out/a/model/adapter/",
        "merged": None,
    },
}
EVAL_GOOD = {
    "stage": "evaluate",
    "exitCode": 0,
    "summary": {
        "tuned": {"loss": 0.5, "perplexity": 1.6},
        "base": {"loss": 2.0, "perplexity": 7.4},
        "n": 100,
    },
}
EVAL_BAD = {
    "stage": "evaluate",
    "exitCode": 0,
    "summary": {
        "tuned": {"loss": 2.2, "perplexity": 9.0},
        "base": {"loss": 2.0, "perplexity": 7.4},
        "n": 100,
    },
}


@dataclass
class World:
    ref: JobRef
    status: dict[str, Any] = field(default_factory=dict)
    children: dict[Stage, dict[str, Any]] = field(default_factory=dict)
    service: dict[str, Any] | None = None
    pods: dict[Stage, list[dict[str, Any]]] = field(default_factory=dict)
    progress: dict[str, Any] | None = None
    generation: int = 1
    events: list[Event] = field(default_factory=list)
    last: Plan | None = None
    conflicts: dict[tuple[str, str], str] = field(default_factory=dict)
    policy: PolicyView | None = None  # FineTunePolicies selecting the job's namespace (test_policy.py)
    server: dict[str, Any] | None = None  # the job's own ModelServer (or a shared one)
    own_server: dict[str, Any] | None = None  # its own, while spec.deployment.server names a shared one

    def step(self) -> Plan:
        observed = Observed(
            job=self.ref,
            generation=self.generation,
            status=copy.deepcopy(self.status),
            children=self.children,
            service=self.service,
            pods=self.pods,
            progress=self.progress,
            now=NOW,
            conflicts=self.conflicts,
            policy=self.policy,
            server=copy.deepcopy(self.server),
            own_server=copy.deepcopy(self.own_server),
        )
        result = plan(observed, CONFIG)
        for manifest in result.create:
            stage = Stage(manifest["metadata"]["labels"]["app.kubernetes.io/component"])
            if manifest["kind"] == "Service":
                self.service = manifest
            elif manifest["kind"] == "ModelServer":
                self.server = self.created_server(manifest)
            else:
                # As the Job controller has it right after creation: no pods started yet.
                self.children[stage] = (
                    with_status(manifest, start=None) if manifest["kind"] == "Job" else manifest
                )
        for patch in result.patch:
            if patch.kind == "ModelServer" and self.server is not None:
                self.server["metadata"]["annotations"].update(patch.patch["metadata"]["annotations"])
                self.server["spec"].update(patch.patch["spec"])
                continue
            target = next(c for c in self.children.values() if c["metadata"]["name"] == patch.name)
            if patch.patch_type == "merge":
                target["spec"].update(patch.patch["spec"])
        for delete in result.delete:
            if delete.kind == "Service":
                self.service = None
            elif delete.kind == "ModelServer":
                self.server = None
            elif delete.kind == "Job":  # its pods go with it (Background propagation)
                stage = next(s for s, c in self.children.items() if c["metadata"]["name"] == delete.name)
                self.children.pop(stage)
                self.pods.pop(stage, None)
            else:
                self.children.pop(Stage.SERVE, None)
        for key, value in result.status.items():
            if value is None:
                self.status.pop(key, None)
            else:
                self.status[key] = value
        self.events += result.events
        self.last = result
        return result

    def created_server(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """As the reconcile creates it: the status records the child (ownership.py), the API gives a uid."""
        key = f"ModelServer/{manifest['metadata']['name']}"
        self.status["children"] = {**self.status.get("children", {}), key: {"uid": "server-uid"}}
        return {**copy.deepcopy(manifest), "metadata": {**manifest["metadata"], "uid": "server-uid"}}

    def pool_pass(self, ready_replicas: int = 1, starting: list[dict[str, Any]] | None = None) -> None:
        """The ModelServer controller's passes over the job's server (the real pool planner): it registers
        what the job asked for and its ready replicas load it."""
        assert self.server is not None
        meta = self.server["metadata"]
        pool = PoolRef(
            meta["namespace"], meta["name"], meta["uid"], parse_modelserver_spec(self.server["spec"]), meta
        )
        me = {
            "metadata": {"name": self.ref.name, "uid": self.ref.uid, "namespace": self.ref.namespace},
            "spec": {"deployment": {}},
            "status": self.status,
        }
        pods = [
            {
                "metadata": {"name": f"pool-{n}"},
                "status": {
                    "phase": "Running",
                    "podIP": f"10.0.0.{n}",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }
            for n in range(ready_replicas)
        ]
        every = [*pods, *(starting or [])]  # pods that do not start: not reachable, no router state
        observed = PoolObserved(pool, self.server.get("status") or {}, None, None, None, every, {}, [me])
        state = plan_pool(observed, CONFIG).state
        held = {"ready": True, "loaded": dict(state["adapters"]), "routes": dict(state["routes"])}
        replicas = {str(p["metadata"]["name"]): held for p in pods}
        pool_plan = plan_pool(dataclasses.replace(observed, replicas=replicas), CONFIG)
        self.server["status"] = pool_plan.status

    def finish(self, stage: Stage, document: dict[str, Any]) -> None:
        self.children[stage] = with_status(self.children[stage], complete=True, start="2026-01-01T00:00:00Z")
        self.pods[stage] = [terminated_pod(stage.value, 0, document)]

    def fail(
        self,
        stage: Stage,
        reason: str,
        exit_code: int,
        document: dict[str, Any] | str,
        pod_reason: str = "Error",
    ) -> None:
        self.children[stage] = with_status(self.children[stage], failed=reason, failed_pods=1)
        self.pods[stage] = [terminated_pod(stage.value, exit_code, document, reason=pod_reason)]

    @property
    def condition(self) -> dict[str, dict[str, Any]]:
        return {c["type"]: c for c in self.status["conditions"]}


def _quiet(world: World) -> None:
    """Observing an unchanged world again must write nothing (idle writes = 0)."""
    again = world.step()
    assert again.writes == 0, again


def _to_training(world: World) -> None:
    world.step()
    world.finish(Stage.VALIDATE, VALID)
    world.step()


def test_first_visit_creates_only_the_validation_job_and_sets_every_condition() -> None:
    world = World(job())
    first = world.step()
    assert [m["kind"] for m in first.create] == ["Job"]
    assert first.create[0]["metadata"]["name"] == "demo-validate"
    assert first.writes == 3  # the Job, one status patch, one Event
    assert world.status["phase"] == "Validating"
    assert set(world.condition) == {"Validated", "Trained", "Evaluated", "Deployed", "Ready"}
    assert all(c["observedGeneration"] == 1 for c in world.condition.values())
    assert world.status["observedGeneration"] == 1
    assert world.status["startTime"] == "2026-01-01T02:00:00Z"
    assert [(e.type, e.reason) for e in first.events] == [("Normal", "Validating")]
    _quiet(world)


def test_bad_dataset_fails_at_validation_with_the_trainers_message_and_no_gpu_pod() -> None:
    world = World(job(resources={"gpus": 8}))
    world.step()
    world.fail(
        Stage.VALIDATE,
        "PodFailurePolicy",
        10,
        {
            "stage": "validate",
            "exitCode": 10,
            "reason": "INVALID_DATA",
            "message": "train.jsonl line 12: invalid JSON: Expecting ',' delimiter",
        },
    )
    world.step()
    assert world.status["phase"] == "Failed"
    assert world.condition["Validated"]["reason"] == "InvalidDataset"
    assert world.condition["Ready"]["reason"] == "InvalidDataset"
    assert "train.jsonl line 12: invalid JSON" in world.status["message"]
    assert set(world.children) == {Stage.VALIDATE}
    assert world.events[-1].type == "Warning" and world.events[-1].reason == "InvalidDataset"
    assert world.status["completionTime"]
    _quiet(world)


def test_a_kto_datasets_label_balance_reaches_status_dataset() -> None:
    world = World(job())
    world.step()
    summary = {**VALID["summary"], "format": "unpaired-preference"}
    summary["labels"] = {"desirable": 850, "undesirable": 50, "other": 3, "junk": "x"}
    world.finish(Stage.VALIDATE, {**VALID, "summary": summary})
    world.step()
    assert world.status["dataset"]["labels"] == {"desirable": 850, "undesirable": 50}
    assert world.status["dataset"]["format"] == "unpaired-preference"


def test_good_data_records_counts_estimate_and_starts_training_in_the_same_pass() -> None:
    world = World(job())
    _to_training(world)
    assert world.status["dataset"]["train"] == 900
    assert world.status["dataset"]["trainTokens"] == 3_240_000
    # 3.24M tokens x 3 epochs / 3000 tokens/s on a100-80gb = 0.9 GPU-hours
    assert world.status["gpuHoursEstimate"] == pytest.approx(0.9)
    assert world.condition["Validated"]["status"] == "True"
    assert world.status["phase"] == "Training"
    train = world.children[Stage.TRAIN]
    assert train["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    _quiet(world)


def test_planned_optimizer_steps_are_in_status_before_the_first_step() -> None:
    """900 examples, batches of 16, 3 epochs on two GPUs (ranks): ceil(900 / 32) x 3 = 87 steps."""
    world = World(job(resources={"gpus": 2}, hyperparameters={"batchSize": 16, "epochs": 3}))
    _to_training(world)
    progress = world.status["progress"]
    assert (progress["step"], progress["totalSteps"], progress["display"]) == (0, 87, "0/87")
    assert (progress["batching"], progress["examplesPerStep"]) == ("padding-free", 32)


def test_packed_runs_leave_the_step_count_to_the_trainer() -> None:
    world = World(job(hyperparameters={"packing": True}))
    _to_training(world)
    assert not (world.status.get("progress") or {}).get("totalSteps")


def test_unschedulable_training_says_why_once() -> None:
    world = World(job(resources={"gpus": 16}))
    _to_training(world)
    scheduler = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    world.pods[Stage.TRAIN] = [pending_pod(unschedulable=scheduler)]
    result = world.step()
    assert scheduler in world.status["message"]
    assert world.condition["Trained"]["reason"] == "Unschedulable"
    assert world.status["phase"] == "Training"
    assert [(e.type, e.reason) for e in result.events] == [("Warning", "Unschedulable")]
    _quiet(world)


def test_progress_from_the_trainer_line_reaches_status() -> None:
    world = World(job())
    _to_training(world)
    world.progress = {
        "event": "progress",
        "step": 40,
        "totalSteps": 200,
        "epoch": 0.8,
        "loss": 1.23,
        "learningRate": 0.0002,
        "tokensPerSecond": 1234.5,
        "etaSeconds": 96,
    }
    world.step()
    assert world.status["progress"] == {
        "step": 40,
        "totalSteps": 200,
        "etaSeconds": 96,
        "epoch": 0.8,
        "loss": 1.23,
        "learningRate": 0.0002,
        "tokensPerSecond": 1234.5,
        "display": "40/200",
    }
    _quiet(world)


def test_a_complete_job_whose_pod_is_not_seen_ended_yet_waits_for_its_summary() -> None:
    """The Job's watch may run ahead of its pods': the step and adapter come from the pod's termination
    message, so the stage is read once the pod is seen ended, not before (a CI run under load lost them)."""
    world = World(job())
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    pod = world.pods[Stage.TRAIN][0]
    world.pods[Stage.TRAIN] = [{**pod, "status": {"phase": "Running"}}]  # the old pod status, still Running
    world.step()
    assert world.status["phase"] == "Training" and "adapter" not in world.status["artifacts"]
    world.pods[Stage.TRAIN] = [pod]
    world.step()
    assert world.status["progress"]["step"] == TRAINED["summary"]["step"]
    assert world.status["artifacts"]["adapter"] == TRAINED["summary"]["adapter"]


def test_a_complete_two_node_job_waits_for_rank_zero_when_only_rank_one_is_seen_ended() -> None:
    """Rank 1 leaves no summary: a Complete Job whose rank-1 pod is seen Succeeded while rank 0's still looks
    Running is read once rank 0 is seen ended (a CI run under load ended a 2-node job with step 0)."""
    world = World(job())
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    (rank0,) = world.pods[Stage.TRAIN]
    index = "batch.kubernetes.io/job-completion-index"
    rank0 = {**rank0, "metadata": {**rank0["metadata"], "annotations": {index: "0"}}}
    rank1 = terminated_pod(Stage.TRAIN.value, 0, {"message": "", "summary": {}})
    rank1 = {**rank1, "metadata": {**rank1["metadata"], "name": "rank1", "annotations": {index: "1"}}}
    world.pods[Stage.TRAIN] = [{**rank0, "status": {"phase": "Running"}}, rank1]
    world.step()
    assert world.status["phase"] == "Training" and "adapter" not in world.status["artifacts"]
    world.pods[Stage.TRAIN] = [rank0, rank1]
    world.step()
    assert world.status["progress"]["step"] == TRAINED["summary"]["step"]
    assert world.status["artifacts"]["adapter"] == TRAINED["summary"]["adapter"]


@pytest.mark.parametrize(
    ("job_reason", "exit_code", "document", "pod_reason", "reason", "words"),
    [
        (
            "PodFailurePolicy",
            11,
            {"exitCode": 11, "message": "spec.method: qlora needs a GPU"},
            "Error",
            "InvalidConfig",
            ["spec.method"],
        ),
        (
            "PodFailurePolicy",
            12,
            {"exitCode": 12, "message": "CUDA out of memory"},
            "Error",
            "OutOfMemory",
            ["batchSize", "hint"],
        ),
        ("BackoffLimitExceeded", 137, "", "OOMKilled", "OutOfMemory", ["memory limit", "hint"]),
        ("DeadlineExceeded", 143, "", "Error", "DeadlineExceeded", ["deadline"]),
        (
            "BackoffLimitExceeded",
            20,
            {"exitCode": 20, "message": "S3 unreachable"},
            "Error",
            "RetriesExhausted",
            ["S3 unreachable", "exit code 20"],
        ),
    ],
)
def test_training_failures_map_to_reasons(
    job_reason: str, exit_code: int, document: Any, pod_reason: str, reason: str, words: list[str]
) -> None:
    world = World(job())
    _to_training(world)
    message = "Job was active longer than specified deadline" if job_reason == "DeadlineExceeded" else ""
    world.children[Stage.TRAIN] = with_status(
        world.children[Stage.TRAIN], failed=job_reason, failed_pods=1, message=message
    )
    world.pods[Stage.TRAIN] = [terminated_pod("train", exit_code, document, reason=pod_reason)]
    world.step()
    assert world.status["phase"] == "Failed"
    assert world.condition["Trained"]["reason"] == reason
    for word in words:
        assert word in world.status["message"]
    assert Stage.EVALUATE not in world.children
    _quiet(world)


def test_image_pull_failure_fails_and_stops_the_job() -> None:
    world = World(job())
    _to_training(world)
    world.pods[Stage.TRAIN] = [pending_pod(waiting="ImagePullBackOff")]
    result = world.step()
    assert world.status["phase"] == "Failed"
    assert world.condition["Trained"]["reason"] == "ImagePullFailed"
    assert [(p.kind, p.patch) for p in result.patch] == [("Job", {"spec": {"suspend": True}})]


def test_eviction_is_a_counted_retry_with_an_event() -> None:
    world = World(job())
    _to_training(world)
    evicted = terminated_pod(
        "train",
        21,
        {"exitCode": 21, "message": "preempted"},
        conditions=[{"type": "DisruptionTarget", "status": "True"}],
    )
    world.pods[Stage.TRAIN] = [evicted, pending_pod(created="2026-01-01T00:05:00Z")]
    result = world.step()
    assert world.status["retries"] == 1
    assert world.status["phase"] == "Training"
    assert "Retrying" in [e.reason for e in result.events]
    _quiet(world)


def test_suspend_and_resume() -> None:
    world = World(job())
    _to_training(world)
    world.ref = job(suspend=True)
    world.generation = 2
    result = world.step()
    assert [(p.kind, p.name, p.patch) for p in result.patch] == [
        ("Job", "demo-train", {"spec": {"suspend": True}})
    ]
    assert world.status["phase"] == "Suspended"
    assert world.status["observedGeneration"] == 2
    _quiet(world)
    world.ref = job(suspend=False)
    world.generation = 3
    result = world.step()
    assert [p.patch for p in result.patch] == [{"spec": {"suspend": False}}]
    assert world.status["phase"] == "Training"
    assert [e.reason for e in result.events] == ["Training"]


def test_kueue_queued_job_waits_for_admission() -> None:
    world = World(job(resources={"queueName": "gpu-queue"}))
    _to_training(world)
    assert world.children[Stage.TRAIN]["spec"]["suspend"] is True
    world.step()
    assert world.condition["Trained"]["reason"] == "Queued"
    assert "gpu-queue" in world.status["message"]
    assert world.last is not None and world.last.patch == []  # Kueue, not the operator, unsuspends it


def _to_evaluated(world: World, document: dict[str, Any]) -> None:
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    world.finish(Stage.EVALUATE, document)
    world.step()


def test_failed_gate_rejects_with_numbers_and_never_deploys() -> None:
    world = World(job())
    _to_evaluated(world, EVAL_BAD)
    assert world.status["phase"] == "Rejected"
    evaluation = world.status["evaluation"]
    assert evaluation["passed"] is False
    assert evaluation["tuned"] == {"loss": 2.2, "perplexity": 9.0}
    assert evaluation["base"] == {"loss": 2.0, "perplexity": 7.4}
    assert any("loss tuned 2.2 vs base 2" in r for r in evaluation["reasons"])
    assert Stage.SERVE not in world.children and world.service is None
    assert world.events[-1].reason == "GateFailed"
    _quiet(world)


def _pass_serving_check(world: World, value: float = 0.5, metric: str = "token_f1") -> dict[str, Any]:
    """The servecheck Job the planner created once the version was loaded: its FTJ_CONFIG; then it passes."""
    check = world.children[Stage.SERVING_CHECK]
    env = check["spec"]["template"]["spec"]["containers"][0]["env"]
    config: dict[str, Any] = json.loads(next(e["value"] for e in env if e["name"] == "FTJ_CONFIG"))
    summary = {"metric": metric, "value": value, "examples": 100, "refused": 0}
    world.finish(Stage.SERVING_CHECK, {"stage": "servecheck", "exitCode": 0, "summary": summary})
    world.step()
    return config


def test_happy_path_to_serving_then_idle() -> None:
    """Issue 21: the job is served by a ModelServer of its own, which hot-loads its adapter under the
    job's served name; the job is Serving once every ready replica holds it, at the pool's endpoint."""
    world = World(job(deployment={"servedModelName": "toy-bot"}))
    _to_evaluated(world, EVAL_GOOD)
    assert world.status["phase"] == "Deploying"
    assert world.status["artifacts"]["adapter"] == "s3://runs/out/a/model/adapter/"
    assert world.status["evaluation"]["passed"] is True
    assert world.server is not None and world.server["metadata"]["name"] == "demo-serve"
    assert world.server["metadata"]["ownerReferences"][0]["uid"] == world.ref.uid
    assert Stage.SERVE not in world.children and world.service is None  # no per-job Deployment any more
    world.step()
    assert world.status["serving"] == {"server": "demo-serve", "modelName": "toy-bot", "state": "Accepted"}
    assert world.status["phase"] == "Deploying" and world.status.get("endpoint") is None
    world.pool_pass(ready_replicas=1)
    world.step()
    # Loaded, not routed: the serving check runs first (issue 22), nothing is published meanwhile.
    assert world.status["phase"] == "Deploying" and world.status.get("endpoint") is None
    assert world.condition["Deployed"]["reason"] == "CheckingServing"
    assert world.server is not None and world.server["status"]["models"]["toy-bot"].get("promoted") is None
    url = "http://demo-serve-pool.team-a.svc:8000/v1"
    config = _pass_serving_check(world)
    assert config["servingCheck"] == {
        "url": url,
        "model": "toy-bot-v1",
        "metric": "token_f1",
        "examples": 200,
    }
    assert world.status["serving"]["checked"] is True
    assert world.status["evaluation"]["served"] == {"token_f1": 0.5, "examples": 100, "refused": 0}
    assert world.status["phase"] == "Deploying" and world.status.get("endpoint") is None  # not promoted yet
    world.pool_pass(ready_replicas=1)
    world.step()
    assert world.status["phase"] == "Serving", world.status
    assert world.status["endpoint"] == {"url": url, "model": "toy-bot"}
    assert world.condition["Ready"]["status"] == "True"
    assert world.status["gpuHours"] == pytest.approx(2.0)  # 1 GPU x (1 h training + 1 h evaluation)
    phases = [e.message.split(":")[0] for e in world.events]
    assert phases == ["Validating", "Training", "Evaluating", "Deploying", "Serving"]
    _quiet(world)

    # A change to the deployment section patches the job's ModelServer (its pool rolls out).
    world.ref = job(deployment={"servedModelName": "toy-bot", "replicas": 2})
    world.generation = 2
    result = world.step()
    assert [(p.kind, p.patch_type) for p in result.patch] == [("ModelServer", "merge")]
    assert result.patch[0].patch["spec"] == {"replicas": 2}


def test_a_serving_pod_that_cannot_pull_its_image_fails_the_job_naming_kubelets_cause() -> None:
    """Issue 20 on the one serving path: kubelet's retried ErrImagePull keeps the job Deploying with its
    message; once kubelet gives up (ImagePullBackOff) the job's own pool says Ready=False ImagePullFailed and
    the job fails with that reason and kubelet's message, in its condition and a Warning Event."""
    world = World(job())
    _to_evaluated(world, EVAL_GOOD)
    world.step()
    world.pool_pass(ready_replicas=0, starting=[pending_pod(waiting="ErrImagePull")])
    world.step()
    assert world.status["phase"] == "Deploying"
    assert "ErrImagePull: pull failed" in world.condition["Deployed"]["message"]
    world.pool_pass(ready_replicas=0, starting=[pending_pod(waiting="ImagePullBackOff")])
    assert world.server is not None
    ready = {c["type"]: c for c in world.server["status"]["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "ImagePullFailed")
    world.step()
    assert world.status["phase"] == "Failed"
    deployed = world.condition["Deployed"]
    assert (deployed["status"], deployed["reason"]) == ("False", "ImagePullFailed")
    assert deployed["message"] == "container trainer: ImagePullBackOff: pull failed"
    assert world.status.get("endpoint") is None
    assert any(e.type == "Warning" and e.reason == "ImagePullFailed" for e in world.events)


def test_deployment_disabled_after_serving_deletes_the_jobs_own_server() -> None:
    world = World(job())
    _to_evaluated(world, EVAL_GOOD)
    assert world.server is not None
    world.ref = job(deployment={"enabled": False})
    world.generation = 2
    result = world.step()
    assert [(d.kind, d.name) for d in result.delete] == [("ModelServer", "demo-serve")]
    assert world.status["phase"] == "Succeeded" and world.server is None


def test_a_job_moved_to_a_shared_server_deletes_its_own_one() -> None:
    """Its own ModelServer's GPUs are not kept once spec.deployment.server names a shared pool; a ModelServer
    of that name that the job did not create (not recorded in its status) is left alone."""
    world = World(job())
    _to_evaluated(world, EVAL_GOOD)
    own = world.server
    assert own is not None
    world.ref = job(deployment={"server": "shared", "modelName": "bot"})
    world.generation = 2
    world.server, world.own_server = None, own
    result = world.step()
    assert ("ModelServer", "demo-serve") in [(d.kind, d.name) for d in result.delete]
    assert world.status["phase"] == "Deploying"  # waiting for the shared one
    foreign = copy.deepcopy(own)
    foreign["metadata"]["uid"] = "someone-else"
    world.own_server = foreign
    world.status["children"] = {}
    assert ("ModelServer", "demo-serve") not in [(d.kind, d.name) for d in world.step().delete]


def test_an_upgrade_replaces_the_per_job_deployment_and_service_with_the_jobs_server() -> None:
    """An operator from before issue 21 left a Serving job with its own vLLM Deployment and Service: they
    are deleted once and the job's ModelServer is created in their place."""
    world = World(job())
    _to_evaluated(world, EVAL_GOOD)
    world.server = None  # as the old operator left it: a Deployment and a Service, no ModelServer
    world.status["children"].pop("ModelServer/demo-serve")
    old = {"kind": "Deployment", "metadata": {"name": "demo-serve", "labels": {}}, "spec": {}}
    world.children[Stage.SERVE] = old
    world.service = {"kind": "Service", "metadata": {"name": "demo-serve"}}
    world.status["phase"] = "Serving"
    result = world.step()
    assert sorted((d.kind, d.name) for d in result.delete) == [
        ("Deployment", "demo-serve"),
        ("Service", "demo-serve"),
    ]
    assert [m["kind"] for m in result.create] == ["ModelServer"]
    assert Stage.SERVE not in world.children and world.service is None and world.server is not None
    assert world.step().delete == []  # once


def test_deployment_disabled_ends_in_succeeded_and_removes_serving() -> None:
    world = World(job(deployment={"enabled": False}))
    _to_evaluated(world, EVAL_GOOD)
    assert world.status["phase"] == "Succeeded"
    assert Stage.SERVE not in world.children
    assert world.condition["Deployed"]["reason"] == "DeploymentDisabled"
    _quiet(world)


def test_merged_serving_of_a_lora_run_exports_first() -> None:
    world = World(job(deployment={"mode": "merged"}))
    _to_evaluated(world, EVAL_GOOD)
    assert Stage.EXPORT in world.children and world.server is None
    assert world.condition["Deployed"]["reason"] == "Exporting"
    world.finish(Stage.EXPORT, {"stage": "export", "exitCode": 0, "summary": {"merged": "s3://runs/m/"}})
    world.step()
    assert world.server is not None
    assert world.server["spec"]["baseModel"] == {"uri": "s3://runs/m"}  # the merged weights, no adapter
    assert world.server["spec"]["servedModelName"] == "demo"
    assert world.status["artifacts"]["merged"] == "s3://runs/m/"
    world.step()
    assert world.status["phase"] == "Deploying"
    world.pool_pass(ready_replicas=1)
    world.step()
    assert world.status["phase"] == "Deploying" and world.status.get("endpoint") is None
    config = _pass_serving_check(world)
    assert config["servingCheck"]["model"] == "demo"  # the served name of the merged weights
    assert world.status["phase"] == "Serving"
    assert world.status["endpoint"] == {"url": "http://demo-serve-pool.team-a.svc:8000/v1", "model": "demo"}
    assert "state" not in world.status["serving"]  # nothing for the pool to load: no version registered
    assert (world.server.get("status") or {}).get("models") is None


def test_evaluation_disabled_goes_straight_to_deploying() -> None:
    world = World(job(evaluation={"enabled": False}))
    _to_training(world)
    world.finish(Stage.TRAIN, TRAINED)
    world.step()
    assert Stage.EVALUATE not in world.children
    assert world.condition["Evaluated"]["reason"] == "EvaluationDisabled"
    assert world.status["phase"] == "Deploying"


def test_unknown_gpu_type_fails_with_invalid_config() -> None:
    world = World(job(resources={"gpuType": "tpu-v5"}))
    _to_training(world)
    assert world.status["phase"] == "Failed"
    assert world.condition["Ready"]["reason"] == "InvalidConfig"
    assert "tpu-v5" in world.status["message"]


def test_storage_output_changed_mid_training_fails_naming_the_field_not_the_dataset() -> None:
    world = World(job())
    _to_training(world)
    run_prefix = world.status["artifacts"]["runPrefix"]
    # the CRD refuses this update; an API server without the rule (or an old CRD) lets it through
    world.ref = job(storage={"output": "s3://elsewhere/runs"})
    world.generation = 2
    world.step()
    assert world.status["phase"] == "Failed"
    assert world.condition["Validated"]["status"] == "True"
    trained = world.condition["Trained"]
    assert (trained["status"], trained["reason"]) == ("False", "InvalidConfig")
    assert "storage.output changed" in trained["message"] and run_prefix in trained["message"]
    assert world.status["artifacts"]["runPrefix"] == run_prefix
    assert set(world.children) == {Stage.VALIDATE, Stage.TRAIN}


def test_every_reason_used_is_in_the_closed_set() -> None:
    reasons = {r.value for r in Reason}
    world = World(job())
    _to_evaluated(world, EVAL_BAD)
    for condition in world.status["conditions"]:
        assert condition["reason"] in reasons


def test_retries_count_evictions_the_job_counter_ignores_and_ordinary_failures() -> None:
    world = World(job())
    _to_training(world)
    world.children[Stage.TRAIN] = with_status(world.children[Stage.TRAIN], active=1, failed_pods=1)
    observed = Observed(
        job=world.ref,
        generation=1,
        status=world.status,
        children=world.children,
        pods={},
        now=NOW,
        disrupted=frozenset({"evicted-pod-uid"}),
    )
    result = plan(observed, CONFIG)
    # One eviction (already deleted, remembered by the operator) + one crash the Job controller counted.
    assert result.status["retries"] == 2


def test_a_serving_name_held_by_a_foreign_object_waits_with_its_message() -> None:
    """Issue 9, item 5: the planner is told which (kind, name) is taken and neither creates the Service nor
    the Deployment; the job waits in Pending with reason ChildConflict; it deploys once the name is free."""
    world = World(job())
    message = "ModelServer team-a/demo-serve exists and is not controlled by this FineTuneJob: ..."
    world.conflicts = {("ModelServer", "demo-serve"): message}
    _to_evaluated(world, EVAL_GOOD)
    assert world.last is not None and world.last.create == []
    assert world.status["phase"] == "Pending" and world.status["message"] == message
    assert world.condition["Deployed"]["reason"] == "ChildConflict"
    assert world.condition["Ready"]["reason"] == "ChildConflict"
    assert [(e.type, e.reason) for e in world.events][-1] == ("Warning", "ChildConflict")
    _quiet(world)
    world.conflicts = {}
    result = world.step()
    assert sorted(m["kind"] for m in result.create) == ["ModelServer"]
    assert world.status["phase"] == "Deploying"


def test_a_modelserver_named_like_the_jobs_own_but_not_recorded_is_a_conflict_not_a_server() -> None:
    """A pre-created `<job>-serve` ModelServer naming the job as its controller (not in status.children)
    is never served on nor patched: the job waits in Pending naming it (ChildConflict)."""
    world = World(job())
    _to_evaluated(world, EVAL_GOOD)
    assert world.server is not None
    world.status["children"].pop("ModelServer/demo-serve")  # as if someone else had created it
    result = world.step()
    assert result.create == [] and result.patch == [] and result.delete == []
    assert world.status["phase"] == "Pending"
    assert world.condition["Deployed"]["reason"] == "ChildConflict"
    message = world.status["message"]
    assert "ModelServer team-a/demo-serve exists and was not created by the operator" in message
