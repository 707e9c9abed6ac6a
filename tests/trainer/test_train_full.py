"""Full fine-tuning of the toy base (local run prefix): the merged model is committed and beats the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from finetune_trainer import manifest

from .toy_fixtures import commit_toy_data, run_stage, toy_base_dir, toy_config

__all__ = ["toy_base_dir"]


@pytest.mark.slow
def test_full_fine_tuning_writes_merged_model_that_beats_base(
    tmp_path: Path, toy_base_dir: Path, termination_log: Path
) -> None:
    prefix = str(tmp_path / "pvc" / "runs" / "full")
    commit_toy_data(f"{prefix}/data")
    config = toy_config(
        prefix,
        str(toy_base_dir),
        method="full",
        # 80 steps of 16 examples (about 4 epochs of the 300 toy examples)
        hyperparameters={"learningRate": 1e-3, "maxSteps": 80, "batchSize": 16},
        checkpoint={"everySteps": 80, "keep": 1},
    )
    run = run_stage("train", config, termination_log)
    assert run.exit_code == 0, run.stdout[-4000:]
    summary = run.termination["summary"]
    assert summary["merged"] == f"{prefix}/model/merged" and summary["adapter"] is None
    assert summary["loraRank"] is None and summary["step"] == 80
    merged = manifest.read_manifest(f"{prefix}/model/merged")
    assert merged is not None and merged.kind == "merged" and merged.hyperparameters["method"] == "full"
    files = {f.path for f in merged.files}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    assert not manifest.is_committed(f"{prefix}/model/adapter")
    tokenizer_config = json.loads((Path(prefix) / "model/merged/tokenizer_config.json").read_text())
    chat_template = Path(prefix) / "model/merged/chat_template.jinja"
    assert chat_template.exists() or tokenizer_config.get("chat_template")
    # the full checkpoint carries the whole model and optimizer state
    ckpt = manifest.read_manifest(f"{prefix}/checkpoints/step-00000080")
    assert ckpt is not None and {"model.safetensors", "optimizer.pt"} <= {f.path for f in ckpt.files}

    termination_log.unlink()
    evaluation = run_stage("evaluate", config, termination_log)
    assert evaluation.exit_code == 0, evaluation.stdout[-4000:]
    scores = evaluation.termination["summary"]
    assert scores["tuned"]["exact_match"] >= scores["base"]["exact_match"] + 0.3, scores
    assert scores["tuned"]["loss"] < scores["base"]["loss"]

    # rerunning a finished stage changes nothing and reports the same result
    termination_log.unlink()
    again = run_stage("train", config, termination_log)
    assert again.exit_code == 0 and again.termination["summary"] == summary
