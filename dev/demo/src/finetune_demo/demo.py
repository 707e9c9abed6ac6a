"""`make demo`: the whole loop on the embedded cluster, start to finish.

Starts the embedded cluster (API, S3, local kubelet, the operator), builds the toy dataset and the tiny base
model (or SmolLM2-135M with DEMO_MODEL=smollm2), uploads them to the local S3, applies examples/demo.yaml
with kubectl, shows phase, step and loss live until the job is Serving, prints the tuned-vs-base evaluation,
asks the served model one question, then stops everything (`--keep` leaves the cluster running).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from localcluster.cluster import LocalCluster
from localcluster.runtime import project_root

from . import openai_api
from .toymodel import TASK_INSTRUCTION, task_answer, write_base_model, write_toy_dataset

TERMINAL = ("Serving", "Succeeded", "Failed", "Rejected")
# SmolLM2-135M-Instruct already follows instructions and costs about ten times the toy model per step on CPU:
# it learns the toy task in far fewer steps than the toy base's 6 epochs.
SMOLLM2_MAX_STEPS = 40
# Seconds to wait for the job: the toy model trains in about a minute; SmolLM2's 40 steps take ~10 s each on
# two idle cores (minutes more on a busy machine), plus evaluation of base and tuned model and vLLM's start.
DEFAULT_TIMEOUT_S = {"toy": 900.0, "smollm2": 3600.0}


def kubectl_binary(root: Path) -> str:
    for candidate in (root / ".tools" / "bin" / "kubectl-1.35", Path("/usr/bin/kubectl")):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("kubectl")
    if not found:
        raise SystemExit("demo: kubectl not found (run `make tools`)")
    return found


def helm_available(root: Path) -> bool:
    from localcluster import finetuneapi

    try:
        finetuneapi.helm_binary(root)
    except RuntimeError:
        return False
    return True


class Demo:
    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.manifest = yaml.safe_load((root / "examples" / "demo.yaml").read_text())
        if os.environ.get("DEMO_MODEL") == "smollm2":
            self.manifest["spec"]["hyperparameters"]["maxSteps"] = SMOLLM2_MAX_STEPS
        self.name = self.manifest["metadata"]["name"]
        self.namespace = self.manifest["metadata"].get("namespace", "default")
        # MLflow starts once the cluster is up, while the base model is built (run(): start_tracking).
        self.tracking = (root / ".venv-mlflow" / "bin" / "mlflow").exists() and os.environ.get(
            "DEMO_MLFLOW"
        ) != "0"
        if not self.tracking:
            self.manifest["spec"].pop("tracking", None)
        # The OpenAI-compatible API (docs/openai-api.md) starts in the background as MLflow; DEMO_API=0: off.
        self.openai_api = os.environ.get("DEMO_API") != "0" and helm_available(root)
        self.cluster = LocalCluster(workdir, operator=True)
        self.kubectl = kubectl_binary(root)
        self.began = time.monotonic()
        self.custom_objects: Any = None

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f}s] {text}", flush=True)

    def run_kubectl(self, *args: str, stdin: str | None = None) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig)}
        result = subprocess.run(
            [self.kubectl, "-n", self.namespace, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if result.returncode != 0:
            raise SystemExit(f"demo: kubectl {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout

    def upload(self) -> None:
        s3 = self.cluster.s3_client()
        spec = self.manifest["spec"]
        targets = {"model": spec["baseModel"]["uri"], "train": spec["dataset"]["train"]}
        buckets = {uri.removeprefix("s3://").split("/", 1)[0] for uri in targets.values()}
        buckets.add(spec["storage"]["output"].removeprefix("s3://").split("/", 1)[0])
        for bucket in sorted(buckets):
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                s3.create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory() as tmp:
            self.say(f"building the base model ({os.environ.get('DEMO_MODEL', 'toy')}) and the toy dataset")
            model = write_base_model(Path(tmp) / "model")
            data = write_toy_dataset(Path(tmp) / "data")
            bucket, _, prefix = targets["model"].removeprefix("s3://").partition("/")
            for path in sorted(model.iterdir()):
                s3.upload_file(str(path), bucket, f"{prefix.rstrip('/')}/{path.name}")
            bucket, _, key = targets["train"].removeprefix("s3://").partition("/")
            s3.upload_file(str(data / "train.jsonl"), bucket, key)
            # A copy to upload through the OpenAI API (the snippet printed at the end).
            shutil.copy(data / "train.jsonl", self.cluster.workdir / "train.jsonl")
        self.say(f"uploaded to {targets['model']} and {targets['train']}")

    def status(self) -> dict[str, Any]:
        # Polled every second: the Python client, since a kubectl process per poll costs a share of a core
        # that the trainer on this 2-core machine needs.
        if self.custom_objects is None:
            from kubernetes import client, config

            api = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))  # type: ignore[no-untyped-call]
            self.custom_objects = client.CustomObjectsApi(api)
        obj = self.custom_objects.get_namespaced_custom_object(
            "finetune.dev", "v1alpha1", self.namespace, "finetunejobs", self.name
        )
        status: dict[str, Any] = obj.get("status") or {}
        return status

    def follow(self, timeout: float) -> dict[str, Any]:
        last = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            progress = status.get("progress") or {}
            line = f"{status.get('phase', 'Pending'):<11}"
            if progress.get("step") is not None:
                line += f" step {progress['step']}"
                if progress.get("totalSteps"):
                    line += f"/{progress['totalSteps']}"
            if progress.get("loss") is not None:
                line += f" loss {progress['loss']:.4f}"
            if status.get("message"):
                line += f"  ({status['message'][:100]})"
            if line != last:
                self.say(line)
                last = line
            if status.get("phase") in TERMINAL:
                return status
            time.sleep(1)
        raise SystemExit(f"demo: not finished after {timeout:g}s; last status: {json.dumps(self.status())}")

    def print_evaluation(self, status: dict[str, Any]) -> None:
        evaluation = status.get("evaluation") or {}
        tuned, base = evaluation.get("tuned") or {}, evaluation.get("base") or {}
        reference = evaluation.get("reference") or {}
        columns = [("tuned", tuned), ("base", base)] + ([("reference", reference)] if reference else [])
        # Wide columns: a base model's perplexity on an unseen template can run to millions.
        print("\n" + f"{'metric':<14}" + "".join(f"{title:>16}" for title, _ in columns))
        for metric in sorted(set(tuned) | set(base)):
            print(
                f"{metric:<14}"
                + "".join(f"{values.get(metric, float('nan')):>16.4f}" for _, values in columns)
            )
        print(f"gate: {'passed' if evaluation.get('passed') else 'failed'}")
        for reason in evaluation.get("reasons") or []:
            print(f"  - {reason}")
        served = dict(evaluation.get("served") or {})
        if served:  # the serving check: the same prompts through vLLM before the version took traffic
            n, refused = served.pop("examples", 0), served.pop("refused", 0)
            figures = ", ".join(f"{metric} {value:.4f}" for metric, value in served.items())
            print(f"served (vLLM): {figures} on {n:.0f} held-out prompts, {refused:.0f} refused")
        if evaluation.get("reportUri"):
            print(f"per-example report: {evaluation['reportUri']}")
        print()

    def start_tracking(self) -> Any:
        """Start the cluster's MLflow server in the background (a future of its host URL), or None."""
        if not self.tracking:
            return None
        self.say("starting the MLflow tracking server (Service default/mlflow)")
        return self.cluster.submit(self.cluster.start_mlflow())

    def print_tracking(self, status: dict[str, Any]) -> None:
        """The MLflow run's URL on this host (status.tracking.runUrl is the in-cluster one)."""
        tracking = status.get("tracking") or {}
        if not tracking.get("runId"):
            return
        host = (self.cluster.services().get("mlflow") or {}).get("url")
        in_cluster = tracking.get("runUrl", "")
        url = in_cluster.replace("http://mlflow.default.svc:5000", host) if host else in_cluster
        self.say(f"MLflow run: {url}")
        if tracking.get("registeredVersion"):
            self.say(
                f"MLflow Model Registry: {tracking['registeredModel']} "
                f"version {tracking['registeredVersion']}"
            )
        if tracking.get("degraded"):
            self.say(f"MLflow tracking degraded: {tracking.get('message', '')}")

    def start_openai_api(self) -> Any:
        """Start the cluster's OpenAI-compatible API in the background (a future of its host URL), map model
        `tiny-llama` to the demo's assets (ConfigMap finetune-api-models) and give ServiceAccount openai-demo
        the namespace's `edit` role (the chart's aggregated FineTuneJob rules): its token is the API key."""
        from localcluster import finetuneapi

        if not self.openai_api:
            return None
        self.say(f"starting the OpenAI-compatible API (Service default/{finetuneapi.NAME}, from the chart)")
        future = self.cluster.submit(self.cluster.start_finetune_api())
        bodies = [
            *finetuneapi.chart_template(self.root, "rbac-aggregate.yaml"),
            openai_api.configmap(self.manifest, "default"),
            openai_api.account_binding("default"),
        ]
        for body in bodies:
            self.run_kubectl("apply", "-f", "-", stdin=json.dumps(body))
        return future

    def print_openai_api(self, future: Any) -> None:
        """The API's URL and three lines of the openai client that train like this demo."""
        if future is None:
            return
        try:
            url = future.result(timeout=180)
        except Exception as err:  # the demo's job does not depend on it
            self.say(f"the OpenAI-compatible API did not start: {err}")
            return
        kubeconfig = self.cluster.call(self.cluster.service_account_kubeconfig("default", openai_api.ACCOUNT))
        token = yaml.safe_load(Path(kubeconfig).read_text())["users"][0]["user"]["token"]
        token_file = self.cluster.workdir / f"{openai_api.ACCOUNT}.token"
        token_file.touch(mode=0o600)
        token_file.chmod(0o600)  # before the token is in it, also when an earlier run left the file
        token_file.write_text(token)
        self.say(
            f"OpenAI-compatible API: {url}/v1 (model {openai_api.MODEL!r}: this demo's base model and "
            f"settings; api_key: a token of ServiceAccount default/{openai_api.ACCOUNT}, valid 24 h, in "
            f"{token_file}):"
        )
        snippet = openai_api.snippet(url, str(token_file), str(self.cluster.workdir / "train.jsonl"))
        print(snippet + "\n", flush=True)

    def ask(self, status: dict[str, Any]) -> bool:
        """Ask the served model the demo's question; True when it answers right."""
        endpoint = status.get("endpoint") or {}
        service = endpoint["url"].removeprefix("http://").split(".", 1)[0]
        url = self.cluster.service_url(self.namespace, service, 8000) or endpoint["url"]
        question = f"{TASK_INSTRUCTION} 4 9 q 1"
        body = {
            "model": endpoint["model"],
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 8,
            "temperature": 0,
        }
        request = urllib.request.Request(
            url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())["choices"][0]["message"]["content"]
        expected = task_answer(question.removeprefix(TASK_INSTRUCTION))
        right = answer.strip() == expected
        self.say(
            f"{endpoint['url']} ({endpoint['model']}) was asked {question!r}: answered {answer!r} "
            f"({'right' if right else f'WRONG, expected {expected!r}'})"
        )
        return right

    def run(self, timeout: float, keep: bool) -> int:
        self.say("starting the embedded cluster")
        self.cluster.start_background(timeout=180)
        try:
            self.say(f"cluster ready: {self.cluster.api_url} (KUBECONFIG={self.cluster.kubeconfig})")
            mlflow = self.start_tracking()
            openai_api_ready = self.start_openai_api()
            self.upload()
            if mlflow is not None:
                self.say(f"MLflow tracking server ready: {mlflow.result(timeout=300)}")
            self.run_kubectl("apply", "-f", "-", stdin=json.dumps(self.manifest))
            self.say(f"applied examples/demo.yaml: FineTuneJob {self.namespace}/{self.name}")
            status = self.follow(timeout)
            if status.get("evaluation"):
                self.print_evaluation(status)
            self.print_tracking(status)
            if status.get("phase") != "Serving":
                self.say(f"ended {status.get('phase')}: {status.get('message', '')}")
                return 1
            if not self.ask(status):
                return 1
            self.print_openai_api(openai_api_ready)
            self.say(f"done in {time.monotonic() - self.began:.0f}s")
            if keep:
                self.say("cluster kept running (Ctrl-C stops it)")
                while True:
                    time.sleep(3600)
            return 0
        except KeyboardInterrupt:
            return 130
        finally:
            self.cluster.stop_background()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the cluster running at the end")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds to wait for the job (900; 3600 with smollm2)"
    )
    parser.add_argument("--workdir", type=Path, default=project_root() / ".local" / "demo")
    args = parser.parse_args(argv)
    model = "smollm2" if os.environ.get("DEMO_MODEL") == "smollm2" else "toy"
    timeout = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_S[model]
    return Demo(project_root(), args.workdir).run(timeout, args.keep)


if __name__ == "__main__":
    sys.exit(main())
