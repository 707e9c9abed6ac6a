"""Shared fixtures for trainer tests: S3 on loopback (moto server), a tiny tokenizer, configs, HF cache.

- ``moto_endpoint`` (session): ``http://127.0.0.1:<port>`` of a ThreadedMotoServer.
- ``s3`` (function): a fresh bucket plus the AWS_* environment pointing at the server (monkeypatched, so
  in-process storage calls and subprocesses started with ``os.environ`` both use it). ``s3.uri("a/b")``.
- ``tiny_tokenizer_dir`` (session): a WordLevel tokenizer trained on the fly, saved with a chat template.
- ``make_config(run_prefix, **spec_overrides)``: a config document (dict) as the operator would pass it.
- ``make_hf_cache(hf_home, repo_id, src_dir, commit)``: lays out ``src_dir`` as a cached Hub snapshot.
"""

from __future__ import annotations

import copy
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# Fake but credential-shaped values: tests assert they never reach logs or termination messages.
FAKE_ACCESS_KEY = "AKIAFAKEFAKEFAKE1234"
FAKE_SECRET_KEY = "fake-secret-key-value-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@dataclass
class S3Bucket:
    endpoint: str
    bucket: str
    client: Any

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/") if key else f"s3://{self.bucket}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    import boto3

    env = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "2",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id=FAKE_ACCESS_KEY,
        aws_secret_access_key=FAKE_SECRET_KEY,
    )
    bucket = f"ftj-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3Bucket(moto_endpoint, bucket, client)


def build_tokenizer(path: Path, extra_words: list[str] | None = None) -> Path:
    """A whitespace WordLevel tokenizer (one token per word) with a chat template, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = [
        " ".join(f"w{i}" for i in range(200)),
        "the quick brown fox jumps over the lazy dog",
        "what is capital of france paris answer question hello world yes no",
        *(extra_words or []),
    ]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


BASE_SPEC: dict[str, Any] = {
    "baseModel": {"uri": "hf://test/tiny"},
    "dataset": {"train": "s3://bucket/train.jsonl", "format": "auto"},
    "method": "lora",
    "hyperparameters": {"epochs": 3, "maxSeqLength": 64, "batchSize": 2, "gradientAccumulationSteps": 1},
    "resources": {"gpus": 0},
    "storage": {"output": "s3://bucket/out"},
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def make_config() -> Callable[..., dict[str, Any]]:
    def _make(run_prefix: str, **spec_overrides: Any) -> dict[str, Any]:
        return {
            "runPrefix": run_prefix,
            "job": {"namespace": "team-a", "name": "demo", "uid": "uid-1234"},
            "spec": _merge(BASE_SPEC, spec_overrides),
        }

    return _make


def make_hf_cache_snapshot(
    hub_cache: Path,
    repo_id: str,
    src_dir: Path,
    commit: str = "a" * 40,
    repo_type: str = "model",
    ref: str = "main",
) -> Path:
    """Copy ``src_dir`` into ``hub_cache`` in huggingface_hub's cache layout; returns the snapshot dir."""
    repo_dir = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for src in src_dir.rglob("*"):
        if src.is_file():
            target = snapshot / src.relative_to(src_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF_HOME with HF_HUB_OFFLINE=1; returns the hub cache dir (fill: make_hf_cache_snapshot)."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (home / "hub").mkdir(parents=True)
    return home / "hub"


@pytest.fixture
def termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("FTJ_TERMINATION_LOG", str(path))
    return path


@pytest.fixture(autouse=True)
def _isolated_trainer_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep runs off /workspace, /dev/termination-log and the user's HF cache."""
    monkeypatch.setenv("FTJ_WORKDIR", str(tmp_path / "workspace"))
    monkeypatch.setenv("FTJ_TERMINATION_LOG", str(tmp_path / "termination-log"))
    monkeypatch.setenv("FTJ_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FTJ_CONFIG", raising=False)
    from finetune_trainer.termination import clear_preemption

    clear_preemption()
