"""Issue 25 end to end: the OpenAI-compatible fine-tuning API, driven ONLY through the official `openai`
package (pinned) as an application developer would, against the API service running as a pod from the chart
on the embedded cluster, with the real operator, trainer and vLLM-CPU behind it; kubectl / the Kubernetes
client check what happened in the cluster.

The user is the ServiceAccount `app-dev` of a team namespace, bound to a Role with exactly what a user of the
API needs, its API key a TokenRequest token (`kubectl create token app-dev`). The platform team's ConfigMap
`finetune-api-models` maps `toy` to the toy base, dataset recipe and a vLLM-CPU deployment, and `denied` to a
base model a FineTunePolicy forbids in a labelled namespace.

The tests run in file order on module-scoped fixtures: the main job is created by the first test that needs it
and trains while the cancel, permission, policy and token tests run; the last test waits for it and chats with
the tuned model (the module's only vLLM server).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from finetune_demo import toymodel
from localcluster.pytest_plugin import KUBECTL_BINARIES, Kubectl, wait_for

from .conftest import GROUP, PLURAL, SECRET, VERSION, prepare_namespace
from .test_policy import chart_admission  # noqa: F401  (the chart's FineTunePolicy admission, module-scoped)
from .test_serving import VLLM_CPU_ARGS

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.local_kubelet,
    pytest.mark.vllm,
    pytest.mark.timeout(600),
]

REPO = Path(__file__).resolve().parents[2]
MODELS_CONFIGMAP = "finetune-api-models"
MODELS_NAMESPACE = "default"
# LocalCluster.start_finetune_api stores files under s3://finetune-api/files
FILES_BUCKET, FILES_PREFIX = "finetune-api", "files"
USER = "app-dev"

# The least a user of the API needs in their namespace (docs/openai-api.md suggests the built-in `edit` role,
# which holds these): every call the tests make passes with exactly this.
USER_RULES = [
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["create", "get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": ["modelservers"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get"]},
]


@dataclass
class Api:
    """The service's base URL, the namespaces and the users' API keys."""

    base_url: str
    namespace: str  # app-dev's own: restricted Pod Security, the storage Secret, the user's Role
    policy_namespace: str  # labelled for the FineTunePolicy; app-dev has the same Role there
    outsider_namespace: str  # app-dev has no rights here; ServiceAccount `nobody` (no rights) lives here
    token: str
    outsider_token: str
    policy_label: str  # the namespace label the FineTunePolicy selects
    main_created: float = 0.0  # time.monotonic() when the main job was created

    def client(self, token: str | None = None, project: str | None = None) -> openai.OpenAI:
        # No retries: every answer the tests see is the service's first one.
        return openai.OpenAI(
            api_key=token or self.token, base_url=self.base_url, project=project, max_retries=0, timeout=120
        )


def _kubectl(local_cluster: Any) -> Kubectl:
    for name in reversed(list(KUBECTL_BINARIES)):
        if KUBECTL_BINARIES[name].exists():
            return Kubectl(KUBECTL_BINARIES[name], Path(local_cluster.kubeconfig), name)
    pytest.skip("no kubectl binary found")
    raise AssertionError  # unreachable


def _namespace(core: Any, prefix: str, **labels: str) -> str:
    name = f"{prefix}-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name, "labels": labels}})
    return name


def _grant_user(rbac: Any, namespace: str, user_namespace: str) -> None:
    """app-dev (of user_namespace) gets the user's Role in namespace."""
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "openai-api-user"}, "rules": USER_RULES})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "openai-api-user"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "openai-api-user"},
            "subjects": [{"kind": "ServiceAccount", "name": USER, "namespace": user_namespace}],
        },
    )


def _create_token(kubectl: Any, namespace: str, account: str) -> str:
    """A token of the ServiceAccount from the TokenRequest API, as a user gets one."""
    token: str = kubectl("create", "token", account, "-n", namespace, "--duration", "2h").stdout.strip()
    assert token, f"kubectl create token {account} gave nothing"
    return token


def _start_api(local_cluster: Any) -> str:
    url = str(local_cluster.call(local_cluster.start_finetune_api(), timeout=180)).rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


@pytest.fixture(scope="module")
def api(local_cluster: Any, lc_api: Any, s3_assets: dict[str, str]) -> Iterator[Api]:
    """The API service from the chart, the team's namespaces and users."""
    from kubernetes import client

    if not (REPO / ".venv-vllm" / "bin" / "python").exists():
        pytest.skip("vllm-cpu is not installed (make vllm-venv)")
    began = time.monotonic()
    base_url = _start_api(local_cluster)
    core, rbac = client.CoreV1Api(lc_api), client.RbacAuthorizationV1Api(lc_api)
    kubectl = _kubectl(local_cluster)
    label = f"oai-{secrets.token_hex(3)}"
    created = [
        _namespace(core, "oai-team"),
        _namespace(core, "oai-policy", **{"finetune.dev/e2e-policy": label}),
        _namespace(core, "oai-outsider"),
    ]
    team, policy_ns, outsider = created
    try:
        prepare_namespace(local_cluster, lc_api, team)
        core.create_namespaced_service_account(team, {"metadata": {"name": USER}})
        core.create_namespaced_service_account(outsider, {"metadata": {"name": "nobody"}})
        for namespace in (team, policy_ns):
            _grant_user(rbac, namespace, team)
        result = Api(
            base_url,
            team,
            policy_ns,
            outsider,
            token=_create_token(kubectl, team, USER),
            outsider_token=_create_token(kubectl, outsider, "nobody"),
            policy_label=label,
        )
        print(f"\nAPI at {base_url}; fixture ready in {time.monotonic() - began:.1f}s")
        yield result
    finally:
        if os.environ.get("E2E_KEEP"):
            print(f"kept namespaces {created}")
        else:
            for name in created:
                with contextlib.suppress(Exception):  # best-effort cleanup, as lc_namespace's
                    core.delete_namespace(name, propagation_policy="Background", grace_period_seconds=0)


def toy_mapping(assets: dict[str, str]) -> dict[str, Any]:
    """The platform team's `toy` model: the recipe under which LoRA learns the toy task (as
    tests/e2e/conftest.py's Jobs.manifest), evaluated on the held-out test set and served by the job's own
    vLLM-CPU server."""
    return {
        "baseModel": {"uri": assets["model"]},
        "storage": {"output": "s3://runs/openai-api", "credentialsSecret": SECRET},
        "hyperparameters": dict(toymodel.TOY_HYPERPARAMETERS),
        "lora": dict(toymodel.TOY_LORA),
        "resources": {"gpus": 0, "gpuType": "cpu"},
        "evaluation": {"metrics": ["loss", "exact_match"], "primaryMetric": "exact_match", "maxNewTokens": 4},
        "deployment": {"gpus": 0, "gpuType": "cpu", "maxModelLen": 256, "extraArgs": VLLM_CPU_ARGS},
        "dataset": {"test": assets["test"]},
    }


@pytest.fixture(scope="module")
def models(lc_api: Any, s3_assets: dict[str, str]) -> Iterator[dict[str, dict[str, Any]]]:
    """The ConfigMap `finetune-api-models`: `toy`, and `denied` (a base outside the policy's allowed ones).
    Other keys already there are kept; ours go afterwards (the ConfigMap too if we created it)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(lc_api)
    denied = {**toy_mapping(s3_assets), "baseModel": {"uri": "s3://unapproved/toy"}}
    mappings = {"toy": toy_mapping(s3_assets), "denied": denied}
    data = {name: yaml.safe_dump(value) for name, value in mappings.items()}
    created = True
    try:
        core.create_namespaced_config_map(
            MODELS_NAMESPACE, {"metadata": {"name": MODELS_CONFIGMAP}, "data": data}
        )
    except ApiException as err:
        if err.status != 409:
            raise
        created = False
        core.patch_namespaced_config_map(MODELS_CONFIGMAP, MODELS_NAMESPACE, {"data": data})
    yield mappings
    with contextlib.suppress(Exception):  # leave the ConfigMap as it was
        if created:
            core.delete_namespaced_config_map(MODELS_CONFIGMAP, MODELS_NAMESPACE)
        else:
            core.patch_namespaced_config_map(
                MODELS_CONFIGMAP, MODELS_NAMESPACE, {"data": dict.fromkeys(mappings)}
            )


@pytest.fixture(scope="module")
def policy(lc_api: Any, api: Api, chart_admission: Any) -> Iterator[str]:  # noqa: F811
    """A FineTunePolicy allowing only s3://approved/* base models in the policy namespace."""
    from kubernetes import client

    custom = client.CustomObjectsApi(lc_api)
    name = f"openai-api-{secrets.token_hex(3)}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTunePolicy",
        "metadata": {"name": name},
        "spec": {
            "namespaceSelector": {"matchLabels": {"finetune.dev/e2e-policy": api.policy_label}},
            "allowedBaseModels": ["s3://approved/*"],
        },
    }
    custom.create_cluster_custom_object(GROUP, VERSION, "finetunepolicies", body)
    yield name
    with contextlib.suppress(Exception):
        custom.delete_cluster_custom_object(GROUP, VERSION, "finetunepolicies", name)


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def training_file(api: Api) -> str:
    """The toy task's training set, uploaded as a user does."""
    train, _ = toymodel.toy_task()
    uploaded = api.client().files.create(file=("toy-train.jsonl", _jsonl(train)), purpose="fine-tune")
    return uploaded.id


@pytest.fixture(scope="module")
def main_job(api: Api, models: Any, training_file: str) -> Any:
    """The job that learns the toy task, created once; the tests that follow run while it trains."""
    job = api.client().fine_tuning.jobs.create(
        model="toy",
        training_file=training_file,
        hyperparameters={"n_epochs": 6, "batch_size": 8, "learning_rate_multiplier": 1.0},
        suffix="shout",
        metadata={"team": "e2e"},
    )
    api.main_created = time.monotonic()
    print(f"\ncreated {job.id}: status {job.status}")
    return job


def _ftj(lc_api: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client

    obj: dict[str, Any] = client.CustomObjectsApi(lc_api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return obj


def _ftjs(lc_api: Any, namespace: str) -> list[dict[str, Any]]:
    from kubernetes import client

    listing = client.CustomObjectsApi(lc_api).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    return list(listing["items"])


def _s3_keys(local_cluster: Any, namespace: str) -> list[str]:
    """The objects under the namespace's prefix of the API's file store."""
    s3 = local_cluster.s3_client()
    listing = s3.list_objects_v2(Bucket=FILES_BUCKET, Prefix=f"{FILES_PREFIX}/{namespace}/")
    return [item["Key"] for item in listing.get("Contents", [])]


def _poll(retrieve: Callable[[], Any], done: Callable[[Any], bool], timeout: float, seen: list[str]) -> Any:
    """Poll a job through the API until `done`, recording each status the user saw once, in order."""
    last: list[Any] = []

    def check() -> Any:
        job = retrieve()
        last[:] = [job]
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        return job if done(job) else None

    try:
        return wait_for(check, timeout=timeout, interval=1.0, what="the job")
    except AssertionError as err:
        raise AssertionError(f"{err}: statuses seen {seen}, last {last}") from None


def _error(err: openai.APIStatusError) -> dict[str, Any]:
    """The OpenAI error object of an answer: {"message", "type", "param", "code"}."""
    body = err.response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    return error


# -- 1. files ------------------------------------------------------------------------------------------------
def test_files_upload_validate_list_retrieve_content_and_delete(api: Api, local_cluster: Any) -> None:
    user = api.client()
    good = _jsonl(toymodel.toy_task()[0][:12])
    bad = _jsonl(toymodel.toy_task()[0][:1]) + b"{not json\n" + _jsonl(toymodel.toy_task()[0][1:3])
    before = set(_s3_keys(local_cluster, api.namespace))

    with pytest.raises(openai.BadRequestError) as refused:
        user.files.create(file=("broken.jsonl", bad), purpose="fine-tune")
    error = _error(refused.value)
    print(f"\nbroken upload: {refused.value.status_code} {error}")
    assert "broken.jsonl line 2" in error["message"], error
    assert (error["code"], error["param"]) == ("invalid_file_format", "file")
    assert set(_s3_keys(local_cluster, api.namespace)) == before  # nothing stored

    uploaded = user.files.create(file=("small.jsonl", good), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose) == ("small.jsonl", len(good), "fine-tune")
    assert uploaded.status == "processed"
    stored = set(_s3_keys(local_cluster, api.namespace)) - before
    assert stored == {
        f"{FILES_PREFIX}/{api.namespace}/files/{uploaded.id}.jsonl",
        f"{FILES_PREFIX}/{api.namespace}/files/{uploaded.id}.json",
    }

    assert uploaded.id in [f.id for f in user.files.list()]
    assert user.files.retrieve(uploaded.id).model_dump() == uploaded.model_dump()
    assert user.files.content(uploaded.id).read() == good

    deleted = user.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError):
        user.files.retrieve(uploaded.id)
    assert uploaded.id not in [f.id for f in user.files.list()]
    assert set(_s3_keys(local_cluster, api.namespace)) == before


# -- 3. cancel (while the main job trains) -------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_cancel_a_running_job_stops_its_pods_for_good(
    api: Api, lc_api: Any, main_job: Any, training_file: str
) -> None:
    from kubernetes import client

    user = api.client()
    # 100 epochs of single examples: ~30000 steps, far more than the toy (~50 steps/s) makes before the cancel
    job = user.fine_tuning.jobs.create(
        model="toy", training_file=training_file, hyperparameters={"n_epochs": 100, "batch_size": 1}
    )
    began, seen = time.monotonic(), [job.status]
    _poll(lambda: user.fine_tuning.jobs.retrieve(job.id), lambda j: j.status == "running", 600, seen)
    running_after = time.monotonic() - began
    core, batch = client.CoreV1Api(lc_api), client.BatchV1Api(lc_api)
    train = f"app.kubernetes.io/instance={job.id},app.kubernetes.io/component=train"

    def train_pods(phase: str | None = None) -> list[Any]:
        pods = core.list_namespaced_pod(api.namespace, label_selector=train).items
        return [p for p in pods if phase is None or p.status.phase == phase]

    wait_for(lambda: train_pods("Running"), timeout=120, what="the running job's train pod")

    cancelled = user.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled", cancelled
    final = _poll(
        lambda: user.fine_tuning.jobs.retrieve(job.id),
        lambda j: j.status == "cancelled" and j.finished_at,
        120,
        seen,
    )
    assert final.fine_tuned_model is None and final.error is None

    status = _ftj(lc_api, api.namespace, job.id)["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status["phase"], ready["reason"]) == ("Failed", "Cancelled"), status
    assert status["message"] == "cancelled (spec.cancel) while Training"
    wait_for(lambda: not train_pods(), timeout=120, what="the cancelled job's train pods to go")
    assert not batch.list_namespaced_job(api.namespace, label_selector=train).items
    print(
        f"\ncancel: statuses {seen}; running after {running_after:.0f}s; "
        f"Failed/Cancelled and no train pod {time.monotonic() - began:.0f}s after create"
    )


# -- 4. no rights --------------------------------------------------------------------------------------------
def test_a_user_without_rights_gets_403_and_creates_nothing(
    api: Api, lc_api: Any, local_cluster: Any, models: Any, training_file: str
) -> None:
    for who, user in (
        ("nobody in its own namespace", api.client(api.outsider_token)),
        ("app-dev with project= a namespace it has no rights in", api.client(project=api.outsider_namespace)),
    ):
        with pytest.raises(openai.PermissionDeniedError) as upload:
            user.files.create(file=("train.jsonl", _jsonl(toymodel.toy_task()[0][:4])), purpose="fine-tune")
        with pytest.raises(openai.PermissionDeniedError) as create:
            user.fine_tuning.jobs.create(model="toy", training_file=training_file)
        for refused in (upload, create):
            error = _error(refused.value)
            assert error["code"] == "permission_denied", (who, error)
            assert api.outsider_namespace in error["message"], (who, error)
        print(f"\n{who}: 403 {_error(upload.value)['message']!r} / {_error(create.value)['message']!r}")
    assert _s3_keys(local_cluster, api.outsider_namespace) == []
    assert _ftjs(lc_api, api.outsider_namespace) == []


# -- 5. FineTunePolicy ---------------------------------------------------------------------------------------
def test_a_policy_denied_model_gets_the_policys_message(
    api: Api, lc_api: Any, models: Any, policy: str, training_file: str
) -> None:
    user = api.client(project=api.policy_namespace)
    uploaded = user.files.create(
        file=("train.jsonl", _jsonl(toymodel.toy_task()[0][:16])), purpose="fine-tune"
    )

    with pytest.raises(openai.PermissionDeniedError) as refused:
        user.fine_tuning.jobs.create(model="denied", training_file=uploaded.id)
    err = refused.value
    error = _error(err)
    print(f"\npolicy: {err.status_code} {error}")
    assert error["code"] == "policy_violation", error
    why = f"denied by FineTunePolicy {policy}: spec.baseModel.uri s3://unapproved/toy is not in allowed"
    assert why in error["message"], error
    assert _ftjs(lc_api, api.policy_namespace) == []


# -- 6. tokens -----------------------------------------------------------------------------------------------
def test_expired_and_garbage_tokens_get_401_in_openais_shape(api: Api, local_cluster: Any) -> None:
    expiring = _create_token(_kubectl(local_cluster), api.namespace, USER)  # a second token of app-dev
    user = api.client(expiring)
    assert isinstance(user.files.list().data, list)  # valid while it lasts

    async def expire() -> None:  # the embedded authenticator's test hook: its expiry moves into the past
        local_cluster.apiserver.authenticator.expire(expiring)

    local_cluster.call(expire())
    began = time.monotonic()

    def turned_away() -> openai.AuthenticationError | None:
        try:
            user.files.list()
        except openai.AuthenticationError as err:
            return err
        return None

    # the service caches a positive TokenReview for at most 10 s
    wait_for(turned_away, timeout=20, interval=0.5, what="the expired token to be refused")
    print(f"\nexpired token refused {time.monotonic() - began:.1f}s after its expiry")
    assert isinstance(api.client().files.list().data, list)  # the user's other token still works
    for what, token in (("expired", expiring), ("garbage", "not-a-kubernetes-token")):
        with pytest.raises(openai.AuthenticationError) as refused:
            api.client(token).fine_tuning.jobs.list()
        error = _error(refused.value)
        print(f"\n{what} token: {refused.value.status_code} {error}")
        assert refused.value.status_code == 401
        assert error["code"] == "invalid_api_key", error
        assert "kubectl create token" in error["message"], error
        assert "Traceback" not in refused.value.response.text


# -- 2. the main job, trained, evaluated, served, and called -------------------------------------------------
@pytest.mark.timeout(1500)
def test_a_job_on_a_mapped_model_trains_serves_and_answers_with_the_tuned_behaviour(
    api: Api, lc_api: Any, main_job: Any, training_file: str
) -> None:
    user = api.client()
    assert main_job.model == "toy" and main_job.training_file == training_file
    assert main_job.hyperparameters.n_epochs == 6 and main_job.hyperparameters.batch_size == 8
    ftj = _ftj(lc_api, api.namespace, main_job.id)
    hyper = ftj["spec"]["hyperparameters"]
    assert (hyper["epochs"], hyper["batchSize"]) == (6, 8)
    assert hyper["learningRate"] == pytest.approx(toymodel.TOY_HYPERPARAMETERS["learningRate"])
    assert ftj["metadata"]["labels"]["finetune.dev/api"] == "openai"

    seen: list[str] = [main_job.status]
    job = _poll(
        lambda: user.fine_tuning.jobs.retrieve(main_job.id),
        lambda j: j.status in ("succeeded", "failed", "cancelled"),
        1200,
        seen,
    )
    took = time.monotonic() - api.main_created
    status = _ftj(lc_api, api.namespace, main_job.id).get("status") or {}
    print(f"\n{job.id}: statuses {seen}, {job.status} {took:.0f}s after create; phase {status.get('phase')}")
    assert job.status == "succeeded", (job, json.dumps(status)[:3000])
    assert seen[-1] == "succeeded" and "running" in seen
    assert job.fine_tuned_model and job.fine_tuned_model == status["endpoint"]["model"]
    assert job.fine_tuned_model.startswith("ft-toy-shout-")
    assert job.trained_tokens and job.trained_tokens > 0
    print(f"fine_tuned_model {job.fine_tuned_model}, trained_tokens {job.trained_tokens}")
    assert job.error is None and job.finished_at and job.metadata == {"team": "e2e"}

    assert main_job.id in [j.id for j in user.fine_tuning.jobs.list(limit=10)]
    events = list(user.fine_tuning.jobs.list_events(main_job.id, limit=100))
    messages = [e.message for e in events]
    print(f"events ({len(events)}): {messages[:8]} ...")
    # the job's Events, as kubectl shows them, and the trainer's progress lines
    reasons = {e.data["reason"] for e in events if e.type == "message"}
    assert reasons and reasons <= {e["reason"] for e in _events(lc_api, api.namespace, main_job.id)}, reasons
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps and max(steps) == status["progress"]["totalSteps"], steps
    checkpoints = list(user.fine_tuning.jobs.checkpoints.list(main_job.id))
    print(f"checkpoints: {[c.model_dump() for c in checkpoints]}")
    assert checkpoints and all(c.fine_tuning_job_id == main_job.id for c in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint == job.fine_tuned_model

    assert job.fine_tuned_model in [m.id for m in user.models.list()]
    _, held_out = toymodel.toy_task()
    right = 0
    for example in held_out:
        prompt, expected = example["messages"][0]["content"], example["messages"][1]["content"]
        answer = user.chat.completions.create(
            model=job.fine_tuned_model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=4,
            temperature=0,
        )
        right += (answer.choices[0].message.content or "").strip() == expected
    rate = right / len(held_out)
    evaluation = status["evaluation"]
    print(
        f"chat through the API: exact match {rate:.2f} on {len(held_out)} held-out prompts "
        f"(evaluated: tuned {evaluation['tuned']['exact_match']}, base {evaluation['base']['exact_match']})"
    )
    assert rate >= 0.9 and rate > evaluation["base"]["exact_match"]
    assert rate >= evaluation["tuned"]["exact_match"] - 0.05


def _events(lc_api: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    from kubernetes import client

    items: list[dict[str, Any]] = (
        client.CoreV1Api(lc_api).list_namespaced_event(namespace, _preload_content=False).json()["items"]
    )
    return [
        e
        for e in items
        if e["involvedObject"].get("kind") == "FineTuneJob" and e["involvedObject"].get("name") == name
    ]
