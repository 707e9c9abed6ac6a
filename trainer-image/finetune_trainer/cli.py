"""``python -m finetune_trainer validate|train|evaluate|export|servecheck|assemble [--config PATH]``.

Each stage is ``finetune_trainer.<stage>.run(config) -> StageResult | dict`` (the summary), imported lazily so
``validate`` never loads torch. Every outcome becomes a contract exit code plus a termination message.
With ``spec.resources.gpus > 1`` or ``nodes > 1`` the ``train`` stage relaunches itself under
``torch.distributed.run`` (``gpus`` processes in this pod; with several nodes, node rank
``JOB_COMPLETION_INDEX`` of a static c10d rendezvous at rank 0's pod, see finetune_vocabulary.distributed) and
keeps its first process's exit code (torchrun alone would turn every failure into exit code 1).
``assemble`` (a FineTuneSchedule's data Job) reads its own document (config.AssembleConfig), not a job's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_vocabulary import distributed

from . import __version__
from .config import AssembleConfig, TrainerConfig, load_assemble_config, load_config
from .exitcodes import ExitCode, InvalidConfigError, TrainerError, TransientError, classify
from .logs import setup_logging
from .termination import StageResult, install_sigterm_handler, termination_log_path, write_termination_message

log = logging.getLogger("finetune_trainer")

STAGES = ("validate", "train", "evaluate", "export", "servecheck", "assemble")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"finetune-trainer {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    helps = {
        "validate": "check, clean and split the dataset; write <runPrefix>/data/ (CPU only)",
        "train": "fine-tune (lora, qlora, full) with committed checkpoints; resume from the newest",
        "evaluate": "score the tuned model against the base (and a reference) on the held-out set",
        "export": "merge the adapter into the base model for serving in merged mode",
        "servecheck": "score the serving engine's answers to held-out prompts before it takes traffic",
        "assemble": "build a FineTuneSchedule run's training set: base + captured chats (CPU only)",
    }
    for stage in STAGES:
        p = sub.add_parser(stage, help=helps[stage])
        p.add_argument("--config", metavar="PATH", help="JSON config file (default: the FTJ_CONFIG variable)")
        p.add_argument("--log-level", default=os.environ.get("FTJ_LOG_LEVEL", "INFO"))
    p = sub.add_parser("fetch", help="copy a model directory (verified against its manifest) to a local path")
    p.add_argument("source", help="s3://, hf://, pvc:// or local model directory")
    p.add_argument("dest", help="local directory, e.g. an emptyDir that vLLM reads")
    p.add_argument("--log-level", default=os.environ.get("FTJ_LOG_LEVEL", "INFO"))
    return parser


def fetch(source: str, dest: str) -> StageResult:
    """Init-container helper: committed directories are verified file by file; others copied whole."""
    from . import manifest, storage

    try:
        if storage.parse(source).scheme != "hf" and manifest.read_manifest(source) is not None:
            found = manifest.download_committed(source, dest)
            return StageResult({"source": source, "files": len(found.files), "step": found.step}, "fetched")
        # hf:// resolves to a cache snapshot first; everything else is copied straight to dest.
        origin = str(storage.fetch_model(source).path) if storage.parse(source).scheme == "hf" else source
        storage.download_dir(origin, dest)
        return StageResult({"source": source, "files": len(storage.local_files(dest))}, "fetched")
    except storage.NotFound as exc:
        raise InvalidConfigError(f"fetch: {source}: not found ({exc})") from None
    except ValueError as exc:
        raise InvalidConfigError(f"fetch: {exc}") from None


def _as_result(value: Any) -> StageResult:
    if isinstance(value, StageResult):
        return value
    if isinstance(value, dict):
        return StageResult(summary=value)
    return StageResult()


def run_stage(stage: str, config: TrainerConfig | AssembleConfig) -> StageResult:
    module = importlib.import_module(f"finetune_trainer.{stage}")
    return _as_result(module.run(config))


@dataclass(frozen=True)
class Launch:
    """How this pod takes part in a distributed run: ``nproc`` processes, node ``node_rank`` of ``nnodes``."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = distributed.DEFAULT_MASTER_PORT


def _distributed_launch(stage: str, config: TrainerConfig) -> Launch | None:
    """How to launch ``stage`` under torchrun, or None to run it in this process."""
    if stage != "train" or "LOCAL_RANK" in os.environ:  # already inside torchrun
        return None
    env = os.environ
    nproc = int(env.get(distributed.NPROC_PER_NODE_ENV, "0") or 0) or max(1, config.spec.resources.gpus)
    nnodes = int(env.get(distributed.NNODES_ENV, "0") or 0) or config.spec.resources.nodes
    if nproc * nnodes <= 1:
        return None
    if nnodes == 1:
        return Launch(nproc)
    master = env.get(distributed.MASTER_ADDR_ENV)
    index = env.get(distributed.NODE_RANK_ENV)
    if not master or index is None or not index.isdigit() or int(index) >= nnodes:
        raise InvalidConfigError(
            f"resources.nodes={nnodes}: each pod needs {distributed.MASTER_ADDR_ENV} and "
            f"{distributed.NODE_RANK_ENV} < {nnodes} (an Indexed Job sets them); got {master!r}, {index!r}"
        )
    port = int(env.get(distributed.MASTER_PORT_ENV) or distributed.DEFAULT_MASTER_PORT)
    return Launch(nproc, nnodes, int(index), master, port)


def resolve_master(host: str, timeout: float, port: int | None = None) -> str:
    """Rank 0's IP address, resolved here in Python (torch's C++ store then connects to an address).

    Waits for the DNS record (a headless Service publishes a pod's name once the pod exists). With ``port``
    (nodes other than 0) it also waits until rank 0's store accepts a connection, resolving again each
    time: a replacement pod may briefly see the address of the previous attempt's rank 0.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            address = socket.gethostbyname(host)
            if port is None:
                return address
            with socket.create_connection((address, port), timeout=2):
                return address
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise TransientError(
                    f"rank 0 at {host}{f':{port}' if port else ''} not reachable in {timeout:.0f} s: {exc}"
                ) from None
            time.sleep(1.0)


def torchrun_command(launch: Launch, argv: list[str]) -> list[str]:
    """``torch.distributed.run`` for one pod: standalone on one node, else a static c10d rendezvous at rank
    0's pod with this pod's node rank (so global rank 0, which reports progress, runs on index 0)."""
    if launch.nnodes == 1:
        where = ["--standalone"]
    else:
        timeout = float(
            os.environ.get(distributed.RENDEZVOUS_TIMEOUT_ENV) or distributed.DEFAULT_RENDEZVOUS_TIMEOUT_S
        )
        assert launch.master_addr is not None
        port = launch.master_port if launch.node_rank else None  # rank 0 hosts the store itself
        where = [
            f"--nnodes={launch.nnodes}",
            f"--node-rank={launch.node_rank}",
            f"--master-addr={resolve_master(launch.master_addr, timeout, port)}",
            f"--master-port={launch.master_port}",
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        f"--nproc-per-node={launch.nproc}",
        "-m",
        "finetune_trainer",
        *argv,
    ]


def launch_distributed(stage: str, launch: Launch, argv: list[str]) -> int:
    """Run ``stage`` under torch.distributed.run; return this pod's first process's contract exit code.

    That process (local rank 0; global rank 0 on node 0) writes its termination message to a private file
    that this process copies to the real one. SIGTERM is forwarded (torchrun passes it on to every worker,
    which checkpoints and exits 21).
    """
    with tempfile.TemporaryDirectory(prefix="ftj-launch-") as tmp:
        rank0_log = Path(tmp) / "termination.json"
        # torchrun sets OMP_NUM_THREADS=1 only for several processes per pod; CPU ranks (gloo) sharing a host
        # oversubscribe its cores without it, GPU ranks do not need more
        env = {"OMP_NUM_THREADS": "1", **os.environ, "FTJ_TERMINATION_LOG": str(rank0_log)}
        cmd = torchrun_command(launch, argv)
        log.info(
            "launching %d processes on node %d of %d",
            launch.nproc,
            launch.node_rank,
            launch.nnodes,
            extra={
                "fields": {
                    "event": "launch",
                    "nproc": launch.nproc,
                    "nnodes": launch.nnodes,
                    "nodeRank": launch.node_rank,
                }
            },
        )
        child = subprocess.Popen(cmd, env=env)
        previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        try:
            returncode = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
        try:
            doc = json.loads(rank0_log.read_bytes())
        except (OSError, ValueError):
            doc = None
    if doc is None:
        code = ExitCode.CRASH if returncode else ExitCode.OK
        write_termination_message(stage, code, f"distributed launcher exited with {returncode}")
        return int(code) if returncode else 0
    write_termination_message(stage, doc.get("exitCode", 1), doc.get("message", ""), doc.get("summary"))
    return int(doc.get("exitCode", 1))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    stage: str = args.stage
    # train polls the flag and commits a checkpoint first; the other stages can stop at once.
    install_sigterm_handler(raise_immediately=stage != "train")
    log.info(
        "%s starting", stage, extra={"fields": {"event": "start", "stage": stage, "version": __version__}}
    )
    try:
        if stage == "fetch":
            result = fetch(args.source, args.dest)
        else:
            if stage == "assemble":
                result = run_stage(stage, load_assemble_config(args.config))
            else:
                config = load_config(args.config)
                launch = _distributed_launch(stage, config)
                if launch is not None:
                    return launch_distributed(stage, launch, argv)
                result = run_stage(stage, config)
    except BaseException as exc:
        if isinstance(exc, SystemExit | KeyboardInterrupt) and not isinstance(exc, TrainerError):
            raise
        code, message = classify(exc, stage)
        summary = exc.summary if isinstance(exc, TrainerError) else {}
        if code == ExitCode.CRASH:
            log.error("%s crashed: %s", stage, message, exc_info=exc)
        else:
            log.error(
                "%s failed (%s): %s",
                stage,
                code.name,
                message,
                extra={"fields": {"event": "failed", "stage": stage, "exitCode": int(code)}},
            )
        write_termination_message(stage, code, message, summary)
        return int(code)
    write_termination_message(stage, ExitCode.OK, result.message or f"{stage} succeeded", result.summary)
    log.info(
        "%s succeeded",
        stage,
        extra={
            "fields": {
                "event": "done",
                "stage": stage,
                "summary": result.summary,
                "terminationLog": str(termination_log_path()),
            }
        },
    )
    return 0
