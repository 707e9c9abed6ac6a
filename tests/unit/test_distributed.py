"""Multi-GPU / multi-node training: the spec's rules, the strategy auto chooses, the Indexed Job and headless
Service (valid for Kubernetes 1.32-1.37), GPU-hours and which pod speaks for the run."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from finetune_operator.api.finetunejob import parse_spec
from finetune_operator.api.schema import NODES_NEED_GPUS, QLORA_NO_FSDP, SpecError
from finetune_operator.config import load_config
from finetune_operator.finetunejob import accounting, builders, distributed
from finetune_operator.k8s.naming import is_dns1035_label

from .ftj_factory import job, spec

CONFIG = load_config(env={})
K8S_VERSIONS = ("1.32", "1.33", "1.34", "1.35", "1.36", "1.37")


def _env(manifest: dict[str, Any]) -> dict[str, str]:
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def _rendered(**resources: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    ref = job(resources={"gpus": 4, "nodes": 2, **resources})
    train = builders.training_job(ref, CONFIG)
    return train, distributed.headless_service(ref)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_indexed_job_and_headless_service_pass_the_kubernetes_schema(version: str) -> None:
    train, service = _rendered()
    kubernetes_validate.validate(train, version, strict=True)
    kubernetes_validate.validate(service, version, strict=True)


def test_several_nodes_make_an_indexed_job_whose_pods_find_rank_zero() -> None:
    train, service = _rendered()
    spec_ = train["spec"]
    assert (spec_["completionMode"], spec_["completions"], spec_["parallelism"]) == ("Indexed", 2, 2)
    name = train["metadata"]["name"]
    pod = spec_["template"]["spec"]
    assert pod["subdomain"] == name == service["metadata"]["name"]
    env = _env(train)
    assert env["FTJ_NNODES"] == "2" and env["FTJ_NPROC_PER_NODE"] == "4"
    assert env["FTJ_MASTER_ADDR"] == f"{name}-0.{name}" and env["FTJ_MASTER_PORT"] == "29500"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    # every pod of the run fails together: the same retry budget and failure policy as one pod
    rules = spec_["podFailurePolicy"]["rules"]
    assert spec_["backoffLimit"] == 3 and rules[0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    # a rank that stopped because its gang was disrupted (checkpointed, exit 21) is not a second retry
    assert rules[1] == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [21]},
    }
    assert rules[2]["action"] == "FailJob"
    # the headless Service selects exactly the training pods and publishes them before they are Ready
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    labels = spec_["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "train"
    assert service["metadata"]["ownerReferences"] == train["metadata"]["ownerReferences"]
    # the trainer sees the resolved strategy, never auto
    assert json.loads(env["FTJ_CONFIG"])["spec"]["hyperparameters"]["strategy"] == "ddp"


def test_one_node_several_gpus_is_one_pod_with_torchrun_processes() -> None:
    train = builders.training_job(job(resources={"gpus": 8}), CONFIG)
    assert "completionMode" not in train["spec"] and "subdomain" not in train["spec"]["template"]["spec"]
    assert _env(train)["FTJ_NPROC_PER_NODE"] == "8" and "FTJ_NNODES" not in _env(train)
    single = builders.training_job(job(), CONFIG)
    assert "FTJ_NPROC_PER_NODE" not in _env(single)


def test_pod_hostnames_of_a_long_job_name_stay_dns_labels() -> None:
    ref = job(name="a" * 60, resources={"gpus": 1, "nodes": 16})
    name = builders.training_job(ref, CONFIG)["metadata"]["name"]
    assert is_dns1035_label(f"{name}-15") and name.endswith("-train")
    other = builders.training_job(job(name="a" * 61, resources={"gpus": 1, "nodes": 16}), CONFIG)
    assert other["metadata"]["name"] != name


@pytest.mark.parametrize(
    ("overrides", "path", "message"),
    [
        ({"resources": {"gpus": 0, "gpuType": "cpu", "nodes": 2}}, "spec.resources.nodes", NODES_NEED_GPUS),
        ({"resources": {"gpus": 1, "gpuType": "cpu", "nodes": 2}}, "spec.resources.nodes", NODES_NEED_GPUS),
        (
            {"method": "qlora", "hyperparameters": {"strategy": "fsdp"}},
            "spec.hyperparameters.strategy",
            QLORA_NO_FSDP,
        ),
        ({"resources": {"nodes": 17}}, "spec.resources.nodes", "less than or equal to 16"),
        (
            {"hyperparameters": {"strategy": "zero3"}},
            "spec.hyperparameters.strategy",
            "'auto', 'ddp' or 'fsdp'",
        ),
    ],
)
def test_refused_specs_name_the_field(overrides: dict[str, Any], path: str, message: str) -> None:
    raw = spec()
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    with pytest.raises(SpecError) as caught:
        parse_spec(raw)
    assert any(p == path and message in m for p, m in caught.value.errors), caught.value.errors


def test_crd_carries_the_same_rules_as_cel() -> None:
    from finetune_operator.api.crdgen import build_crd

    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = {r["message"]: r for r in schema["x-kubernetes-validations"]}
    assert rules[NODES_NEED_GPUS]["fieldPath"] == ".resources.nodes"
    assert rules[QLORA_NO_FSDP]["fieldPath"] == ".hyperparameters.strategy"
    assert schema["properties"]["resources"]["properties"]["nodes"]["maximum"] == 16


@pytest.mark.parametrize(
    ("method", "uri", "gpu_type", "strategy", "why"),
    [
        ("lora", "s3://models/Llama-3-70B", "a100-80gb", "ddp", "adapter"),
        ("full", "s3://models/Qwen2.5-1.5B-Instruct", "a100-80gb", "ddp", "within one GPU"),
        ("full", "s3://models/Mistral-7B-v0.3", "a100-80gb", "fsdp", "more than one GPU's 80 GiB"),
        ("full", "s3://models/SmolLM2-135M", "a100-40gb", "ddp", "within one GPU"),
        ("full", "s3://models/tiny-llama", "a100-80gb", "fsdp", "does not state"),
    ],
)
def test_auto_strategy_from_gpu_memory_and_model_size(
    method: str, uri: str, gpu_type: str, strategy: str, why: str
) -> None:
    ref = job(method=method, baseModel={"uri": uri}, resources={"gpus": 4, "gpuType": gpu_type})
    chosen = distributed.parallelism(ref.spec, CONFIG.gpu_type(gpu_type))
    assert chosen.strategy == strategy and why in chosen.describe(), chosen.describe()
    assert chosen.describe().startswith(f"{strategy} over 4 ranks")


def test_explicit_strategy_and_one_process() -> None:
    ref = job(method="full", hyperparameters={"strategy": "ddp"}, resources={"gpus": 2, "nodes": 2})
    chosen = distributed.parallelism(ref.spec, CONFIG.gpu_type("a100-80gb"))
    assert (chosen.strategy, chosen.ranks) == ("ddp", 4)
    assert chosen.describe() == "ddp over 2 nodes x 2 ranks: hyperparameters.strategy ddp"
    one = distributed.parallelism(job().spec, CONFIG.gpu_type("a100-80gb"))
    assert (one.strategy, one.describe()) == ("none", "one process")


def test_gpu_hours_count_nodes_times_gpus() -> None:
    from datetime import UTC, datetime

    from finetune_operator.api.finetunejob_status import Stage
    from finetune_operator.finetunejob.plan import Observed

    started = {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T01:00:00Z"}
    observed = Observed(
        job=None,
        generation=1,
        status={},
        now=datetime(2026, 1, 1, 2, tzinfo=UTC),
        children={Stage.TRAIN: {"status": started}},
    )
    assert accounting.gpu_hours_spent(observed, job(resources={"gpus": 4, "nodes": 2}).spec) == 8.0
    assert accounting.gpu_hours_spent(observed, job(resources={"gpus": 4}).spec) == 4.0


def test_rank_zero_speaks_for_the_run() -> None:
    def pod(index: str, created: str) -> dict[str, Any]:
        annotations = {"batch.kubernetes.io/job-completion-index": index}
        return {"metadata": {"name": f"p{index}", "annotations": annotations, "creationTimestamp": created}}

    pods = [pod("1", "2026-01-01T00:00:02Z"), pod("0", "2026-01-01T00:00:01Z")]
    assert [p["metadata"]["name"] for p in distributed.rank_zero_first(pods)] == ["p0", "p1"]
    waiting = [
        {"spec": {"nodeName": "gpu-node-0"}, "status": {"phase": "Running"}},
        {"spec": {}, "status": {"phase": "Pending"}},
    ]
    message = distributed.gang_message(waiting, 2, "0/3 nodes have 8 free nvidia.com/gpu")
    assert message.startswith("gang of 2 pods: 1 placed, 1 waiting (0/3 nodes") and "queueName" in message


def test_planner_creates_the_headless_service_with_the_job_and_names_missing_pods() -> None:
    from finetune_operator.api.finetunejob_status import Stage

    from .ftj_factory import pending_pod
    from .test_state import World, _to_training

    world = World(job(method="full", baseModel={"uri": "s3://models/Mistral-7B"}, resources={"nodes": 2}))
    _to_training(world)
    kinds = [(m["kind"], m["metadata"]["name"]) for m in world.last.create] if world.last else []
    assert kinds == [("Service", "demo-train"), ("Job", "demo-train")]
    assert world.status["progress"]["parallelism"].startswith("fsdp over 2 nodes x 1 ranks: full fine-tuning")
    running = {"metadata": {"name": "demo-train-0-x"}, "spec": {"nodeName": "gpu-node-0"}}
    running["status"] = {"phase": "Running"}
    world.pods[Stage.TRAIN] = [
        running,
        pending_pod(unschedulable="0/3 nodes are available: 1 Insufficient gpu"),
    ]
    world.step()
    assert world.status["phase"] == "Training"
    assert world.status["message"].startswith("gang of 2 pods: 1 placed, 1 waiting (waiting for resources")


def test_the_headless_service_is_the_indexed_jobs_own_and_selects_exactly_its_pods() -> None:
    """Decided from the job before anything is built (issue 21): the Service has the Indexed Job's name
    (its pods' subdomain), labels (Kueue's queue label included) and owner, and selects its pods only."""
    from finetune_vocabulary.labels import LABEL_QUEUE

    for name in ("demo", "team-x-" + "a" * 70):
        ref = job(name=name, resources={"gpus": 2, "nodes": 3, "queueName": "gpus"})
        train = builders.training_job(ref, CONFIG)
        service = distributed.headless_service(ref)
        pod = train["spec"]["template"]
        assert service["metadata"] == train["metadata"]
        assert service["metadata"]["labels"][LABEL_QUEUE] == "gpus"
        assert pod["spec"]["subdomain"] == service["metadata"]["name"]
        selector = service["spec"]["selector"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        other = builders.training_job(job(name=name + "x", resources={"gpus": 2, "nodes": 3}), CONFIG)
        assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()


def test_ftj_config_is_written_once_with_the_resolved_strategy() -> None:
    """No JSON surgery on a built Job: FTJ_CONFIG appears once, first, with the strategy auto resolved to;
    one process keeps the spec's own value."""
    spread = builders.training_job(job(resources={"gpus": 4}), CONFIG)
    env = spread["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e["name"] for e in env].count("FTJ_CONFIG") == 1 and env[0]["name"] == "FTJ_CONFIG"
    assert json.loads(env[0]["value"])["spec"]["hyperparameters"]["strategy"] == "ddp"
    single = _env(builders.training_job(job(resources={"gpus": 1}), CONFIG))
    assert json.loads(single["FTJ_CONFIG"])["spec"]["hyperparameters"]["strategy"] == "auto"
