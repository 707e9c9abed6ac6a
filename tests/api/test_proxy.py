"""/v1/models and /v1/chat/completions: the models served in the caller's namespace, and chat requests passed
to the Service serving them (here a stub OpenAI-compatible server in a pod behind a Service), streamed or not.
"""

from __future__ import annotations

import io

import openai
import pytest
from localcluster.pytest_plugin import wait_for

from .conftest import GROUP, VERSION, Admin, Tenant, good_lines

pytestmark = [pytest.mark.timeout(180), pytest.mark.local_kubelet]

# An OpenAI-compatible chat server that answers "echo: <last user message>", as JSON or as SSE chunks.
STUB = r"""
import json
from aiohttp import web

async def chat(request):
    body = await request.json()
    text = "echo: " + body["messages"][-1]["content"]
    base = {"id": "chatcmpl-stub", "created": 1, "model": body["model"]}
    if not body.get("stream"):
        return web.json_response({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in text.split(" "):
        chunk = {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response

async def health(request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
app.router.add_get("/health", health)
web.run_app(app, host="0.0.0.0", port=8000)
"""


def start_stub(admin: Admin, namespace: str) -> None:
    admin.ok(
        "POST",
        f"/api/v1/namespaces/{namespace}/pods",
        {
            "metadata": {"name": "stub", "labels": {"app": "stub"}},
            "spec": {
                "containers": [
                    {
                        "name": "stub",
                        "image": "ghcr.io/finetune-operator/trainer",
                        "command": ["python", "-c", STUB],
                        "ports": [{"containerPort": 8000}],
                        "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 1},
                    }
                ]
            },
        },
    )
    admin.ok(
        "POST",
        f"/api/v1/namespaces/{namespace}/services",
        {
            "metadata": {"name": "stub"},
            "spec": {"selector": {"app": "stub"}, "ports": [{"port": 8000, "targetPort": 8000}]},
        },
    )

    def ready() -> bool:
        pod = admin.ok("GET", f"/api/v1/namespaces/{namespace}/pods/stub")
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions") or []
        )

    wait_for(ready, timeout=90, what="the stub model server's pod to be Ready")


def served_job(tenant: Tenant, admin: Admin) -> str:
    """A FineTuneJob (made through the API) whose status names the stub as its endpoint, as the operator
    writes it once the job serves; its phase is set to Failed so the operator leaves the status alone."""
    job = tenant.client().fine_tuning.jobs.create(
        model="tiny",
        training_file=tenant.client()
        .files.create(file=("t.jsonl", io.BytesIO(good_lines())), purpose="fine-tune")
        .id,
    )
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{tenant.namespace}/finetunejobs/{job.id}/status"
    wait_for(lambda: admin.ok("GET", path).get("status", {}).get("phase") or None, timeout=60, what="a phase")
    admin.ok(
        "PATCH",
        path,
        {
            "status": {
                "phase": "Failed",
                "endpoint": {
                    "url": f"http://stub.{tenant.namespace}.svc:8000/v1",
                    "model": f"ft-{job.id[-8:]}",
                },
            }
        },
        content_type="application/merge-patch+json",
    )
    return f"ft-{job.id[-8:]}"


def test_models_and_chat_through_the_proxy(tenant: Tenant, admin: Admin) -> None:
    start_stub(admin, tenant.namespace)
    model = served_job(tenant, admin)
    client = tenant.client()
    assert model in [m.id for m in client.models.list().data]
    retrieved = client.models.retrieve(model)
    assert (retrieved.id, retrieved.owned_by) == (model, tenant.namespace)
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("not-served")
    assert missing.value.code == "model_not_found" and tenant.namespace in str(missing.value)

    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello there"}]
    )
    assert answer.choices[0].message.content == "echo: hello there"

    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
    assert len(pieces) == 4 and "".join(pieces).strip() == "echo: one two three"

    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="not-served", messages=[{"role": "user", "content": "x"}])
    assert unknown.value.code == "model_not_found"


def test_an_endpoint_outside_the_namespace_is_not_called(tenant: Tenant, admin: Admin) -> None:
    """A status URL that is not a Service of the caller's namespace is never listed nor called."""
    model = served_job(tenant, admin)
    client = tenant.client()
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{tenant.namespace}/finetunejobs"
    [job] = admin.jobs(tenant.namespace)
    admin.ok(
        "PATCH",
        f"{path}/{job['metadata']['name']}/status",
        {"status": {"endpoint": {"url": "http://169.254.169.254/v1", "model": model}}},
        content_type="application/merge-patch+json",
    )
    assert model not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(model)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
