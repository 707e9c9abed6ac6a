"""Experiment tracking end to end (issue 14), against the embedded cluster's real MLflow server (PyPI mlflow,
SQLite store, artifacts on the cluster's S3), read back through MLflow's REST API:

- a tracked job reaches Serving: one run whose params equal the spec's hyperparameters, >= 10 training-loss
  points, tuned and base metrics, the reports and loss plot as artifacts, and a registered model version
  whose dataset sha256 is the S3 object's; a rejected job has a run and no version; a preempted (evicted)
  job keeps one run. These three run side by side in one namespace.
- MLflow scaled to 0 mid-training: the job still Succeeds and status.tracking says degraded.

The MLflow server is started by the module's fixture (the rest of the session does not wait for it) and
removed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Jobs

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.local_kubelet,
    pytest.mark.vllm,
    pytest.mark.timeout(1500),
]

REPO = Path(__file__).resolve().parents[2]
# Filled by the first test: the host URL of a finished run's page, for the UI check.
RUN_PAGES: list[str] = []
VLLM_CPU_ARGS = ["--dtype", "float32", "--max-num-seqs", "4", "--distributed-executor-backend", "uni"]
VLLM_CPU_ARGS += ["--enforce-eager"]


@pytest.fixture(scope="module")
def mlflow_url(local_cluster: Any) -> Iterator[str]:
    """The host URL of the cluster's MLflow server (services.json key `mlflow`), started for this module."""
    if not hasattr(local_cluster, "start_mlflow"):
        pytest.skip("the tracking tests start MLflow in the embedded cluster")
    if not (REPO / ".venv-mlflow" / "bin" / "mlflow").exists():
        pytest.skip("the MLflow server is not installed (make mlflow-venv)")
    url: str = local_cluster.call(local_cluster.start_mlflow(), timeout=300)
    yield url
    local_cluster.call(_remove_mlflow(local_cluster), timeout=60)


async def _remove_mlflow(cluster: Any) -> None:
    from localcluster import mlflow
    from localcluster.kubeclient import DEPLOYMENTS, SERVICES

    for resource in (DEPLOYMENTS, SERVICES):
        with contextlib.suppress(Exception):  # already gone
            await cluster.client.delete(resource.path(mlflow.NAMESPACE, mlflow.NAME))
    cluster.mlflow_started = False


def _scale_mlflow(local_cluster: Any, replicas: int) -> None:
    from localcluster import mlflow
    from localcluster.kubeclient import DEPLOYMENTS

    async def scale() -> None:
        await local_cluster.client.patch(
            DEPLOYMENTS.path(mlflow.NAMESPACE, mlflow.NAME), {"spec": {"replicas": replicas}}
        )

    local_cluster.call(scale(), timeout=30)


class Rest:
    """MLflow's REST API (api/2.0/mlflow), as any platform tool would read it."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get(self, endpoint: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/{endpoint}?{query}", timeout=30) as response:
            return json.loads(response.read())

    def post(self, endpoint: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def runs_of(self, namespace: str, uid: str) -> list[dict[str, Any]]:
        experiment = self.get("experiments/get-by-name", experiment_name=namespace)["experiment"]
        found = self.post(
            "runs/search",
            {"experiment_ids": [experiment["experiment_id"]], "filter": f"tags.`finetune.job_uid` = '{uid}'"},
        )
        runs: list[dict[str, Any]] = found.get("runs", [])
        return runs

    def history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        points: list[dict[str, Any]] = self.get("metrics/get-history", run_id=run_id, metric_key=key).get(
            "metrics", []
        )
        return points

    def versions(self, run_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.get("model-versions/search", filter=f"run_id='{run_id}'").get(
            "model_versions", []
        )
        return found

    def artifacts(self, run_id: str, path: str) -> set[str]:
        files = self.get("artifacts/list", run_id=run_id, path=path).get("files", [])
        return {f["path"] for f in files}


def _params(run: dict[str, Any]) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def _running_train_pod(jobs: Jobs, prefix: str) -> dict[str, Any] | None:
    pods = [
        p
        for p in jobs.list("Pod", "app.kubernetes.io/component=train")
        if p["status"].get("phase") == "Running" and p["metadata"]["name"].startswith(prefix)
    ]
    return pods[0] if pods else None


def _wait_training(jobs: Jobs, lc_api: Any, name: str) -> dict[str, Any]:
    """The running train pod of `name` once it logged a progress line."""
    from kubernetes import client

    core = client.CoreV1Api(lc_api)
    found: list[dict[str, Any]] = []

    def started(_status: dict[str, Any]) -> bool:
        pod = _running_train_pod(jobs, f"{name}-train")
        if pod is None:
            return False
        log = core.read_namespaced_pod_log(pod["metadata"]["name"], jobs.namespace)
        if '"event": "progress"' in log or '"event":"progress"' in log:
            found.append(pod)
            return True
        return False

    jobs.wait(name, started, 400, f"{name}: training progress from a running pod")
    return found[-1]


def _spec_tracking(**extra: Any) -> dict[str, Any]:
    from localcluster.mlflow import IN_CLUSTER_URL

    return {"mlflow": {"trackingUri": IN_CLUSTER_URL, **extra}}


def test_tracked_jobs_have_one_run_each_and_only_a_passed_gate_registers(
    jobs: Jobs, lc_api: Any, local_cluster: Any, mlflow_url: str
) -> None:
    from kubernetes import client

    rest = Rest(mlflow_url)
    jobs.create(
        "tracked",
        tracking=_spec_tracking(registerModel="toy-shout"),
        deployment={
            "enabled": True,
            "gpus": 0,
            "gpuType": "cpu",
            "maxModelLen": 256,
            "servedModelName": "tracked",
            "extraArgs": VLLM_CPU_ARGS,
        },
    )
    jobs.create(
        "rejected",
        tracking=_spec_tracking(),
        evaluation={"thresholds": [{"metric": "exact_match", "min": 1.01}]},
    )
    jobs.create(
        "preempted",
        tracking=_spec_tracking(),
        hyperparameters={"maxSteps": 200},
        evaluation={"enabled": False},
    )

    # Preemption: evict the trainer of `preempted` once it trains; its replacement resumes the same run.
    pod = _wait_training(jobs, lc_api, "preempted")
    name = pod["metadata"]["name"]
    client.CoreV1Api(lc_api).create_namespaced_pod_eviction(
        name, jobs.namespace, {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name}}
    )

    rejected = jobs.wait_phase("rejected", "Rejected", "Succeeded", "Failed", timeout=900)
    preempted = jobs.wait_phase("preempted", "Succeeded", "Failed", timeout=900)
    tracked = jobs.wait_phase("tracked", "Serving", "Failed", "Rejected", timeout=1200)
    assert tracked["phase"] == "Serving", tracked
    assert rejected["phase"] == "Rejected", rejected
    assert preempted["phase"] == "Succeeded", preempted
    assert preempted["retries"] == 1, "the eviction did not interrupt training"

    # --- the serving job: params, metrics, artifacts, registered version with lineage -----------------
    uid = jobs.get("tracked")["metadata"]["uid"]
    spec = jobs.get("tracked")["spec"]
    runs = rest.runs_of(jobs.namespace, uid)
    assert len(runs) == 1, runs
    run = runs[0]
    run_id = run["info"]["run_id"]
    assert tracked["tracking"]["runId"] == run_id
    assert tracked["tracking"]["runUrl"].endswith(f"/runs/{run_id}")
    assert tracked["tracking"]["degraded"] is False, tracked["tracking"]
    assert run["info"]["status"] == "FINISHED"
    params = _params(run)
    for key, value in spec["hyperparameters"].items():
        logged = params[f"hyperparameters.{key}"]
        if isinstance(value, bool | str):
            assert logged == str(value), key
        else:
            assert float(logged) == value, key
    assert params["method"] == "lora" and params["lora.rank"] == str(spec["lora"]["rank"])
    assert params["baseModel.uri"] == spec["baseModel"]["uri"] and params["job.uid"] == uid
    assert params["baseModel.revision"].startswith("s3:")  # the resolved digest of the S3 model
    losses = rest.history(run_id, "train_loss")
    assert len(losses) >= 10, losses
    assert len(rest.history(run_id, "learning_rate")) >= 10
    assert rest.history(run_id, "tokens_per_second")
    metrics = _metrics(run)
    assert {"tuned_exact_match", "base_exact_match", "tuned_loss", "base_loss"} <= set(metrics), metrics
    assert metrics["gate_passed"] == 1.0
    assert metrics["tuned_exact_match"] == pytest.approx(tracked["evaluation"]["tuned"]["exact_match"])
    assert {"evaluation/report.json", "evaluation/report.md"} <= rest.artifacts(run_id, "evaluation")
    assert "train/loss.png" in rest.artifacts(run_id, "train")
    assert "data/report.json" in rest.artifacts(run_id, "data")

    versions = rest.versions(run_id)
    assert len(versions) == 1, versions
    version = versions[0]
    assert version["name"] == "toy-shout"
    assert tracked["tracking"]["registeredModel"] == "toy-shout"
    assert tracked["tracking"]["registeredVersion"] == version["version"]
    assert version["source"] == tracked["artifacts"]["adapter"]
    tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    train_object = local_cluster.s3_client().get_object(Bucket="data", Key="toy/train.jsonl")["Body"].read()
    assert tags["dataset.train.sha256"] == hashlib.sha256(train_object).hexdigest()
    assert tags["finetune.job_uid"] == uid and tags["baseModel.uri"] == spec["baseModel"]["uri"]
    assert tags["dataset.train.uri"] == spec["dataset"]["train"]

    RUN_PAGES.append(f"{mlflow_url.rstrip('/')}/#/experiments/{run['info']['experiment_id']}/runs/{run_id}")

    # --- the rejected job: a run with the gate's decision, no version --------------------------------
    rejected_runs = rest.runs_of(jobs.namespace, jobs.get("rejected")["metadata"]["uid"])
    assert len(rejected_runs) == 1
    assert _metrics(rejected_runs[0])["gate_passed"] == 0.0
    assert {t["key"]: t["value"] for t in rejected_runs[0]["data"]["tags"]}["gate"] == "failed"
    assert rest.versions(rejected_runs[0]["info"]["run_id"]) == []
    assert "registeredVersion" not in rejected["tracking"]

    # --- the preempted job: one run, logged by both pods up to the last step -------------------------
    preempted_runs = rest.runs_of(jobs.namespace, jobs.get("preempted")["metadata"]["uid"])
    assert len(preempted_runs) == 1, preempted_runs
    steps = [p["step"] for p in rest.history(preempted_runs[0]["info"]["run_id"], "train_loss")]
    assert max(steps) == 200 and preempted["tracking"]["runId"] == preempted_runs[0]["info"]["run_id"]


def test_mlflow_down_mid_training_degrades_tracking_but_the_job_succeeds(
    jobs: Jobs, lc_api: Any, local_cluster: Any, mlflow_url: str
) -> None:
    jobs.create("untracked-now", tracking=_spec_tracking(), hyperparameters={"maxSteps": 200})
    _wait_training(jobs, lc_api, "untracked-now")
    _scale_mlflow(local_cluster, 0)
    try:
        began = time.monotonic()
        status = jobs.wait_phase("untracked-now", "Succeeded", "Failed", "Rejected", timeout=900)
        assert status["phase"] == "Succeeded", status
        assert status["tracking"]["degraded"] is True, status["tracking"]
        assert "MLflow" in status["tracking"]["message"] or "failed" in status["tracking"]["message"]
        assert status["tracking"]["runId"]  # the run was created before MLflow went away
        assert time.monotonic() - began < 600
    finally:
        _scale_mlflow(local_cluster, 1)
        local_cluster.call(local_cluster.wait_mlflow(), timeout=300)
    # The run is there, with what was logged before the outage.
    runs = Rest(mlflow_url).runs_of(jobs.namespace, jobs.get("untracked-now")["metadata"]["uid"])
    assert len(runs) == 1


def test_the_mlflow_ui_renders_the_run_page(tmp_path: Path) -> None:
    """Headless Chromium (Debian `chromium`) opens the run page; the screenshots are kept as test artifacts
    (.local/artifacts/mlflow-run.png, mlflow-run-charts.png: the loss chart)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    if not RUN_PAGES:
        pytest.skip("no finished run (the first test of this module did not get that far)")
    artifacts = REPO / ".local" / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "mlflow-run.png"
    common = [
        browser,
        "--headless",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
        "--virtual-time-budget=20000",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", RUN_PAGES[0]], capture_output=True, text=True, timeout=180, check=False
    ).stdout
    subprocess.run([*common, f"--screenshot={screenshot}", RUN_PAGES[0]], capture_output=True, timeout=180)
    assert screenshot.exists() and screenshot.stat().st_size > 10_000, "no screenshot"
    # The run's metric charts (train_loss over steps) are on its "Model metrics" tab.
    charts = artifacts / "mlflow-run-charts.png"
    page = f"{RUN_PAGES[0]}/model-metrics"
    subprocess.run([*common, f"--screenshot={charts}", page], capture_output=True, timeout=180)
    assert charts.exists() and charts.stat().st_size > 10_000, "no screenshot of the charts"
    # The run page lists the run's metrics (train_loss among them, with its chart) and params.
    assert "train_loss" in dom, dom[-2000:]
    assert "hyperparameters.learningRate" in dom or "learningRate" in dom
