"""A Pod Security Standards "restricted" checker (profile as of Kubernetes 1.32), for rendered pod specs.

Implements every control of the baseline and restricted levels that a pod spec can violate:
https://kubernetes.io/docs/concepts/security/pod-security-standards/ — returns the violations as
human-readable strings (empty list: the pod is admitted by `pod-security.kubernetes.io/enforce: restricted`).
"""

from __future__ import annotations

from typing import Any

# Restricted: only these volume types.
ALLOWED_VOLUME_TYPES = frozenset(
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
VOLUME_META_KEYS = frozenset({"name"})
# Baseline: safe sysctls.
SAFE_SYSCTLS = frozenset(
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
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
SECCOMP_OK = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_OK = frozenset({"RuntimeDefault", "Localhost"})


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for container in spec.get(field) or []:
            found.append((f"{field}[{container.get('name', '?')}]", container))
    return found


def check_restricted(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Violations of the PSS restricted profile by a pod spec (and its pod annotations)."""
    problems: list[str] = []
    pod_sc: dict[str, Any] = spec.get("securityContext") or {}
    containers = _containers(spec)

    # --- baseline ---
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{field} must not be true")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("securityContext.windowsOptions.hostProcess must not be true")
    for key, value in (annotations or {}).items():
        if (
            key.startswith("container.apparmor.security.beta.kubernetes.io/")
            and value != "runtime/default"
            and not value.startswith("localhost/")
        ):
            problems.append(f"annotation {key}={value} is not an allowed AppArmor profile")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"securityContext.sysctls {sysctl.get('name')} is not a safe sysctl")

    def check_selinux(where: str, sc: dict[str, Any]) -> None:
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES:
            problems.append(f"{where}.seLinuxOptions.type {selinux['type']} is not allowed")
        for field in ("user", "role"):
            if selinux.get(field):
                problems.append(f"{where}.seLinuxOptions.{field} must not be set")

    def check_apparmor(where: str, sc: dict[str, Any]) -> None:
        profile = sc.get("appArmorProfile")
        if profile and profile.get("type") not in APPARMOR_OK:
            problems.append(f"{where}.appArmorProfile.type {profile.get('type')} is not allowed")

    check_selinux("securityContext", pod_sc)
    check_apparmor("securityContext", pod_sc)

    # --- restricted: volumes ---
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - VOLUME_META_KEYS
        for kind in kinds - ALLOWED_VOLUME_TYPES:
            problems.append(f"volume {volume.get('name')}: type {kind} is not allowed")

    # --- restricted: pod-level defaults the containers may inherit ---
    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_sc.get("runAsNonRoot") is False:
        problems.append("securityContext.runAsNonRoot must not be false")
    if pod_sc.get("runAsUser") == 0:
        problems.append("securityContext.runAsUser must not be 0")
    if pod_seccomp is not None and pod_seccomp not in SECCOMP_OK:
        problems.append(f"securityContext.seccompProfile.type {pod_seccomp} is not allowed")
    if not containers:
        problems.append("pod has no containers")

    for where, container in containers:
        sc: dict[str, Any] = container.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{where}: privileged must not be true")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{where}: windowsOptions.hostProcess must not be true")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where}: procMount must be Default")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{where}: hostPort {port['hostPort']} is not allowed")
        check_selinux(where, sc)
        check_apparmor(where, sc)
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation must be false")
        if sc.get("runAsNonRoot") is False or (sc.get("runAsNonRoot") is not True and not pod_non_root):
            problems.append(f"{where}: runAsNonRoot must be true (on the container or the pod)")
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp is not None and seccomp not in SECCOMP_OK:
            problems.append(f"{where}: seccompProfile.type {seccomp} is not allowed")
        if seccomp is None and pod_seccomp is None:
            problems.append(
                f"{where}: seccompProfile.type must be RuntimeDefault or Localhost "
                "(on the container or the pod)"
            )
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{where}: capabilities.drop must include ALL")
        for added in capabilities.get("add") or []:
            if added != "NET_BIND_SERVICE":
                problems.append(f"{where}: capability {added} must not be added (only NET_BIND_SERVICE)")
    return problems
