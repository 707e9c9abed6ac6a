"""Preemption and resume: SIGTERM mid-training commits a checkpoint and exits PREEMPTED (21); a restart
resumes from the newest *committed* checkpoint and ends at the same total step count; nothing is ever
unpickled."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from finetune_trainer import manifest, storage
from finetune_trainer.checkpoints import resume_checkpoint

from .toy_fixtures import commit_toy_data, run_stage, toy_base_dir, toy_config

__all__ = ["toy_base_dir"]

TOTAL_STEPS = 30


@pytest.mark.slow
def test_sigterm_commits_a_checkpoint_and_a_restart_resumes_from_it(
    tmp_path: Path, toy_base_dir: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    prefix = str(tmp_path / "bucket" / "run")
    commit_toy_data(f"{prefix}/data")
    config = toy_config(
        prefix,
        str(toy_base_dir),
        hyperparameters={"maxSteps": TOTAL_STEPS, "learningRate": 5e-3},
        checkpoint={"everySteps": 1000, "keep": 3},
    )
    env = {
        **os.environ,
        "FTJ_CONFIG": json.dumps(config),
        "FTJ_LOGGING_STEPS": "1",
        "FTJ_TERMINATION_LOG": str(termination_log),
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "finetune_trainer", "train"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        seen.append(line)
        if '"event": "progress"' in line and json.loads(line)["step"] >= 5:
            proc.send_signal(15)  # what the kubelet sends on eviction/preemption
            break
        assert time.monotonic() < deadline, "".join(seen[-30:])
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode == 21, "".join(seen[-20:]) + rest[-4000:]

    term = json.loads(termination_log.read_text())
    assert term["stage"] == "train" and term["reason"] == "PREEMPTED" and term["exitCode"] == 21
    stopped_at = term["summary"]["step"]
    assert 5 <= stopped_at < TOTAL_STEPS
    ckpt = f"{prefix}/checkpoints/step-{stopped_at:08d}"
    assert term["summary"]["checkpoint"] == ckpt
    committed = manifest.read_manifest(ckpt)
    assert committed is not None and committed.step == stopped_at
    assert {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
        "adapter_model.safetensors",
    } <= {f.path for f in committed.files}
    assert not manifest.is_committed(f"{prefix}/model/adapter"), "no final artifacts from a preempted run"

    # A newer checkpoint that never got its manifest (upload cut short) must be ignored.
    orphan = Path(prefix) / "checkpoints" / f"step-{TOTAL_STEPS - 1:08d}"
    shutil.copytree(Path(ckpt), orphan)
    (orphan / "MANIFEST.json").unlink()

    loads: list[bool] = []
    real_load = torch.load

    def spy_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        loads.append(kwargs.get("weights_only") is True)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    termination_log.unlink()
    run = run_stage("train", config, termination_log)
    assert run.exit_code == 0, run.stdout[-4000:]
    assert run.of("resume") and run.of("resume")[0]["step"] == stopped_at
    assert run.of("progress")[0]["step"] == stopped_at
    assert run.termination["summary"]["step"] == TOTAL_STEPS
    assert run.termination["summary"]["totalSteps"] == TOTAL_STEPS
    assert loads and all(loads), "every torch.load on resume must use weights_only=True"
    state = json.loads(storage.read_text(f"{prefix}/train/metrics.json"))
    assert state["step"] == TOTAL_STEPS


def test_resume_ignores_checkpoints_without_manifest(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    for step, commit in ((10, True), (20, True), (30, False)):
        local = tmp_path / f"local-{step}"
        local.mkdir()
        (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        dest = str(root / f"step-{step:08d}")
        if commit:
            manifest.commit_dir(local, dest, kind="checkpoint", step=step)
        else:
            storage.upload_dir(local, dest)
    found = resume_checkpoint(str(root), tmp_path / "work")
    assert found is not None
    local, step = found
    assert step == 20
    assert json.loads((local / "trainer_state.json").read_text())["global_step"] == 20
    assert resume_checkpoint(str(tmp_path / "nothing-here"), tmp_path / "work") is None


class _Planted:
    """Unpickling this would create a file: a stand-in for arbitrary code in a tampered checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (self.marker,))


def test_a_tampered_rng_state_is_refused_not_executed(tmp_path: Path, toy_base_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    torch.save(
        {"python": _Planted(marker), "numpy": None, "cpu": torch.random.get_rng_state()},
        ckpt / "rng_state.pth",
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(toy_base_dir),
        args=TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[]),
    )
    with pytest.raises(Exception, match=r"(?i)weights.only|unpickl|global"):
        trainer._load_rng_state(str(ckpt))  # what Trainer.train(resume_from_checkpoint=...) calls
    assert not marker.exists()


def test_checkpoint_timer_and_sigterm_request_a_save() -> None:
    from types import SimpleNamespace

    from finetune_trainer.checkpoints import CheckpointCallback
    from finetune_trainer.termination import clear_preemption, request_preemption

    now = [0.0]
    cb = CheckpointCallback("unused://", every_minutes=2, keep=1, commit_meta={}, clock=lambda: now[0])
    state = SimpleNamespace(global_step=3, is_world_process_zero=True)

    def step() -> SimpleNamespace:
        control = SimpleNamespace(should_save=False, should_training_stop=False)
        cb.on_step_end(None, state, control)
        return control

    cb.on_train_begin(None, state, None)
    now[0] = 119.0
    assert not step().should_save
    now[0] = 121.0
    assert step().should_save, "every M minutes even between every-N-steps saves"
    cb._last_save = now[0]  # what on_save does
    assert not step().should_save
    request_preemption()
    try:
        control = step()
    finally:
        clear_preemption()
    assert control.should_save and control.should_training_stop and cb.preempted
