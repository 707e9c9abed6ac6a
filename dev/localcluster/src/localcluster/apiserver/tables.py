"""Server-side printing: `meta.k8s.io/v1 Table` with kubectl's default columns and CRD printer columns."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from .resources import ResourceType
from .selectors import jsonpath

Column = tuple[str, str, Callable[[dict[str, Any]], Any], int]  # name, type, cell, priority


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"


def age_of(timestamp: str | None) -> str:
    when = parse_time(timestamp)
    if when is None:
        return "<unknown>"
    return human_duration((dt.datetime.now(dt.UTC) - when).total_seconds())


def _age(obj: dict[str, Any]) -> str:
    return age_of(obj.get("metadata", {}).get("creationTimestamp"))


def _get(obj: dict[str, Any], *path: str, default: Any = None) -> Any:
    current: Any = obj
    for part in path:
        if not isinstance(current, dict):
            return default
        current = current.get(part)
    return default if current is None else current


def _pod_ready(pod: dict[str, Any]) -> str:
    statuses = _get(pod, "status", "containerStatuses", default=[])
    total = len(_get(pod, "spec", "containers", default=[]))
    return f"{sum(1 for s in statuses if s.get('ready'))}/{total}"


def _pod_status(pod: dict[str, Any]) -> str:
    if _get(pod, "metadata", "deletionTimestamp"):
        return "Terminating"
    reason = _get(pod, "status", "reason") or _get(pod, "status", "phase", default="Pending")
    for status in _get(pod, "status", "initContainerStatuses", default=[]):
        state = status.get("state", {})
        if "terminated" in state and state["terminated"].get("exitCode", 0) != 0:
            return "Init:" + (state["terminated"].get("reason") or "Error")
        if "waiting" in state and state["waiting"].get("reason") not in (None, "PodInitializing"):
            return "Init:" + state["waiting"]["reason"]
    for status in _get(pod, "status", "containerStatuses", default=[]):
        state = status.get("state", {})
        if "waiting" in state and state["waiting"].get("reason"):
            reason = state["waiting"]["reason"]
        elif "terminated" in state:
            reason = state["terminated"].get("reason") or (f"ExitCode:{state['terminated'].get('exitCode')}")
    return str(reason)


def _pod_restarts(pod: dict[str, Any]) -> int:
    return sum(int(s.get("restartCount", 0)) for s in _get(pod, "status", "containerStatuses", default=[]))


def _job_status(job: dict[str, Any]) -> str:
    conditions = {c.get("type"): c.get("status") for c in _get(job, "status", "conditions", default=[])}
    for kind in ("Complete", "Failed", "SuccessCriteriaMet", "FailureTarget", "Suspended"):
        if conditions.get(kind) == "True":
            return {"SuccessCriteriaMet": "SuccessCriteriaMet", "FailureTarget": "FailureTarget"}.get(
                kind, kind
            )
    return "Running"


def _job_duration(job: dict[str, Any]) -> str:
    start = parse_time(_get(job, "status", "startTime"))
    if start is None:
        return ""
    end = parse_time(_get(job, "status", "completionTime")) or dt.datetime.now(dt.UTC)
    return human_duration((end - start).total_seconds())


def _node_status(node: dict[str, Any]) -> str:
    ready = next(
        (c for c in _get(node, "status", "conditions", default=[]) if c.get("type") == "Ready"), None
    )
    text = "Unknown" if ready is None else ("Ready" if ready.get("status") == "True" else "NotReady")
    if _get(node, "spec", "unschedulable"):
        text += ",SchedulingDisabled"
    return text


def _node_roles(node: dict[str, Any]) -> str:
    prefix = "node-role.kubernetes.io/"
    roles = sorted(
        k[len(prefix) :] for k in _get(node, "metadata", "labels", default={}) if k.startswith(prefix)
    )
    return ",".join(roles) or "<none>"


def _service_ports(svc: dict[str, Any]) -> str:
    parts = []
    for port in _get(svc, "spec", "ports", default=[]):
        text = f"{port.get('port')}"
        if port.get("nodePort"):
            text += f":{port['nodePort']}"
        parts.append(f"{text}/{port.get('protocol', 'TCP')}")
    return ",".join(parts) or "<none>"


def _event_object(ev: dict[str, Any]) -> str:
    ref = ev.get("involvedObject") or ev.get("regarding") or {}
    return f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}"


def _event_last_seen(ev: dict[str, Any]) -> str:
    stamp = ev.get("lastTimestamp") or ev.get("eventTime") or _get(ev, "metadata", "creationTimestamp")
    return age_of(stamp)


def _name(obj: dict[str, Any]) -> str:
    return str(_get(obj, "metadata", "name", default=""))


def _selector_text(selector: dict[str, Any] | None) -> str:
    if not selector:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in selector.items())


_BUILTIN: dict[str, list[Column]] = {
    "pods": [
        ("Ready", "string", _pod_ready, 0),
        ("Status", "string", _pod_status, 0),
        ("Restarts", "string", lambda p: str(_pod_restarts(p)), 0),
        ("Age", "string", _age, 0),
        ("IP", "string", lambda p: _get(p, "status", "podIP", default="<none>"), 1),
        ("Node", "string", lambda p: _get(p, "spec", "nodeName", default="<none>"), 1),
    ],
    "jobs": [
        ("Status", "string", _job_status, 0),
        (
            "Completions",
            "string",
            lambda j: (
                f"{_get(j, 'status', 'succeeded', default=0)}/{_get(j, 'spec', 'completions', default=1)}"
            ),
            0,
        ),
        ("Duration", "string", _job_duration, 0),
        ("Age", "string", _age, 0),
    ],
    "deployments": [
        (
            "Ready",
            "string",
            lambda d: (
                f"{_get(d, 'status', 'readyReplicas', default=0)}/{_get(d, 'spec', 'replicas', default=1)}"
            ),
            0,
        ),
        ("Up-to-date", "integer", lambda d: _get(d, "status", "updatedReplicas", default=0), 0),
        ("Available", "integer", lambda d: _get(d, "status", "availableReplicas", default=0), 0),
        ("Age", "string", _age, 0),
    ],
    "replicasets": [
        ("Desired", "integer", lambda r: _get(r, "spec", "replicas", default=1), 0),
        ("Current", "integer", lambda r: _get(r, "status", "replicas", default=0), 0),
        ("Ready", "integer", lambda r: _get(r, "status", "readyReplicas", default=0), 0),
        ("Age", "string", _age, 0),
    ],
    "nodes": [
        ("Status", "string", _node_status, 0),
        ("Roles", "string", _node_roles, 0),
        ("Age", "string", _age, 0),
        ("Version", "string", lambda n: _get(n, "status", "nodeInfo", "kubeletVersion", default=""), 0),
    ],
    "services": [
        ("Type", "string", lambda s: _get(s, "spec", "type", default="ClusterIP"), 0),
        ("Cluster-IP", "string", lambda s: _get(s, "spec", "clusterIP", default="<none>"), 0),
        (
            "External-IP",
            "string",
            lambda s: ",".join(_get(s, "spec", "externalIPs", default=[])) or "<none>",
            0,
        ),
        ("Port(s)", "string", _service_ports, 0),
        ("Age", "string", _age, 0),
        ("Selector", "string", lambda s: _selector_text(_get(s, "spec", "selector")), 1),
    ],
    "namespaces": [
        ("Status", "string", lambda n: _get(n, "status", "phase", default="Active"), 0),
        ("Age", "string", _age, 0),
    ],
    "configmaps": [
        ("Data", "integer", lambda c: len(c.get("data") or {}) + len(c.get("binaryData") or {}), 0),
        ("Age", "string", _age, 0),
    ],
    "secrets": [
        ("Type", "string", lambda s: s.get("type", "Opaque"), 0),
        ("Data", "integer", lambda s: len(s.get("data") or {}) + len(s.get("stringData") or {}), 0),
        ("Age", "string", _age, 0),
    ],
    "serviceaccounts": [
        ("Secrets", "integer", lambda s: len(s.get("secrets") or []), 0),
        ("Age", "string", _age, 0),
    ],
    "persistentvolumeclaims": [
        ("Status", "string", lambda p: _get(p, "status", "phase", default="Pending"), 0),
        ("Volume", "string", lambda p: _get(p, "spec", "volumeName", default=""), 0),
        ("Capacity", "string", lambda p: _get(p, "status", "capacity", "storage", default=""), 0),
        ("Access Modes", "string", lambda p: ",".join(_get(p, "status", "accessModes", default=[])), 0),
        ("StorageClass", "string", lambda p: _get(p, "spec", "storageClassName", default="<unset>"), 0),
        ("Age", "string", _age, 0),
    ],
    "leases": [
        ("Holder", "string", lambda lease: _get(lease, "spec", "holderIdentity", default=""), 0),
        ("Age", "string", _age, 0),
    ],
    "customresourcedefinitions": [
        ("Created At", "date", lambda c: _get(c, "metadata", "creationTimestamp", default=""), 0),
    ],
}

_EVENT_COLUMNS: list[tuple[str, str, Callable[[dict[str, Any]], Any], int]] = [
    ("Last Seen", "string", _event_last_seen, 0),
    ("Type", "string", lambda e: e.get("type", ""), 0),
    ("Reason", "string", lambda e: e.get("reason", ""), 0),
    ("Object", "string", _event_object, 0),
    ("Message", "string", lambda e: e.get("message") or e.get("note") or "", 0),
]


def _columns_for(rtype: ResourceType) -> tuple[list[dict[str, Any]], list[Callable[[dict[str, Any]], Any]]]:
    definitions = []
    cells: list[Callable[[dict[str, Any]], Any]] = []
    if rtype.plural == "events":
        specs = _EVENT_COLUMNS
    else:
        definitions.append(
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "priority": 0,
                "description": "Name must be unique within a namespace.",
            }
        )
        cells.append(_name)
        if rtype.printer_columns is not None:
            specs = [_crd_column(col) for col in rtype.printer_columns]
            if not rtype.printer_columns:
                specs = [("Age", "date", _age, 0)]
        else:
            specs = _BUILTIN.get(rtype.plural, [("Age", "string", _age, 0)])
    for name, kind, cell, priority in specs:
        definitions.append(
            {"name": name, "type": kind, "format": "", "priority": priority, "description": ""}
        )
        cells.append(cell)
    return definitions, cells


def _crd_column(column: dict[str, Any]) -> Column:
    path = column.get("jsonPath", "")
    kind = column.get("type", "string")

    def cell(obj: dict[str, Any]) -> Any:
        found = jsonpath(obj, path)
        if not found:
            return None
        value = found[0]
        if kind == "date" and isinstance(value, str):
            return age_of(value)
        if isinstance(value, (dict, list)):
            import json

            return json.dumps(value, separators=(",", ":"))
        return value

    return (column.get("name", ""), kind, cell, int(column.get("priority", 0)))


def to_table(
    rtype: ResourceType,
    objects: list[dict[str, Any]],
    resource_version: str,
    include_object: str = "PartialObjectMetadata",
    list_meta: dict[str, Any] | None = None,
    with_headers: bool = True,
) -> dict[str, Any]:
    definitions, cells = _columns_for(rtype)
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": [_safe(cell, obj) for cell in cells]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata", {}),
            }
        rows.append(row)
    meta = {"resourceVersion": resource_version}
    if list_meta:
        meta.update(list_meta)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": definitions if with_headers else [],
        "rows": rows,
    }


def _safe(cell: Callable[[dict[str, Any]], Any], obj: dict[str, Any]) -> Any:
    try:
        return cell(obj)
    except Exception:  # a malformed object prints an empty cell rather than failing the whole list
        return None
