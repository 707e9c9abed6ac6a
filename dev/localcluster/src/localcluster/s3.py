"""S3 on loopback: moto's server as a child process (its own interpreter, so uploads never stall the API)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp

REGION = "us-east-1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class S3Server:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_file: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_file = log_file
        self.access_key = "localcluster"
        self.secret_key = secrets.token_hex(16)
        self.process: asyncio.subprocess.Process | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
        }

    async def start(self, timeout: float = 20) -> None:
        from .kubelet.pods import _die_with_parent

        out = open(self.log_file, "ab") if self.log_file else asyncio.subprocess.DEVNULL  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            self.host,
            "-p",
            str(self.port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        if not isinstance(out, int):
            out.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"moto server exited with code {self.process.returncode}")
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with session.get(
                        f"{self.endpoint}/moto-api/", timeout=aiohttp.ClientTimeout(total=1)
                    ) as resp:
                        if resp.status < 500:
                            return
                if loop.time() > deadline:
                    await self.stop()
                    raise RuntimeError(f"moto server did not answer on {self.endpoint} within {timeout:g}s")
                await asyncio.sleep(0.1)

    async def stop(self) -> None:
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()


_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "host"}
)


class S3FaultProxy:
    """An HTTP proxy in front of the S3 server on loopback that answers a fraction of requests with S3's own
    500 InternalError / 503 ServiceUnavailable (`fail_rate`, 0 = transparent), for chaos runs: clients pointed
    at `endpoint` see the errors a real S3 sends under load and must retry."""

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0, seed: int = 0):
        import random

        self.upstream = upstream.rstrip("/")
        self.host = host
        self.port = port or free_port(host)
        self.fail_rate = 0.0
        self.injected: dict[int, int] = {500: 0, 503: 0}
        self.forwarded = 0
        self._random = random.Random(seed)
        self._runner: Any = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web
        from yarl import URL

        body = await request.read()
        if self.fail_rate and self._random.random() < self.fail_rate:
            status = self._random.choice((500, 503))
            self.injected[status] += 1
            code = "InternalError" if status == 500 else "ServiceUnavailable"
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>injected by S3FaultProxy</Message>"
                f"<RequestId>chaos</RequestId></Error>"
            )
            return web.Response(status=status, body=xml.encode(), content_type="application/xml")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Host"] = request.headers.get("Host", f"{self.host}:{self.port}")
        async with self._session.request(
            request.method,
            URL(self.upstream + request.raw_path, encoded=True),
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
        ) as upstream:
            data = await upstream.read()
            self.forwarded += 1
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            if request.method == "HEAD":
                response = web.StreamResponse(status=upstream.status, headers=out)
                await response.prepare(request)
                await response.write_eof()
                return response
            out.pop("Content-Length", None)
            return web.Response(status=upstream.status, body=data, headers=out)
