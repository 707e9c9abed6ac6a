"""Node objects the local kubelet registers and keeps Ready (status heartbeat + kube-node-lease Lease)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from ..controllers.events import now_iso, now_micro
from ..kubeclient import LEASES, NAMESPACES, NODES, ApiError, KubeClient

log = logging.getLogger(__name__)

GPU_RESOURCE = "nvidia.com/gpu"
A100 = "NVIDIA-A100-SXM4-80GB"
KUBELET_VERSION = "v1.35.0-local"


@dataclass
class NodeConfig:
    """One emulated node. Capacity is what the scheduler sees; processes still share this machine."""

    name: str
    cpu: str = "16"
    memory: str = "64Gi"
    gpus: int = 0
    gpu_product: str = A100
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)
    ip: str = "127.3.0.1"

    @classmethod
    def gpu(cls, name: str, gpus: int = 8, product: str = A100, **kw: Any) -> NodeConfig:
        taints = kw.pop("taints", [{"key": GPU_RESOURCE, "effect": "NoSchedule"}])
        labels = {
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.count": str(gpus),
            **kw.pop("labels", {}),
        }
        return cls(
            name=name,
            cpu=kw.pop("cpu", "96"),
            memory=kw.pop("memory", "1Ti"),
            gpus=gpus,
            gpu_product=product,
            labels=labels,
            taints=taints,
            **kw,
        )


def default_nodes() -> list[NodeConfig]:
    return [
        NodeConfig.gpu("gpu-node-0"),
        NodeConfig.gpu("gpu-node-1"),
        NodeConfig(name="cpu-node-0", cpu="16", memory="64Gi"),
    ]


def node_manifest(cfg: NodeConfig) -> dict[str, Any]:
    capacity = {"cpu": cfg.cpu, "memory": cfg.memory, "pods": str(cfg.pods), "ephemeral-storage": "500Gi"}
    if cfg.gpus:
        capacity[GPU_RESOURCE] = str(cfg.gpus)
    labels = {
        "kubernetes.io/hostname": cfg.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": "local-gpu" if cfg.gpus else "local-cpu",
        **cfg.labels,
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": cfg.name, "labels": labels, "annotations": {"localcluster.dev/node-ip": cfg.ip}},
        "spec": {"taints": list(cfg.taints)} if cfg.taints else {},
        "status": node_status(cfg, capacity),
    }


def node_status(cfg: NodeConfig, capacity: dict[str, str] | None = None) -> dict[str, Any]:
    if capacity is None:
        capacity = node_manifest(cfg)["status"]["capacity"]
    stamp = now_iso()

    def cond(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }

    return {
        "capacity": capacity,
        "allocatable": dict(capacity),
        "conditions": [
            cond(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "kubelet has sufficient memory available",
            ),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": cfg.ip}, {"type": "Hostname", "address": cfg.name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "architecture": "amd64",
            "operatingSystem": "linux",
            "osImage": "localcluster",
            "kernelVersion": "",
            "containerRuntimeVersion": "localcluster://0.1",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": KUBELET_VERSION,
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
        },
    }


class NodeRegistrar:
    """Creates the nodes, then heartbeats: Lease renewals every 10 s and node status every 60 s."""

    def __init__(self, client: KubeClient, nodes: list[NodeConfig]):
        self.client = client
        self.nodes = nodes
        self._task: asyncio.Task[None] | None = None

    async def register(self) -> None:
        for cfg in self.nodes:
            manifest = node_manifest(cfg)
            try:
                created = await self.client.create(NODES.path(), manifest)
            except ApiError as err:
                if not err.conflict:
                    raise
                created = await self.client.get(NODES.path(name=cfg.name))
            # Status is a subresource on a real API server: write it there too (create may drop it).
            if not created.get("status", {}).get("capacity"):
                created["status"] = manifest["status"]
                await self.client.replace(NODES.path(name=cfg.name, sub="status"), created)
        self._task = asyncio.create_task(self._heartbeat(), name="node-heartbeat")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _heartbeat(self) -> None:
        with contextlib.suppress(ApiError, OSError):
            await self.client.create(
                NAMESPACES.path(),
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-node-lease"}},
            )
        ticks = 0
        while True:
            for cfg in self.nodes:
                try:
                    await self._renew_lease(cfg)
                    if ticks % 6 == 0 and ticks:
                        await self.client.patch(
                            NODES.path(name=cfg.name, sub="status"),
                            {"status": {"conditions": node_status(cfg)["conditions"]}},
                        )
                except (ApiError, OSError) as err:
                    log.debug("heartbeat for %s: %s", cfg.name, err)
                except Exception as err:
                    log.debug("heartbeat for %s: %r", cfg.name, err)
            ticks += 1
            await asyncio.sleep(10)

    async def _renew_lease(self, cfg: NodeConfig) -> None:
        path = LEASES.path("kube-node-lease", cfg.name)
        body = {"spec": {"holderIdentity": cfg.name, "leaseDurationSeconds": 40, "renewTime": now_micro()}}
        try:
            await self.client.patch(path, body)
        except ApiError as err:
            if not err.not_found:
                raise
            await self.client.create(
                LEASES.path("kube-node-lease"),
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": cfg.name, "namespace": "kube-node-lease"},
                    **body,
                },
            )
