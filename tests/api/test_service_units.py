"""The service's pure parts, without a cluster: flags and env, the Kubernetes → OpenAI error mapping, the
namespace rule, the token buckets, the proxy's Service URL rule."""

from __future__ import annotations

import pytest
from finetune_api.__main__ import parse_args
from finetune_api.auth import namespace_of
from finetune_api.errors import ApiError
from finetune_api.kube import api_error
from finetune_api.proxy import service_url
from finetune_api.ratelimit import RateLimiter


def test_flags_env_and_defaults() -> None:
    config = parse_args([], {"FINETUNE_API_FILES_URI": "s3://bucket/some/prefix", "POD_NAMESPACE": "ops"})
    assert (config.bucket, config.prefix, config.models_namespace) == ("bucket", "some/prefix/", "ops")
    assert (config.port, config.max_file_bytes, config.max_body_bytes, config.rate_limit) == (
        8000,
        536870912,
        1048576,
        600,
    )
    assert config.models_configmap == "finetune-api-models" and config.kubeconfig is None
    flagged = parse_args(
        ["--files-uri", "s3://bkt", "--rate-limit", "0", "--port", "9000"],
        {"FINETUNE_API_FILES_URI": "s3://other", "FINETUNE_API_PORT": "1", "KUBECONFIG": "/k"},
    )
    assert (flagged.bucket, flagged.prefix, flagged.rate_limit, flagged.port) == ("bkt", "", 0, 9000)
    assert (
        flagged.kubeconfig == "/k"
        and parse_args([], {"FINETUNE_API_FILES_URI": "s3://bkt"}).models_namespace == "default"
    )


@pytest.mark.parametrize(
    "argv", [[], ["--files-uri", "https://not-s3"], ["--files-uri", "s3://bkt", "--rate-limit", "-1"]]
)
def test_bad_flags_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv, {})


@pytest.mark.parametrize(
    ("status", "message", "code", "mapped"),
    [
        (401, "Unauthorized", "invalid_api_key", 401),
        (
            403,
            'finetunejobs.finetune.dev "x" is forbidden: ValidatingAdmissionPolicy ... denied',
            "policy_violation",
            403,
        ),
        (403, "admission webhook: denied by FineTunePolicy team: baseModel", "policy_violation", 403),
        (403, 'finetunejobs.finetune.dev is forbidden: User "u" cannot create', "permission_denied", 403),
        (404, "not found", "fine_tuning_job_not_found", 404),
        (409, "already exists", "conflict", 409),
        (422, "spec.hyperparameters.epochs: Invalid value", "invalid_request", 400),
        (500, "etcd down", "server_error", 502),
    ],
)
def test_kubernetes_answers_map_to_openai_errors(status: int, message: str, code: str, mapped: int) -> None:
    err = api_error(status, {"kind": "Status", "message": message}, not_found="fine_tuning_job_not_found")
    assert (err.status, err.code) == (mapped, code)
    if status in (403, 422):
        assert err.message == message  # the API server's words: the policy's message, the field at fault


def test_namespace_from_header_or_service_account() -> None:
    assert namespace_of("system:serviceaccount:team-a:bot", None) == "team-a"
    assert namespace_of("system:serviceaccount:team-a:bot", "team-b") == "team-b"
    with pytest.raises(ApiError) as bad:
        namespace_of("alice", "Team_B")
    assert bad.value.param == "OpenAI-Project"
    with pytest.raises(ApiError) as missing:
        namespace_of("alice@example.com", None)
    assert missing.value.code == "project_required"


def test_token_bucket_refills_per_key() -> None:
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(30.0)  # 2 per minute: one more in 30 s
    assert limiter.take("b") == 0
    now[0] = 30.0
    assert limiter.take("a") == 0 and limiter.take("a") > 0
    assert RateLimiter(0).take("a") == 0  # off


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://pool.team-a.svc:8000/v1", True),
        ("http://job-serve.team-a.svc.cluster.local:8000/v1/", True),
        ("http://pool.team-b.svc:8000/v1", False),
        ("http://169.254.169.254/v1", False),
        ("http://user:pw@pool.team-a.svc/v1", False),
        ("file:///etc/passwd", False),
        (None, False),
    ],
)
def test_only_services_of_the_callers_namespace_are_called(url: str | None, ok: bool) -> None:
    assert (service_url(url, "team-a") is not None) is ok
