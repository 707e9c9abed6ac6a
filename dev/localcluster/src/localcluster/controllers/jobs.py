"""batch/v1 Job controller with the semantics of kube-controller-manager 1.31+.

Covers parallelism/completions (NonIndexed and Indexed), backoffLimit, backoffLimitPerIndex and
maxFailedIndexes, podFailurePolicy (onExitCodes, onPodConditions; FailJob/Ignore/Count),
podReplacementPolicy (TerminatingOrFailed/Failed), activeDeadlineSeconds, suspend, and the condition sequence
FailureTarget/SuccessCriteriaMet → Failed/Complete once no pod is terminating.

Indexed Jobs, as kube-controller-manager makes them: one pod per index not yet succeeded, named
`<job>-<index>-<suffix>`, with the `batch.kubernetes.io/job-completion-index` annotation and label, the
`JOB_COMPLETION_INDEX` variable (a fieldRef to the annotation) in every container, `hostname` `<job>-<index>`
(with the template's `subdomain`, a headless Service gives it a DNS name); `status.completedIndexes` and
`failedIndexes` in interval form; with `backoffLimitPerIndex` an index fails on its own (annotation
`batch.kubernetes.io/job-index-failure-count` on its pods) and the Job fails once `maxFailedIndexes` is
exceeded or every index has finished with some failed.
Terminal pods are counted as they are observed (the informer delivers every transition in order), which plays
the role of the real controller's job-tracking finalizers while the cluster runs.
"""

from __future__ import annotations

import copy
import secrets
import time
from datetime import datetime
from typing import Any

from ..kubeclient import JOBS, PODS, ApiError, Informer, KubeClient, object_key
from .events import EventRecorder, now_iso
from .workqueue import WorkQueueController

_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
TERMINAL = ("Succeeded", "Failed")
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
INDEX_FAILURES_KEY = "batch.kubernetes.io/job-index-failure-count"


def pod_index(pod: dict[str, Any]) -> int | None:
    value = (pod["metadata"].get("annotations") or {}).get(INDEX_KEY)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def intervals(indexes: set[int]) -> str:
    """`0-2,5`: the form of status.completedIndexes and failedIndexes."""
    out: list[str] = []
    for i in sorted(indexes):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def random_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def _is_true(status: dict[str, Any], kind: str) -> bool:
    cond = _condition(status, kind)
    return bool(cond and cond.get("status") == "True")


def _exit_codes(pod: dict[str, Any], container: str | None) -> list[tuple[str, int]]:
    out = []
    status = pod.get("status", {})
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        term = (cs.get("state") or {}).get("terminated")
        if term is None or (container and cs.get("name") != container):
            continue
        out.append((cs["name"], int(term.get("exitCode", 0))))
    return out


def match_pod_failure_policy(job: dict[str, Any], pod: dict[str, Any]) -> tuple[str | None, str | None]:
    """(action, message) of the first matching rule, or (None, None) when no rule matches."""
    policy = job.get("spec", {}).get("podFailurePolicy")
    if not policy:
        return None, None
    pod_ref = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
    for index, rule in enumerate(policy.get("rules") or []):
        action = rule.get("action")
        codes = rule.get("onExitCodes")
        if codes:
            operator, values = codes.get("operator"), set(codes.get("values") or [])
            for name, code in _exit_codes(pod, codes.get("containerName")):
                if code == 0:
                    continue
                if (operator == "In" and code in values) or (operator == "NotIn" and code not in values):
                    return action, (
                        f"Container {name} for pod {pod_ref} failed with exit code {code} matching "
                        f"{action} rule at index {index}"
                    )
        for pattern in rule.get("onPodConditions") or []:
            for cond in pod.get("status", {}).get("conditions") or []:
                if cond.get("type") == pattern.get("type") and cond.get("status") == pattern.get(
                    "status", "True"
                ):
                    return (
                        action,
                        f"Pod {pod_ref} has condition {cond['type']} matching {action} rule at index {index}",
                    )
    return None, None


class JobController(WorkQueueController):
    name = "job-controller"

    def __init__(self, client: KubeClient, jobs: Informer, pods: Informer):
        super().__init__(jobs, pods)
        self.client = client
        self.jobs = jobs
        self.pods = pods
        self.recorder = EventRecorder(client, "job-controller")
        # job uid → pod uid → "succeeded" | "failed" | "ignored"
        self.finished: dict[str, dict[str, str]] = {}
        self.fail_job: dict[str, str] = {}  # job uid → PodFailurePolicy message
        self.controller_deleted: dict[str, set[str]] = {}  # pods we deleted (suspend/finish): not failures
        self.expected: dict[str, dict[str, float]] = {}  # job uid → pod names created, not yet observed
        self.expected_index: dict[str, dict[str, int]] = {}  # job uid → pod name → index (Indexed Jobs)
        self.index_of: dict[str, dict[str, int]] = {}  # job uid → pod uid → completion index
        jobs.add_handler(self._on_job)
        pods.add_handler(self._on_pod)

    # -- events ---------------------------------------------------------------------------------------------
    def _on_job(self, kind: str, job: dict[str, Any]) -> None:
        if kind == "DELETED":
            uid = job["metadata"]["uid"]
            for store in (
                self.finished,
                self.fail_job,
                self.controller_deleted,
                self.expected,
                self.expected_index,
                self.index_of,
            ):
                store.pop(uid, None)
            return
        self.enqueue(object_key(job))

    def _owner(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        for ref in pod["metadata"].get("ownerReferences") or []:
            if (
                ref.get("kind") == "Job"
                and ref.get("controller")
                and ref.get("apiVersion", "").startswith("batch/")
            ):
                return ref
        return None

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        ref = self._owner(pod)
        if ref is None:
            return
        job_uid = ref["uid"]
        meta = pod["metadata"]
        expected = self.expected.get(job_uid)
        if expected:
            expected.pop(meta["name"], None)
        self.expected_index.get(job_uid, {}).pop(meta["name"], None)
        index = pod_index(pod)
        if index is not None:
            self.index_of.setdefault(job_uid, {})[meta["uid"]] = index
        phase = pod.get("status", {}).get("phase")
        record = self.finished.setdefault(job_uid, {})
        if meta["uid"] not in record:
            job = self.jobs.get(meta["namespace"], ref["name"])
            if phase == "Succeeded":
                record[meta["uid"]] = "succeeded"
            elif phase == "Failed" or (kind == "DELETED" and phase not in TERMINAL):
                if meta["uid"] in self.controller_deleted.get(job_uid, set()):
                    record[meta["uid"]] = "ignored"
                else:
                    action, message = match_pod_failure_policy(job or {}, pod)
                    if action == "Ignore":
                        record[meta["uid"]] = "ignored"
                    else:
                        record[meta["uid"]] = "failed"
                        if action == "FailJob" and job_uid not in self.fail_job:
                            self.fail_job[job_uid] = message or ""
        self.enqueue(f"{meta['namespace']}/{ref['name']}")

    # -- loop -----------------------------------------------------------------------------------------------
    def _job_pods(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        uid = job["metadata"]["uid"]
        return [
            p
            for p in self.pods.values()
            if p["metadata"].get("namespace") == job["metadata"]["namespace"]
            and (self._owner(p) or {}).get("uid") == uid
        ]

    async def reconcile(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        job = self.jobs.get(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            return
        spec = job.get("spec", {})
        status = copy.deepcopy(job.get("status") or {})
        uid = job["metadata"]["uid"]
        pods = self._job_pods(job)
        record = self.finished.setdefault(uid, {})
        for pod in pods:  # pods already terminal when first seen (e.g. after a relist)
            if pod["metadata"]["uid"] not in record and pod.get("status", {}).get("phase") in TERMINAL:
                self._on_pod("MODIFIED", pod)
        terminal_phase = lambda p: p.get("status", {}).get("phase") in TERMINAL  # noqa: E731
        active = [p for p in pods if not terminal_phase(p) and not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in pods if not terminal_phase(p) and p["metadata"].get("deletionTimestamp")]
        now = time.time()
        expected = self.expected.setdefault(uid, {})
        for pod_name, when in list(expected.items()):
            if now - when > 30 or self.pods.get(namespace, pod_name) is not None:
                expected.pop(pod_name)
        expected_index = self.expected_index.get(uid, {})
        for pod_name in [n for n in expected_index if n not in expected]:
            expected_index.pop(pod_name)
        succeeded = sum(1 for v in record.values() if v == "succeeded")
        failed = sum(1 for v in record.values() if v == "failed")
        completions = spec.get("completions")
        parallelism = spec.get("parallelism", 1)
        finished = _is_true(status, "Complete") or _is_true(status, "Failed")
        indexed = spec.get("completionMode") == "Indexed"
        done_indexes, failed_indexes, index_failures = self._index_outcomes(job, record, indexed)
        if indexed:
            for field, value in (("completedIndexes", done_indexes), ("failedIndexes", failed_indexes)):
                if value or field in status:
                    status[field] = intervals(value)
        events: list[tuple[str, str, str]] = []

        if finished:
            await self._delete_pods(job, active)
            await self._expire_after_ttl(job, key, status)
            await self._write_status(
                job,
                status,
                active=0,
                terminating=len(terminating) + len(active),
                succeeded=succeeded,
                failed=failed,
            )
            return

        suspended = bool(spec.get("suspend"))
        target_reason = None  # FailureTarget (reason, message)
        if _is_true(status, "FailureTarget"):
            cond = _condition(status, "FailureTarget") or {}
            target_reason = (cond.get("reason"), cond.get("message"))
        success = _is_true(status, "SuccessCriteriaMet")

        per_index = spec.get("backoffLimitPerIndex") is not None
        if not target_reason and not success:
            max_failed = spec.get("maxFailedIndexes")
            if uid in self.fail_job:
                target_reason = ("PodFailurePolicy", self.fail_job[uid])
            elif per_index and max_failed is not None and len(failed_indexes) > int(max_failed):
                target_reason = (
                    "MaxFailedIndexesExceeded",
                    "Job has exceeded the specified maximal number of failed indexes",
                )
            elif per_index and failed_indexes and len(failed_indexes | done_indexes) >= int(completions or 0):
                target_reason = ("FailedIndexes", "Job has failed indexes")
            elif not per_index and failed > int(spec.get("backoffLimit", 6)):
                target_reason = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
            elif not suspended and spec.get("activeDeadlineSeconds") is not None and status.get("startTime"):
                start = _parse_time(status["startTime"]) or now
                remaining = start + float(spec["activeDeadlineSeconds"]) - now
                if remaining <= 0:
                    target_reason = ("DeadlineExceeded", "Job was active longer than specified deadline")
                else:
                    self.enqueue_after(key, remaining + 0.05)
            complete_count = len(done_indexes) if indexed else succeeded
            if (not target_reason and completions is not None and complete_count >= int(completions)) or (
                not target_reason and completions is None and succeeded > 0 and not active
            ):
                success = True
                _set_condition(
                    status,
                    "SuccessCriteriaMet",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                )
            if target_reason:
                _set_condition(status, "FailureTarget", "True", target_reason[0], target_reason[1])

        if target_reason or success:
            if active:
                await self._delete_pods(job, active)
                terminating += active
                active = []
            if not terminating:
                if target_reason:
                    _set_condition(status, "Failed", "True", target_reason[0], target_reason[1])
                    events.append(("Warning", target_reason[0], target_reason[1]))
                else:
                    _set_condition(
                        status,
                        "Complete",
                        "True",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    )
                    status["completionTime"] = now_iso()
                    events.append(("Normal", "Completed", "Job completed"))
            await self._write_status(
                job, status, active=0, terminating=len(terminating), succeeded=succeeded, failed=failed
            )
            for event in events:
                await self.recorder.emit(job, *event)
            return

        if suspended:
            if active:
                await self._delete_pods(job, active)
                terminating += active
                active = []
            cond = _condition(status, "Suspended")
            if not cond or cond.get("status") != "True":
                _set_condition(status, "Suspended", "True", "JobSuspended", "Job suspended")
                events.append(("Normal", "Suspended", "Job suspended"))
            status.pop("startTime", None)
        else:
            cond = _condition(status, "Suspended")
            if cond and cond.get("status") == "True":
                _set_condition(status, "Suspended", "False", "JobResumed", "Job resumed")
                events.append(("Normal", "Resumed", "Job resumed"))
                status["startTime"] = now_iso()
            if not status.get("startTime"):
                status["startTime"] = now_iso()
                if spec.get("activeDeadlineSeconds") is not None:
                    self.enqueue_after(key, float(spec["activeDeadlineSeconds"]) + 0.05)
            wanted = int(parallelism)
            if completions is not None:
                wanted = min(wanted, int(completions) - (len(done_indexes) if indexed else succeeded))
            elif succeeded > 0:
                wanted = 0
            replacement = spec.get("podReplacementPolicy") or (
                "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed"
            )
            busy = len(active) + len(expected)
            if replacement == "Failed":
                busy += len(terminating)
            to_create = max(0, wanted - busy)
            if len(active) > wanted:
                extra = sorted(active, key=lambda p: p["metadata"].get("creationTimestamp", ""))[wanted:]
                await self._delete_pods(job, extra)
            plan: list[int | None] = [None] * to_create
            if indexed:
                taken = set(self.expected_index.get(uid, {}).values())
                for pod in active + (terminating if replacement == "Failed" else []):
                    if (i := pod_index(pod)) is not None:
                        taken.add(i)
                free = [
                    i
                    for i in range(int(completions or 0))
                    if i not in taken and i not in done_indexes and i not in failed_indexes
                ]
                plan = list(free[: max(0, int(parallelism) - len(taken))])
            for index in plan:
                created = await self._create_pod(
                    job, index, index_failures.get(index, 0) if index is not None else 0
                )
                if created:
                    if self.pods.get(namespace, created) is None:  # not yet seen through the watch
                        expected[created] = time.time()
                        if index is not None:
                            self.expected_index.setdefault(uid, {})[created] = index
                    else:
                        active.append(self.pods.get(namespace, created) or {})
                    events.append(("Normal", "SuccessfulCreate", f"Created pod: {created}"))
        await self._write_status(
            job,
            status,
            active=len(active) + len(expected),
            terminating=len(terminating),
            succeeded=succeeded,
            failed=failed,
        )
        for event in events:
            await self.recorder.emit(job, *event)

    def _index_outcomes(
        self, job: dict[str, Any], record: dict[str, str], indexed: bool
    ) -> tuple[set[int], set[int], dict[int, int]]:
        """(succeeded indexes, failed indexes, failures per index) of an Indexed Job."""
        if not indexed:
            return set(), set(), {}
        index_of = self.index_of.get(job["metadata"]["uid"], {})
        done, failures = set(), {}
        for pod_uid, outcome in record.items():
            index = index_of.get(pod_uid)
            if index is None:
                continue
            if outcome == "succeeded":
                done.add(index)
            elif outcome == "failed":
                failures[index] = failures.get(index, 0) + 1
        limit = job["spec"].get("backoffLimitPerIndex")
        failed = {i for i, n in failures.items() if limit is not None and n > int(limit)} - done
        return done, failed, failures

    async def _expire_after_ttl(self, job: dict[str, Any], key: str, status: dict[str, Any]) -> None:
        """The TTL-after-finished controller: delete a finished Job (and, in the background, its pods)."""
        ttl = job.get("spec", {}).get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        terminal = _condition(status, "Complete") or _condition(status, "Failed") or {}
        finished_at = (
            _parse_time(status.get("completionTime") or terminal.get("lastTransitionTime")) or time.time()
        )
        remaining = finished_at + float(ttl) - time.time()
        if remaining > 0:
            self.enqueue_after(key, remaining + 0.05)
            return
        meta = job["metadata"]
        await self.client.delete(
            JOBS.path(meta["namespace"], meta["name"]), uid=meta["uid"], propagation="Background"
        )

    async def _create_pod(
        self, job: dict[str, Any], index: int | None = None, index_failures: int = 0
    ) -> str | None:
        meta = job["metadata"]
        template = copy.deepcopy(job["spec"].get("template") or {})
        pod_meta = template.get("metadata") or {}
        labels = dict(pod_meta.get("labels") or {})
        labels.setdefault("batch.kubernetes.io/controller-uid", meta["uid"])
        labels.setdefault("controller-uid", meta["uid"])
        labels.setdefault("batch.kubernetes.io/job-name", meta["name"])
        labels.setdefault("job-name", meta["name"])
        annotations = dict(pod_meta.get("annotations") or {})
        prefix = meta["name"][:57]
        pod_spec = template.get("spec") or {}
        if index is not None:
            prefix = f"{meta['name']}-{index}"[:57]
            annotations[INDEX_KEY] = labels[INDEX_KEY] = str(index)
            if job["spec"].get("backoffLimitPerIndex") is not None:
                annotations[INDEX_FAILURES_KEY] = str(index_failures)
            pod_spec.setdefault("hostname", f"{meta['name']}-{index}"[:63])
            ref = {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}
            for container in (pod_spec.get("containers") or []) + (pod_spec.get("initContainers") or []):
                env = [e for e in container.get("env") or [] if e.get("name") != "JOB_COMPLETION_INDEX"]
                container["env"] = [*env, {"name": "JOB_COMPLETION_INDEX", "valueFrom": ref}]
        for _ in range(5):
            name = f"{prefix}-{random_suffix()}"
            body = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "generateName": f"{prefix}-",
                    "namespace": meta["namespace"],
                    "labels": labels,
                    "annotations": annotations,
                    "ownerReferences": [
                        {
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "name": meta["name"],
                            "uid": meta["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": pod_spec,
            }
            try:
                await self.client.create(PODS.path(meta["namespace"]), body)
                return name
            except ApiError as err:
                if err.conflict and err.reason == "AlreadyExists":
                    continue
                await self.recorder.emit(
                    job, "Warning", "FailedCreate", f"Error creating: {err.body.get('message')}"
                )
                raise
        return None

    async def _delete_pods(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        deleted = self.controller_deleted.setdefault(job["metadata"]["uid"], set())
        for pod in pods:
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            deleted.add(meta["uid"])
            await self.client.delete(PODS.path(meta["namespace"], meta["name"]), uid=meta["uid"])
            await self.recorder.emit(job, "Normal", "SuccessfulDelete", f"Deleted pod: {meta['name']}")

    async def _write_status(
        self,
        job: dict[str, Any],
        status: dict[str, Any],
        *,
        active: int,
        terminating: int,
        succeeded: int,
        failed: int,
    ) -> None:
        status = dict(status)
        for field, value in (("active", active), ("succeeded", succeeded), ("failed", failed)):
            if value:
                status[field] = value
            else:
                status.pop(field, None)
        status["terminating"] = terminating
        status["ready"] = sum(1 for p in self._job_pods(job) if _pod_ready(p))
        status.setdefault("uncountedTerminatedPods", {})
        if status == (job.get("status") or {}):
            return
        meta = job["metadata"]

        def mutate(obj: dict[str, Any]) -> dict[str, Any] | None:
            if obj["metadata"].get("uid") != meta["uid"]:
                return None
            current = obj.get("status") or {}
            merged = dict(status)
            if current.get("conditions") and merged.get("conditions") is not None:
                # Keep conditions others added since our read (types we do not manage).
                ours = {c["type"] for c in merged["conditions"]}
                merged["conditions"] = merged["conditions"] + [
                    c for c in current["conditions"] if c.get("type") not in ours
                ]
            if merged == current:
                return None
            obj["status"] = merged
            return obj

        await self.client.update_with_retry(
            JOBS.path(meta["namespace"], meta["name"], "status"), mutate, current=job
        )


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions") or []
    )


def _set_condition(status: dict[str, Any], kind: str, value: str, reason: str, message: str) -> None:
    conditions = status.setdefault("conditions", [])
    stamp = now_iso()
    for cond in conditions:
        if cond.get("type") == kind:
            if cond.get("status") != value:
                cond["lastTransitionTime"] = stamp
            cond.update({"status": value, "reason": reason, "message": message, "lastProbeTime": stamp})
            return
    conditions.append(
        {
            "type": kind,
            "status": value,
            "reason": reason,
            "message": message,
            "lastProbeTime": stamp,
            "lastTransitionTime": stamp,
        }
    )
