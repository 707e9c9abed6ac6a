"""The exact API access the operator uses. The Helm chart's ClusterRole must grant these and no more
(tests/unit/test_rbac.py compares them); there is no verb on Secrets."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.finetunejob import GROUP, PLURAL
from finetune_operator.api.finetunepolicy import PLURAL as POLICY_PLURAL
from finetune_operator.api.finetuneschedule import PLURAL as SCHEDULE_PLURAL

RULES: tuple[dict[str, Any], ...] = (
    # Kopf lists and watches jobs; kube.patch_status writes their status. A FineTuneSchedule's runs (issue
    # 24) are created (create-or-adopt: get on "already exists") and deleted (history, Replace).
    {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["list", "watch", "get", "create", "delete"]},
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["patch"]},
    # FineTuneSchedules (issue 24): watched, read per pass, their status written.
    {"apiGroups": [GROUP], "resources": [SCHEDULE_PLURAL], "verbs": ["list", "watch", "get"]},
    {"apiGroups": [GROUP], "resources": [f"{SCHEDULE_PLURAL}/status"], "verbs": ["patch"]},
    # ModelServers (issue 11): watched; their status written; their jobs listed (modelserver/controller.py
    # reads them per pass).
    # A job's own ModelServer (issue 21): created, patched when its deployment section changes, deleted
    # when deployment is disabled.
    {
        "apiGroups": [GROUP],
        "resources": ["modelservers"],
        "verbs": ["list", "watch", "get", "create", "patch", "delete"],
    },
    {"apiGroups": [GROUP], "resources": ["modelservers/status"], "verbs": ["patch"]},
    # A pool's desired adapters, mounted into its pods.
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]},
    # A pool's NetworkPolicy: only the operator may reach its adapter routers' admin port.
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["get", "create", "patch"],
    },
    # Children, cached by watches. Create-or-adopt = create, then get on "already exists".
    # Jobs: suspend/resume by patch; a stage Job is never deleted by the operator (ownerReferences
    # garbage-collect them); a FineTuneSchedule's data Job is deleted once read.
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["list", "watch", "create", "get", "patch", "delete"],
    },
    # The vLLM Deployment: rolled by patch when spec.deployment changes, deleted when it is disabled.
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["list", "watch", "create", "get", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch", "create", "get", "delete"]},
    # Pods: scheduling problems, exit codes and termination messages (watched); the trainer's stdout tail
    # for training progress (pods/log get) - the trainer pod itself needs no API access at all.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    # An Event on every transition.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
)

# Cluster-scoped: FineTunePolicies (watched; their status shows each namespace's use) and namespace labels
# (a policy's namespaceSelector). Granted by a ClusterRole in both cluster and namespaced mode.
CLUSTER_RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [GROUP], "resources": [POLICY_PLURAL], "verbs": ["list", "watch"]},
    {"apiGroups": [GROUP], "resources": [f"{POLICY_PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
)


def verbs() -> dict[tuple[str, str], frozenset[str]]:
    """(apiGroup, resource) → verbs, for comparing with a rendered ClusterRole."""
    table: dict[tuple[str, str], set[str]] = {}
    for rule in RULES + CLUSTER_RULES:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return {key: frozenset(value) for key, value in table.items()}


def cluster_role(name: str = "finetune-operator") -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [dict(rule) for rule in RULES + CLUSTER_RULES],
    }
