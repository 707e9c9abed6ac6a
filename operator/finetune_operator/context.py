"""What the operator keeps between reconciles, composed at the top: the FineTuneJob controller's records and
children view (finetunejob/records.py), the ModelServers' (modelserver/queue.py), the FineTunePolicies and the
API client. Lives in Kopf's memo (`memo["ctx"]`), created by `__main__` and shared by the handlers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunepolicy import FineTunePolicy
from finetune_operator.config import OperatorConfig
from finetune_operator.finetunejob.records import JobRecords
from finetune_operator.finetunepolicy import enforcement as policy
from finetune_operator.finetunepolicy.controller import PolicyQueue
from finetune_operator.finetuneschedule.controller import ScheduleQueue
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import observe, ownership

# The watch-cache helpers the handlers and lifecycle use, re-exported from where they live.
from finetune_operator.k8s.watchcache import Children as Children
from finetune_operator.k8s.watchcache import owner_uid as owner_uid
from finetune_operator.k8s.watchcache import resource_version as resource_version
from finetune_operator.k8s.watchcache import snapshot as snapshot
from finetune_operator.metrics import Metrics
from finetune_operator.modelserver.queue import PoolController


@dataclass
class Context(JobRecords):
    """Operator-wide state shared by handlers (Kopf's memo); the FineTuneJob controller's ControllerContext.
    Its job records, `starting`, `children_of` and children view come from JobRecords."""

    config: OperatorConfig
    metrics: Metrics = field(default_factory=Metrics)
    api: kube.Api | None = None
    connection: Any = None
    resync: asyncio.Task[None] | None = None  # the resync loop (lifecycle.py), started by Kopf's startup
    # FineTunePolicies and namespace labels as the watches have them (finetunepolicy/enforcement.py),
    # and each policy's last status.
    policies: dict[str, FineTunePolicy] = field(default_factory=dict)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    policy_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Each policy's GPU-hour ledger (finetunepolicy/ledger.py) as last read or written, with its
    # resourceVersion.
    ledgers: dict[str, tuple[int, list[dict[str, Any]]]] = field(default_factory=dict)
    pools: PoolController = field(default_factory=PoolController)  # ModelServers (modelserver/controller.py)
    policy_queue: PolicyQueue = field(default_factory=PolicyQueue)  # their status sync (finetunepolicy/)
    schedules: ScheduleQueue = field(default_factory=ScheduleQueue)  # FineTuneSchedules (finetuneschedule/)

    def policy_view(self, spec: FineTuneJobSpec, namespace: str, uid: str) -> policy.PolicyView | None:
        """The policies selecting the job's namespace and the namespace's use; None without policies."""
        if not self.policies:
            return None
        limited = any(p.spec.max_serving_gpus is not None for p in self.policies.values())
        return policy.view_for(
            spec,
            self.policies.values(),
            self.namespace_labels.get(namespace, {}),
            (record.body for record in self.records.values()),
            namespace,
            uid,
            datetime.now(UTC),
            self.starting,
            {name: ledger for name, (_, ledger) in self.ledgers.items()},
            self.serving_gpus(namespace, uid) if limited else 0,
        )

    def serving_gpus(self, namespace: str, exclude_uid: str) -> int:
        """GPUs the serving Deployments of the namespace's jobs and ModelServers hold, but `exclude_uid`'s
        (from the watch cache: what runs, not what specs ask for)."""
        names = observe.gpu_resources(self.config)
        jobs = [uid for uid, r in self.records.items() if r.body["metadata"].get("namespace") == namespace]
        held = [d for uid in jobs if uid != exclude_uid for d in self.children(uid, namespace).deployments]
        for uid, key in self.pools.by_uid.items():
            if key[0] == namespace and uid != exclude_uid:  # a pool's children: its controller reference
                held += ownership.owned_children(self.labelled(uid), namespace, uid)[0].deployments
        return sum(observe.deployment_gpus(d, names) for d in held)

    def model_server(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The ModelServer `name` as last seen (a FineTuneJob's spec.deployment.server), or None."""
        return self.pools.servers.get((namespace, name))

    def forget(self, uid: str) -> None:
        self.records.pop(uid, None)
        self.starting.discard(uid)
        self.metrics.forget(uid)
