"""Who may call the service: Kubernetes tokens (TokenReview), 401/403/429 in OpenAI's error shape, body
limits, and no stack trace whatever happens."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
import urllib3
from localcluster.pytest_plugin import wait_for

from .conftest import BUCKET, MODELS_CM, SERVICE_ACCOUNT, Admin, Tenant

pytestmark = [pytest.mark.timeout(120)]


def assert_openai_error(body: Any, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code


def test_garbage_token_is_401(tenant: Tenant) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        tenant.client("not-a-kubernetes-token").files.list()
    assert refused.value.code == "invalid_api_key"
    assert "kubectl create token" in refused.value.message
    assert refused.value.type == "invalid_request_error"


@pytest.mark.emulator
def test_expired_token_is_401(tenant: Tenant, admin: Admin, cluster: Any) -> None:
    expiring = admin.token(tenant.namespace, "app-dev")  # a second token of the same, allowed, user

    async def expire() -> None:
        cluster.apiserver.authenticator.expire(expiring)

    cluster.call(expire())
    with pytest.raises(openai.AuthenticationError) as refused:
        tenant.client(expiring).files.list()
    assert refused.value.code == "invalid_api_key"
    assert tenant.client().files.list().data == []  # the user's unexpired token still works


def test_missing_token_unknown_route_and_healthz(api_url: str) -> None:
    http = urllib3.PoolManager()
    no_auth = http.request("GET", f"{api_url}/v1/files", retries=False)
    assert no_auth.status == 401
    assert_openai_error(json.loads(no_auth.data), "invalid_api_key")
    health = http.request("GET", f"{api_url}/healthz", retries=False)
    assert health.status == 200 and health.data == b"ok"
    unknown = http.request("GET", f"{api_url}/nothing-here", retries=False)
    assert unknown.status == 404
    assert_openai_error(json.loads(unknown.data), "unknown_url")


def test_json_body_over_the_limit_is_413(tenant: Tenant) -> None:
    huge = "x" * (70 * 1024)  # the tier's --max-body-bytes is 64 KiB
    with pytest.raises(openai.APIStatusError) as refused:
        tenant.client().fine_tuning.jobs.create(model="tiny", training_file="file-" + "0" * 24, suffix=huge)
    assert refused.value.status_code == 413 and refused.value.code == "request_too_large"


def test_rate_limit_is_429_with_retry_after(tenant: Tenant, start_service: Callable[..., str]) -> None:
    url = start_service(rate_limit=2)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=tenant.token, max_retries=0)
    client.files.list()
    client.files.list()
    with pytest.raises(openai.RateLimitError) as limited:
        client.files.list()
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["Retry-After"]) >= 1
    # another user is not limited by this one's use
    other = openai.OpenAI(base_url=f"{url}/v1", api_key="garbage", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        other.files.list()


def test_unexpected_failure_is_500_without_a_stack_trace(
    tenant: Tenant, start_service: Callable[..., str]
) -> None:
    url = start_service(files_uri="s3://no-such-bucket-here/files")  # S3 answers NoSuchBucket
    http = urllib3.PoolManager()
    answer = http.request(
        "GET", f"{url}/v1/files", headers={"Authorization": f"Bearer {tenant.token}"}, retries=False
    )
    assert answer.status == 500
    body = json.loads(answer.data)
    assert_openai_error(body, "server_error")
    assert body["error"]["message"] == "internal error (see the service's log)"
    assert b"Traceback" not in answer.data and b"NoSuchBucket" not in answer.data


def test_service_identity_has_no_rights_on_finetunejobs(tenant: Tenant, admin: Admin) -> None:
    """The service runs as a ServiceAccount with only the chart's rules: every job call it makes works only
    with the caller's token (this guards the fixture: a wider binding would hide a call made as itself)."""
    for verb in ("create", "get", "list", "patch"):
        answer = admin.ok(
            "POST",
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": f"system:serviceaccount:default:{SERVICE_ACCOUNT}",
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                    "resourceAttributes": {
                        "verb": verb,
                        "group": "finetune.dev",
                        "resource": "finetunejobs",
                        "namespace": tenant.namespace,
                    },
                },
            },
        )
        assert answer["status"]["allowed"] is False, verb


def test_access_log_names_the_user_never_the_token(
    tenant: Tenant, admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="finetune_api")
    outsider = admin.token(tenant.namespace, "no-rights")
    tenant.client().files.list()
    with pytest.raises(openai.PermissionDeniedError):
        tenant.client(outsider).files.list()
    with pytest.raises(openai.AuthenticationError):
        tenant.client("garbage-token-value").files.list()
    access = [r.getMessage() for r in caplog.records if r.name == "finetune_api.access"]
    assert any(
        f"system:serviceaccount:{tenant.namespace}:app-dev GET /v1/files 200" in line for line in access
    )
    assert any(":no-rights GET /v1/files 403" in line for line in access)
    for secret in (tenant.token, outsider, "garbage-token-value"):
        assert secret not in caplog.text


def test_python_m_finetune_api_serves(tenant: Tenant, cluster: Any, service_kubeconfig: Path) -> None:
    """The entry point the chart runs: flags from env, S3 from the standard AWS_* env."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        **cluster.s3_env,
        "FINETUNE_API_FILES_URI": f"s3://{BUCKET}/files",
        "FINETUNE_API_HOST": "127.0.0.1",
        "FINETUNE_API_PORT": str(port),
        "FINETUNE_API_MODELS_CONFIGMAP": MODELS_CM,
        "KUBECONFIG": str(service_kubeconfig),
    }
    process = subprocess.Popen([sys.executable, "-m", "finetune_api"], env=env)
    try:
        http = urllib3.PoolManager()

        def healthy() -> bool:
            try:
                return http.request("GET", f"http://127.0.0.1:{port}/healthz", retries=False).status == 200
            except urllib3.exceptions.HTTPError:
                return process.poll() is not None  # exited: stop waiting, the assertion below says so

        wait_for(healthy, timeout=30, what="python -m finetune_api to answer /healthz")
        assert process.poll() is None
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=tenant.token, max_retries=0)
        assert client.files.list().data == []
    finally:
        process.terminate()
        process.wait(10)
