"""/v1/fine_tuning/jobs through the official openai client: every call reaches the Kubernetes API with the
caller's token, so the FineTuneJob appears in the caller's namespace with the mapped spec, RBAC and the
FineTunePolicy admission apply, and events come from the job's Events."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from localcluster.pytest_plugin import wait_for

from .conftest import BUCKET, GROUP, USER_RULES, VERSION, Admin, Tenant, good_lines

pytestmark = [pytest.mark.timeout(180)]


def upload(tenant: Tenant, client: Any = None) -> str:
    client = client or tenant.client()
    return str(client.files.create(file=("train.jsonl", io.BytesIO(good_lines())), purpose="fine-tune").id)


def test_create_makes_the_mapped_finetunejob(tenant: Tenant, admin: Admin) -> None:
    client = tenant.client()
    file_id = upload(tenant)
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=file_id, hyperparameters={"n_epochs": 2}, suffix="bot", seed=7
    )
    assert job.id.startswith("ftjob-") and job.model == "tiny" and job.training_file == file_id
    assert job.status == "validating_files" and job.fine_tuned_model is None
    [ftj] = admin.jobs(tenant.namespace)
    print("spec:", ftj["spec"])
    assert ftj["metadata"]["name"] == job.id
    assert ftj["metadata"]["labels"]["finetune.dev/api"] == "openai"
    spec = ftj["spec"]
    assert spec["baseModel"]["uri"] == "s3://models/tiny-base"
    assert spec["storage"] == {"output": "s3://runs/api", "credentialsSecret": "s3"}
    assert f"s3://{BUCKET}/files/{tenant.namespace}/files/{file_id}.jsonl" in str(spec["dataset"])
    assert spec["hyperparameters"]["epochs"] == 2 and spec["hyperparameters"]["seed"] == 7

    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id


def test_unknown_model_and_unknown_file(tenant: Tenant, admin: Admin) -> None:
    client = tenant.client()
    file_id = upload(tenant)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=file_id)
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.create(model="tiny", training_file="file-" + "a" * 24)
    assert missing.value.code == "file_not_found" and missing.value.param == "training_file"
    with pytest.raises(openai.NotFoundError) as no_job:
        client.fine_tuning.jobs.retrieve("ftjob-" + "0" * 20)
    assert no_job.value.code == "fine_tuning_job_not_found"
    assert admin.jobs(tenant.namespace) == []


def test_list_is_newest_first_and_paginates(tenant: Tenant) -> None:
    client = tenant.client()
    file_id = upload(tenant)
    made = [client.fine_tuning.jobs.create(model="tiny", training_file=file_id).id for _ in range(3)]
    first = client.fine_tuning.jobs.list(limit=2)
    assert first.has_more is True and len(first.data) == 2
    rest = client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert rest.has_more is False
    seen = [j.id for j in first.data + rest.data]
    assert sorted(seen) == sorted(made) and len(set(seen)) == 3
    with pytest.raises(openai.BadRequestError) as bad:
        client.fine_tuning.jobs.list(limit=1000)
    assert bad.value.param == "limit"


def test_cancel_patches_spec_cancel(tenant: Tenant, admin: Admin) -> None:
    client = tenant.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload(tenant))
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id and cancelled.status == "cancelled"
    [ftj] = admin.jobs(tenant.namespace)
    assert ftj["spec"]["cancel"] is True
    with pytest.raises(openai.BadRequestError) as again:
        client.fine_tuning.jobs.cancel(job.id)
    assert again.value.code == "job_not_cancellable"


def test_pause_and_resume_patch_spec_suspend(tenant: Tenant, admin: Admin) -> None:
    client = tenant.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload(tenant))
    with pytest.raises(openai.BadRequestError) as not_paused:
        client.fine_tuning.jobs.resume(job.id)
    assert not_paused.value.code == "job_not_resumable"
    assert f"Job {job.id} is not paused (status " in not_paused.value.message

    paused = client.fine_tuning.jobs.pause(job.id)
    # queued at once, before the operator has suspended anything (the SDK has no "paused" status)
    assert paused.id == job.id and paused.status == "queued"
    [ftj] = admin.jobs(tenant.namespace)
    assert ftj["spec"]["suspend"] is True
    again = client.fine_tuning.jobs.pause(job.id)  # idempotent: no error, nothing changes
    assert again.status == "queued"
    [unchanged] = admin.jobs(tenant.namespace)
    assert unchanged["spec"] == ftj["spec"]
    assert unchanged["metadata"]["generation"] == ftj["metadata"]["generation"]

    # the embedded cluster's operator suspends the job, and says so in the job's events
    def suspended_event() -> list[Any]:
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        return [e for e in events if e.data and e.data.get("reason") == "Suspended"]

    wait_for(suspended_event, timeout=60, what="the operator's Suspended event")
    assert admin.jobs(tenant.namespace)[0]["status"]["phase"] == "Suspended"
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.id == job.id
    [ftj] = admin.jobs(tenant.namespace)
    assert ftj["spec"]["suspend"] is False
    wait_for(
        lambda: client.fine_tuning.jobs.retrieve(job.id).status != "queued",
        timeout=60,
        what="the operator to resume the job",
    )


def test_a_finished_job_cannot_be_paused_or_resumed(tenant: Tenant, admin: Admin) -> None:
    client = tenant.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload(tenant))
    client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError) as pause:
        client.fine_tuning.jobs.pause(job.id)
    assert pause.value.code == "job_not_pausable"
    assert f"Job {job.id} has already been cancelled: it cannot be paused" in pause.value.message
    with pytest.raises(openai.BadRequestError) as resume:
        client.fine_tuning.jobs.resume(job.id)
    assert resume.value.code == "job_not_resumable"
    [ftj] = admin.jobs(tenant.namespace)
    assert not ftj["spec"].get("suspend")


def test_pause_and_resume_need_the_right_to_patch(tenant: Tenant, admin: Admin) -> None:
    """The PATCH is made with the caller's token: a user who may read jobs but not patch them gets 403."""
    job = tenant.client().fine_tuning.jobs.create(model="tiny", training_file=upload(tenant))
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{tenant.namespace}"
    admin.create(
        f"{rbac}/roles",
        {"metadata": {"name": "reader"}, "rules": [{**USER_RULES[0], "verbs": ["get", "list"]}]},
    )
    admin.create(
        f"{rbac}/rolebindings",
        {
            "metadata": {"name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": tenant.namespace}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
        },
    )
    reader = tenant.client(admin.token(tenant.namespace, "reader"))
    assert reader.fine_tuning.jobs.retrieve(job.id).id == job.id
    with pytest.raises(openai.PermissionDeniedError) as pause:
        reader.fine_tuning.jobs.pause(job.id)
    assert pause.value.code == "permission_denied"
    [ftj] = admin.jobs(tenant.namespace)
    assert not ftj["spec"].get("suspend")

    tenant.client().fine_tuning.jobs.pause(job.id)
    with pytest.raises(openai.PermissionDeniedError) as resume:
        reader.fine_tuning.jobs.resume(job.id)
    assert resume.value.code == "permission_denied"
    [ftj] = admin.jobs(tenant.namespace)
    assert ftj["spec"]["suspend"] is True


def test_events_come_from_the_jobs_events(tenant: Tenant, admin: Admin) -> None:
    client = tenant.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload(tenant))
    [ftj] = admin.jobs(tenant.namespace)
    admin.ok(
        "POST",
        f"/api/v1/namespaces/{tenant.namespace}/events",
        {
            "metadata": {"name": f"{job.id}.custom"},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FineTuneJob",
                "name": job.id,
                "namespace": tenant.namespace,
                "uid": ftj["metadata"]["uid"],
            },
            "reason": "Checked",
            "message": "a note posted for the API tier",
            "type": "Warning",
            "lastTimestamp": "2026-01-01T00:00:00Z",
        },
    )
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    print("events:", [(e.level, e.message) for e in events])
    posted = [e for e in events if "a note posted for the API tier" in e.message]
    assert len(posted) == 1 and posted[0].level == "warn"
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []


def test_no_rights_is_403_and_creates_nothing(tenant: Tenant, admin: Admin) -> None:
    file_id = upload(tenant)
    outsider = tenant.client(admin.token(tenant.namespace, "no-rights"))
    with pytest.raises(openai.PermissionDeniedError) as denied:
        outsider.fine_tuning.jobs.create(model="tiny", training_file=file_id)
    assert denied.value.code == "permission_denied"
    with pytest.raises(openai.PermissionDeniedError):
        outsider.fine_tuning.jobs.list()
    assert admin.jobs(tenant.namespace) == []


@pytest.fixture
def policy_namespace(tenant: Tenant, admin: Admin) -> Iterator[str]:
    """The tenant's namespace labelled for a FineTunePolicy that allows only s3://approved/* base models, and
    the chart's admission policy that enforces it at the API server."""
    from tests.chart.chart_helpers import chart_template

    objects = chart_template("policy-admission.yaml")
    paths = {
        "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
        "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
    }
    for obj in objects:
        admin.create(f"/apis/admissionregistration.k8s.io/v1/{paths[obj['kind']]}", obj)
    admin.ok(
        "PATCH",
        f"/api/v1/namespaces/{tenant.namespace}",
        {"metadata": {"labels": {"tier": "api-test"}}},
        content_type="application/merge-patch+json",
    )
    name = f"api-{tenant.namespace}"
    admin.ok(
        "POST",
        f"/apis/{GROUP}/{VERSION}/finetunepolicies",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTunePolicy",
            "metadata": {"name": name},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": tenant.namespace}},
                "allowedBaseModels": ["s3://models/*"],
            },
        },
    )
    yield tenant.namespace
    with contextlib.suppress(Exception):
        admin.request("DELETE", f"/apis/{GROUP}/{VERSION}/finetunepolicies/{name}")
    # cluster-wide objects of a shared cluster: a later module (e2e's chart_admission) installs them again
    for obj in objects:
        with contextlib.suppress(Exception):
            path = f"/apis/admissionregistration.k8s.io/v1/{paths[obj['kind']]}/{obj['metadata']['name']}"
            admin.request("DELETE", path)


def test_policy_denied_model_gets_the_policys_message(
    tenant: Tenant, admin: Admin, policy_namespace: str
) -> None:
    client = tenant.client()
    file_id = upload(tenant)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.fine_tuning.jobs.create(model="denied", training_file=file_id)
    print("policy:", denied.value.message)
    assert denied.value.code == "policy_violation"
    assert "s3://unapproved/base" in denied.value.message
    assert admin.jobs(tenant.namespace) == []
    assert client.fine_tuning.jobs.create(model="tiny", training_file=file_id).status == "validating_files"


# A train pod's log as the trainer writes it: plain lines and JSON progress events.
TRAIN_LOG = (
    "import json\n"
    "print('loading the base model')\n"
    "for step in (5, 10):\n"
    "    print(json.dumps({'event': 'progress', 'step': step, 'totalSteps': 10, 'loss': 1.0 / step}))\n"
)


@pytest.mark.local_kubelet
def test_events_include_progress_from_the_train_pods_log(tenant: Tenant, admin: Admin) -> None:
    client = tenant.client()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload(tenant))
    [ftj] = admin.jobs(tenant.namespace)
    labels = {"finetune.dev/job-uid": ftj["metadata"]["uid"], "app.kubernetes.io/component": "train"}
    admin.ok(
        "POST",
        f"/api/v1/namespaces/{tenant.namespace}/pods",
        {
            "metadata": {"name": f"{job.id}-train-test", "labels": labels},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "train",
                        "image": "ghcr.io/finetune-operator/trainer",
                        "command": ["python", "-c", TRAIN_LOG],
                    }
                ],
            },
        },
    )

    def metrics() -> list[Any]:
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        return [e for e in events if e.type == "metrics"]

    found = wait_for(lambda: len(metrics()) == 2 and metrics(), timeout=60, what="two progress events")
    print("progress events:", [e.message for e in found])
    assert [e.data["step"] for e in found] == [10, 5]  # newest first
    assert found[0].message == "Step 10/10: training loss=0.1"
