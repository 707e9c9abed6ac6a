"""RBAC: the operator's declared rules are exactly what it uses — the HTTP calls kube.py makes (recorded
against a loopback HTTP server) plus Kopf's list/watch of the registered resources — and nothing on
Secrets. The Helm chart's ClusterRole must grant the same (compared when helm is available)."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
import yaml
from aiohttp import web
from finetune_operator import handlers
from finetune_operator.config import load_config
from finetune_operator.finetunejob.builders import validation_job
from finetune_operator.finetuneschedule import controller as schedule
from finetune_operator.finetuneschedule.planner import SchedulePlan
from finetune_operator.k8s import client as kube
from finetune_operator.k8s import rbac

from .ftj_factory import UID, job

REPO = Path(__file__).resolve().parents[2]
PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/[^/]+)?/(?P<resource>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
VERBS = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}


def _permission(method: str, path: str) -> tuple[str, str, str]:
    match = PATH.match(path)
    assert match, path
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    verb = VERBS.get(method) or ("get" if match["name"] else "list")
    return match["group"] or "", resource, verb


async def _recorded_calls(aiohttp_port: int, server_calls: list[tuple[str, str, str]]) -> None:
    info = SimpleNamespace(
        server=f"http://127.0.0.1:{aiohttp_port}",
        token="t",
        scheme="Bearer",
        insecure=None,
        ca_path=None,
        ca_data=None,
        certificate_path=None,
        certificate_data=None,
        private_key_path=None,
        private_key_data=None,
        username=None,
        password=None,
    )
    api = kube.KubeApi(info)
    manifest = validation_job(job(), load_config(env={}))
    try:
        await api.create_or_adopt(manifest, UID)  # 201
        await api.create_or_adopt(manifest, UID)  # 409 → get → adopt (owned)
        with pytest.raises(kube.NotOwnedError, match="was not created by the operator"):
            await api.create_or_adopt(manifest, UID, {})  # owned, but not in the job's status.children
        await api.patch("Job", "team-a", "demo-validate", {"spec": {"suspend": True}})
        await api.patch(
            "Deployment",
            "team-a",
            "demo-serve",
            [{"op": "replace", "path": "/spec/replicas", "value": 2}],
            "json",
        )
        await api.delete("Deployment", "team-a", "demo-serve")
        await api.delete("Service", "team-a", "demo-serve")
        for kind in ("Deployment", "Service"):
            await api.create_or_adopt({**manifest, "kind": kind}, UID)
            await api.create_or_adopt({**manifest, "kind": kind}, UID)
        await api.patch_status("team-a", "demo", {"phase": "Validating"})
        await api.patch_policy_status("team-defaults", {"usedSummary": "0h"})  # cluster-scoped
        await api.post_event(
            {"metadata": {"name": "demo", "namespace": "team-a", "uid": UID}}, "Normal", "Validating", "hello"
        )
        assert await api.pod_log_tail("team-a", "demo-train-abc", "trainer", 5) == '{"event": "progress"}'
        # The ModelServer pass (pool.py): its reads, its ConfigMap and NetworkPolicy, its status.
        await api.get("ModelServer", "team-a", "pool")
        for kind in ("Deployment", "Service", "ConfigMap", "NetworkPolicy"):
            await api.get(kind, "team-a", "pool-pool")
        await api.list("Pod", "team-a", "finetune.dev/modelserver-uid=u")
        await api.list("FineTuneJob", "team-a")
        cm = {**manifest, "kind": "ConfigMap"}
        await api.create_or_adopt(cm, UID)
        await api.create_or_adopt(cm, UID)
        await api.patch("ConfigMap", "team-a", "pool-pool", {"data": {}})
        policy = {**manifest, "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy"}
        await api.create_or_adopt(policy, UID)
        await api.create_or_adopt(policy, UID)
        await api.patch("NetworkPolicy", "team-a", "pool-pool", {"spec": {}})
        await api.patch_object_status("ModelServer", "team-a", "pool", {"readyReplicas": 1}, UID)
        # A job's own ModelServer (ownedserver.py): created, its spec patched, deleted with deployment off.
        server = {**manifest, "apiVersion": "finetune.dev/v1alpha1", "kind": "ModelServer"}
        await api.create_or_adopt(server, UID)
        await api.create_or_adopt(server, UID)
        await api.patch("ModelServer", "team-a", "demo-serve", {"spec": {"replicas": 2}})
        await api.delete("ModelServer", "team-a", "demo-serve")
        await _schedule_pass(api, manifest)
    finally:
        await api.close()


async def _schedule_pass(api: kube.KubeApi, manifest: Any) -> None:
    """A FineTuneSchedule pass (finetuneschedule/controller.py): its reads, a data Job and a run created (and
    adopted), both deleted, an Event, its status."""
    body = {
        "metadata": {"name": "nightly", "namespace": "team-a", "uid": UID},
        "spec": {"dataset": {"fromCapture": {"modelServer": "pool"}}},
    }
    await api.get("FineTuneSchedule", "team-a", "nightly")
    await schedule.observe(api, body, datetime.now(UTC))
    data = {**manifest, "metadata": {**manifest["metadata"], "name": "nightly-1-data"}}
    run = {**manifest, "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob"}
    for _ in range(2):
        planned = SchedulePlan(
            create=[data, run],
            delete=[("Job", "team-a-old"), ("FineTuneJob", "nightly-0")],
            status={"lastRun": 1},
            events=[("Normal", "RunCreated", "run nightly-1 created")],
        )
        await schedule.act(api, body, planned)


@pytest.fixture
async def fake_server() -> Any:
    calls: list[tuple[str, str, str]] = []
    created: set[str] = set()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.text()
        calls.append((request.method, request.path, request.headers.get("Content-Type", "")))
        if request.path.endswith("/log"):
            assert request.query["tailLines"] == "5" and request.query["container"] == "trainer"
            return web.Response(text='{"event": "progress"}')
        if request.method == "POST" and "/events" not in request.path:
            name = json.loads(body)["metadata"]["name"] + request.path
            if name in created:
                return web.json_response({"kind": "Status", "reason": "AlreadyExists"}, status=409)
            created.add(name)
            return web.json_response(json.loads(body), status=201)
        if request.method == "GET":
            return web.json_response({"metadata": {"ownerReferences": [{"uid": UID, "controller": True}]}})
        return web.json_response({"metadata": {"name": "x", "resourceVersion": "2", "uid": UID}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port, calls
    await runner.cleanup()


def _kopf_watches() -> set[tuple[str, str, str]]:
    registry = handlers.register(kopf.OperatorRegistry())
    used: set[tuple[str, str, str]] = set()
    for group in (registry._indexing, registry._watching, registry._changing, registry._spawning):
        for handler in group.get_all_handlers():
            selector = handler.selector
            assert selector is not None
            for verb in ("list", "watch"):
                used.add((selector.group or "", selector.plural or selector.any_name or "", verb))
    assert not registry._spawning.get_all_handlers()  # timers/daemons would add a finalizer to every job
    assert not registry._changing.get_all_handlers()  # change handlers would add Kopf's own patches
    return used


async def test_declared_rules_are_exactly_the_calls_made(fake_server: Any) -> None:
    port, calls = fake_server
    await _recorded_calls(port, calls)
    used = {_permission(method, path) for method, path, _ in calls} | _kopf_watches()
    declared = {(g, r, v) for (g, r), verbs in rbac.verbs().items() for v in verbs}
    assert used == declared
    # Patches use the content types the API server expects.
    assert {c for m, _, c in calls if m == "PATCH"} == {kube.MERGE_PATCH, kube.JSON_PATCH}


def test_no_secret_access_and_no_wildcards() -> None:
    for rule in rbac.RULES:
        assert not any("secret" in r for r in rule["resources"])
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    assert not any("secret" in str(k).lower() for k in kube.KINDS)


def test_helm_chart_grants_exactly_the_operator_rules() -> None:
    helm = REPO / ".tools" / "bin" / "helm"
    if not helm.exists():
        pytest.skip("helm not installed (make tools)")
    rendered = subprocess.run(
        [str(helm), "template", "t", str(REPO / "charts" / "finetune-operator")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    roles = [
        d
        for d in yaml.safe_load_all(rendered)
        if d
        and d.get("kind") == "ClusterRole"
        and not d["metadata"]["name"].endswith(("-edit", "-view", "-admin"))
    ]
    assert len(roles) == 1
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in roles[0]["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert {k: frozenset(v) for k, v in granted.items()} == rbac.verbs()
