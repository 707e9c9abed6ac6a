"""Issues 12 and 20 end to end on the embedded cluster (which enforces RBAC, ValidatingAdmissionPolicy and Pod
Security as kube-apiserver does), with the operator running as its ServiceAccount under the chart's rules:

- a FineTunePolicy allowing only `s3://approved/*` base models and `maxGpusPerJob: 2`, bound to namespaces
  labelled `tier=team` through the chart's ValidatingAdmissionPolicy: an hf:// model or 4 GPUs in team-a is
  denied at `kubectl apply` with the policy's name; the same jobs in an unlabelled namespace are admitted;
- a job created before the policy fails at reconcile with reason PolicyViolation;
- `gpuHoursPerMonth` exhausted: the next job is Suspended / BudgetExceeded with no GPU pod, and starts
  training once the policy raises the budget; `kubectl get ftp` shows the selector and the use;
- user alice, bound to the aggregated edit role in team-a, creates FineTuneJobs there, not in team-b, cannot
  edit FineTunePolicies, and her pod that is not restricted is refused;
- issue 20: a job deleted mid-training keeps its GPU-hours in the policy's ledger, so the next job waits for
  budget; serving is governed too (ModelServers and a job's own Deployment at admission, the namespace's
  maxServingGpus sum by the operator).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from localcluster.pytest_plugin import wait_for

from ..chart.chart_helpers import chart_template
from .conftest import GROUP, VERSION, Jobs

pytestmark = [pytest.mark.e2e, pytest.mark.local_kubelet, pytest.mark.timeout(600)]

POLICIES = "finetunepolicies"
RESTRICTED = "pod-security.kubernetes.io/enforce"


@pytest.fixture(scope="module")
def chart_admission(lc_api: Any) -> Iterator[list[dict[str, Any]]]:
    """The chart's ValidatingAdmissionPolicy and binding (the session's operator runs from source)."""
    from kubernetes import client, utils

    objects = chart_template("policy-admission.yaml")
    utils.create_from_yaml(lc_api, yaml_objects=objects)
    yield objects
    api = client.AdmissionregistrationV1Api(lc_api)
    for obj in objects:
        with contextlib.suppress(Exception):
            if obj["kind"] == "ValidatingAdmissionPolicy":
                api.delete_validating_admission_policy(obj["metadata"]["name"])
            else:
                api.delete_validating_admission_policy_binding(obj["metadata"]["name"])


@pytest.fixture
def make_policy(lc_api: Any) -> Iterator[Callable[..., str]]:
    """Create FineTunePolicies (cluster-scoped, so deleted after the test); returns the name."""
    from kubernetes import client

    custom = client.CustomObjectsApi(lc_api)
    created: list[str] = []

    def create(**spec: Any) -> str:
        name = f"team-defaults-{secrets.token_hex(3)}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTunePolicy",
            "metadata": {"name": name},
            "spec": {"namespaceSelector": {"matchLabels": {"tier": "team"}}, **spec},
        }
        custom.create_cluster_custom_object(GROUP, VERSION, POLICIES, body)
        created.append(name)
        return name

    yield create
    for name in created:
        with contextlib.suppress(Exception):
            custom.delete_cluster_custom_object(GROUP, VERSION, POLICIES, name)


@pytest.fixture
def namespaces(lc_api: Any) -> Iterator[Callable[..., str]]:
    from kubernetes import client

    core = client.CoreV1Api(lc_api)
    created: list[str] = []

    def create(prefix: str, **labels: str) -> str:
        """Every namespace the operator may create pods in enforces the restricted Pod Security level."""
        name = f"{prefix}-{secrets.token_hex(3)}"
        core.create_namespace({"metadata": {"name": name, "labels": {RESTRICTED: "restricted", **labels}}})
        created.append(name)
        return name

    yield create
    for name in created:
        with contextlib.suppress(Exception):
            core.delete_namespace(name, propagation_policy="Background", grace_period_seconds=0)


def finetunejob(name: str, model: str = "s3://approved/toy", gpus: int = 1) -> dict[str, Any]:
    """A job that runs nothing (suspended): admission and RBAC are what is tested."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": model},
            "dataset": {"train": "s3://data/toy/train.jsonl"},
            "resources": {"gpus": gpus, "gpuType": "a100-80gb"},
            "storage": {"output": "s3://runs/policy", "credentialsSecret": "s3"},
            "deployment": {"enabled": False},
            "suspend": True,
        },
    }


def apply(
    kubectl: Any, namespace: str, manifest: dict[str, Any], *extra: str
) -> subprocess.CompletedProcess[str]:
    return kubectl("apply", "-n", namespace, *extra, "-f", "-", input=json.dumps(manifest), check=False)


def test_policy_denies_at_kubectl_apply_naming_the_policy_only_in_selected_namespaces(
    lc_kubectl_one: Any, chart_admission: Any, make_policy: Callable[..., str], namespaces: Any
) -> None:
    policy = make_policy(allowedBaseModels=["s3://approved/*"], maxGpusPerJob=2)
    team_a = namespaces("team-a", tier="team")
    unlabelled = namespaces("other")

    denied = apply(lc_kubectl_one, team_a, finetunejob("from-hf", model="hf://x/y"))
    assert denied.returncode != 0
    assert "is forbidden: ValidatingAdmissionPolicy 'ftop-finetune-operator-finetunepolicy'" in denied.stderr
    assert (
        f"denied by FineTunePolicy {policy}: spec.baseModel.uri hf://x/y is not in allowedBaseModels"
        in denied.stderr
    )
    denied = apply(lc_kubectl_one, team_a, finetunejob("four-gpus", gpus=4))
    assert denied.returncode != 0
    assert f"denied by FineTunePolicy {policy}: spec.resources.gpus 4 is more than maxGpusPerJob 2" in (
        denied.stderr
    )
    assert "forbidden" not in apply(lc_kubectl_one, team_a, finetunejob("allowed")).stderr

    for name, manifest in (
        ("from-hf", finetunejob("from-hf", model="hf://x/y")),
        ("four-gpus", finetunejob("four-gpus", gpus=4)),
    ):
        admitted = apply(lc_kubectl_one, unlabelled, manifest)
        assert admitted.returncode == 0, admitted.stderr
        assert f"finetunejob.finetune.dev/{name} created" in admitted.stdout


def test_a_job_admitted_before_the_policy_fails_with_policy_violation(
    lc_kubectl_one: Any, make_policy: Callable[..., str], namespaces: Any
) -> None:
    team_a = namespaces("team-a", tier="team")
    assert apply(lc_kubectl_one, team_a, finetunejob("early", model="hf://x/y")).returncode == 0
    policy = make_policy(allowedBaseModels=["s3://approved/*"])

    def failed() -> dict[str, Any] | None:
        status = lc_kubectl_one.json("get", "finetunejob", "early", "-n", team_a).get("status") or {}
        return status if status.get("phase") == "Failed" else None

    status = wait_for(failed, timeout=60, what="the job to fail on the new policy")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "PolicyViolation"
    assert status["message"] == (
        f"denied by FineTunePolicy {policy}: spec.baseModel.uri hf://x/y is not in allowedBaseModels"
    )
    assert lc_kubectl_one.json("get", "pods", "-n", team_a)["items"] == []  # no pod ever ran


def _copy_toy_model(local_cluster: Any, s3_assets: dict[str, str]) -> str:
    """The toy base model under s3://approved/ (the only bucket the policy allows)."""
    s3 = local_cluster.s3_client()
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket="approved")
    bucket, prefix = s3_assets["model"].removeprefix("s3://").split("/", 1)
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", []):
        key = "toy/" + item["Key"][len(prefix) + 1 :]
        s3.copy_object(Bucket="approved", Key=key, CopySource={"Bucket": bucket, "Key": item["Key"]})
    return "s3://approved/toy"


def _gpu_pods(jobs: Jobs) -> list[str]:
    return [
        p["metadata"]["name"]
        for p in jobs.list("Pod")
        for c in p["spec"]["containers"]
        if "nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
    ]


@pytest.mark.slow
def test_exhausted_budget_suspends_without_a_gpu_pod_and_starts_when_raised(
    jobs: Jobs,
    lc_api: Any,
    lc_kubectl_one: Any,
    local_cluster: Any,
    s3_assets: dict[str, str],
    make_policy: Callable[..., str],
) -> None:
    from kubernetes import client

    client.CoreV1Api(lc_api).patch_namespace(jobs.namespace, {"metadata": {"labels": {"tier": "team"}}})
    model = _copy_toy_model(local_cluster, s3_assets)
    policy = make_policy(allowedBaseModels=["s3://approved/*"], maxGpusPerJob=2, gpuHoursPerMonth=0)
    jobs.create("over-budget", baseModel={"uri": model}, resources={"gpus": 1, "gpuType": "a100-80gb"})

    status = jobs.wait(
        "over-budget",
        lambda s: s.get("phase") == "Suspended",
        240,
        "the job to wait for budget after validation",
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "BudgetExceeded"
    assert (
        f"used 0.00 of 0 GPU-hours this month (FineTunePolicy {policy} gpuHoursPerMonth)"
        in (status["message"])
    )
    assert status["gpuHoursEstimate"] > 0
    assert status["policy"]["policies"] == [policy]
    assert [j["metadata"]["name"] for j in jobs.list("Job")] == ["over-budget-validate"]
    assert _gpu_pods(jobs) == []
    assert any(e["reason"] == "BudgetExceeded" for e in jobs.events("over-budget"))

    shown = wait_for(
        lambda: (lc_kubectl_one.json("get", "ftp", policy).get("status") or {}).get("selector"),
        timeout=30,
        what="the policy's status",
    )
    assert shown == "tier=team"
    table = lc_kubectl_one("get", "ftp", policy).stdout
    assert table.split()[:5] == ["NAME", "SELECTOR", "BUDGET", "USED", "AGE"]

    client.CustomObjectsApi(lc_api).patch_cluster_custom_object(
        GROUP, VERSION, POLICIES, policy, {"spec": {"gpuHoursPerMonth": 100}}
    )
    jobs.wait_phase("over-budget", "Training", timeout=60)
    wait_for(lambda: _gpu_pods(jobs), timeout=60, what="the training pod with a GPU")
    used = wait_for(
        lambda: (lc_kubectl_one.json("get", "ftp", policy).get("status") or {}).get("used"),
        timeout=30,
        what="the namespace's use in the policy's status",
    )
    assert used[0]["namespace"] == jobs.namespace and used[0]["activeJobs"] == 1
    assert used[0]["gpuHours"] == pytest.approx(status["gpuHoursEstimate"], abs=0.01)


def _policy_status(kubectl: Any, policy: str) -> dict[str, Any]:
    found: dict[str, Any] = kubectl.json("get", "ftp", policy).get("status") or {}
    return found


def _ledger(kubectl: Any, policy: str, namespace: str) -> dict[str, Any] | None:
    """This month's ledger entry of `namespace` in the policy's status."""
    return next(
        (e for e in _policy_status(kubectl, policy).get("ledger") or [] if e["namespace"] == namespace), None
    )


@pytest.mark.slow
def test_run_then_delete_does_not_escape_the_monthly_budget(
    jobs: Jobs, lc_api: Any, lc_kubectl_one: Any, make_policy: Callable[..., str]
) -> None:
    """Issue 20 defect 7: a job deleted mid-training keeps the GPU-hours it spent in the policy's ledger
    (status, written by the operator only), and the next job waits for budget because of them."""
    from kubernetes import client

    client.CoreV1Api(lc_api).patch_namespace(jobs.namespace, {"metadata": {"labels": {"tier": "team"}}})
    policy = make_policy(gpuHoursPerMonth=1000)
    long_run = {"resources": {"gpus": 1, "gpuType": "a100-80gb"}, "hyperparameters": {"epochs": 100}}
    jobs.create("spender", **long_run)
    estimate = jobs.wait("spender", lambda s: s.get("phase") == "Training", 240, "training with a GPU")[
        "gpuHoursEstimate"
    ]
    # status.gpuHours counts in hundredths (36 s of one GPU); the ledger records it as it accrues.
    wait_for(
        lambda: ((_ledger(lc_kubectl_one, policy, jobs.namespace) or {}).get("gpuHours") or 0) >= 0.01,
        timeout=240,
        what="the ledger to record the GPU-hours spent so far",
    )
    jobs.delete("spender")
    entry = wait_for(
        lambda: (e := _ledger(lc_kubectl_one, policy, jobs.namespace)) and "jobs" not in e and e,
        timeout=60,
        what="the deleted job's hours to stay in the ledger once it is gone",
    )
    spent = entry["gpuHours"]
    assert spent >= 0.01
    # Room for one more estimate but not for it plus what the deleted job spent.
    budget = round(spent + estimate / 2, 4)
    client.CustomObjectsApi(lc_api).patch_cluster_custom_object(
        GROUP, VERSION, POLICIES, policy, {"spec": {"gpuHoursPerMonth": budget}}
    )
    jobs.create("next", **long_run)
    status = jobs.wait(
        "next", lambda s: s.get("phase") == "Suspended", 240, "the next job to wait for budget"
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "BudgetExceeded"
    assert f"used {spent:.2f} of {budget:g} GPU-hours this month" in status["message"]
    assert _gpu_pods(jobs) == []
    used = _policy_status(lc_kubectl_one, policy)["used"]
    assert used[0]["namespace"] == jobs.namespace and used[0]["gpuHours"] >= spent


def _modelserver(name: str, replicas: int) -> dict[str, Any]:
    """A ModelServer on a GPU type no node of the embedded cluster has: its pods wait unscheduled, so
    nothing heavy runs, yet its Deployment holds replicas x 1 GPUs."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelServer",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://approved/toy"},
            "adapterSources": ["s3://runs/policy"],
            "replicas": replicas,
            "gpus": 1,
            "gpuType": "h100-80gb",
        },
    }


def test_a_modelserver_over_max_serving_gpus_is_refused_at_admission_and_not_created_by_the_operator(
    lc_kubectl_one: Any, chart_admission: Any, make_policy: Callable[..., str], namespaces: Any
) -> None:
    """Issue 20 defect 6: what one object asks is refused at `kubectl apply`; the namespace's sum, which
    admission cannot see, is enforced by the operator: no Deployment, condition PolicyAllowed=False
    (ServingGpuLimit) and a Warning Event, until the other server scales down."""
    kubectl = lc_kubectl_one
    policy = make_policy(allowedBaseModels=["s3://approved/*"], maxServingGpus=2)
    team_a = namespaces("team-a", tier="team")
    big = _modelserver("big", 64)
    big["spec"].update(baseModel={"uri": "hf://x/y"}, gpus=8)
    denied = apply(kubectl, team_a, big)
    assert denied.returncode != 0
    assert "ValidatingAdmissionPolicy 'ftop-finetune-operator-finetunepolicy-modelservers'" in denied.stderr
    assert f"denied by FineTunePolicy {policy}: spec.baseModel.uri hf://x/y is not in allowedBaseModels" in (
        denied.stderr
    )
    denied = apply(kubectl, team_a, _modelserver("wide", 3))
    assert f"denied by FineTunePolicy {policy}: spec.replicas 3 x spec.gpus 1 = 3 GPUs is more than " in (
        denied.stderr
    )
    job = finetunejob("wide-serving")
    job["spec"]["deployment"] = {"replicas": 16, "gpus": 8, "gpuType": "a100-80gb"}
    denied = apply(kubectl, team_a, job)
    assert (
        f"denied by FineTunePolicy {policy}: spec.deployment.replicas 16 x spec.deployment.gpus 8 = 128 GPUs "
        "is more than maxServingGpus 2" in denied.stderr
    )

    assert apply(kubectl, team_a, _modelserver("first", 1)).returncode == 0
    wait_for(
        lambda: [
            d for d in kubectl.json("get", "deployments", "-n", team_a)["items"] if d["spec"]["replicas"]
        ],
        timeout=60,
        what="the first server's Deployment",
    )
    assert apply(kubectl, team_a, _modelserver("second", 2)).returncode == 0  # 2 alone is within the limit

    def refused() -> dict[str, Any] | None:
        status = kubectl.json("get", "modelserver", "second", "-n", team_a).get("status") or {}
        found = [c for c in status.get("conditions") or [] if c["type"] == "PolicyAllowed"]
        return found[0] if found and found[0]["status"] == "False" else None

    condition = wait_for(refused, timeout=60, what="the operator to refuse the second server")
    message = (
        f"denied by FineTunePolicy {policy}: spec.replicas 2 x spec.gpus 1 = 2 GPUs, with 1 held by the "
        "namespace's other servers, is more than maxServingGpus 2"
    )
    assert (condition["reason"], condition["message"]) == ("ServingGpuLimit", message)
    names = [d["metadata"]["name"] for d in kubectl.json("get", "deployments", "-n", team_a)["items"]]
    assert names == ["first-pool"]
    events = kubectl.json("get", "events", "-n", team_a)["items"]
    assert any(
        e["reason"] == "ServingGpuLimit"
        and e["type"] == "Warning"
        and e["involvedObject"]["name"] == "second"
        for e in events
    )

    kubectl("patch", "modelserver", "first", "-n", team_a, "--type=merge", "-p", '{"spec":{"replicas":0}}')
    wait_for(
        lambda: (
            "second-pool"
            in [d["metadata"]["name"] for d in kubectl.json("get", "deployments", "-n", team_a)["items"]]
        ),
        timeout=60,
        what="the second server's Deployment once the first one scaled down",
    )


@pytest.fixture
def aggregated_roles(lc_api: Any) -> Iterator[None]:
    """The chart's ClusterRoles aggregated into admin/edit/view."""
    from kubernetes import client, utils

    objects = chart_template("rbac-aggregate.yaml")
    utils.create_from_yaml(lc_api, yaml_objects=objects)
    yield
    for obj in objects:
        with contextlib.suppress(Exception):
            client.RbacAuthorizationV1Api(lc_api).delete_cluster_role(obj["metadata"]["name"])


def test_alice_with_edit_in_team_a_manages_jobs_there_only_and_never_policies(
    lc_kubectl_one: Any, aggregated_roles: None, namespaces: Any, make_policy: Callable[..., str]
) -> None:
    kubectl = lc_kubectl_one
    team_a = namespaces("team-a", tier="team")
    team_b = namespaces("team-b", tier="team")
    policy = make_policy(maxGpusPerJob=2)
    kubectl("create", "rolebinding", "alice-edit", "-n", team_a, "--clusterrole=edit", "--user=alice")
    wait_for(
        lambda: (
            kubectl(
                "auth", "can-i", "create", "finetunejobs", "-n", team_a, "--as=alice", check=False
            ).stdout.strip()
            == "yes"
        ),
        timeout=15,
        what="the aggregated edit role",
    )

    def create(namespace: str) -> subprocess.CompletedProcess[str]:
        manifest = json.dumps(finetunejob("alices"))
        return kubectl("create", "-n", namespace, "--as=alice", "-f", "-", input=manifest, check=False)

    created = create(team_a)
    assert created.returncode == 0, created.stderr
    refused = create(team_b)
    assert refused.returncode != 0
    assert (
        f'User "alice" cannot create resource "finetunejobs" in API group "finetune.dev" in the namespace '
        f'"{team_b}"' in refused.stderr
    )

    for verb in ("create", "update", "patch", "delete"):
        answer = kubectl("auth", "can-i", verb, POLICIES, "--as=alice", check=False).stdout.strip()
        assert answer == "no", verb
    deleted = kubectl("delete", "ftp", policy, "--as=alice", check=False)
    assert deleted.returncode != 0
    assert (
        f'User "alice" cannot delete resource "{POLICIES}" in API group "finetune.dev" at the cluster scope'
        in deleted.stderr
    )
    patched = kubectl(
        "patch",
        "ftp",
        policy,
        "--type=merge",
        "-p",
        '{"spec":{"maxGpusPerJob":16}}',
        "--as=alice",
        check=False,
    )
    assert patched.returncode != 0 and f'User "alice" cannot get resource "{POLICIES}"' in patched.stderr

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "not-restricted"},
        "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "1"]}]},
    }
    refused = apply(kubectl, team_a, pod, "--as=alice")
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr
