"""`python -m localcluster` (= `make local-cluster`): run the embedded cluster in the foreground.

Writes <workdir>/kubeconfig atomically once ready, prints the endpoints, and on SIGINT/SIGTERM stops every
child process it started (pods, S3, operator) before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from .cluster import LocalCluster
from .runtime import missing_runtimes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("LOCAL_WORKDIR", ".local")),
        help="state directory (kubeconfig, s3.env, services.json, pod logs); default .local",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("LOCAL_API_PORT", "0")),
        help="API server port on 127.0.0.1 (default: any free port)",
    )
    parser.add_argument(
        "--no-operator", action="store_true", help="do not start the operator (same as LOCAL_OPERATOR=0)"
    )
    parser.add_argument("--no-kubelet", action="store_true", help="API server only: no nodes, pods never run")
    parser.add_argument("--no-s3", action="store_true", help="do not start the S3 server")
    parser.add_argument(
        "--no-mlflow",
        action="store_true",
        help="do not start the MLflow tracking server (same as LOCAL_MLFLOW=0)",
    )
    parser.add_argument(
        "--no-api",
        action="store_true",
        help="do not start the OpenAI-compatible fine-tuning API (same as LOCAL_API=0)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    cluster = LocalCluster(
        args.workdir,
        kubelet=not args.no_kubelet,
        s3=not args.no_s3,
        operator=False if args.no_operator else None,
        api_port=args.port,
        mlflow=not (args.no_mlflow or args.no_s3 or args.no_kubelet or os.environ.get("LOCAL_MLFLOW") == "0"),
        finetune_api=not (args.no_api or args.no_s3 or args.no_kubelet or os.environ.get("LOCAL_API") == "0"),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await cluster.start()
    except Exception as err:
        print(f"local cluster failed to start: {err}", file=sys.stderr)
        return 1
    lines = [
        f"local cluster ready in {cluster.started_in:.1f}s",
        f"  API server   {cluster.api_url}",
        f"  kubeconfig   {cluster.kubeconfig}   (export KUBECONFIG={cluster.kubeconfig})",
    ]
    if cluster.s3_endpoint:
        lines.append(
            f"  S3           {cluster.s3_endpoint}   (credentials: {cluster.s3_env_file}, "
            "Secret default/s3-credentials)"
        )
    if cluster.kubelet is not None:
        lines.append(f"  nodes        {', '.join(n.name for n in cluster.nodes)}")
        lines.append(f"  services     {cluster.services_file}")
    if cluster.operator_process is not None:
        lines.append(
            f"  operator     pid {cluster.operator_process.pid}, ports on {cluster.operator_ip} "
            "(metrics :9090, health :8080), restarted with back-off if it exits, "
            f"log {cluster.workdir / 'operator.log'}"
        )
    lines.append("Ctrl-C to stop.")
    print("\n".join(lines), flush=True)
    if cluster.kubelet is not None:  # `make local-cluster` installs them; `python -m localcluster` may not
        for line in missing_runtimes(cluster.root, cluster.kubelet.runtimes):
            print(f"warning: {line}; its pods wait in ImagePullBackOff until then", file=sys.stderr)
    # Both start in the background: each line is printed as soon as its server answers; Ctrl-C does not wait.
    announcements = asyncio.gather(
        announce(
            cluster.mlflow_ready,
            "MLflow",
            "  MLflow       {url}   (pods: http://mlflow.default.svc:5000; services.json key mlflow)",
        ),
        announce(
            cluster.finetune_api_ready,
            "the OpenAI-compatible API",
            "  OpenAI API   {url}/v1   (api_key: a Kubernetes token, `kubectl create token <account>`; "
            "models: ConfigMap default/finetune-api-models; services.json key finetune-api)",
        ),
    )
    await stop.wait()
    announcements.cancel()
    print("stopping local cluster…", file=sys.stderr, flush=True)
    await cluster.stop()
    return 0


async def announce(ready: asyncio.Task[str] | None, what: str, line: str) -> None:
    """Print a background server's line once it answers (or why it did not start)."""
    if ready is None:
        return
    try:
        url = await ready
    except Exception as err:
        print(f"  {what} did not start: {err}", file=sys.stderr, flush=True)
        return
    print(line.format(url=url), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
