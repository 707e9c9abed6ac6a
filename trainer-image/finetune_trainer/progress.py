"""Progress as JSON lines on stdout (the operator reads the newest one from the pod log).

One ``{"event": "progress", "step", "totalSteps", "epoch", "loss", "learningRate", "tokensPerSecond",
"etaSeconds", ...context}`` line (context: how examples are batched, see batching.py) before the first step
(``totalSteps`` is known then), at every logging step, and at least every ``interval`` seconds even when
a single step takes longer (a heartbeat thread repeats the latest figures). tokensPerSecond counts real tokens
(no padding) processed by this process since it started, across all ranks. ``loss`` is the mean training
loss over the last logging window, on the tokens evaluation scores (assistant tokens by default); the final
step is always logged. dpo/kto/grpo lines also carry the objective's own figures (``rewardsChosen``,
``rewardsAccuracy``, ``reward``, ``kl`` ...: finetune_vocabulary.objectives.PROGRESS_FIGURES, mapped from
TRL's log keys), the latest logged value of each.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from .logs import log_event

DEFAULT_INTERVAL_S = 15.0


class ProgressCallback(TrainerCallback):
    def __init__(
        self,
        tokens_seen: Callable[[], int],
        *,
        interval: float = DEFAULT_INTERVAL_S,
        emit: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        context: dict[str, Any] | None = None,
        figures: dict[str, str] | None = None,
    ) -> None:
        self._context = dict(context or {})
        self._figure_keys = dict(figures or {})  # progress key -> TRL log key
        self._figures: dict[str, float] = {}
        self._tokens_seen = tokens_seen
        self._interval = interval
        self._emit_fn = emit or (lambda **fields: log_event("progress", **fields))
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_emit = 0.0
        self._start_time = 0.0
        self._start_step = 0
        self._start_tokens = 0
        self._loss: float | None = None
        self._lr: float | None = None
        self._state: Any = None
        self.last: dict[str, Any] | None = None

    # --- figures ------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any] | None:
        state = self._state
        if state is None:
            return None
        elapsed = max(self._clock() - self._start_time, 1e-9)
        steps_done = state.global_step - self._start_step
        total = int(state.max_steps or 0)
        eta = None
        if steps_done > 0 and total:
            eta = round(max(total - state.global_step, 0) * elapsed / steps_done)
        tokens = max(self._tokens_seen() - self._start_tokens, 0)
        return {
            "step": int(state.global_step),
            "totalSteps": total,
            "epoch": round(float(state.epoch or 0.0), 4),
            "loss": None if self._loss is None else round(self._loss, 6),
            "learningRate": self._lr,
            "tokensPerSecond": round(tokens / elapsed, 1),
            "etaSeconds": eta,
            **self._figures,
            **self._context,
        }

    def _emit(self) -> None:
        with self._lock:
            fields = self.snapshot()
            if fields is None:
                return
            self._last_emit = self._clock()
            self.last = fields
        self._emit_fn(**fields)

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(1.0, self._interval / 3)):
            if self._clock() - self._last_emit >= self._interval:
                self._emit()

    # --- TrainerCallback ----------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._state = state
        self._start_time = self._last_emit = self._clock()
        self._start_step = state.global_step  # resumed runs: rates count this process's work only
        self._start_tokens = self._tokens_seen()
        if state.is_world_process_zero:
            self._emit()
            self._thread = threading.Thread(target=self._heartbeat, name="progress-heartbeat", daemon=True)
            self._thread.start()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        logs = logs or {}
        if "loss" in logs:
            self._loss = float(logs["loss"])
        if "learning_rate" in logs:
            self._lr = float(logs["learning_rate"])
        for key, trl_key in self._figure_keys.items():
            value = logs.get(trl_key)
            if isinstance(value, int | float) and math.isfinite(value):
                self._figures[key] = round(float(value), 6)
        if state.is_world_process_zero and "loss" in logs:
            self._emit()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True  # the final loss is always reported, whatever logging_steps is
        if state.is_world_process_zero and self._clock() - self._last_emit >= self._interval:
            self._emit()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stop.set()
        if state.is_world_process_zero:
            self._emit()
