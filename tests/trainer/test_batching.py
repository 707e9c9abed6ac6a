"""Step arithmetic: batchSize examples per device step, * gradientAccumulationSteps * ranks per optimizer
step, ceil(examples / examples per step) * epochs steps (or maxSteps); packing (opt-in) counts packed rows.
The trainer announces totalSteps before the first step and makes exactly that many."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from finetune_demo import toymodel
from finetune_trainer import batching
from finetune_trainer.config import Hyperparameters

from .toy_fixtures import commit_toy_data, environment, run_stage, toy_base_dir, toy_config

__all__ = ["toy_base_dir"]


def hp(**values: Any) -> Hyperparameters:
    return Hyperparameters.model_validate(values)


def test_defaults_are_one_example_batch_per_step_without_packing() -> None:
    defaults = hp()
    assert defaults.gradient_accumulation_steps == 1
    assert not defaults.packing
    assert batching.mode(defaults) == batching.PADDING_FREE


@pytest.mark.parametrize(
    ("examples", "values", "world", "steps"),
    [
        # the classification job: 600 training examples, batches of 16, 4 epochs
        (600, {"batchSize": 16, "epochs": 4}, 1, 152),
        (600, {"batchSize": 16, "gradientAccumulationSteps": 2, "epochs": 4}, 1, 76),
        (600, {"batchSize": 4, "gradientAccumulationSteps": 2, "epochs": 1}, 4, 19),  # 32 per step
        (37, {"batchSize": 4, "gradientAccumulationSteps": 2, "epochs": 2}, 1, 10),  # last step short
        (10, {"batchSize": 16, "epochs": 3}, 1, 3),  # fewer examples than a batch: one step an epoch
        (600, {"batchSize": 16, "epochs": 4, "maxSteps": 7}, 1, 7),  # maxSteps wins
        (100, {"batchSize": 10, "epochs": 1.5}, 1, 15),  # fractional epochs round up
    ],
)
def test_total_steps(examples: int, values: dict[str, Any], world: int, steps: int) -> None:
    assert batching.total_steps(examples, hp(**values), world) == steps


def test_packing_counts_packed_rows_not_examples() -> None:
    packed = hp(batchSize=16, epochs=4, packing=True)
    # 600 short examples packed into 150 rows: 4x fewer steps than the same batchSize without packing
    assert batching.total_steps(150, packed, 1) == 40
    info = batching.describe(packed, examples=600, rows=150)
    assert info == {"batching": "packed", "trainExamples": 600, "examplesPerStep": 64.0, "packedRows": 150}
    assert batching.describe(hp(batchSize=16), examples=600, rows=600) == {
        "batching": "padding-free",
        "trainExamples": 600,
        "examplesPerStep": 16,
    }


@pytest.mark.parametrize("packing", [False, True], ids=["padding-free", "packed"])
def test_trainer_makes_the_announced_steps(packing: bool, toy_base_dir: Path, tmp_path: Path) -> None:
    prefix = str(tmp_path / "run")
    commit_toy_data(f"{prefix}/data", toymodel.ToyTaskParams(train_examples=37, test_examples=4))
    values = {
        "batchSize": 4,
        "gradientAccumulationSteps": 2,
        "epochs": 2,
        "maxSteps": None,
        "packing": packing,
    }
    config = toy_config(prefix, str(toy_base_dir), hyperparameters=values)
    config["spec"]["hyperparameters"].pop("maxSteps")
    with environment(FTJ_WORKDIR=str(tmp_path / "work"), FTJ_TERMINATION_LOG=str(tmp_path / "term")):
        run = run_stage("train", config, tmp_path / "term")
    assert run.exit_code == 0, run.stdout[-2000:]
    progress = run.of("progress")
    first, last = progress[0], progress[-1]
    assert first["step"] == 0, "totalSteps is announced before the first step"
    if packing:
        rows = first["packedRows"]
        assert first["batching"] == "packed" and rows < 37, "several short examples share a row"
        expected = math.ceil(rows / 8) * 2
    else:
        assert first["batching"] == "padding-free" and first["examplesPerStep"] == 8
        expected = math.ceil(37 / 8) * 2
    assert first["totalSteps"] == expected
    assert last["step"] == last["totalSteps"] == expected == run.termination["summary"]["step"]
    assert isinstance(last["loss"], float), "the final step always reports its loss"
    assert "?" not in run.termination["message"]
