"""Volumes materialised as directories: emptyDir, secret, configMap, downwardAPI, projected, PVC, hostPath."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path
from typing import Any

from ..kubeclient import CONFIGMAPS, SECRETS, ApiError, KubeClient
from .quantity import format_cpu, parse_quantity


class VolumeError(Exception):
    """A volume cannot be set up yet (missing Secret/ConfigMap): retried, like MountVolume.SetUp."""


def field_value(pod: dict[str, Any], path: str) -> str:
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": status.get("podIP"),
        "status.podIPs": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
        "status.hostIPs": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    for prefix, source in (
        ("metadata.labels", meta.get("labels")),
        ("metadata.annotations", meta.get("annotations")),
    ):
        if path == prefix:
            return "\n".join(f'{k}="{v}"' for k, v in sorted((source or {}).items()))
        if path.startswith(prefix + "['") and path.endswith("']"):
            return str((source or {}).get(path[len(prefix) + 2 : -2], ""))
    raise VolumeError(f"unsupported fieldPath: {path}")


def resource_value(pod: dict[str, Any], ref: dict[str, Any], default_container: str | None) -> str:
    name = ref.get("containerName") or default_container
    container = next((c for c in pod["spec"].get("containers", []) if c.get("name") == name), None)
    if container is None:
        raise VolumeError(f"resourceFieldRef: container {name!r} not found")
    kind, _, resource = ref.get("resource", "").partition(".")
    res = container.get("resources") or {}
    value = (res.get(kind) or {}).get(resource)
    if value is None and kind == "requests":
        value = (res.get("limits") or {}).get(resource)
    if value is None:
        value = "64" if resource == "cpu" else str(64 * 2**30)  # node allocatable, as the kubelet reports
    divisor = parse_quantity(ref.get("divisor") or "1")
    amount = parse_quantity(value) / divisor
    rounded = -(-amount.numerator // amount.denominator)
    return format_cpu(rounded) if resource == "cpu" else str(rounded)


async def _get(client: KubeClient, path: str) -> dict[str, Any] | None:
    return await client.get_or_none(path)


def _decode_secret(obj: dict[str, Any]) -> dict[str, bytes]:
    out = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    out.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    return out


def _decode_configmap(obj: dict[str, Any]) -> dict[str, bytes]:
    out = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def _write(target: Path, rel: str, data: bytes, mode: int) -> None:
    path = target / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


async def _project_keyed(
    client: KubeClient, namespace: str, target: Path, source: dict[str, Any], kind: str, default_mode: int
) -> None:
    name = source.get("secretName") if kind == "secret" else source.get("name")
    if kind == "secret" and name is None:
        name = source.get("name")
    path = SECRETS.path(namespace, name) if kind == "secret" else CONFIGMAPS.path(namespace, name)
    obj = await _get(client, path)
    if obj is None and kind == "configmap" and name == ROOT_CA_CONFIGMAP:
        obj = {"data": {"ca.crt": ""}}  # no root-ca publisher here: the API server is plain http, no CA
    if obj is None:
        if source.get("optional"):
            return
        raise VolumeError(
            f'{kind} "{name}" not found' if kind == "secret" else f'configmap "{name}" not found'
        )
    data = _decode_secret(obj) if kind == "secret" else _decode_configmap(obj)
    items = source.get("items")
    if items:
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise VolumeError(f"couldn't find key {item['key']} in {kind} {namespace}/{name}")
            _write(target, item.get("path") or item["key"], data[item["key"]], item.get("mode", default_mode))
    else:
        for key, value in data.items():
            _write(target, key, value, default_mode)


ROOT_CA_CONFIGMAP = "kube-root-ca.crt"


async def _project_token(
    client: KubeClient, pod: dict[str, Any], target: Path, source: dict[str, Any], mode: int
) -> None:
    """A bound ServiceAccount token from the TokenRequest API, as the kubelet fetches it."""
    meta = pod["metadata"]
    account = pod["spec"].get("serviceAccountName") or "default"
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [source["audience"]] if source.get("audience") else [],
            "expirationSeconds": int(source.get("expirationSeconds") or 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        },
    }
    path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
    try:
        answer = await client.create(path, body)
    except ApiError as err:
        message = err.body.get("message") if isinstance(err.body, dict) else str(err.body)
        raise VolumeError(f"failed to fetch token: {message}") from err
    _write(target, source.get("path", "token"), answer["status"]["token"].encode(), mode)


async def _project_downward(
    pod: dict[str, Any], target: Path, source: dict[str, Any], default_mode: int
) -> None:
    for item in source.get("items") or []:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"])
        else:
            value = resource_value(pod, item["resourceFieldRef"], None)
        _write(target, item["path"], value.encode(), item.get("mode", default_mode))


async def materialise(
    client: KubeClient, pod: dict[str, Any], pod_dir: Path, workdir: Path
) -> dict[str, Path]:
    """Create every volume of the pod; returns volume name → local directory."""
    namespace = pod["metadata"]["namespace"]
    uid = pod["metadata"]["uid"]
    result: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        target = pod_dir / "volumes" / name
        if "hostPath" in volume:
            host = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                host.mkdir(parents=True, exist_ok=True)
            result[name] = host
            continue
        if "persistentVolumeClaim" in volume:
            claim = workdir / "pvcs" / namespace / volume["persistentVolumeClaim"]["claimName"]
            claim.mkdir(parents=True, exist_ok=True)
            result[name] = claim
            continue
        if "emptyDir" in volume and (volume["emptyDir"] or {}).get("medium") == "Memory":
            shm = Path("/dev/shm")
            if shm.is_dir() and os.access(shm, os.W_OK):
                target = shm / "localcluster" / uid / name
                (pod_dir / "volumes").mkdir(parents=True, exist_ok=True)
        fresh = target.with_name(target.name + ".tmp")
        if "secret" in volume or "configMap" in volume or "downwardAPI" in volume or "projected" in volume:
            shutil.rmtree(fresh, ignore_errors=True)
            fresh.mkdir(parents=True)
            if "secret" in volume:
                src = volume["secret"]
                await _project_keyed(client, namespace, fresh, src, "secret", src.get("defaultMode", 0o644))
            elif "configMap" in volume:
                src = volume["configMap"]
                await _project_keyed(
                    client, namespace, fresh, src, "configmap", src.get("defaultMode", 0o644)
                )
            elif "downwardAPI" in volume:
                src = volume["downwardAPI"]
                await _project_downward(pod, fresh, src, src.get("defaultMode", 0o644))
            else:
                src = volume["projected"]
                mode = src.get("defaultMode", 0o644)
                for source in src.get("sources") or []:
                    if "secret" in source:
                        await _project_keyed(client, namespace, fresh, source["secret"], "secret", mode)
                    elif "configMap" in source:
                        await _project_keyed(client, namespace, fresh, source["configMap"], "configmap", mode)
                    elif "downwardAPI" in source:
                        await _project_downward(pod, fresh, source["downwardAPI"], mode)
                    elif "serviceAccountToken" in source:
                        await _project_token(client, pod, fresh, source["serviceAccountToken"], mode)
            if target.exists():
                shutil.rmtree(target)
            fresh.rename(target)
        else:  # emptyDir and anything not emulated
            target.mkdir(parents=True, exist_ok=True)
        result[name] = target
    return result


def cleanup(pod_dir: Path, uid: str) -> None:
    shutil.rmtree(pod_dir, ignore_errors=True)
    shutil.rmtree(Path("/dev/shm/localcluster") / uid, ignore_errors=True)
