"""Issue 20 defect 1: a job trained on CPU is served on CPU. Unset deployment.gpus (ModelServer gpus) follows
the GPU type, a GPU count on a cpu type is refused naming both fields, a type that has no GPUs only in the
operator's table is served on CPU with a note, and every CPU replica gets an explicit KV cache size from its
own memory limit (without one vLLM-CPU demands 92% of the host's memory free) — in both vLLM builders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_operator.api import crdgen
from finetune_operator.api.crdgen import build_crd
from finetune_operator.api.finetunejob import parse_spec
from finetune_operator.api.modelserver import parse_modelserver_spec
from finetune_operator.api.schema import SpecError
from finetune_operator.config import OperatorConfig, load_config
from finetune_operator.finetunejob import ownedserver, serving
from finetune_operator.finetunejob.ref import Artifacts, JobRef
from finetune_operator.modelserver.builders import PoolRef, pool_deployment
from localcluster.crdvalidation import CRDValidator, InvalidError

from . import test_state
from .test_state import EVAL_GOOD, World, _to_evaluated

CONFIG = load_config(env={})
ADAPTER = Artifacts(adapter="s3://runs/out/team-a/demo/uid/model/adapter/")
BASE: dict[str, Any] = {
    "baseModel": {"uri": "s3://models/tiny-llama"},
    "dataset": {"train": "s3://data/toy/train.jsonl"},
    "storage": {"output": "s3://runs/out"},
}
GPU_KEYS = ("nvidia.com/gpu",)


def ftj(**sections: Any) -> JobRef:
    """A job parsed from what the API server stores for this spec (no deployment section unless given)."""
    return JobRef("team-a", "demo", "uid-1", parse_spec({**BASE, **sections}))


def pool(config_spec: dict[str, Any]) -> PoolRef:
    raw = {"baseModel": {"uri": "s3://models/tiny-llama"}, "adapterSources": ["s3://runs"], **config_spec}
    return PoolRef("team-a", "shared", "pool-uid", parse_modelserver_spec(raw))


def served(job: JobRef, config: OperatorConfig = CONFIG) -> dict[str, Any]:
    """The vLLM Deployment of the job's own ModelServer (ownedserver.py), as the pool builds it."""
    server = ownedserver.job_modelserver(job, config, ADAPTER)
    spec = parse_modelserver_spec(server["spec"])
    ref = PoolRef(job.namespace, server["metadata"]["name"], "pool-uid", spec)
    return dict(pool_deployment(ref, config))


def vllm_of(manifest: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = manifest["spec"]["template"]["spec"]
    container: dict[str, Any] = next(c for c in pod["containers"] if c["name"] == "vllm")
    return container


def env(manifest: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in vllm_of(manifest)["env"]}


def assert_cpu_replica(manifest: dict[str, Any], kv_gib: str) -> None:
    """CPU settings, no GPU resource, no GPU placement, no tensor parallelism."""
    container, pod = vllm_of(manifest), manifest["spec"]["template"]["spec"]
    assert env(manifest)["VLLM_CPU_KVCACHE_SPACE"] == kv_gib
    resources = container.get("resources") or {}
    for block in resources.values():
        assert not set(block) & set(GPU_KEYS), resources
    assert "nvidia.com/gpu.product" not in (pod.get("nodeSelector") or {})
    assert all(t.get("key") != "nvidia.com/gpu" for t in pod.get("tolerations") or [])
    assert "--tensor-parallel-size" not in container["args"]


@pytest.mark.parametrize(
    "resources",
    [{"gpuType": "cpu"}, {"gpus": 0, "gpuType": "cpu"}, {"gpus": 0}],
    ids=["cpu-type", "cpu-type-0-gpus", "0-gpus"],
)
def test_a_cpu_trained_job_without_a_deployment_section_serves_on_cpu(resources: dict[str, Any]) -> None:
    job = ftj(resources=resources)
    assert job.spec.deployment.gpus == 0
    assert_cpu_replica(served(job), kv_gib="1")


def test_the_cpu_kv_cache_comes_from_the_replicas_own_memory_limit() -> None:
    job = ftj(resources={"gpuType": "cpu"}, deployment={"resources": {"memory": "8Gi"}})
    manifest = served(job)
    assert_cpu_replica(manifest, kv_gib="2")
    assert vllm_of(manifest)["resources"]["limits"] == {"memory": "8Gi"}


def test_gpu_jobs_keep_one_gpu_by_default_and_a_gpu_serving_type_overrides_cpu_training() -> None:
    gpu = served(ftj())
    assert vllm_of(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env(gpu)
    mixed = ftj(resources={"gpuType": "cpu"}, deployment={"gpuType": "a100-40gb"})
    assert mixed.spec.deployment.gpus == 1
    assert vllm_of(served(mixed))["resources"]["limits"] == {
        "nvidia.com/gpu": "1"
    }


@pytest.mark.parametrize(
    "sections",
    [
        {"resources": {"gpuType": "cpu"}, "deployment": {"gpus": 2}},
        {"deployment": {"gpus": 1, "gpuType": "cpu"}},
    ],
    ids=["training-type-cpu", "serving-type-cpu"],
)
def test_a_gpu_count_on_a_cpu_type_is_refused_naming_both_fields(sections: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({**BASE, **sections})
    assert [path for path, _ in error.value.errors] == ["spec.deployment.gpus"]
    assert "deployment.gpus" in str(error.value) and "gpuType" in str(error.value)


def test_the_api_server_leaves_gpus_unset_and_refuses_a_contradiction_naming_both_fields() -> None:
    ftj_api = CRDValidator(build_crd(crdgen.FINETUNEJOB), "v1alpha1")
    stored = ftj_api.admit(manifest("FineTuneJob", {**BASE, "resources": {"gpuType": "cpu"}}))
    assert "gpus" not in stored["spec"]["deployment"] and parse_spec(stored["spec"]).deployment.gpus == 0
    contradiction = {**BASE, "resources": {"gpuType": "cpu"}, "deployment": {"gpus": 2}}
    with pytest.raises(InvalidError) as refused:
        ftj_api.admit(manifest("FineTuneJob", contradiction))
    assert "spec.deployment.gpus: " in refused.value.message()
    assert "resources.gpuType" in refused.value.message()
    ms_api = CRDValidator(build_crd(crdgen.MODELSERVER), "v1alpha1")
    server = {"baseModel": {"uri": "s3://models/tiny-llama"}, "adapterSources": ["s3://runs"]}
    stored = ms_api.admit(manifest("ModelServer", {**server, "gpuType": "cpu"}))
    assert "gpus" not in stored["spec"] and parse_modelserver_spec(stored["spec"]).gpus == 0
    with pytest.raises(InvalidError) as refused:
        ms_api.admit(manifest("ModelServer", {**server, "gpuType": "cpu", "gpus": 1}))
    assert "spec.gpus: " in refused.value.message() and "gpuType is cpu" in refused.value.message()


def test_a_modelserver_gpu_count_follows_its_type_and_a_contradiction_is_refused() -> None:
    assert pool({"gpuType": "cpu"}).spec.gpus == 0
    assert pool({}).spec.gpus == 1
    with pytest.raises(SpecError) as error:
        pool({"gpuType": "cpu", "gpus": 2})
    assert [path for path, _ in error.value.errors] == ["spec.gpus"]
    assert "gpus" in str(error.value) and "gpuType is cpu" in str(error.value)


def test_a_jobs_own_server_and_a_shared_pool_give_a_cpu_replica_the_same_settings() -> None:
    job = ftj(resources={"gpuType": "cpu"}, deployment={"resources": {"cpu": "2", "memory": "12Gi"}})
    server = pool({"gpuType": "cpu", "resources": {"cpu": "2", "memory": "12Gi"}})
    per_job, shared = served(job), dict(pool_deployment(server, CONFIG))
    assert_cpu_replica(per_job, kv_gib="3")
    assert_cpu_replica(shared, kv_gib="3")
    assert vllm_of(per_job)["resources"] == vllm_of(shared)["resources"]


def manifest(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": spec,
    }


def config_with_cpu_pool(tmp_path: Path) -> OperatorConfig:
    """A GPU table with a CPU node pool of its own name: only the operator knows it has no GPUs."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "gpuTypes:\n  cpu-pool:\n    resourceName: ''\n    nodeSelector: {pool: cpu}\n"
        "    tokensPerSecond: 100\n"
    )
    return load_config(path, env={})


def test_a_type_without_gpus_in_the_operators_table_is_served_on_cpu(tmp_path: Path) -> None:
    config = config_with_cpu_pool(tmp_path)
    job = ftj(resources={"gpuType": "cpu-pool"})
    assert job.spec.deployment.gpus == 1  # admission cannot know: the table is the operator's
    assert_cpu_replica(served(job, config), kv_gib="1")
    assert_cpu_replica(pool_deployment(pool({"gpuType": "cpu-pool"}), config), kv_gib="1")
    note = serving.job_vllm_compute(job, config).note
    assert note is not None and "cpu-pool" in note and "serving on CPU" in note


def test_the_job_says_it_serves_on_cpu_instead_of_crash_looping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(test_state, "CONFIG", config_with_cpu_pool(tmp_path))
    world = World(ftj(resources={"gpuType": "cpu-pool"}))
    _to_evaluated(world, EVAL_GOOD)
    assert world.status["phase"] == "Deploying" and world.server is not None
    deployed = next(c for c in world.status["conditions"] if c["type"] == "Deployed")
    assert "cpu-pool has no GPUs" in deployed["message"] and "serving on CPU" in deployed["message"]
    assert any("serving on CPU" in e.message for e in world.events)
