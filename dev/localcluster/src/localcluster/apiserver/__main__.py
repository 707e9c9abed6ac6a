"""Run the API emulator alone: `python -m localcluster.apiserver [--port N] [--kubeconfig PATH]`.

Prints the server URL on its first line once serving; stops on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from .server import ApiServer


async def _serve(args: argparse.Namespace) -> None:
    server = ApiServer(args.host, args.port, token=args.token, tls=args.tls)
    await server.start()
    if args.kubeconfig:
        server.write_kubeconfig(args.kubeconfig)
    print(server.url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=None, help="require this bearer token (with --tls for kubectl)")
    parser.add_argument("--tls", action="store_true", help="serve https with a self-signed certificate")
    parser.add_argument("--kubeconfig", default=None, help="write a kubeconfig for the server here")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
