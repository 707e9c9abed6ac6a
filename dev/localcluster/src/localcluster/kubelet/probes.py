"""Probe handlers: httpGet, tcpSocket and exec, with the kubelet's result messages."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp


def resolve_port(port: Any, container: dict[str, Any]) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for item in container.get("ports") or []:
        if item.get("name") == port:
            return int(item["containerPort"])
    raise ValueError(f"unknown port name {port!r}")


async def run_probe(
    probe: dict[str, Any],
    *,
    pod_ip: str,
    container: dict[str, Any],
    env: dict[str, str],
    cwd: str,
    session: aiohttp.ClientSession,
) -> tuple[bool, str]:
    """Run one probe attempt; returns (success, failure message as the kubelet words it)."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in probe:
            spec = probe["httpGet"]
            port = resolve_port(spec.get("port"), container)
            scheme = (spec.get("scheme") or "HTTP").lower()
            host = spec.get("host") or pod_ip
            path = spec.get("path") or "/"
            if not path.startswith("/"):
                path = "/" + path
            url = f"{scheme}://{host}:{port}{path}"
            headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
            headers.setdefault("User-Agent", "kube-probe/1.35")
            try:
                async with session.get(
                    url,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout),
                    allow_redirects=False,
                    ssl=False,
                ) as resp:
                    await resp.read()
                    if 200 <= resp.status < 400:
                        return True, ""
                    return False, f"HTTP probe failed with statuscode: {resp.status}"
            except TimeoutError:
                return False, (
                    f'Get "{url}": context deadline exceeded (Client.Timeout exceeded while awaiting headers)'
                )
            except aiohttp.ClientConnectorError:
                return False, f'Get "{url}": dial tcp {host}:{port}: connect: connection refused'
            except aiohttp.ClientError as err:
                return False, f'Get "{url}": {err}'
        if "tcpSocket" in probe:
            spec = probe["tcpSocket"]
            port = resolve_port(spec.get("port"), container)
            host = spec.get("host") or pod_ip
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            except TimeoutError:
                return False, f"dial tcp {host}:{port}: i/o timeout"
            except OSError:
                return False, f"dial tcp {host}:{port}: connect: connection refused"
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return True, ""
        if "exec" in probe:
            command = probe["exec"].get("command") or []
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    env=env,
                    cwd=cwd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as err:
                return False, f"exec failed: {err}"
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                return False, f'command timed out: "{" ".join(command)}" timed out after {timeout:g}s'
            if proc.returncode == 0:
                return True, ""
            return False, out.decode("utf-8", "replace").strip()
        if "grpc" in probe:
            return False, "grpc probes are not emulated by the local kubelet"
    except ValueError as err:
        return False, str(err)
    return False, "probe has no handler"
