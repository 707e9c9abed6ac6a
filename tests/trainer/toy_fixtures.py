"""Fixtures and helpers for the train/evaluate/export tests: the toy base model and task
(finetune_demo.toymodel).

Import what a test module needs (``from .toy_fixtures import toy_base_dir, ...``); pytest picks the
fixtures up from the module namespace. The toy base is cached under .local/cache/toymodel (keyed by its
parameters), so only the first run on a machine pays its ~10 s of pre-training.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from finetune_demo import toymodel

from .conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY

TOY_HYPERPARAMETERS = toymodel.TOY_HYPERPARAMETERS
TOY_LORA = toymodel.TOY_LORA


@pytest.fixture(scope="session")
def toy_base_dir() -> Path:
    return toymodel.toy_base_model()


def commit_toy_data(data_uri: str, params: toymodel.ToyTaskParams | None = None) -> None:
    """Stand-in for validate's output: cleaned train.jsonl + test.jsonl committed under ``data_uri``."""
    from finetune_trainer import manifest

    with tempfile.TemporaryDirectory() as tmp:
        toymodel.write_toy_dataset(tmp, params or toymodel.ToyTaskParams())
        manifest.commit_dir(
            tmp,
            data_uri,
            kind="dataset",
            dataset={"train": {"uri": "toy://train.jsonl"}, "test": {"uri": "toy://test.jsonl"}},
        )


def toy_config(run_prefix: str, base_uri: str, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "baseModel": {"uri": base_uri},
        "dataset": {"train": "toy://train.jsonl"},
        "method": "lora",
        "lora": dict(TOY_LORA),
        "hyperparameters": dict(TOY_HYPERPARAMETERS),
        "checkpoint": {"everySteps": 20, "everyMinutes": 60, "keep": 2},
        "resources": {"gpus": 0, "gpuType": "cpu"},
        "evaluation": {"maxNewTokens": 8, "batchSize": 20},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "runPrefix": run_prefix,
        "job": {"namespace": "team-a", "name": "toy", "uid": "uid-toy"},
        "spec": spec,
    }


@dataclass
class StageRun:
    exit_code: int
    termination: dict[str, Any]
    stdout: str
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


def run_stage(stage: str, config: dict[str, Any], termination_log: Path) -> StageRun:
    """``python -m finetune_trainer <stage>`` in this process; stdout captured and parsed as JSON lines."""
    from finetune_trainer import cli

    out = io.StringIO()
    old = os.environ.get("FTJ_CONFIG")
    os.environ["FTJ_CONFIG"] = json.dumps(config)
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main([stage])
    finally:
        if old is None:
            os.environ.pop("FTJ_CONFIG", None)
        else:
            os.environ["FTJ_CONFIG"] = old
    text = out.getvalue()
    events = []
    for line in text.splitlines():
        if line.startswith('{"'):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    termination = json.loads(termination_log.read_text()) if termination_log.exists() else {}
    return StageRun(code, termination, text, events)


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or unset, with None) environment variables for a block; for fixtures wider than a test."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Test modules that import the session fixture each get their own copy of it; this keeps one run.
_PIPELINES: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="session")
def lora_pipeline(
    moto_endpoint: str, toy_base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """LoRA on the toy task on S3 through the CLI: train, evaluate, export (run once per session)."""
    if "lora" in _PIPELINES:
        return _PIPELINES["lora"]
    import boto3
    from finetune_trainer import manifest, storage
    from finetune_trainer.termination import clear_preemption

    tmp = tmp_path_factory.mktemp("lora-pipeline")
    bucket = f"ftj-{uuid.uuid4().hex[:10]}"
    env = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_PROFILE": None,
        "FTJ_WORKDIR": str(tmp / "workspace"),
        "HF_HOME": str(tmp / "hf"),
        "HF_HUB_OFFLINE": "1",
        "FTJ_CONFIG": None,
    }
    runs: dict[str, StageRun] = {}
    with environment(**env):
        client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        storage.upload_dir(toy_base_dir, f"s3://{bucket}/models/toy-llama", exclude=["READY"])
        prefix = f"s3://{bucket}/runs/team-a/toy/uid-toy"
        commit_toy_data(f"{prefix}/data")
        config = toy_config(prefix, f"s3://{bucket}/models/toy-llama")
        for stage in ("train", "evaluate", "export"):
            clear_preemption()
            with environment(FTJ_TERMINATION_LOG=str(tmp / f"termination-{stage}")):
                runs[stage] = run_stage(stage, config, tmp / f"termination-{stage}")
        keys = sorted(
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/")
            for o in page.get("Contents", [])
        )
        local = {}
        for name in ("adapter", "merged"):
            local[name] = tmp / name
            if manifest.is_committed(f"{prefix}/model/{name}"):
                manifest.download_committed(f"{prefix}/model/{name}", local[name])
        train_dir, eval_dir = tmp / "train-out", tmp / "eval-out"
        manifest.download_committed(f"{prefix}/train", train_dir)
        if manifest.is_committed(f"{prefix}/evaluation"):
            manifest.download_committed(f"{prefix}/evaluation", eval_dir)
        adapter_manifest = manifest.read_manifest(f"{prefix}/model/adapter")
    _PIPELINES["lora"] = {
        "runs": runs,
        "keys": keys,
        "prefix": prefix,
        "local": local,
        "train_dir": train_dir,
        "eval_dir": eval_dir,
        "adapter_manifest": adapter_manifest,
        "base": toy_base_dir,
    }
    return _PIPELINES["lora"]


# --- dpo / kto / grpo data (the canonical forms validate writes; contract of issue 23) ----------------------


def objective_rows(objective: str, chat_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The toy task in the objective's canonical form: the right answer (upper case) is chosen / desirable /
    expected, the base's own habit (the letter as given, lower case) is rejected / undesirable."""
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(chat_rows):
        prompt, right = row["messages"][:-1], row["messages"][-1]["content"]
        if objective == "dpo":
            rows.append({"prompt": prompt, "chosen": right, "rejected": right.lower()})
        elif objective == "kto":
            good = i % 2 == 0
            rows.append({"prompt": prompt, "completion": right if good else right.lower(), "label": good})
        else:
            rows.append({"prompt": prompt, "expected": right})
    return rows


def commit_objective_data(
    data_uri: str, objective: str, params: toymodel.ToyTaskParams | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stand-in for validate's output for dpo/kto/grpo: canonical train.jsonl + test.jsonl committed."""
    from finetune_trainer import manifest

    train, test = (
        objective_rows(objective, rows) for rows in toymodel.toy_task(params or toymodel.ToyTaskParams())
    )
    if manifest.is_committed(data_uri):  # a rerun of the same job (resume)
        return train, test
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
            (Path(tmp) / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifest.commit_dir(tmp, data_uri, kind="dataset", dataset={"train": {"uri": "toy://train.jsonl"}})
    return train, test
