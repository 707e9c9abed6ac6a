"""Experiment tracking (spec.tracking.mlflow): what the trainer pods are told, and what they report back.

The operator never talks to MLflow and never reads the credentials Secret: it resolves the defaults (tracking
URI from the operator config, experiment = namespace, registered model name = the ModelServer modelName, else
the served model name, else the job name) and the hosts plain http may reach, passes them in the trainer's
FTJ_CONFIG, passes the credentials by `secretKeyRef` (optional keys), and copies the `tracking` block of each
stage's termination summary into `status.tracking`.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, MutableMapping
from typing import Any

from finetune_operator.config import OperatorConfig
from finetune_operator.finetunejob.ref import JobRef
from finetune_operator.k8s.manifests import EnvVar

# The environment MLflow's client reads its credentials from (mlflow.environment_variables).
CREDENTIAL_KEYS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
STATUS_KEYS = ("runId", "runUrl", "experimentId", "registeredModel", "registeredVersion")
MESSAGE_LIMIT = 512


def resolved(job: JobRef, config: OperatorConfig) -> dict[str, Any] | None:
    """The tracking block of FTJ_CONFIG, defaults applied; None when the job is not tracked.

    A tracked job without any tracking URI gets `trackingUri: null`: the trainer then reports tracking as
    degraded (naming the field) and trains anyway.
    """
    defaults = config.tracking.mlflow
    wanted = job.spec.tracking.mlflow if job.spec.tracking is not None else None
    if wanted is None and not (defaults.track_all_jobs and defaults.default_tracking_uri):
        return None
    uri = (wanted.tracking_uri if wanted else None) or defaults.default_tracking_uri
    experiment = (wanted.experiment if wanted else None) or job.namespace
    register = (
        (wanted.register_model if wanted else None)
        or job.spec.deployment.model_name
        or job.spec.deployment.served_model_name
        or job.name
    )
    return {
        "mlflow": {
            "trackingUri": uri,
            "experiment": experiment,
            "registerModel": register,
            "image": config.images.trainer,
            "allowPlainHttpHosts": plain_http_hosts(config),
        }
    }


def plain_http_hosts(config: OperatorConfig) -> list[str]:
    """Where the trainer may send the MLflow token over plain http: the reference's allow-list (one egress
    policy), plus the host of the platform's own defaultTrackingUri when that is http."""
    hosts = list(config.reference.allow_plain_http_hosts)
    default = config.tracking.mlflow.default_tracking_uri
    if default and default.lower().startswith("http://"):
        host = urllib.parse.urlsplit(default).hostname
        if host and host not in hosts:
            hosts.append(host)
    return hosts


def credentials_env(job: JobRef) -> list[EnvVar]:
    """MLFLOW_TRACKING_* from the job's Secret by reference (each key optional): never read here."""
    wanted = job.spec.tracking.mlflow if job.spec.tracking is not None else None
    if wanted is None or wanted.credentials_secret is None:
        return []
    secret = wanted.credentials_secret
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
        for key in CREDENTIAL_KEYS
    ]


def record(status: MutableMapping[str, Any], summary: Mapping[str, Any]) -> None:
    """Merge a stage summary's `tracking` block into status.tracking (degraded stays set once seen)."""
    reported = summary.get("tracking")
    if not isinstance(reported, Mapping):
        return
    tracking: dict[str, Any] = dict(status.get("tracking") or {})
    for key in STATUS_KEYS:
        value = reported.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            tracking[key] = str(value)[:2048]
    if reported.get("degraded") is True:
        tracking["degraded"] = True
        message = reported.get("message")
        if isinstance(message, str) and message:
            tracking["message"] = message[:MESSAGE_LIMIT]
    elif "degraded" not in tracking:
        tracking["degraded"] = False
    status["tracking"] = tracking or None
