"""Watch: resumption from a resourceVersion, selectors, bookmarks, 410 Gone, timeoutSeconds, and the
Python client's watch helper."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from .conftest import Raw


def cm(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": {"k": "v"}}


def read_events(raw: Raw, path: str, until: int | None = None, timeout: float = 10) -> list[dict[str, Any]]:
    """Stream a watch until `until` events arrived or the server ends it."""
    status, _, response = raw.request("GET", path, preload=False, timeout=timeout)
    assert status == 200
    events: list[dict[str, Any]] = []
    buffer = b""
    try:
        for chunk in response.stream(1024, decode_content=True):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    events.append(json.loads(line))
                    if until is not None and len(events) >= until:
                        return events
    finally:
        response.release_conn()
    return events


def test_watch_resumes_from_resource_version_with_selector(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    first = raw.request("POST", path, cm("w1", labels={"watch": "yes"}))[1]
    since = first["metadata"]["resourceVersion"]
    raw.request("POST", path, cm("w2", labels={"watch": "no"}))
    raw.request("PATCH", f"{path}/w1", {"data": {"k": "2"}}, "application/merge-patch+json")
    raw.request(
        "PATCH", f"{path}/w2", {"metadata": {"labels": {"watch": "yes"}}}, "application/merge-patch+json"
    )
    raw.request("DELETE", f"{path}/w1")
    events = read_events(
        raw, f"{path}?watch=true&resourceVersion={since}&labelSelector=watch%3Dyes&timeoutSeconds=5", until=3
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "w1"),
        ("ADDED", "w2"),
        ("DELETED", "w1"),
    ]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(since)


def test_watch_without_version_starts_with_current_state_then_bookmarks(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    raw.request("POST", path, cm("existing"))
    started = time.monotonic()
    events = read_events(raw, f"{path}?watch=true&allowWatchBookmarks=true&timeoutSeconds=2")
    elapsed = time.monotonic() - started
    assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == "existing"
    assert 1.5 <= elapsed < 8, elapsed  # timeoutSeconds ends the stream
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    for bookmark in bookmarks:
        assert bookmark["object"]["metadata"]["resourceVersion"]


def test_watch_from_compacted_version_is_410_gone(raw: Raw, namespace: str) -> None:
    events = read_events(
        raw, f"/api/v1/namespaces/{namespace}/configmaps?watch=true&resourceVersion=1", until=1
    )
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] in ("Expired", "Gone")


def test_send_initial_events_ends_with_marked_bookmark(raw: Raw, namespace: str, emulator: Any) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    raw.request("POST", path, cm("init"))
    events = read_events(
        raw,
        f"{path}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan"
        "&timeoutSeconds=5",
        until=2,
    )
    assert events[0]["type"] == "ADDED"
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"] == "true"


def test_python_client_watch_and_list(api: Any, namespace: str) -> None:
    from kubernetes import client, watch

    core = client.CoreV1Api(api)
    listed = core.list_namespaced_config_map(namespace)
    core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="py"), data={"a": "b"})
    )
    stream = watch.Watch().stream(
        core.list_namespaced_config_map,
        namespace,
        resource_version=listed.metadata.resource_version,
        timeout_seconds=3,
    )
    seen = []
    for event in stream:
        seen.append((event["type"], event["object"].metadata.name))
        break
    assert seen == [("ADDED", "py")]
    with pytest.raises(client.ApiException) as info:
        core.create_namespaced_config_map(
            namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="py"))
        )
    assert info.value.status == 409 and json.loads(info.value.body)["reason"] == "AlreadyExists"
