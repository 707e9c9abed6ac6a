"""Train refuses what cannot run with the contract's permanent exit codes and a message naming the cause."""

from __future__ import annotations

from pathlib import Path

from .toy_fixtures import commit_toy_data, run_stage, toy_config


def test_qlora_without_cuda_is_an_invalid_config(tmp_path: Path, termination_log: Path) -> None:
    prefix = str(tmp_path / "run")
    commit_toy_data(f"{prefix}/data")
    # gpus: 1 passes the spec's own check; this pod simply has no CUDA device
    config = toy_config(prefix, str(tmp_path / "no-model"), method="qlora", resources={"gpus": 1})
    run = run_stage("train", config, termination_log)
    assert run.exit_code == 11
    assert run.termination["reason"] == "INVALID_CONFIG"
    assert "spec.method" in run.termination["message"] and "CUDA" in run.termination["message"]


def test_train_without_validated_data_is_invalid_data(tmp_path: Path, termination_log: Path) -> None:
    prefix = str(tmp_path / "run")
    run = run_stage("train", toy_config(prefix, str(tmp_path / "no-model")), termination_log)
    assert run.exit_code == 10
    assert "run validate first" in run.termination["message"]
