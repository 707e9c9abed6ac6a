"""MLflow tracking: one run per FineTuneJob, shared by validate, train and evaluate, resumed after preemption.

- The run: its id is kept at ``<runPrefix>/tracking/run.json``; when that is missing (first stage, or the
  write failed) the run is searched by the tag ``finetune.job_uid`` before a new one is created.
- What is logged: params (resolved hyperparameters, method, LoRA, base model URI + resolved revision, dataset
  URIs + sha256/ETag, a scheduled run's ``dataset.sources.<key>`` counts, image, job uid) by
  ``run_params``; training loss, learning rate and tokens/s per logging step by ``TrackingCallback``;
  tuned/base/reference/champion metrics and the gate's decision by ``log_evaluation``; the data validation
  report, the loss plot and the evaluation reports (report.json/.md, the comparison chart, the per-example
  report.jsonl and report.html) as artifacts.
- On gate pass, ``register`` creates a Model Registry version whose source is the adapter (or merged model)
  in the run's storage, tagged with the lineage and the job uid; a failed gate registers nothing.
- Never fails a stage: every call is guarded, MLflow's own HTTP retries are bounded and short
  (``HTTP_SETTINGS``), and after ``MAX_FAILURES`` failed calls in a row the tracker stops calling for
  ``COOLDOWN_S`` seconds. Any failure marks tracking degraded, which the stage reports in its summary
  (``status.tracking.degraded``). Credentials come from the environment (MLFLOW_TRACKING_TOKEN or
  USERNAME/PASSWORD, by secretKeyRef) and MLflow's client sends them to the tracking URI only, which must
  pass the reference's egress rules first (``egress_refusal``): https unless the operator allows plain http
  for the host, never a link-local or metadata address; a refused URI is degraded tracking, nothing sent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from finetune_vocabulary.gate import Bound, GateResult, Retention, Safety, decide
from finetune_vocabulary.objectives import PROGRESS_FIGURES

from . import egress, manifest, storage
from .config import MlflowTracking, TrainerConfig

log = logging.getLogger(__name__)
# TRL log keys of the objectives' own figures (finetune_vocabulary.objectives), forwarded to MLflow
OBJECTIVE_LOG_KEYS = frozenset(k for figures in PROGRESS_FIGURES.values() for k in figures.values())

JOB_UID_TAG = "finetune.job_uid"
# MLflow client HTTP behaviour (mlflow.environment_variables), unless the pod's environment says otherwise.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
MAX_FAILURES = 3
COOLDOWN_S = 60.0
PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value
NO_URI = (
    "no MLflow tracking URI: set spec.tracking.mlflow.trackingUri or the operator's "
    "tracking.mlflow.defaultTrackingUri"
)


def image_digest(image: str | None) -> str:
    """`repo@sha256:…` → the digest; a tag-only reference has none (the pod status's imageID has it)."""
    if image and "@" in image:
        return image.split("@", 1)[1]
    return "unpinned"


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, list | tuple):
        out[prefix] = ",".join(_text(v) for v in value)
    else:
        out[prefix] = _text(value)


def _text(value: Any) -> str:
    """A param value: numbers in their shortest form (epochs 4, not the trainer's float 4.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def run_params(
    config: TrainerConfig,
    *,
    base_model_revision: str | None = None,
    dataset: Mapping[str, Mapping[str, Any]] | None = None,
    resolved: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The run's params, as strings: `hyperparameters.<name>` equal the spec's values, plus the lineage."""
    spec = config.spec
    params: dict[str, str] = {"method": spec.method}
    _flatten("hyperparameters", spec.hyperparameters.model_dump(by_alias=True), params)
    if spec.method in ("lora", "qlora"):
        _flatten("lora", spec.lora.model_dump(by_alias=True), params)
    params["baseModel.uri"] = spec.base_model.uri
    params["baseModel.revision"] = str(base_model_revision or spec.base_model.revision or "unknown")
    for role, info in (dataset or {}).items():
        for key in ("uri", "sha256", "etag", "versionId", "size"):
            if info.get(key) is not None:
                params[f"dataset.{role}.{key}"] = str(info[key])
    for key, count in config.dataset.sources.items():  # a scheduled run's assembled set (assemble.py)
        params[f"dataset.sources.{key}"] = str(count)
    settings = config.tracking.mlflow
    image = settings.image if settings else None
    params["image"] = str(image or "unknown")
    params["image.digest"] = image_digest(image)
    params["job.uid"] = config.job.uid
    params["job.namespace"] = config.job.namespace
    params["job.name"] = config.job.name
    _flatten("resolved", dict(resolved or {}), params)
    return {key: value[:PARAM_VALUE_LIMIT] for key, value in params.items()}


def lineage_tags(config: TrainerConfig, params: Mapping[str, str]) -> dict[str, str]:
    """Tags of a registered version: where its weights and data came from, and which job made it."""
    keys = ("method", "baseModel.uri", "baseModel.revision", "image", "image.digest")
    tags = {key: params[key] for key in keys if key in params}
    tags.update({k: v for k, v in params.items() if k.startswith("dataset.")})
    tags[JOB_UID_TAG] = config.job.uid
    tags["finetune.job"] = f"{config.job.namespace}/{config.job.name}"
    tags["finetune.runPrefix"] = config.run_prefix
    return tags


def _figure(section: Any, key: str) -> float | None:
    value = section.get(key) if isinstance(section, Mapping) else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def gate_decision(
    config: TrainerConfig,
    tuned: Mapping[str, float],
    base: Mapping[str, float] | None,
    summary: Mapping[str, Any] | None = None,
) -> GateResult:
    """The operator's gate (finetune_vocabulary.gate) on this evaluation's scores, with the safety and
    retention figures of the stage's `summary`: a model the operator rejects is never registered."""
    ev, found = config.spec.evaluation, summary or {}
    safety = retention = None
    if ev.safety is not None:
        rates = found.get("safety")
        safety = Safety(_figure(rates, "tuned"), _figure(rates, "base"), ev.safety.max_unsafe_rate)
    if ev.retention is not None:
        scores = found.get("retention")
        retention = Retention(
            ev.retention.metric, _figure(scores, "tuned"), _figure(scores, "base"), ev.retention.max_drop
        )
    return decide(
        [Bound(t.metric, t.min, t.max) for t in ev.thresholds],
        tuned,
        base,
        compare_to_base=ev.compare_to_base,
        primary=config.spec.deciding_metric,
        min_improvement=ev.min_improvement,
        safety=safety,
        retention=retention,
    )


def _numbers(scores: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (scores or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def egress_refusal(settings: MlflowTracking) -> str | None:
    """Why the tracking URI breaks the reference's egress rules (egress.py), checked on the addresses the
    host resolves to before MLflow's client exists; None when it may be used (or DNS cannot say yet)."""
    allowance = egress.PlainHttpAllowance.parse(settings.allow_plain_http_hosts)
    try:
        egress.check_resolved(str(settings.tracking_uri), allowance)
    except egress.RefusedEndpoint as exc:
        return f"spec.tracking.mlflow.trackingUri: {exc}; nothing was sent to it"
    except OSError:
        return None  # unresolvable now: MLflow's own call fails and says so
    return None


class Tracker:
    """The job's MLflow run. Every public method is safe to call whatever MLflow's state; none raises."""

    def __init__(
        self, config: TrainerConfig, client: Any = None, *, clock: Callable[[], float] = time.monotonic
    ):
        self.config = config
        self.settings = config.tracking.mlflow
        self.enabled = self.settings is not None
        self.client = client
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.registered_version: str | None = None
        self.degraded = False
        self.message: str | None = None
        self.skipped = 0  # calls not made while paused
        self._failures = 0
        self._paused_until = 0.0
        self._clock = clock

    # --- guarded calls -----------------------------------------------------------------------------
    def _degrade(self, message: str) -> None:
        if not self.degraded:
            log.warning("MLflow tracking degraded: %s", message)
        self.degraded = True
        self.message = message[:512]

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), or None when MLflow is off, paused after failures, or the call fails."""
        if not self.enabled or self.client is None:
            return None
        if self._clock() < self._paused_until:
            self.skipped += 1  # the message keeps the failure that paused the tracker
            return None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # logging never fails a stage
            self._failures += 1
            self._degrade(f"{what} failed: {type(exc).__name__}: {str(exc)[:200]}")
            if self._failures >= MAX_FAILURES:
                self._paused_until = self._clock() + COOLDOWN_S
                self._failures = 0
            return None
        self._failures = 0
        return result

    # --- the run -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, config: TrainerConfig, client: Any = None, *, enabled: bool = True) -> Tracker:
        """The tracker for this job's run (found, or created and remembered); disabled when not tracked
        (and on ranks other than 0: `enabled=False`)."""
        tracker = cls(config, client)
        tracker.enabled = tracker.enabled and enabled
        if not tracker.enabled:
            return tracker
        if client is None:
            if not tracker.settings or not tracker.settings.tracking_uri:
                tracker._degrade(NO_URI)
                return tracker
            if refusal := egress_refusal(tracker.settings):
                tracker._degrade(refusal)  # no client: the token is never sent
                return tracker
            try:
                for key, value in HTTP_SETTINGS.items():
                    os.environ.setdefault(key, value)
                from mlflow.tracking import MlflowClient

                tracker.client = MlflowClient(tracking_uri=tracker.settings.tracking_uri)
            except Exception as exc:
                tracker._degrade(f"MLflow client unavailable: {type(exc).__name__}: {exc}")
                return tracker
        try:
            tracker._resolve_run()
        except Exception as exc:  # belt and braces: nothing here may fail the stage
            tracker._degrade(f"MLflow run not resolved: {type(exc).__name__}: {exc}")
        return tracker

    def _remembered_run(self) -> str | None:
        try:
            document = json.loads(storage.read_text(self.config.layout.tracking_run))
        except storage.NotFound:
            return None
        except Exception as exc:
            log.warning("could not read %s: %s", self.config.layout.tracking_run, exc)
            return None
        run_id = document.get("runId") if isinstance(document, dict) else None
        return run_id if isinstance(run_id, str) and run_id.isalnum() else None

    def _resolve_run(self) -> None:
        assert self.settings is not None
        client, uid = self.client, self.config.job.uid
        run_id = self._remembered_run()
        if run_id is not None:
            run = self.call("get run", client.get_run, run_id)
            if run is None:
                return
            self.run_id, self.experiment_id = run_id, run.info.experiment_id
        else:
            self.experiment_id = self.call("get experiment", _experiment_id, client, self.settings.experiment)
            if self.experiment_id is None:
                return
            found = self.call(
                "search runs",
                client.search_runs,
                [self.experiment_id],
                filter_string=f"tags.`{JOB_UID_TAG}` = '{uid}'",
                max_results=1,
            )
            if found is None:
                return
            if found:
                self.run_id = found[0].info.run_id
            else:
                job = self.config.job
                run = self.call(
                    "create run",
                    client.create_run,
                    self.experiment_id,
                    run_name=job.name,
                    tags={
                        JOB_UID_TAG: uid,
                        "finetune.job": f"{job.namespace}/{job.name}",
                        "finetune.runPrefix": self.config.run_prefix,
                        "mlflow.source.name": "finetune-operator",
                    },
                )
                if run is None:
                    return
                self.run_id = run.info.run_id
            try:
                storage.write_text(self.config.layout.tracking_run, json.dumps({"runId": self.run_id}))
            except Exception as exc:  # the tag search finds the run next time
                log.warning("could not remember the MLflow run id: %s", exc)
        self.call("mark running", client.update_run, self.run_id, status="RUNNING")

    @property
    def active(self) -> bool:
        return self.run_id is not None and self.client is not None

    @property
    def run_url(self) -> str | None:
        if not self.active or not self.settings or not self.settings.tracking_uri:
            return None
        return (
            f"{self.settings.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        )

    # --- logging -----------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.call("log params", self.client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [
            Metric(key, float(value), stamp, step) for key, value in metrics.items() if math.isfinite(value)
        ]
        if items:
            self.call("log metrics", self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(key, str(value)[:5000]) for key, value in tags.items()]
        self.call("set tags", self.client.log_batch, self.run_id, tags=items)

    def log_artifacts(self, files: Iterable[tuple[Path, str]]) -> None:
        """(local file, artifact directory) pairs; missing files are skipped."""
        if not self.active:
            return
        for path, directory in files:
            if Path(path).is_file():
                self.call(
                    f"log artifact {Path(path).name}",
                    self.client.log_artifact,
                    self.run_id,
                    str(path),
                    directory,
                )

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self.call("end run", self.client.set_terminated, self.run_id, status)

    # --- registry ----------------------------------------------------------------------------------
    def register(self, source: str, tags: Mapping[str, str]) -> str | None:
        """A Model Registry version of `source` (once per run: a rerun finds the earlier version)."""
        if not self.active or not self.settings or not self.settings.register_model:
            return None
        name, client = self.settings.register_model, self.client
        existing = self.call(
            "search model versions", client.search_model_versions, f"name='{name}' and run_id='{self.run_id}'"
        )
        if existing is None:
            return None
        if existing:
            self.registered_version = str(existing[0].version)
            return self.registered_version
        if self.call("create registered model", _ensure_registered_model, client, name) is None:
            return None
        version = self.call(
            "create model version",
            client.create_model_version,
            name,
            source,
            run_id=self.run_id,
            tags=dict(tags),
        )
        if version is not None:
            self.registered_version = str(version.version)
        return self.registered_version

    def summary(self) -> dict[str, Any]:
        """The `tracking` block of the stage's termination summary (status.tracking); empty when untracked."""
        if not self.enabled:
            return {}
        block: dict[str, Any] = {"degraded": self.degraded}
        if self.run_id:
            block.update(runId=self.run_id, experimentId=self.experiment_id, runUrl=self.run_url)
        if self.registered_version and self.settings:
            block.update(
                registeredModel=self.settings.register_model, registeredVersion=self.registered_version
            )
        if self.degraded and self.message:
            skipped = f" ({self.skipped} later calls skipped)" if self.skipped else ""
            block["message"] = (self.message + skipped)[:512]
        return block


def _experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created when missing (jobs of one namespace may race to create it)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(client.create_experiment(name))
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    return str(experiment.experiment_id)


def _model_manifest(model_uri: str) -> manifest.Manifest | None:
    try:
        return manifest.read_manifest(model_uri)
    except Exception as exc:  # lineage tags are then the spec's only; registration goes on
        log.warning("could not read the manifest of %s: %s", model_uri, exc)
        return None


def _ensure_registered_model(client: Any, name: str) -> bool:
    try:
        client.create_registered_model(name)
    except Exception as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    return True


def with_tracking(summary: Mapping[str, Any], tracker: Tracker) -> dict[str, Any]:
    block = tracker.summary()
    return {**summary, "tracking": block} if block else dict(summary)


# --- stages -------------------------------------------------------------------------------------------------


def log_validation(
    config: TrainerConfig, provenance: Mapping[str, Mapping[str, Any]], report: Path
) -> Tracker:
    tracker = Tracker.open(config)
    tracker.log_params(
        {
            f"dataset.{role}.{key}": str(value)
            for role, info in provenance.items()
            for key, value in info.items()
            if value is not None
        }
    )
    tracker.log_artifacts([(report, "data")])
    return tracker


def log_evaluation(
    config: TrainerConfig,
    results: Mapping[str, Mapping[str, Any] | None],
    report_dir: Path,
    model_uri: str | None,
    summary: Mapping[str, Any] | None = None,
) -> Tracker:
    """Scores per model, the gate's decision, the reports; on gate pass, the registered version."""
    tracker = Tracker.open(config)
    if not tracker.enabled:
        return tracker
    scores = {name: _numbers(values) for name, values in results.items() if values}
    metrics = {
        f"{name}_{metric}": value for name, values in scores.items() for metric, value in values.items()
    }
    gate = gate_decision(config, scores.get("tuned", {}), scores.get("base"), summary)
    metrics["gate_passed"] = 1.0 if gate.passed else 0.0
    if gate.improvement is not None and math.isfinite(gate.improvement):
        metrics["gate_improvement"] = gate.improvement
    tracker.log_metrics(metrics)
    tracker.set_tags({"gate": "passed" if gate.passed else "failed", "gate.reasons": "; ".join(gate.reasons)})
    tracker.log_artifacts(
        (report_dir / name, "evaluation")
        for name in ("report.json", "report.md", "comparison.png", "report.jsonl", "report.html")
    )
    if gate.passed and model_uri:
        model = _model_manifest(model_uri)  # what train recorded: dataset and resolved base revision
        params = run_params(
            config,
            base_model_revision=(model.base_model.get("revision") if model else None),
            dataset=model.dataset if model else None,
        )
        tracker.register(model_uri, lineage_tags(config, params))
    tracker.finish()
    return tracker


class TrackingCallback:
    """Training loss, learning rate and tokens/s at every logging step (rank 0 only)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):  # type: ignore[misc]
            def __init__(self, tracker: Tracker, tokens_seen: Callable[[], int]) -> None:
                self.tracker = tracker
                self.tokens_seen = tokens_seen
                self._last: tuple[float, int] | None = None

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                if not state.is_world_process_zero or not logs:
                    return
                self.tracker.log_metrics(step_metrics(logs, self._rate()), step=int(state.global_step))

            def _rate(self) -> float | None:
                now, tokens = time.monotonic(), self.tokens_seen()
                last, self._last = self._last, (now, tokens)
                if last is None or now <= last[0]:
                    return None
                return (tokens - last[1]) / (now - last[0])

        return _Callback(*args, **kwargs)


def step_metrics(logs: Mapping[str, Any], tokens_per_second: float | None) -> dict[str, float]:
    """One logging step's metrics from the Trainer's `logs` dict; the dpo/kto/grpo figures under TRL's own
    names (``rewards/chosen``, ``kl``, ``reward``, ``rewards/<grader>/mean`` ...)."""
    names = {
        "loss": "train_loss",
        "learning_rate": "learning_rate",
        "eval_loss": "eval_loss",
        "grad_norm": "grad_norm",
    }
    out = {name: float(logs[key]) for key, name in names.items() if isinstance(logs.get(key), int | float)}
    for key, value in logs.items():
        if isinstance(value, int | float) and (key in OBJECTIVE_LOG_KEYS or key.startswith("rewards/")):
            out[_metric_name(key)] = float(value)
    if tokens_per_second is not None and "train_loss" in out:  # a logging step, not the final summary
        out["tokens_per_second"] = tokens_per_second
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _metric_name(key: str) -> str:
    """MLflow metric names: letters, digits, ``_ - . /`` and spaces (a grader name is already such)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)[:250]
