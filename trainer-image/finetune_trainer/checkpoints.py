"""Committed checkpoints on the run prefix, and resuming from the newest one.

The HF Trainer writes ``checkpoint-N/`` locally (model or adapter weights, optimizer, scheduler, RNG state,
trainer state); :class:`CheckpointCallback` then uploads it to ``<runPrefix>/checkpoints/step-NNNNNNNN/`` and
commits it with a manifest. It asks the Trainer for a save every ``checkpoint.everySteps`` steps (through
``save_steps``), every ``checkpoint.everyMinutes`` minutes, and once when SIGTERM arrives, after which it
stops training so that train.py can exit PREEMPTED.

Resuming downloads the newest *committed* checkpoint (directories without a manifest are ignored) and
verifies each file's sha256 against the manifest. Transformers restores it with ``torch.load(...,
weights_only=True)`` (optimizer, scheduler, RNG); ``training_args.bin``, the one full pickle the Trainer
writes, is never uploaded, so nothing a bucket writer could plant is ever unpickled.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from . import manifest, storage
from .logs import log_event
from .termination import preemption_requested

log = logging.getLogger(__name__)

# Written by Trainer._save_checkpoint but never read back on resume; it is a full pickle.
NOT_UPLOADED = ("training_args.bin",)


def step_of(dir_uri: str) -> int | None:
    name = dir_uri.rstrip("/").rsplit("/", 1)[-1]
    return int(name.removeprefix("step-")) if name.startswith("step-") and name[5:].isdigit() else None


def resume_checkpoint(checkpoints_uri: str, workdir: Path) -> tuple[Path, int] | None:
    """Download the newest committed checkpoint under ``checkpoints_uri``; (local dir, step) or None."""
    found = manifest.latest_committed(checkpoints_uri)
    if found is None:
        return None
    uri, found_manifest = found
    step = found_manifest.step if found_manifest.step is not None else step_of(uri)
    local = workdir / "resume" / f"checkpoint-{step}"
    manifest.download_committed(uri, local)
    log.info("resuming from %s", uri, extra={"fields": {"event": "resume", "uri": uri, "step": step}})
    return local, int(step or 0)


FSDP_FILES = ("pytorch_model_fsdp.bin", "optimizer.bin")  # accelerate's names for whole-tensor FSDP state


def without_fsdp(local: Path) -> bool:
    """Let a run without FSDP (one process, or DDP) resume an FSDP checkpoint (downloaded to ``local``).

    The weights are also in ``model.safetensors``; FSDP's whole optimizer state, keyed by parameter name,
    becomes the plain form keyed by position in the param groups (which list the same parameters in the same
    order). The FSDP files are then removed from this local copy (the Trainer refuses them without FSDP).
    True when converted."""
    model, optimizer = (local / name for name in FSDP_FILES)
    if not model.is_file() or not optimizer.is_file() or not (local / "model.safetensors").is_file():
        return False
    import torch

    whole = torch.load(optimizer, map_location="cpu", weights_only=True)
    names = [name for group in whole["param_groups"] for name in group["params"]]
    position = {name: i for i, name in enumerate(names)}
    plain = {
        "state": {position[name]: state for name, state in whole["state"].items()},
        "param_groups": [
            {**group, "params": [position[name] for name in group["params"]]}
            for group in whole["param_groups"]
        ],
    }
    torch.save(plain, local / "optimizer.pt")
    model.unlink()
    optimizer.unlink()
    log.info("converted the FSDP checkpoint %s for a run without FSDP", local.name)
    return True


def prune(checkpoints_uri: str, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest committed checkpoints (manifest first, so none is half-visible)."""
    committed = sorted(manifest.find_committed(checkpoints_uri), key=lambda u: step_of(u) or -1)
    doomed = committed[:-keep] if keep > 0 else []
    for uri in doomed:
        storage.delete_prefix(manifest.manifest_uri(uri))
        storage.delete_prefix(uri)
    return doomed


def _distributed() -> Any | None:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _agree(*flags: bool) -> list[bool]:
    """Every rank takes the same save/stop decision (a collective save with one rank missing would hang)."""
    dist = _distributed()
    if dist is None:
        return list(flags)
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    tensor = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def _barrier() -> None:
    dist = _distributed()
    if dist is not None:
        dist.barrier()


class CheckpointCallback(TrainerCallback):
    """Commit every checkpoint the Trainer saves; force saves on a timer and on SIGTERM."""

    def __init__(
        self,
        checkpoints_uri: str,
        *,
        every_minutes: float,
        keep: int,
        commit_meta: dict[str, Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.checkpoints_uri = checkpoints_uri
        self.every_seconds = every_minutes * 60.0
        self.keep = keep
        self.commit_meta = commit_meta
        self._clock = clock
        self._last_save = clock()
        self.preempted = False
        self.committed: list[int] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_save = self._clock()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        timer_due, sigterm = _agree(
            self._clock() - self._last_save >= self.every_seconds, preemption_requested()
        )
        if timer_due or sigterm:
            control.should_save = True
        if sigterm:
            self.preempted = True
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_save = self._clock()
        _barrier()  # every rank has written its part (RNG state, FSDP shards) before rank 0 uploads
        if state.is_world_process_zero:
            self.commit(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
        _barrier()

    def commit(self, local: Path, step: int) -> None:
        for name in NOT_UPLOADED:
            (local / name).unlink(missing_ok=True)
        uri = storage.join(self.checkpoints_uri, f"step-{step:08d}")
        started = time.monotonic()
        try:
            manifest.commit_dir(local, uri, kind="checkpoint", step=step, **self.commit_meta)
        except manifest.AlreadyCommitted:
            log.info("checkpoint %s already committed", uri)
        self.committed.append(step)
        log_event("checkpoint", step=step, uri=uri, seconds=round(time.monotonic() - started, 2))
        pruned = prune(self.checkpoints_uri, self.keep)
        for old in pruned:
            old_step = step_of(old)
            if old_step is not None:
                shutil.rmtree(local.parent / f"checkpoint-{old_step}", ignore_errors=True)
