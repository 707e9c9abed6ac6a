"""The Pod Security "restricted" checker itself: a compliant pod passes, each violation is named."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from .pss import check_restricted


def compliant_pod() -> dict[str, Any]:
    return {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "main",
                "image": "x",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "c"}}],
    }


def test_compliant_pod_passes() -> None:
    assert check_restricted(compliant_pod()) == []


def test_container_level_settings_are_enough() -> None:
    pod = compliant_pod()
    pod["securityContext"] = {}
    pod["containers"][0]["securityContext"].update(
        runAsNonRoot=True,
        seccompProfile={"type": "Localhost", "localhostProfile": "p.json"},
        capabilities={"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
    )
    assert check_restricted(pod) == []


def _set(path: str, value: Any):
    def mutate(pod: dict[str, Any]) -> None:
        target: Any = pod
        keys = path.split(".")
        for key in keys[:-1]:
            target = target[int(key)] if key.isdigit() else target.setdefault(key, {})
        target[keys[-1]] = value

    return mutate


def _add_init_container(pod: dict[str, Any]) -> None:
    pod["initContainers"] = [{"name": "init", "image": "x"}]


VIOLATIONS = [
    ("hostNetwork", _set("hostNetwork", True), "hostNetwork"),
    ("hostPID", _set("hostPID", True), "hostPID"),
    ("hostIPC", _set("hostIPC", True), "hostIPC"),
    ("privileged", _set("containers.0.securityContext.privileged", True), "privileged"),
    (
        "escalation unset",
        lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation",
    ),
    (
        "escalation true",
        _set("containers.0.securityContext.allowPrivilegeEscalation", True),
        "allowPrivilegeEscalation",
    ),
    ("runAsNonRoot missing", lambda p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    (
        "container runAsNonRoot false",
        _set("containers.0.securityContext.runAsNonRoot", False),
        "runAsNonRoot",
    ),
    ("runAsUser 0", _set("containers.0.securityContext.runAsUser", 0), "runAsUser"),
    ("pod runAsUser 0", _set("securityContext.runAsUser", 0), "runAsUser"),
    ("seccomp missing", lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
    (
        "seccomp unconfined",
        _set("containers.0.securityContext.seccompProfile", {"type": "Unconfined"}),
        "seccompProfile",
    ),
    (
        "drop ALL missing",
        _set("containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}),
        "capabilities.drop",
    ),
    (
        "SYS_ADMIN added",
        _set("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
        "SYS_ADMIN",
    ),
    ("hostPath volume", lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    ("nfs volume", lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}), "nfs"),
    ("hostPort", _set("containers.0.ports", [{"containerPort": 80, "hostPort": 80}]), "hostPort"),
    ("procMount", _set("containers.0.securityContext.procMount", "Unmasked"), "procMount"),
    ("unsafe sysctl", _set("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]), "sysctl"),
    (
        "selinux user",
        _set("securityContext.seLinuxOptions", {"user": "root"}),
        "pod set forbidden securityContext.seLinuxOptions: user may not be set",
    ),
    (
        "apparmor unconfined",
        _set("containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}),
        "appArmorProfile",
    ),
    ("init container unrestricted", _add_init_container, 'container "init" must set'),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [(m, e) for _, m, e in VIOLATIONS], ids=[name for name, _, _ in VIOLATIONS]
)
def test_each_violation_is_reported(mutate, expected: str) -> None:
    pod = copy.deepcopy(compliant_pod())
    mutate(pod)
    problems = check_restricted(pod)
    assert any(expected in problem for problem in problems), problems


def test_apparmor_annotation() -> None:
    key = "container.apparmor.security.beta.kubernetes.io/main"
    assert check_restricted(compliant_pod(), {key: "runtime/default"}) == []
    assert check_restricted(compliant_pod(), {key: "unconfined"})
