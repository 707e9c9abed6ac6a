"""``python -m finetune_trainer validate|train|evaluate|export [--config PATH]``.

Each stage is ``finetune_trainer.<stage>.run(config) -> StageResult | dict`` (the summary), imported lazily so
``validate`` never loads torch. Every outcome becomes a contract exit code plus a termination message.
With ``spec.resources.gpus > 1`` the ``train`` stage relaunches itself under ``torch.distributed.run`` and
keeps rank 0's exit code (torchrun alone would turn every failure into exit code 1).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import __version__
from .config import TrainerConfig, load_config
from .exitcodes import ExitCode, InvalidConfigError, TrainerError, classify
from .logs import setup_logging
from .termination import StageResult, install_sigterm_handler, termination_log_path, write_termination_message

log = logging.getLogger("finetune_trainer")

STAGES = ("validate", "train", "evaluate", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"finetune-trainer {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    helps = {
        "validate": "check, clean and split the dataset; write <runPrefix>/data/ (CPU only)",
        "train": "fine-tune (lora, qlora, full) with committed checkpoints; resume from the newest",
        "evaluate": "score the tuned model against the base (and a reference) on the held-out set",
        "export": "merge the adapter into the base model for serving in merged mode",
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


def run_stage(stage: str, config: TrainerConfig) -> StageResult:
    module = importlib.import_module(f"finetune_trainer.{stage}")
    return _as_result(module.run(config))


def _distributed_nproc(stage: str, config: TrainerConfig) -> int:
    """How many processes to launch, or 0 to run in this process."""
    if stage != "train" or "LOCAL_RANK" in os.environ:  # already inside torchrun
        return 0
    wanted = int(os.environ.get("FTJ_NPROC_PER_NODE", "0") or 0) or config.spec.resources.gpus
    return wanted if wanted > 1 else 0


def launch_distributed(stage: str, nproc: int, argv: list[str]) -> int:
    """Run ``stage`` under torch.distributed.run; return rank 0's contract exit code.

    Rank 0 writes its termination message to a private file that this process copies to the real one.
    SIGTERM is forwarded (torchrun passes it on to every worker, which checkpoints and exits 21).
    """
    with tempfile.TemporaryDirectory(prefix="ftj-launch-") as tmp:
        rank0_log = Path(tmp) / "termination.json"
        env = {**os.environ, "FTJ_TERMINATION_LOG": str(rank0_log)}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "finetune_trainer",
            *argv,
        ]
        log.info("launching %d processes", nproc, extra={"fields": {"event": "launch", "nproc": nproc}})
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
            config = load_config(args.config)
            nproc = _distributed_nproc(stage, config)
            if nproc:
                return launch_distributed(stage, nproc, argv)
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
