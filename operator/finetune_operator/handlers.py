"""Kopf handlers: a trigger, a one-line docstring and a call. `register()` attaches them to a registry;
nothing is registered at import time."""

from __future__ import annotations

from typing import Any

import kopf
from finetune_vocabulary.labels import LABEL_MANAGED_BY, LABEL_MODELSERVER_UID, MANAGER

from finetune_operator import lifecycle
from finetune_operator.api.finetunejob import GROUP, PLURAL, VERSION
from finetune_operator.api.finetunepolicy import PLURAL as POLICY_PLURAL
from finetune_operator.api.finetuneschedule import PLURAL as SCHEDULES
from finetune_operator.api.modelserver import PLURAL as MODELSERVERS
from finetune_operator.finetuneschedule.builders import LABEL_SCHEDULE_UID

MANAGED = {LABEL_MANAGED_BY: MANAGER}


def register(registry: kopf.OperatorRegistry) -> kopf.OperatorRegistry:
    """Attach every handler of the operator to `registry` and return it."""
    _register_lifecycle(registry)
    _register_indexes(registry)
    _register_events(registry)
    _register_pools(registry)
    _register_schedules(registry)
    return registry


def _register_lifecycle(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.login(id="login", registry=registry)
    async def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """Log in with the pod's service account or the kubeconfig."""
        return await lifecycle.login(**kwargs)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(memo: Any, **kwargs: Any) -> None:
        """Wire the watch caches into the reconcile and start the resync loop."""
        await lifecycle.startup(memo, kwargs)

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(memo: Any, **_: Any) -> None:
        """Stop the resync loop and close the API session."""
        await lifecycle.cleanup(memo)


def _register_indexes(registry: kopf.OperatorRegistry) -> None:
    @kopf.index("batch", "v1", "jobs", labels=MANAGED, id="child_jobs", registry=registry)
    async def child_jobs(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
        """Cache our Jobs by their FineTuneJob's uid."""
        return lifecycle.index_child(body)

    @kopf.index("apps", "v1", "deployments", labels=MANAGED, id="child_deployments", registry=registry)
    async def child_deployments(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
        """Cache our Deployments by their FineTuneJob's (or ModelServer's) uid."""
        return lifecycle.index_deployment(body)

    @kopf.index("", "v1", "services", labels=MANAGED, id="child_services", registry=registry)
    async def child_services(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
        """Cache our Services by their FineTuneJob's uid."""
        return lifecycle.index_child(body)

    @kopf.index("", "v1", "pods", labels=MANAGED, id="child_pods", registry=registry)
    async def child_pods(body: kopf.Body, **_: Any) -> dict[str, Any] | None:
        """Cache our children's pods by their FineTuneJob's uid."""
        return lifecycle.index_child(body)


def _register_events(registry: kopf.OperatorRegistry) -> None:
    """Kopf does not retry on.event handlers: the resync loop retries failed reconciles (lifecycle.py)."""

    @kopf.on.event(GROUP, VERSION, PLURAL, id="finetunejob_event", registry=registry)
    async def finetunejob_event(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
        """Reconcile a FineTuneJob when it is listed (resume), created or changed."""
        await lifecycle.on_job_event(memo, body, type)

    @kopf.on.event(GROUP, VERSION, POLICY_PLURAL, id="policy_event", registry=registry)
    async def policy_event(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
        """Keep FineTunePolicies, sync their status at once and re-plan the unfinished jobs."""
        await lifecycle.on_policy_event(memo, body, type)

    @kopf.on.event("", "v1", "namespaces", id="namespace_event", registry=registry)
    async def namespace_event(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
        """Keep namespace labels for the policies' namespaceSelectors."""
        await lifecycle.on_namespace_event(memo, body, type)

    @kopf.on.event("batch", "v1", "jobs", labels=MANAGED, id="job_event", registry=registry)
    async def job_event(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
        """Reconcile the owning FineTuneJob when one of its Jobs changes."""
        await lifecycle.on_child_event(memo, body, type)

    @kopf.on.event("apps", "v1", "deployments", labels=MANAGED, id="deployment_event", registry=registry)
    async def deployment_event(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
        """Reconcile the owning FineTuneJob when its Deployment changes."""
        await lifecycle.on_child_event(memo, body, type)

    @kopf.on.event("", "v1", "services", labels=MANAGED, id="service_event", registry=registry)
    async def service_event(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
        """Reconcile the owning FineTuneJob when its Service changes or disappears."""
        await lifecycle.on_child_event(memo, body, type)

    @kopf.on.event("", "v1", "pods", labels=MANAGED, id="pod_event", registry=registry)
    async def pod_event(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
        """Reconcile the owning FineTuneJob when a pod is scheduled, blocked, started or ends."""
        await lifecycle.on_child_event(memo, body, type)


def _register_pools(registry: kopf.OperatorRegistry) -> None:
    """ModelServers are queued by modelserver/controller.py: these handlers only kick a pool."""

    @kopf.on.event(GROUP, VERSION, MODELSERVERS, id="modelserver_event", registry=registry)
    async def modelserver_event(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
        """Reconcile a ModelServer when it is listed, created, changed or deleted."""
        lifecycle.context(memo).pools.seen(body, deleted=type == "DELETED")

    @kopf.on.event(
        "", "v1", "pods", labels={LABEL_MODELSERVER_UID: kopf.PRESENT}, id="pool_pod_event", registry=registry
    )
    async def pool_pod_event(body: kopf.Body, memo: Any, **_: Any) -> None:
        """Reconcile a ModelServer when one of its pods starts, turns ready or goes."""
        lifecycle.context(memo).pools.kick_pod(body)


def _register_schedules(registry: kopf.OperatorRegistry) -> None:
    """FineTuneSchedules are queued by finetuneschedule/controller.py: these handlers only kick a schedule
    (a run's FineTuneJob kicks it from finetunejob_event)."""

    @kopf.on.event(GROUP, VERSION, SCHEDULES, id="schedule_event", registry=registry)
    async def schedule_event(body: kopf.Body, type: str | None, memo: Any, **_: Any) -> None:
        """Plan a FineTuneSchedule when it is listed, created, changed or deleted."""
        lifecycle.context(memo).schedules.seen(body, deleted=type == "DELETED")

    @kopf.on.event(
        "batch",
        "v1",
        "jobs",
        labels={LABEL_SCHEDULE_UID: kopf.PRESENT},
        id="schedule_job_event",
        registry=registry,
    )
    async def schedule_job_event(body: kopf.Body, memo: Any, **_: Any) -> None:
        """Plan a FineTuneSchedule when one of its data Jobs changes (finishes)."""
        lifecycle.context(memo).schedules.kick_child(body)
