"""Issue 20, defect 2 end to end: a serving pod that cannot start tells the job's user why. The local
kubelet is pointed at a missing vLLM runtime (Kubelet.runtimes, for this test only; the real .venv-vllm is
left alone), so the pod reads as kubelet's ErrImagePull / ImagePullBackOff with the cause; the job's own
ModelServer (issue 21) reports it (Ready=False ImagePullFailed) and the operator fails the FineTuneJob with
reason and message in its Deployed condition and a Warning Event. vLLM itself never starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from finetune_vocabulary.images import VLLM_IMAGE
from localcluster.pytest_plugin import wait_for

from .conftest import Jobs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(600)]


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def test_a_serving_pod_without_its_runtime_fails_the_job_naming_the_cause_and_the_command(
    monkeypatch: pytest.MonkeyPatch, local_cluster: Any, jobs: Jobs, tmp_path: Path
) -> None:
    missing = tmp_path / "no-vllm-venv"
    monkeypatch.setitem(local_cluster.kubelet.runtimes, VLLM_IMAGE, missing)
    jobs.create(
        "no-runtime",
        evaluation={"enabled": False},
        deployment={"enabled": True, "gpus": 0, "gpuType": "cpu", "maxModelLen": 256},
    )
    # Until it ends, or until it shows the symptom: a bare crash loop the user would wait on forever.
    status = jobs.wait(
        "no-runtime",
        lambda s: s.get("phase") in ("Failed", "Serving") or "CrashLoopBackOff" in (s.get("message") or ""),
        480,
        "the serving stage to end or crash-loop",
    )
    deployed = _condition(status, "Deployed")
    assert (status["phase"], deployed.get("reason")) == ("Failed", "ImagePullFailed"), status
    # kubelet's reason and message, as on a real cluster, naming the missing directory and the command.
    assert deployed["message"].startswith("container vllm: ImagePullBackOff: Back-off pulling image")
    assert f"{missing}, which does not exist (run `make vllm-venv`)" in deployed["message"]
    assert status["message"] == deployed["message"]
    events = jobs.events("no-runtime")
    assert any(e["reason"] == "ImagePullFailed" and "make vllm-venv" in e["message"] for e in events)
    from kubernetes import client

    pool = client.CustomObjectsApi(jobs.api).get_namespaced_custom_object(
        "finetune.dev", "v1alpha1", jobs.namespace, "modelservers", "no-runtime-serve"
    )
    server = _condition(pool.get("status") or {}, "Ready")
    assert (server.get("status"), server.get("reason")) == ("False", "ImagePullFailed"), server
    # Stop the retrying pod before the runtime is restored, so that no vLLM starts after the test.
    jobs.delete("no-runtime")
    wait_for(lambda: not jobs.list("Pod"), timeout=60, what="the job's pods to be gone")
