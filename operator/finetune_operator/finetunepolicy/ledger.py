"""The GPU-hour ledger in a FineTunePolicy's status: what each selected namespace's jobs spent per month
(UTC, the month a job was created in), kept after the jobs are deleted, so run-then-delete does not escape
`gpuHoursPerMonth`. Pure; controller.sync_status writes it, the budget check (policy.usage) reads it.

Hours are recorded as they accrue (a job's status.gpuHours, which never decreases), not when a job ends, so
no finalizer is needed: a job deleted mid-training keeps what was recorded at the last pass. An entry holds
its month's total and, per job that still exists, the hours recorded of it; recording sets that job's figure
and adds the difference to the total in one status write, so a repeated pass or a restarted operator (which
reads the ledger back from the status) never counts an hour twice. A job leaves the per-job list only once
the API confirms it is gone (its hours stay in the total). Entries of past months are frozen (no per-job
list) and only the last LEDGER_MONTHS months are kept.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from finetune_operator.api.finetunepolicy import LEDGER_MONTHS, MAX_LEDGER_ENTRIES, MAX_LEDGER_JOBS
from finetune_operator.k8s.observe import finite, parse_time


def month_of(moment: datetime) -> str:
    return moment.strftime("%Y-%m")


def _months_back(month: str, count: int) -> str:
    """The month `count` months before `month` (YYYY-MM)."""
    year, number = int(month[:4]), int(month[5:7]) - 1 - count
    return f"{year + number // 12:04d}-{number % 12 + 1:02d}"


def ledger_entry(ledger: Sequence[Mapping[str, Any]], namespace: str, month: str) -> Mapping[str, Any] | None:
    return next((e for e in ledger if e.get("namespace") == namespace and e.get("month") == month), None)


def recorded(entry: Mapping[str, Any] | None) -> dict[str, float]:
    """uid → the hours an entry holds of that (existing) job."""
    return {str(j["uid"]): finite(j.get("gpuHours")) or 0.0 for j in (entry or {}).get("jobs") or []}


def _spent(body: Mapping[str, Any]) -> float:
    return finite((body.get("status") or {}).get("gpuHours")) or 0.0


def _record_namespace(
    entry: Mapping[str, Any] | None,
    namespace: str,
    month: str,
    jobs: Iterable[Mapping[str, Any]],
    gone: Collection[str],
) -> dict[str, Any] | None:
    """The namespace's entry for `month` after recording its jobs; None when it would hold nothing."""
    total = finite((entry or {}).get("gpuHours")) or 0.0
    held = {uid: hours for uid, hours in recorded(entry).items() if uid not in gone}
    for body in jobs:
        meta = body.get("metadata") or {}
        created = parse_time(meta.get("creationTimestamp"))
        if meta.get("namespace") != namespace or created is None or month_of(created) != month:
            continue
        uid, hours = str(meta.get("uid") or ""), _spent(body)
        before = held.get(uid)
        if not uid or hours <= (before or 0.0) or (before is None and len(held) >= MAX_LEDGER_JOBS):
            continue  # nothing new (or no room: the job still counts from its own status while it exists)
        total += hours - (before or 0.0)
        held[uid] = hours
    if entry is None and not held:
        return None
    found: dict[str, Any] = {"namespace": namespace, "month": month, "gpuHours": round(total, 4)}
    if held:  # the ledger is one list: a merge patch replaces it whole, so an empty key is left out
        found["jobs"] = [{"uid": uid, "gpuHours": round(hours, 4)} for uid, hours in sorted(held.items())]
    return found


def record(
    ledger: Sequence[Mapping[str, Any]],
    namespaces: Iterable[str],
    jobs: Sequence[Mapping[str, Any]],
    now: datetime,
    gone: Collection[str] = (),
) -> list[dict[str, Any]]:
    """The ledger after recording what the selected `namespaces`' jobs of this month have spent.

    `jobs`: the jobs the operator knows (those of other namespaces are ignored); `gone`: uids the API
    confirmed deleted (dropped from the per-job lists, their hours kept). Recording the same jobs again
    returns the same ledger."""
    month = month_of(now)
    oldest = _months_back(month, LEDGER_MONTHS - 1)
    selected = set(namespaces)
    out: list[dict[str, Any]] = []
    for entry in ledger:
        namespace, entry_month = str(entry.get("namespace")), str(entry.get("month") or "")
        if entry_month < oldest or (entry_month == month and namespace in selected):
            continue  # expired, or recorded again below
        frozen = {k: v for k, v in entry.items() if k != "jobs"}
        out.append(dict(entry) if entry_month == month else frozen)  # a past month no longer changes
    for namespace in sorted(selected):
        found = _record_namespace(ledger_entry(ledger, namespace, month), namespace, month, jobs, gone)
        if found is not None:
            out.append(found)
    out.sort(key=lambda e: (str(e.get("month")), str(e.get("namespace"))), reverse=True)
    return out[:MAX_LEDGER_ENTRIES]


def unconfirmed(
    ledger: Sequence[Mapping[str, Any]], known: Collection[str], now: datetime
) -> dict[str, set[str]]:
    """namespace → uids this month's entries hold that the operator does not know (deleted, or not listed
    yet after a restart): the controller asks the API which of them are gone."""
    month, out = month_of(now), {}
    for entry in ledger:
        if entry.get("month") == month:
            missing = set(recorded(entry)) - set(known)
            if missing:
                out[str(entry["namespace"])] = missing
    return out
