# ruff: noqa: E501
"""Pod Security Standards checks with kube-apiserver's PodSecurity admission messages
(k8s.io/pod-security-admission/policy, policy version `latest`).

`check_pod(level, metadata, spec)` returns the failed checks as (reason, detail) in the order the admission
plugin reports them; `violation_message(level, version, results)` is the text after `is forbidden: `:
`violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false (container "c" must set
securityContext.allowPrivilegeEscalation=false), ...`. Used by the emulator's PodSecurity admission and by
the chart tests (tests/chart/pss.py), so both apply the same standard.

Every baseline and restricted check of policy version latest is implemented except the user-namespace
relaxation (`hostUsers: false`), host probes/lifecycle handlers (1.34) and the Windows-only fields beyond
hostProcess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

LEVELS = ("privileged", "baseline", "restricted")
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
ENFORCE_VERSION_LABEL = "pod-security.kubernetes.io/enforce-version"

_RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
_BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
_SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
_SECCOMP_OK = frozenset({"RuntimeDefault", "Localhost"})
_APPARMOR_OK = frozenset({"RuntimeDefault", "Localhost"})
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"

Result = tuple[str, str]  # (forbidden reason, forbidden detail)
Check = Callable[[dict[str, Any], dict[str, Any]], Result | None]


def _containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(field) or []


def _sc(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("securityContext") or {}


def _plural(one: str, many: str, n: int) -> str:
    return one if n == 1 else many


def _quote(items: list[str]) -> str:
    return ", ".join(f'"{i}"' for i in items)


def _containers_phrase(names: list[str]) -> str:
    return f"{_plural('container', 'containers', len(names))} {_quote(names)}"


# ------------------------------------------------------------------------------------------------ baseline
def _allow_privilege_escalation(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    bad = [
        c.get("name", "") for c in _containers(spec) if _sc(c).get("allowPrivilegeEscalation") is not False
    ]
    if bad:
        return (
            "allowPrivilegeEscalation != false",
            f"{_containers_phrase(bad)} must set securityContext.allowPrivilegeEscalation=false",
        )
    return None


def _app_armor(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    bad: list[str] = []

    def profile_bad(sc: dict[str, Any]) -> str | None:
        profile = sc.get("appArmorProfile")
        if profile and profile.get("type") not in _APPARMOR_OK:
            return str(profile.get("type"))
        return None

    value = profile_bad(_sc(spec))
    if value:
        bad.append(f'pod must not set securityContext.appArmorProfile.type to "{value}"')
    for c in _containers(spec):
        value = profile_bad(_sc(c))
        if value:
            bad.append(
                f'container "{c.get("name", "")}" must not set securityContext.appArmorProfile.type to "{value}"'
            )
    for key, value in sorted((meta.get("annotations") or {}).items()):
        allowed = not value or value == "runtime/default" or value.startswith("localhost/")
        if key.startswith(_APPARMOR_ANNOTATION) and not allowed:
            bad.append(f'{key}="{value}"')
    if bad:
        return _plural("forbidden AppArmor profile", "forbidden AppArmor profiles", len(bad)), ", ".join(bad)
    return None


def _capabilities_baseline(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    bad_containers: list[str] = []
    caps: set[str] = set()
    for c in _containers(spec):
        added = [
            a for a in (_sc(c).get("capabilities") or {}).get("add") or [] if a not in _BASELINE_CAPABILITIES
        ]
        if added:
            bad_containers.append(c.get("name", ""))
            caps.update(added)
    if bad_containers:
        return (
            "non-default capabilities",
            f"{_containers_phrase(bad_containers)} must not include {_quote(sorted(caps))} "
            "in securityContext.capabilities.add",
        )
    return None


def _capabilities_restricted(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    missing_drop: list[str] = []
    adding: list[str] = []
    caps: set[str] = set()
    for c in _containers(spec):
        capabilities = _sc(c).get("capabilities")
        if capabilities is None:
            missing_drop.append(c.get("name", ""))
            continue
        if "ALL" not in (capabilities.get("drop") or []):
            missing_drop.append(c.get("name", ""))
        added = [a for a in capabilities.get("add") or [] if a != "NET_BIND_SERVICE"]
        if added:
            adding.append(c.get("name", ""))
            caps.update(added)
    details = []
    if missing_drop:
        details.append(
            f'{_containers_phrase(missing_drop)} must set securityContext.capabilities.drop=["ALL"]'
        )
    if adding:
        details.append(
            f"{_containers_phrase(adding)} must not include {_quote(sorted(caps))} in securityContext.capabilities.add"
        )
    return ("unrestricted capabilities", "; ".join(details)) if details else None


def _host_namespaces(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    bad = [f"{f}=true" for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)]
    return ("host namespaces", ", ".join(bad)) if bad else None


def _host_path_volumes(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    bad = [v.get("name", "") for v in spec.get("volumes") or [] if "hostPath" in v]
    if bad:
        return "hostPath volumes", f"{_plural('volume', 'volumes', len(bad))} {_quote(bad)}"
    return None


def _host_ports(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    names: list[str] = []
    ports: list[str] = []
    for c in _containers(spec):
        used = [str(p["hostPort"]) for p in c.get("ports") or [] if p.get("hostPort")]
        if used:
            names.append(c.get("name", ""))
            ports.extend(used)
    if names:
        verb = "uses" if len(names) == 1 else "use"
        return (
            "hostPort",
            f"{_containers_phrase(names)} {verb} {_plural('hostPort', 'hostPorts', len(ports))} {', '.join(ports)}",
        )
    return None


def _privileged(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    bad = [c.get("name", "") for c in _containers(spec) if _sc(c).get("privileged")]
    if bad:
        return "privileged", f"{_containers_phrase(bad)} must not set securityContext.privileged=true"
    return None


def _proc_mount(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    bad: list[str] = []
    values: set[str] = set()
    for c in _containers(spec):
        mount = _sc(c).get("procMount")
        if mount not in (None, "", "Default"):
            bad.append(c.get("name", ""))
            values.add(str(mount))
    if bad:
        return (
            "procMount",
            f"{_containers_phrase(bad)} must not set securityContext.procMount to {_quote(sorted(values))}",
        )
    return None


def _restricted_volumes(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    names: list[str] = []
    kinds: set[str] = set()
    for volume in spec.get("volumes") or []:
        bad = sorted(set(volume) - {"name"} - _RESTRICTED_VOLUMES)
        if bad:
            names.append(volume.get("name", ""))
            kinds.update(bad)
    if names:
        verb = "uses" if len(names) == 1 else "use"
        return (
            "restricted volume types",
            f"{_plural('volume', 'volumes', len(names))} {_quote(names)} {verb} "
            f"{_plural('restricted volume type', 'restricted volume types', len(kinds))} {_quote(sorted(kinds))}",
        )
    return None


def _run_as_non_root(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    setters: list[str] = []
    pod_value = _sc(spec).get("runAsNonRoot")
    if pod_value is False:
        setters.append("pod")
    explicit: list[str] = []
    implicit: list[str] = []
    for c in _containers(spec):
        value = _sc(c).get("runAsNonRoot")
        if value is None:
            if pod_value is not True:
                implicit.append(c.get("name", ""))
        elif value is False:
            explicit.append(c.get("name", ""))
    if explicit:
        setters.append(_containers_phrase(explicit))
    if setters:
        return (
            "runAsNonRoot != true",
            f"{' and '.join(setters)} must not set securityContext.runAsNonRoot=false",
        )
    if implicit:
        return (
            "runAsNonRoot != true",
            f"pod or {_containers_phrase(implicit)} must set securityContext.runAsNonRoot=true",
        )
    return None


def _run_as_user(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    setters = ["pod"] if _sc(spec).get("runAsUser") == 0 else []
    bad = [c.get("name", "") for c in _containers(spec) if _sc(c).get("runAsUser") == 0]
    if bad:
        setters.append(_containers_phrase(bad))
    if setters:
        return "runAsUser=0", f"{' and '.join(setters)} must not set runAsUser=0"
    return None


def _se_linux(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    setters: list[str] = []
    bad_types: set[str] = set()
    flags = {"user": False, "role": False}

    def bad(sc: dict[str, Any]) -> bool:
        options = sc.get("seLinuxOptions")
        if options is None:
            return False
        valid = True
        if options.get("type", "") not in _SELINUX_TYPES:
            bad_types.add(str(options.get("type")))
            valid = False
        for key in ("user", "role"):
            if options.get(key):
                flags[key] = True
                valid = False
        return not valid

    if bad(_sc(spec)):
        setters.append("pod")
    containers = [c.get("name", "") for c in _containers(spec) if bad(_sc(c))]
    if containers:
        setters.append(_containers_phrase(containers))
    if not setters:
        return None
    data = []
    if bad_types:
        data.append(f"{_plural('type', 'types', len(bad_types))} {_quote(sorted(bad_types))}")
    if flags["user"]:
        data.append("user may not be set")
    if flags["role"]:
        data.append("role may not be set")
    return (
        "seLinuxOptions",
        f"{' and '.join(setters)} set forbidden securityContext.seLinuxOptions: {'; '.join(data)}",
    )


def _seccomp_baseline(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    setters: list[str] = []
    if (_sc(spec).get("seccompProfile") or {}).get("type") == "Unconfined":
        setters.append("pod")
    bad = [
        c.get("name", "")
        for c in _containers(spec)
        if (_sc(c).get("seccompProfile") or {}).get("type") == "Unconfined"
    ]
    if bad:
        setters.append(_containers_phrase(bad))
    if setters:
        return (
            "seccompProfile",
            f'{" and ".join(setters)} must not set securityContext.seccompProfile.type to "Unconfined"',
        )
    return None


def _seccomp_restricted(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    setters: list[str] = []
    values: set[str] = set()
    pod_profile = _sc(spec).get("seccompProfile")
    pod_ok = False
    if pod_profile is not None:
        if pod_profile.get("type") in _SECCOMP_OK:
            pod_ok = True
        else:
            setters.append("pod")
            values.add(str(pod_profile.get("type")))
    explicit: list[str] = []
    implicit: list[str] = []
    for c in _containers(spec):
        profile = _sc(c).get("seccompProfile")
        if profile is not None:
            if profile.get("type") not in _SECCOMP_OK:
                explicit.append(c.get("name", ""))
                values.add(str(profile.get("type")))
        elif not pod_ok:
            implicit.append(c.get("name", ""))
    if explicit:
        setters.append(_containers_phrase(explicit))
    if setters:
        return (
            "seccompProfile",
            f"{' and '.join(setters)} must not set securityContext.seccompProfile.type to {_quote(sorted(values))}",
        )
    if implicit:
        return (
            "seccompProfile",
            f'pod or {_containers_phrase(implicit)} must set securityContext.seccompProfile.type to "RuntimeDefault" '
            'or "Localhost"',
        )
    return None


def _sysctls(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    bad = [s.get("name", "") for s in _sc(spec).get("sysctls") or [] if s.get("name") not in _SAFE_SYSCTLS]
    return ("forbidden sysctls", ", ".join(bad)) if bad else None


def _windows_host_process(meta: dict[str, Any], spec: dict[str, Any]) -> Result | None:
    setters = ["pod"] if (_sc(spec).get("windowsOptions") or {}).get("hostProcess") else []
    bad = [
        c.get("name", "")
        for c in _containers(spec)
        if (_sc(c).get("windowsOptions") or {}).get("hostProcess")
    ]
    if bad:
        setters.append(_containers_phrase(bad))
    if setters:
        return (
            "hostProcess",
            f"{' and '.join(setters)} must not set securityContext.windowsOptions.hostProcess=true",
        )
    return None


# The admission plugin's order: checks registered file by file (alphabetical), baseline ones first, then the
# restricted ones; the "overlapping" baseline checks (superseded by a restricted one) only at baseline.
_BASELINE: list[Check] = [
    _app_armor,
    _host_namespaces,
    _host_path_volumes,
    _host_ports,
    _privileged,
    _proc_mount,
    _se_linux,
    _sysctls,
    _windows_host_process,
]
_BASELINE_ONLY: list[Check] = [_capabilities_baseline, _seccomp_baseline]
_RESTRICTED: list[Check] = [
    _allow_privilege_escalation,
    _capabilities_restricted,
    _restricted_volumes,
    _run_as_non_root,
    _run_as_user,
    _seccomp_restricted,
]


def check_pod(level: str, metadata: dict[str, Any], spec: dict[str, Any]) -> list[Result]:
    """The failed checks of a pod at a level (privileged: none)."""
    if level == "privileged":
        return []
    checks = _BASELINE + (_BASELINE_ONLY if level == "baseline" else _RESTRICTED)
    return [result for check in checks if (result := check(metadata or {}, spec or {})) is not None]


def violation_message(level: str, version: str, results: list[Result], verb: str = "violates") -> str:
    details = ", ".join(f"{reason} ({detail})" if detail else reason for reason, detail in results)
    return f'{verb} PodSecurity "{level}:{version}": {details}'


def namespace_policy(labels: dict[str, str]) -> tuple[str, str] | None:
    """(level, version) the namespace enforces, or None (privileged, or an invalid level: not enforced)."""
    level = labels.get(ENFORCE_LABEL)
    if level not in ("baseline", "restricted"):
        return None
    return level, labels.get(ENFORCE_VERSION_LABEL) or "latest"
