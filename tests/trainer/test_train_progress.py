"""Progress lines: every logging step, and at least every interval even while one step runs long."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from finetune_trainer.progress import ProgressCallback


def _state(step: int, max_steps: int = 100, epoch: float = 0.0) -> Any:
    return SimpleNamespace(global_step=step, max_steps=max_steps, epoch=epoch, is_world_process_zero=True)


def test_logging_steps_emit_figures_with_real_token_rate_and_eta() -> None:
    now = [1000.0]
    tokens = [5000]  # tokens seen before this process started (a resumed run) do not count
    lines: list[dict[str, Any]] = []
    cb = ProgressCallback(
        lambda: tokens[0], interval=15, emit=lambda **f: lines.append(f), clock=lambda: now[0]
    )
    state = _state(20)
    cb.on_train_begin(None, state, None)
    assert lines[-1]["step"] == 20 and lines[-1]["etaSeconds"] is None
    now[0] += 10.0
    tokens[0] += 2500
    state.global_step, state.epoch = 30, 0.3
    cb.on_log(None, state, None, logs={"loss": 1.5, "learning_rate": 1e-4})
    cb.on_train_end(None, state, None)
    line = lines[1]
    assert line == {
        "step": 30,
        "totalSteps": 100,
        "epoch": 0.3,
        "loss": 1.5,
        "learningRate": 1e-4,
        "tokensPerSecond": 250.0,
        "etaSeconds": 70,
    }  # 10 steps in 10 s, 70 steps to go


def test_heartbeat_repeats_progress_while_a_step_runs_long() -> None:
    lines: list[dict[str, Any]] = []
    cb = ProgressCallback(lambda: 0, interval=0.3, emit=lambda **f: lines.append(f))
    state = _state(3)
    cb.on_train_begin(None, state, None)
    time.sleep(1.2)  # no step ends in the meantime
    cb.on_train_end(None, state, None)
    assert len(lines) >= 3, lines
    assert all(line["step"] == 3 for line in lines)


def test_only_rank_zero_prints() -> None:
    lines: list[dict[str, Any]] = []
    cb = ProgressCallback(lambda: 0, interval=0.1, emit=lambda **f: lines.append(f))
    state = _state(1)
    state.is_world_process_zero = False
    cb.on_train_begin(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 1.0})
    time.sleep(0.3)
    cb.on_train_end(None, state, None)
    assert lines == []


def test_objective_figures_ride_on_progress_lines_under_their_progress_keys() -> None:
    from finetune_vocabulary.objectives import PROGRESS_FIGURES

    lines: list[dict[str, Any]] = []
    cb = ProgressCallback(
        lambda: 0, interval=15, emit=lambda **f: lines.append(f), figures=PROGRESS_FIGURES["dpo"]
    )
    state = _state(0)
    cb.on_train_begin(None, state, None)
    assert "rewardsAccuracy" not in lines[-1]  # nothing logged yet: no figure invented
    state.global_step = 5
    logs = {"loss": 0.6, "rewards/chosen": 0.2, "rewards/rejected": -0.1, "rewards/margins": 0.3}
    cb.on_log(None, state, None, logs={**logs, "rewards/accuracies": 0.75, "logps/chosen": -3.0})
    cb.on_train_end(None, state, None)
    assert {k: lines[1].get(k) for k in PROGRESS_FIGURES["dpo"]} == {
        "rewardsChosen": 0.2,
        "rewardsRejected": -0.1,
        "rewardsMargin": 0.3,
        "rewardsAccuracy": 0.75,
    }
    assert "logps/chosen" not in lines[1] and "logpsChosen" not in lines[1]
