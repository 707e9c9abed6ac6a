"""Write a kubeconfig pointing kubectl, helm and client libraries at the emulator."""

from __future__ import annotations

import base64
import os
import tempfile
from typing import Any

import yaml


def kubeconfig_dict(
    server_url: str,
    token: str | None = None,
    namespace: str = "default",
    name: str = "localcluster",
    ca_pem: bytes | None = None,
) -> dict[str, Any]:
    user: dict[str, Any] = {"token": token} if token else {}
    cluster: dict[str, Any] = {"server": server_url}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
        "current-context": name,
        "preferences": {},
    }


def write_kubeconfig(
    path: str | os.PathLike[str],
    server_url: str,
    token: str | None = None,
    namespace: str = "default",
    name: str = "localcluster",
    ca_pem: bytes | None = None,
) -> str:
    """Atomically write a kubeconfig (http, or https trusting `ca_pem`; optional bearer token); returns the
    path. Readers never see a half-written file: it is written aside and renamed."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kubeconfig-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(
                kubeconfig_dict(server_url, token, namespace, name, ca_pem), handle, sort_keys=False
            )
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
