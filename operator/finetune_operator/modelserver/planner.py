"""The ModelServer planner: observed pool (its children, its pods' adapter state, its attached FineTuneJobs)
→ actions, the desired adapter state of every replica, the status and the Events. Pure, like planner.py.

The version registry lives in `status.models[<modelName>]`: every FineTuneJob the job planner accepted (its
gate and the champion comparison passed: `status.serving.state: Accepted`) gets the next version number, never
reused (`lastVersion`), and is loaded; it is promoted once the job says its serving check passed
(`status.serving.checked`), and dropped unpromoted when the job stops asking (the check failed). The stable
name serves the pinned version when `spec.models[<name>].pin` names a registered one, else the promoted one.
What every replica loads: every serving, promoted or pinned version, and every version awaiting its check,
then the most recently promoted others up to `maxLoras`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from finetune_operator.api.conditions import short, timestamp
from finetune_operator.api.finetunejob_status import Condition
from finetune_operator.api.modelnames import version_name
from finetune_operator.api.modelserver_conditions import PoolConditionType, PoolReason
from finetune_operator.config import OperatorConfig
from finetune_operator.finetunepolicy import enforcement as policy
from finetune_operator.finetunepolicy.enforcement import PolicyView
from finetune_operator.k8s.actions import ChildPatch, rollout, spec_hash_of
from finetune_operator.k8s.observe import pod_problem
from finetune_operator.modelserver import builders as modelserver
from finetune_operator.modelserver import rollout as canary
from finetune_operator.modelserver.builders import PoolRef
from finetune_operator.modelserver.status import (
    PoolFindings,
    as_fields,
    build_status,
    capture_counters,
    condition,
    find,
)
from finetune_operator.serving_contract import jobs_served_by, serving_request


@dataclass(frozen=True)
class PoolObserved:
    """Everything the operator saw of one ModelServer in one pass."""

    pool: PoolRef
    status: Mapping[str, Any]
    deployment: Mapping[str, Any] | None
    service: Mapping[str, Any] | None
    configmap: Mapping[str, Any] | None
    pods: Sequence[Mapping[str, Any]]
    # pod name → what its router reports (GET /state); None: not reachable.
    replicas: Mapping[str, Mapping[str, Any] | None]
    jobs: Sequence[Mapping[str, Any]]  # every FineTuneJob of the namespace (deleted ones are absent)
    generation: int = 0
    network_policy: Mapping[str, Any] | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # The FineTunePolicies selecting the namespace, with the GPUs its other serving Deployments hold.
    policy: PolicyView | None = None


@dataclass(frozen=True)
class PoolEvent:
    type: str
    reason: str
    message: str
    job: str | None = None  # also on this FineTuneJob


@dataclass
class PoolPlan:
    create: list[Mapping[str, Any]] = field(default_factory=list)
    patch: list[ChildPatch] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # the desired adapters and routes of every replica
    push: dict[str, str] = field(default_factory=dict)  # pod name → pod IP: ready pods that differ
    status: dict[str, Any] = field(default_factory=dict)  # the whole new status (status.as_fields)
    registry_changed: bool = False  # versions assigned or dropped: written before anything is loaded
    events: list[PoolEvent] = field(default_factory=list)
    requeue_after: float | None = None  # seconds until a rollout step is due: the next pass comes then
    # (model, versioned name) → (weight %, requests, errors, p95 ms): the operator's per-version gauges
    versions: dict[tuple[str, str], tuple[int, int, int, float | None]] = field(default_factory=dict)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    if pod.get("metadata", {}).get("deletionTimestamp") or status.get("phase") != "Running":
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def pod_reachable(pod: Mapping[str, Any]) -> bool:
    """Running with an IP (its router may still be loading): the operator asks it for its state."""
    status = pod.get("status") or {}
    return (
        not pod.get("metadata", {}).get("deletionTimestamp")
        and status.get("phase") == "Running"
        and bool(status.get("podIP"))
    )


class PoolPlanner:
    def __init__(self, o: PoolObserved, config: OperatorConfig) -> None:
        self.o = o
        self.config = config
        self.out = PoolPlan()
        self.now = timestamp(o.now)
        self.policy_condition: Condition | None = None
        self.pin_problems: list[str] = []  # PinsResolved
        self.outside_sources: list[str] = []  # AdaptersAllowed
        self.state_changed = False  # the ConfigMap's state changes this pass: every ready pod gets it
        old_models = o.status.get("models") or {}
        self.models: dict[str, dict[str, Any]] = {
            name: {**model, "versions": [dict(v) for v in model.get("versions") or []]}
            for name, model in old_models.items()
        }

    def event(self, type_: str, reason: str, message: str, job: str | None = None) -> None:
        self.out.events.append(PoolEvent(type_, reason, short(message), job))

    # --- the registry -------------------------------------------------------------------------------
    def register(self) -> None:
        """Accepted jobs get the next version (loaded, not yet routed); a version whose job's serving check
        passed is promoted; versions of deleted or no longer accepted jobs are dropped."""
        registered = {v.get("jobUid") for m in self.models.values() for v in m["versions"]}
        requests = [
            (job, request)
            for job in jobs_served_by(self.o.jobs, self.o.pool.identity())
            if (request := serving_request(job)) is not None
        ]
        for job, request in requests:
            if request.job_uid in registered:
                continue
            model = self.models.setdefault(request.model, {"versions": [], "lastVersion": 0})
            number = int(model.get("lastVersion") or 0) + 1
            model["lastVersion"] = number
            model["versions"].append(
                {
                    "version": number,
                    "name": version_name(request.model, number),
                    "adapter": request.adapter,
                    "job": job["metadata"]["name"],
                    "jobUid": request.job_uid,
                    "promotedAt": self.now,  # the recency maxLoras keeps by; set again on promotion
                    "loaded": True,
                }
            )
            self.out.registry_changed = True
        self.promote({r.job_uid for _, r in requests if r.checked})
        self.drop_deleted({r.job_uid for _, r in requests})

    def promote(self, checked: set[str]) -> None:
        """The newest version whose job's serving check passed, if newer than the promoted one, is promoted:
        the stable name routes to it (docs/serving.md: promotion after the check); with a rollout spec, a
        champion and no pin, it is canaried first (rollout.py), and a newer one waits for that to end."""
        for name, model in self.models.items():
            previous = model.get("promoted")
            ready = [
                v for v in model["versions"] if v.get("jobUid") in checked and not v.get("rolloutFailed")
            ]
            newest = max(ready, key=lambda v: int(v["version"]), default=None)
            if newest is None or (previous is not None and int(newest["version"]) <= int(previous)):
                continue
            if (model.get("rollout") or {}).get("state") == canary.PROGRESSING:
                continue
            spec, pin = self.o.pool.spec.rollout(name), self.o.pool.spec.pin(name)
            champion = next((v for v in model["versions"] if v["version"] == previous), None)
            if spec is not None and champion is not None and pin is None:
                model["rollout"] = canary.start(newest, champion, spec, self.now)
                self.out.registry_changed = True
                message = (
                    f"canary of {newest['name']} against {champion['name']}: {model['rollout']['message']}"
                )
                self.event("Normal", "RolloutStarted", message, str(newest["job"]))
                continue
            self.promoted(name, model, newest)

    def promoted(self, name: str, model: dict[str, Any], newest: dict[str, Any]) -> None:
        previous = model.get("promoted")
        model["promoted"] = newest["version"]
        newest["promotedAt"] = self.now
        self.out.registry_changed = True
        was = f" (was {version_name(name, int(previous))})" if previous else ""
        text = f"{newest['name']} from FineTuneJob {newest['job']} is promoted: {name} serves it{was}"
        self.event("Normal", "Promoted", text, str(newest["job"]))

    def progress(self) -> None:
        """Each rollout in progress: roll back, advance or complete on the live figures (rollout.py)."""
        for name, model in self.models.items():
            current = model.get("rollout") or {}
            if current.get("state") != canary.PROGRESSING:
                continue
            numbers = {v["version"]: v for v in model["versions"]}
            spec, pin = self.o.pool.spec.rollout(name), self.o.pool.spec.pin(name)
            decision = canary.progress(name, current, numbers, spec, pin, self.ready_reports(), self.o.now)
            if spec is not None and (due := canary.due_in(decision.rollout, spec, self.o.now)) is not None:
                self.out.requeue_after = min(due, self.out.requeue_after or due)
            self.conclude(name, model, decision, numbers.get(current.get("version")))

    def conclude(
        self, name: str, model: dict[str, Any], decision: canary.Decision, challenger: dict[str, Any] | None
    ) -> None:
        model["rollout"] = decision.rollout
        self.out.registry_changed = self.out.registry_changed or decision.changed
        job = str(challenger["job"]) if challenger is not None else None
        if decision.failed is not None:
            if challenger is not None:
                challenger["rolloutFailed"] = decision.failed
            self.event("Warning", "RolloutFailed", decision.failed, job)
        elif decision.promote and challenger is not None:
            self.promoted(name, model, challenger)
        elif decision.changed:
            self.event("Normal", "RolloutStep", str(decision.rollout["message"]), job)

    def ready_reports(self) -> list[Mapping[str, Any]]:
        """What the routers of ready pods report (their stats count toward a rollout)."""
        ready = {str(p["metadata"]["name"]) for p in self.o.pods if pod_ready(p)}
        return [r for pod, r in sorted(self.o.replicas.items()) if r and r.get("ready") and pod in ready]

    def pending_check(self) -> set[str]:
        """Versioned names registered but not yet promoted whose job still asks: loaded for their check."""
        requests = [serving_request(j) for j in self.o.jobs]
        asking = {r.job_uid for r in requests if r is not None and not r.checked}
        return {
            str(v["name"])
            for model in self.models.values()
            for v in model["versions"]
            if v.get("jobUid") in asking and v["version"] != model.get("promoted")
        }

    def drop_deleted(self, asking: set[str]) -> None:
        """A deleted, cancelled or no longer accepted job's versions go unless promoted or pinned."""
        alive = {str(j["metadata"]["uid"]) for j in self.o.jobs if not j["metadata"].get("deletionTimestamp")}
        cancelled = {str(j["metadata"]["uid"]) for j in self.o.jobs if (j.get("spec") or {}).get("cancel")}
        for name, model in self.models.items():
            pin = self.o.pool.spec.pin(name)
            kept = []
            for version in model["versions"]:
                uid = version.get("jobUid")
                gone = uid and (uid not in alive or uid not in asking)
                if gone and version["version"] not in (model.get("promoted"), pin):
                    self.out.registry_changed = True
                    why = (
                        "was deleted"
                        if uid not in alive
                        else "was cancelled (spec.cancel)"
                        if uid in cancelled
                        else "no longer asks for it (its canary was rolled back)"
                        if version.get("rolloutFailed")
                        else "no longer asks for it (its serving check failed)"
                    )
                    self.event(
                        "Normal",
                        "Unloaded",
                        f"{version['name']} is unloaded: its FineTuneJob {version.get('job')} {why} "
                        f"(the adapter stays at {version['adapter']})",
                    )
                    continue
                kept.append(version)
            model["versions"] = kept

    def route(self) -> dict[str, str]:
        """stable name → versioned name (pin, else promoted); records pinned/serving and rollback Events."""
        routes: dict[str, str] = {}
        for name, model in sorted(self.models.items()):
            numbers = {v["version"]: v for v in model["versions"]}
            old_serving = model.get("serving")
            pin = self.o.pool.spec.pin(name)
            if pin is not None and pin not in numbers:
                self.pin_problems.append(
                    f"spec.models.{name}.pin: {version_name(name, pin)} is not a registered version "
                    f"(known: {', '.join(v['name'] for v in model['versions']) or 'none'}); "
                    "serving the promoted one",
                )
                pin = None
            model["pinned"] = pin
            serving = pin if pin is not None else model.get("promoted")
            if serving not in numbers:
                serving = None
            model["serving"] = serving
            if serving is None:
                continue
            routes[name] = numbers[serving]["name"]
            if old_serving is not None and serving != old_serving and self.o.status.get("models"):
                if pin is not None:
                    self.event("Normal", "RolledBack", f"{name} now serves {routes[name]} (pinned)")
                elif old_serving == (self.o.status.get("models") or {}).get(name, {}).get("pinned"):
                    self.event("Normal", "Unpinned", f"{name} serves the promoted {routes[name]} again")
        return routes

    def limit(self) -> dict[str, str]:
        """versioned name → adapter of what every replica loads: needed ones, then by recency, ≤ maxLoras."""
        needed: list[dict[str, Any]] = []
        others: list[dict[str, Any]] = []
        spec = self.o.pool.spec
        checking = self.pending_check()
        for model in self.models.values():
            keep = {model.get("serving"), model.get("promoted"), model.get("pinned")}
            if (model.get("rollout") or {}).get("state") == canary.PROGRESSING:
                keep.add(model["rollout"]["version"])  # the canary's challenger
            for version in model["versions"]:
                if spec.adapter_source_of(str(version["adapter"])) is None:
                    # adapterSources narrowed since: the routers would refuse the whole state
                    self.outside_sources.append(str(version["name"]))
                    if version.get("loaded", True):
                        version["loaded"] = False
                        version["unloadedReason"] = "its adapter is not under spec.adapterSources"
                        self.event("Warning", "Unloaded", f"{version['name']}: {version['unloadedReason']}")
                    continue
                wanted = version["version"] in keep or version["name"] in checking
                (needed if wanted else others).append(version)
        others.sort(key=lambda v: str(v.get("promotedAt") or ""), reverse=True)
        room = max(0, self.o.pool.spec.max_loras - len(needed))
        loaded = needed + others[:room]
        for version in others[room:]:
            if version.get("loaded", True):
                version["loaded"] = False
                version["unloadedReason"] = (
                    f"maxLoras {self.o.pool.spec.max_loras}: least recently promoted, "
                    "neither serving nor pinned"
                )
                self.event(
                    "Normal", "Unloaded", f"{version['name']} is unloaded: {version['unloadedReason']}"
                )
        for version in loaded:
            if not version.get("loaded", True):
                self.event("Normal", "Reloading", f"{version['name']} is loaded again")
            version["loaded"] = True
            version.pop("unloadedReason", None)
        return {v["name"]: v["adapter"] for v in loaded}

    # --- children -----------------------------------------------------------------------------------
    def children(self, state: Mapping[str, Any]) -> None:
        pool, name = self.o.pool, modelserver.pool_name(self.o.pool.name)
        wanted_map = modelserver.state_configmap(pool, state)
        if self.o.configmap is None:
            self.out.create.append(wanted_map)
        elif (self.o.configmap.get("data") or {}) != wanted_map["data"]:
            self.out.patch.append(ChildPatch("ConfigMap", name, {"data": wanted_map["data"]}))
            self.state_changed = True  # capture settings too, which a router's GET /state does not echo
        if self.o.service is None:
            self.out.create.append(modelserver.pool_service(pool, self.config))
        policy = modelserver.pool_network_policy(pool, self.config)
        if self.o.network_policy is None:
            self.out.create.append(policy)
        elif self.o.network_policy.get("spec") != policy["spec"]:
            self.out.patch.append(ChildPatch("NetworkPolicy", name, {"spec": policy["spec"]}))
        desired = modelserver.pool_deployment(pool, self.config)
        if not self.policy_allows():
            return  # a refused Deployment is neither created nor grown; what runs keeps running
        if self.o.deployment is None:
            self.out.create.append(desired)
            note = modelserver.pool_vllm_compute(pool.spec, self.config).note
            if note:  # a GPU type without GPUs in this operator's table: served on CPU, said once
                self.event("Warning", "ServingOnCpu", note)
        elif spec_hash_of(self.o.deployment) != spec_hash_of(desired):
            self.out.patch.append(rollout("Deployment", name, desired))

    def policy_allows(self) -> bool:
        """FineTunePolicy serving rules: condition PolicyAllowed, one Warning Event per new refusal."""
        refused = policy.server_refusal(self.o.pool.spec, self.o.deployment, self.o.policy, self.config)
        conditions = self.o.status.get("conditions") or []
        old = find(conditions, PoolConditionType.POLICY_ALLOWED)
        if refused is None and old is None and self.o.policy is None:
            return True
        status, reason, message = (
            ("True", PoolReason.ALLOWED, "allowed by FineTunePolicy")
            if refused is None
            else ("False", *refused)
        )
        self.policy_condition = condition(
            conditions,
            PoolConditionType.POLICY_ALLOWED,
            status,
            reason,
            message,
            self.o.now,
            self.o.generation,
        )
        if refused is not None and (old or {}).get("message") != self.policy_condition.message:
            self.event("Warning", reason, message)
        return refused is None

    def replicas(self, state: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per pod: what its router holds; ready pods that differ from `state` get it pushed."""
        rows = []
        for pod in sorted(self.o.pods, key=lambda p: str(p["metadata"]["name"])):
            pod_name = str(pod["metadata"]["name"])
            reported = self.o.replicas.get(pod_name)
            if not pod_reachable(pod) or reported is None:
                continue
            loaded = sorted((reported.get("loaded") or {}).keys())
            routes = dict(reported.get("routes") or {})
            weights = dict(reported.get("weights") or {})
            in_sync = loaded == sorted(state["adapters"]) and routes == state["routes"]
            in_sync = in_sync and weights == state.get("weights", {})
            if reported.get("ready") and (not in_sync or self.state_changed):
                self.out.push[pod_name] = str(pod["status"]["podIP"])
            rows.append(
                {
                    "pod": pod_name,
                    "loaded": loaded,
                    "routes": routes or None,
                    "ready": bool(reported.get("ready")) and pod_ready(pod),
                    "inSync": in_sync,
                }
            )
        return rows

    def run(self) -> PoolPlan:
        self.register()
        self.progress()
        routes = self.route()
        adapters = self.limit()
        routes = {model: target for model, target in routes.items() if target in adapters}
        weights = canary.state_weights(self.models, routes, adapters)
        state = modelserver.desired_state(adapters, routes, weights, modelserver.capture_state(self.o.pool))
        self.out.versions = canary.version_gauges(self.ready_reports(), routes, weights)
        self.out.state = state
        self.children(state)
        found = PoolFindings(
            generation=self.o.generation,
            now=self.o.now,
            wanted=self.o.pool.spec.replicas,
            rows=self.replicas(state),
            models=self.models,
            routes=routes,
            endpoint=modelserver.endpoint_url(self.o.pool, self.config),
            policy=self.policy_condition,
            pin_problems=self.pin_problems,
            outside_sources=self.outside_sources,
            pod_problem=pod_problem(self.o.pods),
            capture=capture_counters(self.o.replicas) if self.o.pool.spec.capture else None,
        )
        status = build_status(self.o.status, found)
        self.out.status = as_fields(status)
        self.pins_event(status.conditions or [])
        return self.out

    def pins_event(self, conditions: list[Condition]) -> None:
        """One Warning Event when a pin turns unknown or its problem changes, not one per pass."""
        pins = next(c for c in conditions if c.type == PoolConditionType.PINS_RESOLVED)
        old = find(self.o.status.get("conditions") or [], PoolConditionType.PINS_RESOLVED) or {}
        if pins.status == "False" and old.get("message") != pins.message:
            self.event("Warning", PoolReason.PIN_UNKNOWN, pins.message)


def plan_pool(observed: PoolObserved, config: OperatorConfig) -> PoolPlan:
    """Next actions, desired replica state, status and Events for one ModelServer."""
    return PoolPlanner(observed, config).run()
