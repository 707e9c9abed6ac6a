"""Object semantics as kube-apiserver has them: identity, versions, generation, subresources, conflicts,
patches, selectors, paging, finalizers, garbage collection and error bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .conftest import WIDGET_GROUP, WIDGET_PLURAL, WIDGET_VERSION, Raw, wait_for

WIDGETS = f"/apis/{WIDGET_GROUP}/{WIDGET_VERSION}"
UNSCHEDULABLE = {"conformance.example.com/no-such-node": "true"}  # keeps test pods Pending and unbound
NO_KUBELET_NODE = "conformance-node-without-kubelet"


def cm(name: str, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **extra}, "data": {"k": "v"}}


def widget(name: str, size: int = 2, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{WIDGET_GROUP}/{WIDGET_VERSION}",
        "kind": "Widget",
        "metadata": {"name": name, **meta},
        "spec": {"size": size},
    }


def create(raw: Raw, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, obj, _ = raw.request("POST", path, body)
    assert status == 201, obj
    return obj


def test_create_sets_identity_and_monotonic_resource_version(raw: Raw, namespace: str) -> None:
    first = create(raw, f"/api/v1/namespaces/{namespace}/configmaps", cm("a"))
    second = create(raw, f"/api/v1/namespaces/{namespace}/configmaps", cm("b"))
    assert first["metadata"]["uid"] != second["metadata"]["uid"]
    assert first["metadata"]["creationTimestamp"].endswith("Z")
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    _, listed, _ = raw.request("GET", f"/api/v1/namespaces/{namespace}/configmaps")
    assert int(listed["metadata"]["resourceVersion"]) >= int(second["metadata"]["resourceVersion"])


def test_existing_name_is_already_exists_and_stale_update_is_conflict(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    obj = create(raw, path, cm("dup"))
    status, body, _ = raw.request("POST", path, cm("dup"))
    assert (status, body["reason"], body["details"]["name"]) == (409, "AlreadyExists", "dup")
    assert body["message"] == 'configmaps "dup" already exists'
    fresh = dict(obj, data={"k": "new"})
    assert raw.request("PUT", f"{path}/dup", fresh)[0] == 200
    status, body, _ = raw.request("PUT", f"{path}/dup", dict(obj, data={"k": "stale"}))
    assert (status, body["reason"]) == (409, "Conflict")
    assert "the object has been modified" in body["message"]


def test_generation_tracks_spec_only_and_status_subresource_splits(
    raw: Raw, namespace: str, widget_crd: Any
) -> None:
    path = f"{WIDGETS}/namespaces/{namespace}/{WIDGET_PLURAL}"
    body = widget("gen")
    body["status"] = {"phase": "ignored-on-create"}
    obj = create(raw, path, body)
    assert obj["metadata"]["generation"] == 1
    assert "status" not in obj
    assert obj["spec"] == {"size": 2, "mode": "small", "replicas": 1}  # schema defaults
    # Metadata-only change: no generation bump.
    status, obj, _ = raw.request(
        "PATCH", f"{path}/gen", {"metadata": {"labels": {"x": "y"}}}, "application/merge-patch+json"
    )
    assert status == 200 and obj["metadata"]["generation"] == 1
    # Main resource ignores status; spec change bumps generation.
    status, obj, _ = raw.request(
        "PATCH",
        f"{path}/gen",
        {"spec": {"size": 3}, "status": {"phase": "X"}},
        "application/merge-patch+json",
    )
    assert obj["metadata"]["generation"] == 2 and "status" not in obj
    # /status ignores everything but status and does not bump generation.
    status, obj, _ = raw.request(
        "PATCH",
        f"{path}/gen/status",
        {"spec": {"size": 9}, "metadata": {"labels": {"x": "z"}}, "status": {"phase": "Done"}},
        "application/merge-patch+json",
    )
    assert status == 200, obj
    assert obj["status"] == {"phase": "Done"}
    assert obj["spec"]["size"] == 3 and obj["metadata"]["labels"] == {"x": "y"}
    assert obj["metadata"]["generation"] == 2


def test_custom_resource_validation_is_422_with_causes(raw: Raw, namespace: str, widget_crd: Any) -> None:
    path = f"{WIDGETS}/namespaces/{namespace}/{WIDGET_PLURAL}"
    status, body, _ = raw.request("POST", path, widget("bad", size=0))
    assert (status, body["reason"]) == (422, "Invalid")
    assert body["message"].startswith(
        'Widget.conformance.example.com "bad" is invalid: spec.size: Invalid value: 0'
    )
    assert body["details"]["causes"][0]["field"] == "spec.size"
    status, body, _ = raw.request("POST", path, widget("big", size=20))
    assert status == 422 and "size above 10 needs mode big" in body["message"]
    # Transition rule with oldSelf.
    obj = create(raw, path, {**widget("trans", size=20), "spec": {"size": 20, "mode": "big"}})
    obj["spec"]["mode"] = "small"
    obj["spec"]["size"] = 5
    status, body, _ = raw.request("PUT", f"{path}/trans", obj)
    assert status == 422 and "mode cannot go back from big" in body["message"], body
    # Unknown fields: pruned silently, or rejected with fieldValidation=Strict.
    status, body, _ = raw.request("POST", f"{path}?fieldValidation=Strict", {**widget("strict"), "extra": 1})
    assert status == 400 and 'unknown field "extra"' in body["message"]
    obj = create(raw, path, {**widget("pruned"), "extra": 1})
    assert "extra" not in obj


def test_names_are_validated_and_generate_name_works(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    status, body, _ = raw.request("POST", path, cm("Bad_Name"))
    assert (status, body["reason"]) == (422, "Invalid")
    assert body["details"]["causes"][0]["field"] == "metadata.name"
    assert "RFC 1123 subdomain" in body["message"]
    status, body, _ = raw.request("POST", path, cm("x" * 254))
    assert status == 422 and "no more than 253 characters" in body["message"]
    status, body, _ = raw.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/services",
        {"metadata": {"name": "a.b"}, "spec": {"ports": [{"port": 80}]}},
    )
    assert status == 422 and "RFC 1123 label" in body["message"]
    generated = create(raw, path, {"metadata": {"generateName": "gen-"}, "data": {}})
    assert generated["metadata"]["name"].startswith("gen-") and len(generated["metadata"]["name"]) == 9


def test_bad_bodies_get_real_status_codes(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    assert raw.request("POST", path, b"{not json")[0] == 400
    status, body, _ = raw.request(
        "POST", path, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}
    )
    assert status == 400 and body["kind"] == "Status"
    status, body, _ = raw.request("POST", path, {**cm("huge"), "data": {"k": "x" * (3 * 1024 * 1024 + 10)}})
    assert status == 413
    status, body, _ = raw.request("POST", path, cm("annotated", annotations={"a": "x" * (256 * 1024 + 1)}))
    assert status == 422 and body["details"]["causes"][0]["field"] == "metadata.annotations"
    assert raw.request("POST", path, b"- just\n- a list\n", "application/yaml")[0] == 400
    assert raw.request("GET", "/api/v1/nosuchthings")[0] == 404
    assert raw.request("PUT", path, cm("no-name-in-url"))[0] == 405
    assert raw.request("POST", path, b"[" * 100_000)[0] == 400
    assert raw.request("GET", path)[0] == 200  # still serving


def test_patch_types(raw: Raw, namespace: str) -> None:
    path = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    create(
        raw,
        path,
        {
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "a",
                                "image": "a:1",
                                "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
                            },
                            {"name": "b", "image": "b:1"},
                        ]
                    },
                },
            },
        },
    )
    item = f"{path}/web"
    # Strategic merge: containers and env merge by name; $patch: delete removes one entry.
    status, obj, _ = raw.request(
        "PATCH",
        item,
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "a",
                                "env": [{"name": "Y", "value": "3"}, {"name": "X", "$patch": "delete"}],
                            }
                        ]
                    }
                }
            }
        },
        "application/strategic-merge-patch+json",
    )
    assert status == 200, obj
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["a", "b"]
    assert containers[0]["env"] == [{"name": "Y", "value": "3"}] and containers[0]["image"] == "a:1"
    # $setElementOrder reorders the merged list.
    status, obj, _ = raw.request(
        "PATCH",
        item,
        {
            "spec": {
                "template": {
                    "spec": {
                        "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
                        "containers": [{"name": "b", "image": "b:2"}],
                    }
                }
            }
        },
        "application/strategic-merge-patch+json",
    )
    assert [c["name"] for c in obj["spec"]["template"]["spec"]["containers"]] == ["b", "a"]
    # Merge patch replaces lists wholesale and null deletes.
    status, obj, _ = raw.request(
        "PATCH",
        item,
        {"metadata": {"labels": {"tier": "x"}}, "spec": {"paused": None}},
        "application/merge-patch+json",
    )
    assert status == 200 and obj["metadata"]["labels"] == {"tier": "x"}
    # JSON patch with a failing test op changes nothing.
    status, body, _ = raw.request(
        "PATCH",
        item,
        [
            {"op": "test", "path": "/spec/replicas", "value": 7},
            {"op": "replace", "path": "/spec/replicas", "value": 9},
        ],
        "application/json-patch+json",
    )
    assert status == 422, body
    status, obj, _ = raw.request(
        "PATCH",
        item,
        [
            {"op": "test", "path": "/spec/replicas", "value": 1},
            {"op": "replace", "path": "/spec/replicas", "value": 2},
        ],
        "application/json-patch+json",
    )
    assert status == 200 and obj["spec"]["replicas"] == 2
    assert obj["metadata"]["generation"] == 4
    # Scale subresource.
    status, scale, _ = raw.request(
        "PATCH", f"{item}/scale", {"spec": {"replicas": 5}}, "application/merge-patch+json"
    )
    assert status == 200 and scale["kind"] == "Scale" and scale["spec"]["replicas"] == 5
    # Custom resources refuse strategic merge patch like kube-apiserver (415).
    status, _, _ = raw.request(
        "PATCH",
        f"/api/v1/namespaces/{namespace}/configmaps/none",
        {},
        "application/strategic-merge-patch+json",
    )
    assert status == 404


def test_server_side_apply_creates_then_drops_fields_no_longer_applied(raw: Raw, namespace: str) -> None:
    item = f"/api/v1/namespaces/{namespace}/configmaps/ssa?fieldManager=conformance"
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "ssa"},
        "data": {"a": "1", "b": "2"},
    }
    status, obj, _ = raw.request("PATCH", item, config, "application/apply-patch+yaml")
    assert status == 201 and obj["data"] == {"a": "1", "b": "2"}
    config["data"] = {"a": "1"}
    status, obj, _ = raw.request("PATCH", item, config, "application/apply-patch+yaml")
    assert status == 200 and obj["data"] == {"a": "1"}


def test_label_and_field_selectors(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    create(raw, path, cm("one", labels={"app": "a", "tier": "web"}))
    create(raw, path, cm("two", labels={"app": "b", "tier": "db"}))
    create(raw, path, cm("three", labels={"app": "c"}))

    def names(query: str) -> list[str]:
        status, body, _ = raw.request("GET", f"{path}?{query}")
        assert status == 200, body
        return sorted(i["metadata"]["name"] for i in body["items"])

    assert names("labelSelector=app%3Da") == ["one"]
    assert names("labelSelector=app%3D%3Da") == ["one"]
    assert names("labelSelector=app!%3Da") == ["three", "two"]
    assert names("labelSelector=app%20in%20(a,b)") == ["one", "two"]
    assert names("labelSelector=app%20notin%20(a,b)") == ["three"]
    assert names("labelSelector=tier") == ["one", "two"]
    assert names("labelSelector=!tier") == ["three"]
    assert names("labelSelector=tier,app%3Db") == ["two"]
    assert names("fieldSelector=metadata.name%3Dtwo") == ["two"]
    assert names("fieldSelector=metadata.name!%3Dtwo") == ["one", "three"]
    status, body, _ = raw.request("GET", f"{path}?fieldSelector=data.k%3Dv")
    assert status == 400 and body["reason"] == "BadRequest"


def test_pod_and_event_field_selectors(raw: Raw, namespace: str) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    pod = create(
        raw,
        pods,
        {
            "metadata": {"name": "p"},
            "spec": {"nodeSelector": UNSCHEDULABLE, "containers": [{"name": "c", "image": "busybox"}]},
        },
    )
    assert pod["status"]["phase"] == "Pending"
    status, body, _ = raw.request("GET", f"{pods}?fieldSelector=status.phase%3DPending,spec.nodeName%3D")
    assert [i["metadata"]["name"] for i in body["items"]] == ["p"]
    status, body, _ = raw.request("GET", f"{pods}?fieldSelector=status.phase%3DRunning")
    assert body["items"] == []
    create(
        raw,
        f"/api/v1/namespaces/{namespace}/events",
        {
            "metadata": {"name": "p.1"},
            "involvedObject": {
                "kind": "Pod",
                "name": "p",
                "namespace": namespace,
                "uid": pod["metadata"]["uid"],
            },
            "reason": "Testing",
            "message": "hello",
            "type": "Normal",
            "source": {"component": "conformance"},
        },
    )
    status, body, _ = raw.request(
        "GET",
        f"/api/v1/namespaces/{namespace}/events"
        "?fieldSelector=involvedObject.name%3Dp,involvedObject.kind%3DPod,reason%3DTesting",
    )
    assert [e["message"] for e in body["items"]] == ["hello"]
    status, body, _ = raw.request(
        "GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name%3Dq"
    )
    assert body["items"] == []
    # The same event through events.k8s.io/v1.
    status, body, _ = raw.request(
        "GET", f"/apis/events.k8s.io/v1/namespaces/{namespace}/events?fieldSelector=reason%3DTesting"
    )
    assert (
        status == 200 and body["items"][0]["note"] == "hello" and body["items"][0]["regarding"]["name"] == "p"
    )


def test_list_paging_with_limit_and_continue(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    for i in range(5):
        create(raw, path, cm(f"page-{i}"))
    seen: list[str] = []
    query = "limit=2"
    while True:
        status, body, _ = raw.request("GET", f"{path}?{query}")
        assert status == 200 and len(body["items"]) <= 2
        seen += [i["metadata"]["name"] for i in body["items"]]
        token = body["metadata"].get("continue")
        if not token:
            break
        query = f"limit=2&continue={token}"
    assert sorted(seen) == [f"page-{i}" for i in range(5)]


def test_finalizers_hold_deletion_until_removed(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    create(raw, path, cm("held", finalizers=["conformance.example.com/hold"]))
    status, obj, _ = raw.request("DELETE", f"{path}/held")
    assert status in (200, 202) and obj["metadata"]["deletionTimestamp"]
    status, obj, _ = raw.request("GET", f"{path}/held")
    assert status == 200 and obj["metadata"]["deletionTimestamp"]
    status, obj, _ = raw.request(
        "PATCH", f"{path}/held", {"metadata": {"finalizers": None}}, "application/merge-patch+json"
    )
    assert status == 200
    assert raw.request("GET", f"{path}/held")[0] == 404


def _owned_cm(name: str, owner: dict[str, Any], block: bool = True) -> dict[str, Any]:
    return cm(
        name,
        ownerReferences=[
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "blockOwnerDeletion": block,
            }
        ],
    )


def test_garbage_collection_by_propagation_policy(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    for policy in ("Background", "Foreground", "Orphan"):
        owner = create(raw, path, cm(f"owner-{policy.lower()}"))
        create(raw, path, _owned_cm(f"dep-{policy.lower()}", owner))
        status, body, _ = raw.request(
            "DELETE",
            f"{path}/owner-{policy.lower()}",
            {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": policy},
        )
        assert status in (200, 202), body
        wait_for(
            lambda p=policy: raw.request("GET", f"{path}/owner-{p.lower()}")[0] == 404, f"{policy} owner gone"
        )
        if policy == "Orphan":
            status, dep, _ = raw.request("GET", f"{path}/dep-orphan")
            assert status == 200 and not dep["metadata"].get("ownerReferences")
        else:
            wait_for(
                lambda p=policy: raw.request("GET", f"{path}/dep-{p.lower()}")[0] == 404,
                f"{policy} dependent",
            )
    # A dependent whose owner never existed is collected too.
    create(
        raw,
        path,
        _owned_cm("dangling", {"metadata": {"name": "ghost", "uid": "00000000-dead-beef-0000-000000000000"}}),
    )
    wait_for(lambda: raw.request("GET", f"{path}/dangling")[0] == 404, "dangling dependent collected")


def test_foreground_deletion_waits_for_blocking_dependents(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    owner = create(raw, path, cm("fg-owner"))
    create(
        raw,
        path,
        {
            **_owned_cm("fg-dep", owner),
            "metadata": {
                **_owned_cm("fg-dep", owner)["metadata"],
                "finalizers": ["conformance.example.com/hold"],
            },
        },
    )
    raw.request("DELETE", f"{path}/fg-owner?propagationPolicy=Foreground")
    status, obj, _ = raw.request("GET", f"{path}/fg-owner")
    assert status == 200 and "foregroundDeletion" in obj["metadata"]["finalizers"]
    wait_for(
        lambda: raw.request("GET", f"{path}/fg-dep")[1]["metadata"].get("deletionTimestamp"), "dep deleting"
    )
    assert raw.request("GET", f"{path}/fg-owner")[0] == 200  # blocked by the dependent
    raw.request("PATCH", f"{path}/fg-dep", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    wait_for(lambda: raw.request("GET", f"{path}/fg-owner")[0] == 404, "owner deleted after its dependent")


def test_namespace_deletion_cascades(raw: Raw, widget_crd: Any) -> None:
    ns = "conf-cascade"
    create(raw, "/api/v1/namespaces", {"metadata": {"name": ns}})
    create(raw, f"/api/v1/namespaces/{ns}/configmaps", cm("plain"))
    create(
        raw,
        f"{WIDGETS}/namespaces/{ns}/{WIDGET_PLURAL}",
        widget("held", finalizers=["conformance.example.com/x"]),
    )
    status, obj, _ = raw.request("DELETE", f"/api/v1/namespaces/{ns}")
    assert status in (200, 202)
    status, obj, _ = raw.request("GET", f"/api/v1/namespaces/{ns}")
    assert obj["status"]["phase"] == "Terminating"
    status, body, _ = raw.request("POST", f"/api/v1/namespaces/{ns}/configmaps", cm("late"))
    assert (status, body["reason"]) == (403, "Forbidden")
    wait_for(
        lambda: raw.request("GET", f"/api/v1/namespaces/{ns}/configmaps/plain")[0] == 404, "content deleted"
    )
    wait_for(
        lambda: raw.request("GET", f"{WIDGETS}/namespaces/{ns}/{WIDGET_PLURAL}/held")[1]["metadata"].get(
            "deletionTimestamp"
        ),
        "widget deleting",
    )
    assert raw.request("GET", f"/api/v1/namespaces/{ns}")[0] == 200
    raw.request(
        "PATCH",
        f"{WIDGETS}/namespaces/{ns}/{WIDGET_PLURAL}/held",
        {"metadata": {"finalizers": None}},
        "application/merge-patch+json",
    )
    wait_for(lambda: raw.request("GET", f"/api/v1/namespaces/{ns}")[0] == 404, "namespace gone", timeout=30)


def test_crd_registration_serves_resource_and_updates_discovery(raw: Raw, namespace: str) -> None:
    crd = json.loads(
        json.dumps(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": "gadgets.disc.example.com"},
                "spec": {
                    "group": "disc.example.com",
                    "scope": "Namespaced",
                    "names": {"plural": "gadgets", "kind": "Gadget"},
                    "versions": [
                        {
                            "name": "v1beta1",
                            "served": True,
                            "storage": True,
                            "schema": {
                                "openAPIV3Schema": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    ],
                },
            }
        )
    )
    created = create(raw, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    conditions = {c["type"]: c["status"] for c in created.get("status", {}).get("conditions", [])}
    if not conditions:  # a real API server sets them a moment later
        conditions = wait_for(
            lambda: {
                c["type"]: c["status"]
                for c in raw.request(
                    "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.disc.example.com"
                )[1]
                .get("status", {})
                .get("conditions", [])
                if c["type"] == "Established" and c["status"] == "True"
            },
            "Established",
        )
    assert conditions.get("Established") == "True"
    try:

        def served() -> Any:
            status, body, _ = raw.request("GET", "/apis/disc.example.com/v1beta1")
            return status == 200 and [r["name"] for r in body["resources"]]

        assert "gadgets" in wait_for(served, "gadgets served")
        groups = raw.request("GET", "/apis")[1]["groups"]
        assert any(g["name"] == "disc.example.com" for g in groups)
        create(
            raw,
            f"/apis/disc.example.com/v1beta1/namespaces/{namespace}/gadgets",
            {"apiVersion": "disc.example.com/v1beta1", "kind": "Gadget", "metadata": {"name": "g"}, "any": 1},
        )
    finally:
        raw.request(
            "DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gadgets.disc.example.com"
        )
    wait_for(
        lambda: raw.request("GET", "/apis/disc.example.com/v1beta1")[0] == 404, "group removed", timeout=30
    )


def test_table_output_uses_printer_columns(raw: Raw, namespace: str, widget_crd: Any) -> None:
    path = f"{WIDGETS}/namespaces/{namespace}/{WIDGET_PLURAL}"
    create(raw, path, widget("tbl", size=4))
    raw.request(
        "PATCH",
        f"{path}/tbl/status",
        {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
        "application/merge-patch+json",
    )
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    status, table, _ = raw.request("GET", path, accept=accept)
    assert status == 200 and table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Size", "Phase", "Ready", "Age"]
    assert table["rows"][0]["cells"][:4] == ["tbl", 4, "Running", "True"]
    status, table, _ = raw.request("GET", f"/api/v1/namespaces/{namespace}/configmaps", accept=accept)
    assert [c["name"] for c in table["columnDefinitions"]][:3] == ["Name", "Data", "Age"]


def test_discovery_and_version(raw: Raw) -> None:
    status, version, _ = raw.request("GET", "/version")
    assert status == 200 and version["major"] == "1"
    core = raw.request("GET", "/api/v1")[1]
    names = {r["name"] for r in core["resources"]}
    assert {
        "pods",
        "pods/status",
        "pods/log",
        "pods/eviction",
        "services",
        "configmaps",
        "secrets",
        "events",
        "nodes",
        "namespaces",
        "serviceaccounts",
        "persistentvolumeclaims",
    } <= names
    apps = {r["name"] for r in raw.request("GET", "/apis/apps/v1")[1]["resources"]}
    assert {"deployments", "deployments/status", "deployments/scale"} <= apps
    groups = {g["name"] for g in raw.request("GET", "/apis")[1]["groups"]}
    assert {
        "apps",
        "batch",
        "coordination.k8s.io",
        "rbac.authorization.k8s.io",
        "events.k8s.io",
        "apiextensions.k8s.io",
    } <= groups


def test_secret_string_data_is_folded_into_data(raw: Raw, namespace: str) -> None:
    obj = create(
        raw,
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": "s"}, "stringData": {"user": "me"}},
    )
    assert obj["data"] == {"user": "bWU="} and "stringData" not in obj and obj["type"] == "Opaque"


@pytest.mark.emulator
def test_unscheduled_pod_deletes_at_once_and_bound_pod_is_graceful(
    raw: Raw, namespace: str, emulator: Any
) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    spec = {
        "containers": [{"name": "c", "image": "busybox"}],
        "terminationGracePeriodSeconds": 1,
        "nodeSelector": UNSCHEDULABLE,
    }
    create(raw, pods, {"metadata": {"name": "free"}, "spec": spec})
    assert raw.request("DELETE", f"{pods}/free")[0] == 200
    assert raw.request("GET", f"{pods}/free")[0] == 404
    create(raw, pods, {"metadata": {"name": "bound"}, "spec": {**spec, "nodeName": NO_KUBELET_NODE}})
    _, obj, _ = raw.request("DELETE", f"{pods}/bound")
    assert obj["metadata"]["deletionTimestamp"] and obj["metadata"]["deletionGracePeriodSeconds"] == 1
    assert raw.request("GET", f"{pods}/bound")[0] == 200  # Terminating until the grace period ends
    wait_for(lambda: raw.request("GET", f"{pods}/bound")[0] == 404, "grace period fallback", timeout=5)


@pytest.mark.emulator
def test_eviction_sets_disruption_target_and_deletes(raw: Raw, namespace: str, emulator: Any) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    create(
        raw,
        pods,
        {
            "metadata": {"name": "ev"},
            "spec": {
                "nodeName": NO_KUBELET_NODE,
                "terminationGracePeriodSeconds": 30,
                "containers": [{"name": "c", "image": "busybox"}],
            },
        },
    )
    status, body, _ = raw.request(
        "POST",
        f"{pods}/ev/eviction",
        {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": "ev", "namespace": namespace},
            "deleteOptions": {"gracePeriodSeconds": 1},
        },
    )
    assert status == 201, body
    status, pod, _ = raw.request("GET", f"{pods}/ev")
    target = [c for c in pod["status"]["conditions"] if c["type"] == "DisruptionTarget"]
    assert target and target[0]["reason"] == "EvictionByEvictionAPI"
    assert pod["metadata"]["deletionGracePeriodSeconds"] == 1


def test_immutable_fields_are_refused_on_update(raw: Raw, namespace: str) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    create(
        raw,
        pods,
        {
            "metadata": {"name": "frozen"},
            "spec": {"nodeSelector": UNSCHEDULABLE, "containers": [{"name": "c", "image": "busybox:1.36"}]},
        },
    )
    status, obj, _ = raw.request(
        "PATCH",
        f"{pods}/frozen",
        {"spec": {"containers": [{"name": "c", "image": "busybox:1.37"}]}},
        "application/strategic-merge-patch+json",
    )
    assert status == 200 and obj["spec"]["containers"][0]["image"] == "busybox:1.37"
    status, body, _ = raw.request(
        "PATCH",
        f"{pods}/frozen",
        {"spec": {"containers": [{"name": "c", "command": ["sh"]}]}},
        "application/strategic-merge-patch+json",
    )
    assert (status, body["reason"]) == (422, "Invalid")
    assert "pod updates may not change fields" in body["message"]
    jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    create(
        raw,
        jobs,
        {
            "metadata": {"name": "frozen"},
            "spec": {
                "suspend": False,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "nodeSelector": UNSCHEDULABLE,
                        "containers": [{"name": "c", "image": "busybox:1.36"}],
                    }
                },
            },
        },
    )
    status, body, _ = raw.request(
        "PATCH",
        f"{jobs}/frozen",
        {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:1.37"}]}}}},
        "application/strategic-merge-patch+json",
    )
    assert status == 422 and "spec.template" in body["message"] and "field is immutable" in body["message"]
    status, obj, _ = raw.request(
        "PATCH", f"{jobs}/frozen", {"metadata": {"labels": {"a": "b"}}}, "application/merge-patch+json"
    )
    assert status == 200


@pytest.mark.emulator
def test_eviction_respects_pod_disruption_budget(raw: Raw, namespace: str, emulator: Any) -> None:
    pods = f"/api/v1/namespaces/{namespace}/pods"
    for name in ("pdb-a", "pdb-b"):
        create(
            raw,
            pods,
            {
                "metadata": {"name": name, "labels": {"app": "guarded"}},
                "spec": {
                    "nodeName": NO_KUBELET_NODE,
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "c", "image": "busybox"}],
                },
            },
        )
        raw.request(
            "PATCH",
            f"{pods}/{name}/status",
            {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
            "application/merge-patch+json",
        )
    create(
        raw,
        f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets",
        {
            "metadata": {"name": "guard"},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
        },
    )
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"namespace": namespace}}
    assert raw.request("POST", f"{pods}/pdb-a/eviction", eviction)[0] == 201
    wait_for(lambda: raw.request("GET", f"{pods}/pdb-a")[0] == 404, "first eviction done")
    status, body, _ = raw.request("POST", f"{pods}/pdb-b/eviction", eviction)
    assert (status, body["reason"]) == (429, "TooManyRequests")
    assert "disruption budget" in body["message"]
    assert raw.request("GET", f"{pods}/pdb-b")[0] == 200


def test_namespace_finalize_subresource_releases_a_terminating_namespace(raw: Raw, widget_crd: Any) -> None:
    ns = "conf-finalize"
    create(raw, "/api/v1/namespaces", {"metadata": {"name": ns}})
    create(
        raw,
        f"{WIDGETS}/namespaces/{ns}/{WIDGET_PLURAL}",
        widget("stuck", finalizers=["conformance.example.com/x"]),
    )
    raw.request("DELETE", f"/api/v1/namespaces/{ns}")
    status, obj, _ = raw.request("GET", f"/api/v1/namespaces/{ns}")
    assert obj["spec"]["finalizers"] == ["kubernetes"] and obj["status"]["phase"] == "Terminating"
    obj["spec"]["finalizers"] = []
    status, body, _ = raw.request("PUT", f"/api/v1/namespaces/{ns}/finalize", obj)
    assert status == 200, body
    wait_for(lambda: raw.request("GET", f"/api/v1/namespaces/{ns}")[0] == 404, "namespace released")


def test_non_finite_numbers_are_not_json_and_are_refused(raw: Raw, namespace: str) -> None:
    """NaN/Infinity are not JSON: kube-apiserver answers 400 and stores nothing (a stored NaN would break
    every later read and patch of the object)."""
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    for name, literal, char in (("nan", "NaN", "N"), ("inf", "Infinity", "I"), ("neg-inf", "-Infinity", "I")):
        body = json.dumps(cm(name)).encode()[:-1] + b', "x": ' + literal.encode() + b"}"
        status, reply, _ = raw.request("POST", path, body)
        assert status == 400, (literal, reply)
        assert reply["kind"] == "Status" and reply["reason"] == "BadRequest"
        assert f"invalid character '{char}'" in reply["message"], reply["message"]
        assert raw.request("GET", f"{path}/{name}")[0] == 404
    created = create(raw, path, cm("plain"))
    status, reply, _ = raw.request(
        "PATCH",
        f"{path}/plain",
        b'{"metadata": {"labels": {"a": "b"}}, "x": NaN}',
        "application/merge-patch+json",
    )
    assert status == 400, reply
    assert (
        raw.request("GET", f"{path}/plain")[1]["metadata"]["resourceVersion"]
        == (created["metadata"]["resourceVersion"])
    )


def test_duplicate_fields_are_refused_under_strict_and_warned_under_warn(raw: Raw, namespace: str) -> None:
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    body = (
        '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "%s"},'
        ' "data": {"k": "first", "k": "second"}}'
    )
    status, reply, _ = raw.request("POST", path + "?fieldValidation=Strict", (body % "strict").encode())
    assert status == 400, reply
    assert reply["reason"] == "BadRequest"
    assert "strict decoding error" in reply["message"] and 'duplicate field "k"' in reply["message"]
    assert raw.request("GET", f"{path}/strict")[0] == 404

    status, reply, headers = raw.request("POST", path + "?fieldValidation=Warn", (body % "warned").encode())
    assert status == 201, reply
    assert reply["data"] == {"k": "second"}  # the last one wins, as in Go's decoder
    warning = headers.get("Warning", "")
    assert warning.startswith("299 - ") and json.loads(warning[6:]) == 'duplicate field "k"', warning

    status, reply, _ = raw.request("POST", path + "?fieldValidation=Ignore", (body % "ignored").encode())
    assert status == 201, reply

    # An update under Strict is refused the same way and leaves the object as it was.
    current = raw.request("GET", f"{path}/warned")[1]
    rv = current["metadata"]["resourceVersion"]
    update = json.dumps(cm("warned", resourceVersion=rv)).encode()[:-1] + b', "data": {"k": "y"}}'
    status, reply, _ = raw.request("PUT", f"{path}/warned?fieldValidation=Strict", update)
    assert status == 400 and 'duplicate field "data"' in reply["message"], reply
    assert raw.request("GET", f"{path}/warned")[1]["data"] == {"k": "second"}
