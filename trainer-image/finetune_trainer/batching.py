"""How training examples become optimizer steps: one definition for the trainer, its estimates and benchmarks.

The hyperparameters mean what they mean in TRL, the HF Trainer and the OpenAI fine-tuning API:

- ``batchSize`` examples per device per forward/backward pass;
- ``batchSize * gradientAccumulationSteps * data-parallel ranks`` examples per optimizer step;
- ``epochs`` passes over the training examples, so
  ``total steps = ceil(train examples / examples per optimizer step) * epochs`` (or ``maxSteps``).

The default batching is *padding-free*: the examples of a micro-batch are concatenated into one row with
per-example ``position_ids`` (attention never crosses an example boundary), so no compute goes to padding and
the step count is exactly the formula above. Concatenation *packing* (``hyperparameters.packing: true``) is
opt-in: it fills rows of ``maxSeqLength`` tokens with several examples, so ``batchSize`` counts packed
rows and a run makes ``ceil(packed rows / rows per optimizer step) * epochs`` steps, fewer than without
packing when examples are short. The arithmetic itself is ``finetune_vocabulary.steps``, which the
operator uses too (``status.progress.totalSteps`` before training starts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from finetune_vocabulary import steps

if TYPE_CHECKING:
    from .config import Hyperparameters

PADDING_FREE = "padding-free"
PACKED = "packed"


def mode(hp: Hyperparameters) -> str:
    return PACKED if hp.packing else PADDING_FREE


def examples_per_step(hp: Hyperparameters, world_size: int = 1) -> int:
    """Training examples (packed rows with packing) per optimizer step."""
    return steps.examples_per_step(hp.batch_size, hp.gradient_accumulation_steps, world_size)


def steps_per_epoch(rows: int, hp: Hyperparameters, world_size: int = 1) -> int:
    """Optimizer steps in one pass over ``rows`` (examples, or packed rows); the last may be short."""
    return steps.steps_per_epoch(rows, hp.batch_size, hp.gradient_accumulation_steps, world_size)


def total_steps(rows: int, hp: Hyperparameters, world_size: int = 1) -> int:
    """Optimizer steps of the whole run: ``maxSteps`` when set, else ``ceil(epochs * steps per epoch)``."""
    return steps.total_steps(
        rows, hp.batch_size, hp.epochs, hp.gradient_accumulation_steps, world_size, hp.max_steps
    )


def describe(hp: Hyperparameters, examples: int, rows: int, world_size: int = 1) -> dict[str, Any]:
    """What every progress line says about batching, so a user can check the step count."""
    info: dict[str, Any] = {
        "batching": mode(hp),
        "trainExamples": examples,
        "examplesPerStep": examples_per_step(hp, world_size),
    }
    if hp.packing:
        # With packing a "batch" holds packed rows, not examples: say how many rows one epoch has.
        info["packedRows"] = rows
        info["examplesPerStep"] = round(examples_per_step(hp, world_size) * examples / max(rows, 1), 1)
    return info
