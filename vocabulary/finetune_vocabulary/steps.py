"""How many optimizer steps a run makes: one definition for the trainer, the operator's status and the
benchmarks, with the meaning TRL, the HF Trainer and the OpenAI fine-tuning API give the hyperparameters.

``batchSize`` examples per device step; ``batchSize * gradientAccumulationSteps * data-parallel ranks``
examples per optimizer step; ``epochs`` passes over the training examples, so
``ceil(train examples / examples per optimizer step) * epochs`` steps (or ``maxSteps``). With opt-in
packing the same arithmetic counts packed rows instead of examples.
"""

from __future__ import annotations

import math


def examples_per_step(batch_size: int, accumulation: int = 1, ranks: int = 1) -> int:
    """Training examples (packed rows with packing) per optimizer step."""
    return batch_size * accumulation * max(1, ranks)


def steps_per_epoch(rows: int, batch_size: int, accumulation: int = 1, ranks: int = 1) -> int:
    """Optimizer steps in one pass over ``rows``; the last may be short (the HF Trainer's arithmetic)."""
    return max(1, math.ceil(rows / examples_per_step(batch_size, accumulation, ranks)))


def total_steps(
    rows: int,
    batch_size: int,
    epochs: float,
    accumulation: int = 1,
    ranks: int = 1,
    max_steps: int | None = None,
) -> int:
    """Optimizer steps of the whole run: ``max_steps`` when set, else ``ceil(epochs * steps per epoch)``."""
    if max_steps:
        return int(max_steps)
    return max(1, math.ceil(epochs * steps_per_epoch(rows, batch_size, accumulation, ranks)))
