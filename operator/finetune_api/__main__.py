"""`python -m finetune_api`: the OpenAI-compatible fine-tuning API (docs/openai-api.md).

Every flag can also come from env `FINETUNE_API_<FLAG_UPPER_SNAKE>` (e.g. FINETUNE_API_FILES_URI); a flag
wins.
S3 credentials and endpoint come from the standard `AWS_*` env."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from .config import ApiConfig


def _env(environ: Mapping[str, str], flag: str, default: str | None) -> str | None:
    return environ.get("FINETUNE_API_" + flag.upper().replace("-", "_"), default)


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> ApiConfig:
    models_ns = environ.get("POD_NAMESPACE") or "default"
    parser = argparse.ArgumentParser(prog="python -m finetune_api", description=__doc__)
    parser.add_argument("--host", default=_env(environ, "host", "0.0.0.0"))
    parser.add_argument("--port", type=int, default=_env(environ, "port", "8000"))
    files_uri = _env(environ, "files-uri", None)
    parser.add_argument(
        "--files-uri",
        default=files_uri,
        required=files_uri is None,
        help="s3://bucket/prefix; files of namespace N live under <uri>/<N>/files/",
    )
    parser.add_argument("--max-file-bytes", type=int, default=_env(environ, "max-file-bytes", "536870912"))
    parser.add_argument("--max-body-bytes", type=int, default=_env(environ, "max-body-bytes", "1048576"))
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=_env(environ, "rate-limit", "600"),
        help="requests per minute per user (0 = off)",
    )
    parser.add_argument(
        "--models-configmap", default=_env(environ, "models-configmap", "finetune-api-models")
    )
    parser.add_argument("--models-namespace", default=_env(environ, "models-namespace", models_ns))
    parser.add_argument(
        "--kubeconfig",
        default=_env(environ, "kubeconfig", environ.get("KUBECONFIG") or None),
        help="default: env KUBECONFIG, else the in-cluster ServiceAccount",
    )
    args = parser.parse_args(list(argv))
    try:
        return ApiConfig(
            files_uri=args.files_uri,
            host=args.host,
            port=int(args.port),
            max_file_bytes=int(args.max_file_bytes),
            max_body_bytes=int(args.max_body_bytes),
            rate_limit=int(args.rate_limit),
            models_configmap=args.models_configmap,
            models_namespace=args.models_namespace,
            kubeconfig=args.kubeconfig or None,
        )
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def main(argv: Sequence[str] | None = None) -> None:
    from aiohttp import web

    from .app import create_app

    config = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    web.run_app(create_app(config), host=config.host, port=config.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
