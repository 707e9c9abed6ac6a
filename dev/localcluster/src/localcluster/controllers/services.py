"""Services on loopback.

Each Service gets a local ClusterIP (127.2.x.y) with a TCP proxy per port to its ready endpoints
(podIP:targetPort), a DNS map for pods (`<svc>.<ns>.svc[.cluster.local]`, see podshim/sitecustomize.py) and an
entry in `<workdir>/services.json` for the host. A headless Service (clusterIP None) has no proxy: its name
resolves to its pods' IPs, and `<hostname>.<svc>` to each pod that sets `hostname` and `subdomain: <svc>`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..kubeclient import Informer
from ..kubelet.addresses import AddressBlock

log = logging.getLogger(__name__)

_PIPE_CHUNK = 64 * 1024
SERVICES_KEY_ANNOTATION = "localcluster.dev/services-key"


def _atomic_write(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _pod_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp") or not pod.get("status", {}).get("podIP"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions") or []
    )


def _selects(selector: dict[str, str], pod: dict[str, Any]) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _target_port(target: Any, pod: dict[str, Any]) -> int | None:
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for container in pod.get("spec", {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    return None


class _Listener:
    def __init__(self, controller: ServiceController, key: str, port: dict[str, Any]):
        self.controller = controller
        self.key = key
        self.port = port
        self.server: asyncio.AbstractServer | None = None
        self._rr = itertools.count()

    async def start(self, host: str) -> None:
        self.server = await asyncio.start_server(
            self._handle, host, int(self.port["port"]), reuse_address=True
        )

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoints = self.controller.endpoints(self.key, self.port)
        if not endpoints:
            writer.close()  # no ready endpoint: the connection is refused, as kube-proxy's REJECT rule does
            return
        ip, port = endpoints[next(self._rr) % len(endpoints)]
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 5)
        except (TimeoutError, OSError):
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(_PIPE_CHUNK):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, asyncio.CancelledError):
                pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        for w in (writer, up_writer):
            w.close()


class ServiceController:
    def __init__(
        self, services: Informer, pods: Informer, workdir: Path, addresses: AddressBlock | None = None
    ):
        self.addresses = addresses or AddressBlock(1)
        self.services = services
        self.pods = pods
        self.services_file = workdir / "services.json"
        self.dns_file = workdir / "dns.json"
        self._ips: dict[str, str] = {}  # service uid → local ClusterIP
        self._next = 1
        self._listeners: dict[str, tuple[str, list[_Listener]]] = {}  # key → (ports signature, listeners)
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        services.add_handler(lambda _k, _o: self._kick.set())
        pods.add_handler(self._on_pod)

    def _on_pod(self, _kind: str, _pod: dict[str, Any]) -> None:
        self._kick.set()

    def start(self) -> None:
        self.services_file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.services_file, {})
        _atomic_write(self.dns_file, {})
        self._task = asyncio.create_task(self._run(), name="services")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for _, listeners in self._listeners.values():
            for listener in listeners:
                await listener.close()
        self._listeners.clear()

    def local_ip(self, svc: dict[str, Any]) -> str | None:
        if (
            svc.get("spec", {}).get("clusterIP") == "None"
            or svc.get("spec", {}).get("type") == "ExternalName"
        ):
            return None
        uid = svc["metadata"]["uid"]
        if uid not in self._ips:
            self._ips[uid] = self.addresses.service_ip()
        return self._ips[uid]

    def endpoints(self, key: str, port: dict[str, Any]) -> list[tuple[str, int]]:
        namespace, _, name = key.partition("/")
        svc = self.services.get(namespace, name)
        if svc is None:
            return []
        selector = svc.get("spec", {}).get("selector") or {}
        out = []
        for pod in self.pods.values():
            if (
                pod["metadata"].get("namespace") != namespace
                or not _selects(selector, pod)
                or not _pod_ready(pod)
            ):
                continue
            target = _target_port(port.get("targetPort", port.get("port")), pod)
            if target is not None:
                out.append((pod["status"]["podIP"], target))
        return sorted(out)

    def _headless_records(self, svc: dict[str, Any], fqdn: str) -> dict[str, list[str]]:
        """The Service name → its endpoints' IPs (ready ones, or every live one with
        publishNotReadyAddresses), and `<hostname>.<service>.<ns>.svc.cluster.local` → the pod's IP for
        each such pod whose `subdomain` is the Service (as CoreDNS answers for a headless Service)."""
        meta, spec = svc["metadata"], svc.get("spec", {})
        selector = spec.get("selector") or {}
        not_ready_too = bool(spec.get("publishNotReadyAddresses"))
        records: dict[str, list[str]] = {fqdn: []}
        for pod in self.pods.values():
            status = pod.get("status", {})
            if pod["metadata"].get("namespace") != meta["namespace"] or not _selects(selector, pod):
                continue
            live = (
                status.get("podIP")
                and status.get("phase") not in ("Succeeded", "Failed")
                and not pod["metadata"].get("deletionTimestamp")
            )
            if not (_pod_ready(pod) or (not_ready_too and live)):
                continue
            records[fqdn].append(status["podIP"])
            pod_spec = pod.get("spec", {})
            if pod_spec.get("hostname") and pod_spec.get("subdomain") == meta["name"]:
                records[f"{pod_spec['hostname']}.{fqdn}"] = [status["podIP"]]
        records[fqdn] = sorted(set(records[fqdn]))
        return records

    def service_env(self, namespace: str) -> dict[str, str]:
        """Docker-link style variables (FOO_SERVICE_HOST, FOO_SERVICE_PORT, …) for enableServiceLinks."""
        env: dict[str, str] = {}
        for svc in self.services.values():
            if svc["metadata"].get("namespace") != namespace:
                continue
            ip = self._ips.get(svc["metadata"]["uid"])
            ports = svc.get("spec", {}).get("ports") or []
            if not ip or not ports:
                continue
            prefix = svc["metadata"]["name"].upper().replace("-", "_")
            env[f"{prefix}_SERVICE_HOST"] = ip
            env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
            env[f"{prefix}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
            for port in ports:
                proto = (port.get("protocol") or "TCP").upper()
                if port.get("name"):
                    env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
                base = f"{prefix}_PORT_{port['port']}_{proto}"
                env[base] = f"{proto.lower()}://{ip}:{port['port']}"
                env[f"{base}_PROTO"] = proto.lower()
                env[f"{base}_PORT"] = str(port["port"])
                env[f"{base}_ADDR"] = ip
        return env

    async def _run(self) -> None:
        await self.services.synced.wait()
        await self.pods.synced.wait()
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("service sync failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), 5)
            self._kick.clear()
            await asyncio.sleep(0.05)

    async def sync(self) -> None:
        services: dict[str, Any] = {}
        dns: dict[str, list[str]] = {}
        seen = set()
        for svc in self.services.values():
            meta, spec = svc["metadata"], svc.get("spec", {})
            key = f"{meta['namespace']}/{meta['name']}"
            ip = self.local_ip(svc)
            fqdn = f"{meta['name']}.{meta['namespace']}.svc.cluster.local"
            ports = [p for p in spec.get("ports") or [] if (p.get("protocol") or "TCP") == "TCP"]
            if ip is None:
                if spec.get("clusterIP") == "None":  # headless: DNS answers with the pod IPs
                    dns.update(self._headless_records(svc, fqdn))
                continue
            seen.add(key)
            dns[fqdn] = [ip]
            signature = json.dumps([ip, ports], sort_keys=True)
            current = self._listeners.get(key)
            if current is None or current[0] != signature:
                if current is not None:
                    for listener in current[1]:
                        await listener.close()
                listeners = []
                for port in ports:
                    listener = _Listener(self, key, port)
                    try:
                        await listener.start(ip)
                        listeners.append(listener)
                    except OSError as err:
                        log.warning(
                            "service %s port %s cannot listen on %s: %s", key, port.get("port"), ip, err
                        )
                self._listeners[key] = (signature, listeners)
            entries = []
            for port in ports:
                scheme = "https" if port.get("port") == 443 or port.get("name") == "https" else "http"
                entries.append(
                    {
                        "name": port.get("name", ""),
                        "port": port["port"],
                        "targetPort": port.get("targetPort", port["port"]),
                        "url": f"{scheme}://{ip}:{port['port']}",
                        "endpoints": [f"{a}:{b}" for a, b in self.endpoints(key, port)],
                    }
                )
            services[key] = {
                "namespace": meta["namespace"],
                "name": meta["name"],
                "clusterIP": ip,
                "apiClusterIP": spec.get("clusterIP"),
                "dns": [fqdn, f"{meta['name']}.{meta['namespace']}.svc"],
                "ports": entries,
                "url": entries[0]["url"] if entries else None,
            }
            # A well-known Service (e.g. MLflow) also gets a short key of its own in services.json.
            alias = (meta.get("annotations") or {}).get(SERVICES_KEY_ANNOTATION)
            if alias and "/" not in alias:
                services[alias] = services[key]
        for key in list(self._listeners):
            if key not in seen:
                for listener in self._listeners.pop(key)[1]:
                    await listener.close()
        if services != self._last_services():
            _atomic_write(self.services_file, services)
        _atomic_write_if_changed(self.dns_file, dns)

    def _last_services(self) -> Any:
        try:
            return json.loads(self.services_file.read_text())
        except (OSError, ValueError):
            return None


def _atomic_write_if_changed(path: Path, data: Any) -> None:
    try:
        if json.loads(path.read_text()) == data:
            return
    except (OSError, ValueError):
        pass
    _atomic_write(path, data)
