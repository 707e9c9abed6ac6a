"""The trainer's MLflow tracker: the params it builds, one run per job (remembered in the run prefix, else
found by the job-uid tag), a registered version only once, and calls that never raise.

MLflow itself is a fake here (an in-memory client with MlflowClient's method names and the failures we need);
tests/e2e/test_tracking.py runs the same code against a real MLflow server.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from finetune_trainer import tracking
from finetune_trainer.config import parse_config


def config(tmp_path: Path, **mlflow: Any) -> Any:
    document: dict[str, Any] = {
        "runPrefix": str(tmp_path / "run"),
        "job": {"namespace": "team-a", "name": "shout", "uid": "uid-1"},
        "spec": {
            "baseModel": {"uri": "s3://models/toy"},
            "dataset": {"train": "s3://data/toy/train.jsonl"},
            "hyperparameters": {"learningRate": 0.005, "batchSize": 8, "epochs": 4, "seed": 11},
            "lora": {"rank": 8, "alpha": 16},
        },
    }
    if mlflow is not None:
        settings = {"trackingUri": "http://mlflow:5000", "experiment": "team-a", "registerModel": "shout"}
        document["tracking"] = {"mlflow": {**settings, **mlflow}}
    return parse_config(document)


class FakeMlflow:
    """MlflowClient's calls the tracker makes, in memory; `down` makes every call fail like a refused TCP."""

    def __init__(self) -> None:
        self.down = False
        self.calls: list[str] = []
        self.experiments: dict[str, str] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.versions: list[SimpleNamespace] = []
        self.models: set[str] = set()

    def __getattribute__(self, name: str) -> Any:
        attr = object.__getattribute__(self, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            object.__getattribute__(self, "calls").append(name)
            if object.__getattribute__(self, "down"):
                raise ConnectionError("Connection refused")
            return attr(*args, **kwargs)

        return call

    def get_experiment_by_name(self, name: str) -> Any:
        return SimpleNamespace(experiment_id=self.experiments[name]) if name in self.experiments else None

    def create_experiment(self, name: str) -> str:
        self.experiments[name] = str(len(self.experiments) + 1)
        return self.experiments[name]

    def search_runs(self, experiment_ids: list[str], filter_string: str, max_results: int) -> list[Any]:
        uid = filter_string.split("'")[1]
        return [
            SimpleNamespace(info=SimpleNamespace(run_id=run_id))
            for run_id, run in self.runs.items()
            if run["tags"].get(tracking.JOB_UID_TAG) == uid
        ][:max_results]

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> Any:
        run_id = f"run{len(self.runs) + 1}"
        self.runs[run_id] = {"experiment": experiment_id, "tags": dict(tags), "params": {}, "metrics": []}
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def get_run(self, run_id: str) -> Any:
        return SimpleNamespace(info=SimpleNamespace(experiment_id=self.runs[run_id]["experiment"]))

    def update_run(self, run_id: str, status: str) -> None:
        self.runs[run_id]["status"] = status

    def set_terminated(self, run_id: str, status: str) -> None:
        self.runs[run_id]["status"] = status

    def log_batch(self, run_id: str, metrics: Any = (), params: Any = (), tags: Any = ()) -> None:
        run = self.runs[run_id]
        for param in params:
            assert run["params"].get(param.key, param.value) == param.value, "MLflow params are immutable"
            run["params"][param.key] = param.value
        run["metrics"] += [(m.key, m.value, m.step) for m in metrics]
        run["tags"].update({t.key: t.value for t in tags})

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str) -> None:
        self.runs[run_id].setdefault("artifacts", []).append(f"{artifact_path}/{Path(local_path).name}")

    def search_model_versions(self, filter_string: str) -> list[Any]:
        return [v for v in self.versions if f"run_id='{v.run_id}'" in filter_string]

    def create_registered_model(self, name: str) -> None:
        if name in self.models:
            error = RuntimeError("exists")
            error.error_code = "RESOURCE_ALREADY_EXISTS"  # type: ignore[attr-defined]
            raise error
        self.models.add(name)

    def create_model_version(self, name: str, source: str, run_id: str, tags: dict[str, str]) -> Any:
        version = SimpleNamespace(
            name=name, source=source, run_id=run_id, tags=tags, version=len(self.versions) + 1
        )
        self.versions.append(version)
        return version


def test_params_are_the_specs_hyperparameters_and_the_lineage(tmp_path: Path) -> None:
    cfg = config(tmp_path, image="ghcr.io/finetune-operator/trainer@sha256:abc")
    dataset = {
        "train": {"uri": "s3://data/toy/train.jsonl", "sha256": "f00", "etag": '"e"', "versionId": None}
    }
    params = tracking.run_params(
        cfg, base_model_revision="s3:1234", dataset=dataset, resolved={"totalSteps": 40}
    )
    hp = cfg.spec.hyperparameters.model_dump(by_alias=True)
    logged = {
        k.removeprefix("hyperparameters."): v for k, v in params.items() if k.startswith("hyperparameters.")
    }
    assert set(logged) == set(hp)
    for key, value in hp.items():  # the spec's values, numbers in their shortest form
        assert logged[key] == str(value) if not isinstance(value, float) else float(logged[key]) == value
    assert params["hyperparameters.epochs"] == "4"  # not the trainer's float 4.0
    assert params["hyperparameters.learningRate"] == "0.005"
    assert (
        params["method"] == "lora"
        and params["lora.rank"] == "8"
        and params["lora.targetModules"] == "all-linear"
    )
    assert params["baseModel.uri"] == "s3://models/toy" and params["baseModel.revision"] == "s3:1234"
    assert params["dataset.train.sha256"] == "f00" and "dataset.train.versionId" not in params
    assert params["image.digest"] == "sha256:abc" and params["job.uid"] == "uid-1"
    assert params["resolved.totalSteps"] == "40"
    assert tracking.image_digest("ghcr.io/x/trainer:0.1.0") == "unpinned"
    tags = tracking.lineage_tags(cfg, params)
    assert tags[tracking.JOB_UID_TAG] == "uid-1" and tags["dataset.train.sha256"] == "f00"
    assert "hyperparameters.learningRate" not in tags


def test_step_metrics_take_loss_learning_rate_and_throughput() -> None:
    logs = {"loss": 1.5, "learning_rate": 0.001, "grad_norm": float("nan"), "epoch": 0.5}
    assert tracking.step_metrics(logs, 1234.5) == {
        "train_loss": 1.5,
        "learning_rate": 0.001,
        "tokens_per_second": 1234.5,
    }
    assert tracking.step_metrics({"train_runtime": 3.0}, None) == {}
    assert tracking.step_metrics({"train_runtime": 3.0}, 0.0) == {}  # the end-of-training summary


def test_step_metrics_forward_the_objective_figures_under_trl_names() -> None:
    """dpo/kto/grpo figures reach MLflow under TRL's own names (MLflow accepts '/'); others stay out."""
    logs = {
        "loss": 0.6,
        "rewards/chosen": 0.2,
        "rewards/rejected": -0.1,
        "rewards/margins": 0.3,
        "rewards/accuracies": 0.75,
        "kl": 0.01,
        "reward": 0.5,
        "completions/mean_length": 3.0,
        "rewards/exact answer/mean": 0.5,
        "logps/chosen": -3.0,
    }
    out = tracking.step_metrics(logs, None)
    assert out == {
        "train_loss": 0.6,
        "rewards/chosen": 0.2,
        "rewards/rejected": -0.1,
        "rewards/margins": 0.3,
        "rewards/accuracies": 0.75,
        "kl": 0.01,
        "reward": 0.5,
        "completions/mean_length": 3.0,
        "rewards/exact answer/mean": 0.5,
    }


def test_one_run_per_job_remembered_in_the_run_prefix_or_found_by_uid(tmp_path: Path) -> None:
    fake = FakeMlflow()
    cfg = config(tmp_path)
    first = tracking.Tracker.open(cfg, fake)
    assert first.run_id == "run1" and not first.degraded
    assert json.loads(Path(cfg.layout.tracking_run).read_text()) == {"runId": "run1"}
    # A preempted pod's replacement (or the next stage) logs to the same run.
    again = tracking.Tracker.open(cfg, fake)
    assert again.run_id == "run1" and fake.runs["run1"]["status"] == "RUNNING"
    # Without the remembered id (its write failed), the uid tag finds the run: still one run.
    Path(cfg.layout.tracking_run).unlink()
    assert tracking.Tracker.open(cfg, fake).run_id == "run1"
    assert len(fake.runs) == 1
    summary = again.summary()
    assert summary == {
        "degraded": False,
        "runId": "run1",
        "experimentId": "1",
        "runUrl": "http://mlflow:5000/#/experiments/1/runs/run1",
    }


def test_mlflow_down_degrades_and_stops_calling_for_a_while(tmp_path: Path) -> None:
    fake = FakeMlflow()
    now = [0.0]
    tracker = tracking.Tracker(config(tmp_path), fake, clock=lambda: now[0])
    tracking.Tracker._resolve_run(tracker)
    fake.down = True
    for step in range(20):
        tracker.log_metrics({"train_loss": 1.0}, step=step)  # never raises
    assert fake.calls.count("log_batch") == tracking.MAX_FAILURES  # then paused, not hammered
    assert tracker.degraded and tracker.skipped == 20 - tracking.MAX_FAILURES
    assert tracker.message == "log metrics failed: ConnectionError: Connection refused"
    fake.down = False
    now[0] += tracking.COOLDOWN_S + 1
    tracker.log_metrics({"train_loss": 0.5}, step=21)
    assert fake.runs["run1"]["metrics"][-1] == ("train_loss", 0.5, 21)
    assert tracker.summary()["degraded"] is True  # some points were lost: it stays said


def test_no_uri_or_no_client_is_degraded_not_an_error(tmp_path: Path) -> None:
    tracker = tracking.Tracker.open(config(tmp_path, trackingUri=None))
    assert tracker.degraded and tracker.message == tracking.NO_URI
    tracker.log_metrics({"train_loss": 1.0})
    tracker.finish()
    assert tracker.summary() == {"degraded": True, "message": tracking.NO_URI}
    untracked = parse_config(
        {"runPrefix": str(tmp_path), "spec": config(tmp_path).spec.model_dump(by_alias=True)}
    )
    assert tracking.Tracker.open(untracked).summary() == {}


def test_a_passed_gate_registers_one_version_a_failed_gate_none(tmp_path: Path, _fake_client: Any) -> None:
    fake = _fake_client.setdefault("fake", FakeMlflow())
    cfg = config(tmp_path)
    report = tmp_path / "report"
    report.mkdir()
    adapter = str(tmp_path / "run" / "model" / "adapter")  # uncommitted: lineage from the spec only
    for name in ("report.json", "report.jsonl", "report.html"):  # report.md, comparison.png: absent, skipped
        (report / name).write_text("{}")
    passed = {"tuned": {"exact_match": 0.9, "loss": 0.2}, "base": {"exact_match": 0.1, "loss": 2.0}}
    tracker = tracking.log_evaluation(cfg, passed, report, adapter)
    assert tracker.registered_version == "1"
    run = fake.runs["run1"]
    assert run["status"] == "FINISHED" and run["tags"]["gate"] == "passed"
    assert ("gate_passed", 1.0, 0) in run["metrics"] and ("base_exact_match", 0.1, 0) in run["metrics"]
    assert run["artifacts"] == ["evaluation/report.json", "evaluation/report.jsonl", "evaluation/report.html"]
    assert fake.versions[0].source == adapter and fake.versions[0].name == "shout"
    assert fake.versions[0].tags[tracking.JOB_UID_TAG] == "uid-1"
    # A rerun of evaluate (e.g. after preemption) finds the version instead of registering another.
    assert tracking.log_evaluation(cfg, passed, report, adapter).registered_version == "1"
    assert len(fake.versions) == 1

    other = config(tmp_path / "b")
    other = other.model_copy(update={"job": other.job.model_copy(update={"uid": "uid-2"})})
    failed = {"tuned": {"exact_match": 0.0}, "base": {"exact_match": 0.1}}
    rejected = tracking.log_evaluation(other, failed, report, str(tmp_path / "y"))
    assert rejected.registered_version is None and len(fake.versions) == 1
    assert fake.runs[rejected.run_id or ""]["tags"]["gate"] == "failed"
    assert "registeredVersion" not in rejected.summary()


@pytest.fixture(autouse=True)
def _fake_client(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Tracker.open(config) without a client builds MlflowClient: route it to one shared fake per test."""
    shared: dict[str, FakeMlflow] = {}

    def open_with_fake(cls: Any, cfg: Any, client: Any = None, *, enabled: bool = True) -> Any:
        if client is None and cfg.tracking.mlflow is not None and cfg.tracking.mlflow.tracking_uri:
            client = shared.setdefault("fake", FakeMlflow())
        return original(cfg, client, enabled=enabled)

    original = tracking.Tracker.open
    monkeypatch.setattr(tracking.Tracker, "open", classmethod(open_with_fake))
    return shared


def test_jobs_racing_to_create_their_namespaces_experiment_are_not_degraded(tmp_path: Path) -> None:
    fake = FakeMlflow()
    original = fake.get_experiment_by_name
    calls = iter([None])  # the first lookup misses: another job creates the experiment meanwhile

    def racing_lookup(name: str) -> Any:
        missed = next(calls, "found")
        if missed is None:
            fake.experiments[name] = "7"
            return None
        return original(name)

    def create(name: str) -> str:
        error = RuntimeError("RESOURCE_ALREADY_EXISTS: Experiment(name=team-a) already exists")
        error.error_code = "RESOURCE_ALREADY_EXISTS"  # type: ignore[attr-defined]
        raise error

    fake.get_experiment_by_name = racing_lookup  # type: ignore[method-assign]
    fake.create_experiment = create  # type: ignore[method-assign]
    tracker = tracking.Tracker.open(config(tmp_path), fake)
    assert tracker.experiment_id == "7" and tracker.run_id == "run1" and not tracker.degraded


_REAL_OPEN = tracking.Tracker.__dict__["open"]  # before the autouse fixture routes it to the fake


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A plain-http server on loopback that records each request's Authorization header (and refuses it)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            body = b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "recorder"}'
            self.send_response(400)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _record

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    thread.join(timeout=10)


def test_the_token_goes_over_plain_http_only_to_hosts_the_operator_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorder: tuple[str, list[str]]
) -> None:
    monkeypatch.setattr(tracking.Tracker, "open", _REAL_OPEN)  # MLflow's real client
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "team-token")
    url, seen = recorder
    refused = tracking.Tracker.open(config(tmp_path, trackingUri=url))
    assert refused.client is None and refused.degraded and seen == []
    assert (refused.message or "").startswith(
        "spec.tracking.mlflow.trackingUri: http://127.0.0.1: plain http"
    )
    # the embedded cluster's in-cluster MLflow: loopback is on the operator's allow-list
    allowed = tracking.Tracker.open(
        config(tmp_path / "b", trackingUri=url, allowPlainHttpHosts=["127.0.0.0/8"])
    )
    assert allowed.client is not None
    assert seen and set(seen) == {"Bearer team-token"}


@pytest.mark.parametrize(
    ("uri", "allow"), [("http://169.254.169.254", ["169.254.0.0/16"]), ("https://metadata.internal:443", [])]
)
def test_a_tracking_uri_at_a_metadata_address_is_refused_before_any_client_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str, allow: list[str]
) -> None:
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        return real("169.254.169.254" if host == "metadata.internal" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(tracking.Tracker, "open", _REAL_OPEN)
    tracker = tracking.Tracker.open(config(tmp_path, trackingUri=uri, allowPlainHttpHosts=allow))
    assert tracker.client is None and tracker.degraded
    assert "trackingUri" in (tracker.message or "") and "169.254.169.254" in (tracker.message or "")
    assert "link-local or cloud metadata address" in (tracker.message or "")


def test_a_scheduled_runs_dataset_sources_are_params(tmp_path: Path) -> None:
    """FTJ_CONFIG `dataset.sources` (the assemble stage's counts, set for a FineTuneSchedule's job) become
    `dataset.sources.<key>` params and lineage tags; a job without them logs none."""
    plain = config(tmp_path)
    document = {**plain.model_dump(by_alias=True), "dataset": {"sources": {"base": 120, "captured": 37}}}
    scheduled = parse_config(document)

    params = tracking.run_params(scheduled)

    assert params["dataset.sources.base"] == "120" and params["dataset.sources.captured"] == "37"
    assert tracking.lineage_tags(scheduled, params)["dataset.sources.captured"] == "37"
    assert not [k for k in tracking.run_params(plain) if k.startswith("dataset.sources")]
