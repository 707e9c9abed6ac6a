"""Served equals evaluated (issue 22), the cheapest refusal: a job whose deployment.maxModelLen cannot hold
its prompts plus evaluation.maxNewTokens never serves. Its validate stage (CPU, the base model's tokenizer
and chat template) refuses it naming the field and the line, before training asks for anything. The check
on a real engine runs in test_serving.py and test_modelserver.py (status.evaluation.served)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .conftest import Jobs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.local_kubelet, pytest.mark.timeout(600)]

LONG_SYSTEM_PROMPT = " ".join(f"rule {i}: answer in capital letters only." for i in range(30))


def _with_long_system_prompt(local_cluster: Any, source: str, key: str, rows: int) -> str:
    """The toy data set with a long system prompt before the first `rows` conversations."""
    s3 = local_cluster.s3_client()
    bucket, path = source.removeprefix("s3://").split("/", 1)
    lines = s3.get_object(Bucket=bucket, Key=path)["Body"].read().decode().splitlines()
    out = []
    for number, line in enumerate(line for line in lines if line.strip()):
        record = json.loads(line)
        if number < rows:
            record["messages"] = [{"role": "system", "content": LONG_SYSTEM_PROMPT}, *record["messages"]]
        out.append(json.dumps(record))
    s3.put_object(Bucket="data", Key=key, Body=("\n".join(out) + "\n").encode())
    return f"s3://data/{key}"


def test_a_max_model_len_shorter_than_the_prompts_never_serves_and_names_the_field(
    jobs: Jobs, local_cluster: Any
) -> None:
    test = _with_long_system_prompt(local_cluster, jobs.assets["test"], "long-prompts/test.jsonl", rows=1)
    jobs.create(
        "long-prompts",
        dataset={"train": jobs.assets["train"], "test": test},
        # room for the long prompt in training (else it is an overlong line, an invalid data set)
        hyperparameters={"maxSeqLength": 8192},
        deployment={"enabled": True, "gpus": 0, "gpuType": "cpu", "maxModelLen": 128},
    )
    status = jobs.wait_phase("long-prompts", "Failed", "Serving", "Rejected", timeout=300)
    assert status["phase"] == "Failed", status
    validated = {c["type"]: c for c in status["conditions"]}["Validated"]
    assert (validated["status"], validated["reason"]) == ("False", "InvalidConfig")
    message = status["message"]
    assert "spec.deployment.maxModelLen: 128 tokens cannot hold" in message and "line 1" in message, message
    assert "evaluation.maxNewTokens 4" in message, message
    # Nothing past validate ran: no training Job, no serving Deployment.
    stages = {c["metadata"]["labels"].get("app.kubernetes.io/component") for c in jobs.list("Job")}
    assert stages == {"validate"}, stages
    assert not jobs.list("Deployment")
