"""What a FineTuneJob and the ModelServer serving it tell each other: the one module both kinds import.

A job asks a pool to load its adapter by writing `status.serving.state: Accepted` (with its adapter in
`status.artifacts.adapter` and the stable name in `spec.deployment.modelName`), and to promote it once its
serving check passed (`status.serving.checked: true`): `ServingRequest`. The pool
answers in its status (the version registry, what every ready replica holds, the endpoint): `PoolReport`.
Each side reads the other only through these typed values, never through raw status paths of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_operator.api.modelserver_conditions import PoolConditionType, PoolReason
from finetune_operator.k8s.naming import child_name
from finetune_operator.k8s.ownership import is_controlled_by, is_recorded, records_of

ACCEPTED = "Accepted"  # a job's status.serving.state once its gate and the champion comparison passed
# A job's status.serving.state once its pool rolled its canary back: it no longer asks (the pool drops it).
ROLLED_BACK = "RolledBack"
ROLLOUT_PROGRESSING = "Progressing"  # RolloutView.state while the canary runs (Completed, RolledBack after)
POOL_COMPONENT = "pool"  # a ModelServer's Deployment, Service and ConfigMap: <name>-pool
MODELSERVER_NAME_LEAD = "m"  # naming.child_name's lead for a ModelServer name not starting with a letter


def pool_name(server: str) -> str:
    """A ModelServer's pool Deployment, Service and ConfigMap name: `<name>-pool`, or a hashed form."""
    return child_name(server, POOL_COMPONENT, lead=MODELSERVER_NAME_LEAD)


def pool_url(server: str, namespace: str, port: int) -> str:
    """The in-cluster OpenAI base URL of a ModelServer (its status endpoint; a judge's modelServer)."""
    return f"http://{pool_name(server)}.{namespace}.svc:{port}/v1"


@dataclass(frozen=True)
class ServingRequest:
    """What an accepted job asks its pool to load: its adapter under the stable model name."""

    job: str
    job_uid: str
    model: str
    adapter: str
    # The serving check passed (or is off): the pool may promote the version; until then it only loads it.
    checked: bool = False


def jobs_served_by(jobs: Sequence[Mapping[str, Any]], server: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The FineTuneJobs a ModelServer (its metadata: name, namespace, uid, ownerReferences, annotations)
    serves, oldest first: those naming it in spec.deployment.server, and the job it belongs to: its
    controller, which recorded creating it in status.children (a forged ownerReference does not count)."""
    name, namespace = server.get("name"), str(server.get("namespace") or "")
    found = [
        job
        for job in jobs
        if ((job.get("spec") or {}).get("deployment") or {}).get("server") == name
        or (
            is_controlled_by({"metadata": server}, namespace, str(job["metadata"].get("uid") or ""))
            and is_recorded({"metadata": server}, "ModelServer", records_of(job.get("status") or {}) or {})
        )
    ]
    return sorted(
        found, key=lambda j: (str(j["metadata"].get("creationTimestamp") or ""), j["metadata"]["name"])
    )


def serving_request(job: Mapping[str, Any]) -> ServingRequest | None:
    """The request of a FineTuneJob object (as the API returns it), or None while it asks for nothing."""
    metadata = job.get("metadata") or {}
    status = job.get("status") or {}
    adapter = (status.get("artifacts") or {}).get("adapter")
    # The job writes the name it asks for: spec.deployment.modelName on a shared pool, its served name on
    # its own.
    model = (status.get("serving") or {}).get("modelName") or (
        ((job.get("spec") or {}).get("deployment") or {}).get("modelName")
    )
    if (status.get("serving") or {}).get("state") != ACCEPTED or not adapter or not model:
        return None
    if metadata.get("deletionTimestamp"):
        return None
    checked = (status.get("serving") or {}).get("checked") is True
    return ServingRequest(str(metadata["name"]), str(metadata["uid"]), str(model), str(adapter), checked)


@dataclass(frozen=True)
class ServedVersion:
    """One adapter version in a pool's registry."""

    version: int
    name: str
    adapter: str
    job_uid: str | None
    loaded: bool
    unloaded_reason: str | None
    rollout_failed: str | None = None  # its canary was rolled back: why, with the figures


@dataclass(frozen=True)
class RolloutView:
    """The canary rollout of a stable name (status.models.<name>.rollout)."""

    version: int
    name: str
    state: str  # Progressing | Completed | RolledBack
    step: int
    steps: tuple[int, ...]
    weight: int
    message: str


@dataclass(frozen=True)
class PoolReport:
    """What a ModelServer reports to the jobs it serves, read from its status."""

    name: str
    endpoint: str
    versions: Mapping[str, tuple[ServedVersion, ...]]  # stable model name → its versions
    promoted: Mapping[str, int | None]
    serving: Mapping[str, int | None]  # the version each stable name serves now
    ready_loaded: tuple[frozenset[str], ...]  # per ready replica: the versioned names it holds
    ready_replicas: int  # pods ready with every adapter loaded
    message: str  # why it is not ready (FineTunePolicy refusal, replicas starting)
    # (reason, message) of a Ready condition that waiting will not fix (ImagePullFailed), else None
    start_failure: tuple[str, str] | None = None
    # per ready replica: stable name → the versioned name its router sends it to
    ready_routes: tuple[Mapping[str, str], ...] = ()
    rollouts: Mapping[str, RolloutView] = field(
        default_factory=dict
    )  # stable name → its current/last rollout

    def version_of(self, model: str, job_uid: str) -> ServedVersion | None:
        return next((v for v in self.versions.get(model, ()) if v.job_uid == job_uid), None)

    def champion(self, model: str) -> ServedVersion | None:
        """The promoted version of `model` (what a new job must beat), or None while nothing serves."""
        promoted = self.promoted.get(model)
        return next((v for v in self.versions.get(model, ()) if v.version == promoted and v.adapter), None)

    def loaded_everywhere(self, name: str) -> tuple[int, int]:
        """(ready replicas holding the versioned `name`, ready replicas)."""
        return sum(1 for held in self.ready_loaded if name in held), len(self.ready_loaded)

    def routed_everywhere(self, model: str, name: str) -> tuple[int, int]:
        """(ready replicas routing the stable `model` to the versioned `name`, ready replicas)."""
        return sum(1 for routes in self.ready_routes if routes.get(model) == name), len(self.ready_routes)


def _version(found: Mapping[str, Any]) -> ServedVersion:
    return ServedVersion(
        version=int(found.get("version") or 0),
        name=str(found.get("name") or ""),
        adapter=str(found.get("adapter") or ""),
        job_uid=str(found["jobUid"]) if found.get("jobUid") else None,
        loaded=bool(found.get("loaded", True)),
        unloaded_reason=str(found["unloadedReason"]) if found.get("unloadedReason") else None,
        rollout_failed=str(found["rolloutFailed"]) if found.get("rolloutFailed") else None,
    )


def _rollout(found: Mapping[str, Any]) -> RolloutView:
    return RolloutView(
        version=int(found.get("version") or 0),
        name=str(found.get("name") or ""),
        state=str(found.get("state") or ""),
        step=int(found.get("step") or 0),
        steps=tuple(int(s) for s in found.get("steps") or []),
        weight=int(found.get("weight") or 0),
        message=str(found.get("message") or ""),
    )


def pool_report(server: Mapping[str, Any]) -> PoolReport:
    """The report of a ModelServer object (as the API returns it)."""
    status = server.get("status") or {}
    models: Mapping[str, Any] = status.get("models") or {}
    return PoolReport(
        name=str((server.get("metadata") or {}).get("name") or ""),
        endpoint=str(status.get("endpoint") or ""),
        versions={m: tuple(_version(v) for v in found.get("versions") or []) for m, found in models.items()},
        promoted={m: found.get("promoted") for m, found in models.items()},
        serving={m: found.get("serving") for m, found in models.items()},
        ready_loaded=tuple(
            frozenset(r.get("loaded") or []) for r in status.get("replicas") or [] if r.get("ready")
        ),
        ready_routes=tuple(
            dict(r.get("routes") or {}) for r in status.get("replicas") or [] if r.get("ready")
        ),
        ready_replicas=int(status.get("readyReplicas") or 0),
        message=str(status.get("message") or ""),
        start_failure=_start_failure(status),
        rollouts={m: _rollout(found["rollout"]) for m, found in models.items() if found.get("rollout")},
    )


# ModelServer Ready reasons that end a job served only by that pool
START_FAILURES = frozenset({PoolReason.IMAGE_PULL_FAILED})


def _start_failure(status: Mapping[str, Any]) -> tuple[str, str] | None:
    conditions = status.get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == PoolConditionType.READY), None) or {}
    if ready.get("status") == "False" and ready.get("reason") in START_FAILURES:
        return str(ready["reason"]), str(ready.get("message") or "")
    return None
