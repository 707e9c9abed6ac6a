"""dpo / kto / grpo through the real train stage (CLI, in process, local storage) on the toy task.

Preference pairs: chosen = the task's right answer (``K``), rejected = the base's habit (``k``). Each run is a
few steps on the toy Llama; the checks are what a user and the operator rely on: the adapter or merged model
committed, the objective's figures in progress lines and in the summary, the preference actually learned,
GRPO rewarded by the evaluation grader at every step, full DPO against a frozen reference, and resume.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import checkpoints, manifest
from finetune_trainer.config import parse_config
from finetune_trainer.exitcodes import InvalidConfigError
from finetune_trainer.rewards import reward_functions
from finetune_vocabulary.objectives import PROGRESS_FIGURES

from .toy_fixtures import commit_objective_data, run_stage, toy_base_dir, toy_config

__all__ = ["toy_base_dir"]

REPO = Path(__file__).resolve().parents[2]
EXACT = {"name": "exact", "type": "stringCheck", "stringCheck": {"operation": "equals"}}


def _prefix(tmp_path: Path) -> str:
    return str(tmp_path / "bucket" / "runs" / "team-a" / "toy" / "uid-toy")


def _train(
    tmp_path: Path, base: Path, objective: str, termination_log: Path, **overrides: Any
) -> tuple[Any, str, list[dict[str, Any]]]:
    from finetune_demo import toymodel

    prefix = _prefix(tmp_path)
    rows, _ = commit_objective_data(f"{prefix}/data", objective, toymodel.ToyTaskParams(train_examples=64))
    hp = {"maxSteps": 8, "epochs": 1, "learningRate": 5e-3, **overrides.pop("hyperparameters", {})}
    config = toy_config(prefix, str(base), objective=objective, hyperparameters=hp, **overrides)
    return run_stage("train", config, termination_log), prefix, rows


def _pair_margins(base: Path, adapter: Path | None, rows: list[dict[str, Any]]) -> list[float]:
    """Implicit-reward margins beta*((pi_c - ref_c) - (pi_r - ref_r)), reference = the adapter disabled."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_preference
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    import torch
    from finetune_trainer import modeling
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is None:  # the base before training: a fresh LoRA (B = 0) changes nothing
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    else:
        model = PeftModel.from_pretrained(model, str(adapter))
    tokenizer = modeling.load_tokenizer(base)
    encode = bench_preference.encode
    pairs = [
        (encode(tokenizer, r["prompt"], r["chosen"]), encode(tokenizer, r["prompt"], r["rejected"]))
        for r in rows
    ]
    model.eval()
    with torch.no_grad():
        return [float(m) for m in bench_preference.pair_margins(model, pairs)]


def _accuracy(margins: list[float]) -> float:
    return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)


@pytest.mark.slow
def test_dpo_lora_commits_an_adapter_reports_its_figures_and_learns_the_preference(
    tmp_path: Path, toy_base_dir: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTJ_LOGGING_STEPS", "2")
    run, prefix, rows = _train(tmp_path, toy_base_dir, "dpo", termination_log)
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    assert summary["objective"] == "dpo" and summary["step"] == 8
    assert summary["adapter"] == f"{prefix}/model/adapter" and manifest.is_committed(summary["adapter"])
    assert set(summary["figures"]) == set(PROGRESS_FIGURES["dpo"])
    progress = [p for p in run.of("progress") if p["step"] > 0]
    assert progress and all(set(PROGRESS_FIGURES["dpo"]) <= set(p) for p in progress)
    assert progress[-1]["rewardsAccuracy"] == summary["figures"]["rewardsAccuracy"]
    metrics = json.loads((Path(prefix) / "train" / "metrics.json").read_text())
    assert metrics["objective"] == "dpo" and metrics["figures"] == summary["figures"]

    adapter = tmp_path / "adapter"
    manifest.download_committed(summary["adapter"], adapter)
    before, after = _pair_margins(toy_base_dir, None, rows), _pair_margins(toy_base_dir, adapter, rows)
    assert _accuracy(before) == 0.5  # the reference itself: every pair a tie
    assert _accuracy(after) >= 0.9 and sum(after) > 0, after


@pytest.mark.slow
def test_kto_lora_trains_on_unpaired_examples(
    tmp_path: Path, toy_base_dir: Path, termination_log: Path
) -> None:
    run, prefix, _ = _train(tmp_path, toy_base_dir, "kto", termination_log)
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    assert summary["objective"] == "kto" and manifest.is_committed(f"{prefix}/model/adapter")
    assert set(summary["figures"]) == set(PROGRESS_FIGURES["kto"])
    assert summary["figures"]["rewardsChosen"] > summary["figures"]["rewardsRejected"]


@pytest.mark.slow
def test_grpo_is_rewarded_by_the_string_check_grader_at_every_step(
    tmp_path: Path, toy_base_dir: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTJ_LOGGING_STEPS", "1")
    run, prefix, _ = _train(
        tmp_path,
        toy_base_dir,
        "grpo",
        termination_log,
        hyperparameters={"maxSteps": 4, "batchSize": 2, "numGenerations": 4, "maxCompletionLength": 4},
        rewards=[{"grader": "exact", "weight": 1.0}],
        evaluation={"graders": [EXACT]},
    )
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    assert summary["objective"] == "grpo" and manifest.is_committed(f"{prefix}/model/adapter")
    assert {"reward", "completionLength"} <= set(summary["figures"])
    logged = {p["step"]: p for p in run.of("progress") if "reward" in p}
    assert set(logged) == {1, 2, 3, 4}, run.of("progress")
    assert all(0.0 <= p["reward"] <= 1.0 and p["completionLength"] >= 1 for p in logged.values())
    # batchSize counts prompts: 4 steps x 2 prompts of 64 = an eighth of an epoch (each with 4 completions)
    assert logged[4]["epoch"] == pytest.approx(8 / 64)


def test_reward_functions_score_completions_with_the_evaluation_grader(tmp_path: Path) -> None:
    spec = toy_config(
        str(tmp_path),
        "s3://b/base",
        objective="grpo",
        rewards=[{"grader": "exact", "weight": 0.5}],
        evaluation={"graders": [EXACT]},
    )
    functions, weights = reward_functions(parse_config(spec))
    assert weights == [0.5] and functions[0].__name__ == "exact"
    completions = [[{"role": "assistant", "content": " K "}], [{"role": "assistant", "content": "k"}], "K"]
    scores = functions[0](prompts=[[], [], []], completions=completions, expected=["K", "K", "K"])
    assert scores == [1.0, 0.0, 1.0]

    judge = {"url": "https://judge.example/v1", "model": "j", "rubric": "better?", "pairwise": True}
    spec["spec"]["rewards"] = [{"grader": "vs"}]
    spec["spec"]["evaluation"] = {"graders": [{"name": "vs", "type": "judge", "judge": judge}]}
    with pytest.raises(InvalidConfigError, match=r"spec.rewards\[0\].grader: vs is a pairwise judge"):
        reward_functions(parse_config(spec))


@pytest.mark.slow
def test_full_dpo_trains_against_a_frozen_reference(
    tmp_path: Path, toy_base_dir: Path, termination_log: Path
) -> None:
    run, prefix, _ = _train(tmp_path, toy_base_dir, "dpo", termination_log, method="full")
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    assert summary["merged"] == f"{prefix}/model/merged" and summary["adapter"] is None
    # a reference that moved with the policy would keep every implicit reward at 0
    figures = summary["figures"]
    assert figures["rewardsMargin"] > 0.1 and figures["rewardsAccuracy"] >= 0.9, figures


@pytest.mark.slow
def test_dpo_resumes_from_its_committed_checkpoint(
    tmp_path: Path, toy_base_dir: Path, termination_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, _, _ = _train(tmp_path / "straight", toy_base_dir, "dpo", termination_log)
    assert straight.exit_code == 0, straight.stdout[-3000:]

    calls = itertools.count(1)  # SIGTERM seen at the end of step 4 (the callback asks once per step)
    monkeypatch.setattr(checkpoints, "preemption_requested", lambda: next(calls) >= 4)
    termination_log.unlink()
    stopped, prefix, _ = _train(tmp_path / "resumed", toy_base_dir, "dpo", termination_log)
    assert stopped.exit_code == 21 and stopped.termination["summary"]["step"] == 4, stopped.stdout[-3000:]
    assert manifest.is_committed(f"{prefix}/checkpoints/step-00000004")

    monkeypatch.setattr(checkpoints, "preemption_requested", lambda: False)
    termination_log.unlink()
    resumed, _, _ = _train(tmp_path / "resumed", toy_base_dir, "dpo", termination_log)
    assert resumed.exit_code == 0, resumed.stdout[-3000:]
    assert resumed.of("resume") and resumed.of("resume")[0]["step"] == 4
    assert resumed.of("progress")[0]["step"] == 4
    final, reference = resumed.termination["summary"], straight.termination["summary"]
    assert final["step"] == 8
    assert final["loss"] == pytest.approx(reference["loss"], rel=1e-3)
    assert final["figures"] == pytest.approx(reference["figures"], rel=1e-3, abs=1e-4)


def _dpo_subprocess(tmp_path: Path, base: Path, batch: int, nproc: int, **spec: Any) -> dict[str, Any]:
    """`train` (dpo, 6 steps, a loss each) as the pod runs it: the CLI relaunches itself under torchrun."""
    prefix = _prefix(tmp_path)
    commit_objective_data(f"{prefix}/data", "dpo")
    hp = {"maxSteps": 6, "batchSize": batch, **spec.pop("hyperparameters", {})}
    config = toy_config(prefix, str(base), objective="dpo", hyperparameters=hp, **spec)
    env = {
        **os.environ,
        "FTJ_CONFIG": json.dumps(config),
        "FTJ_LOGGING_STEPS": "1",
        "FTJ_WORKDIR": str(tmp_path / "ws"),
        "FTJ_TERMINATION_LOG": str(tmp_path / "termination-log"),
        "FTJ_NPROC_PER_NODE": str(nproc),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return dict(json.loads((Path(prefix) / "train" / "metrics.json").read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_on_two_ranks_matches_one_process(tmp_path: Path, toy_base_dir: Path, method: str) -> None:
    """2 gloo ranks x 4 pairs take the same steps as 1 process x 8 pairs: the same DPO loss, reward accuracy
    and margin at every step (means over the global batch). LoRA runs DDP; full runs FSDP full-shard, its
    frozen reference prepared by TRL beside the sharded policy."""
    spec: dict[str, Any] = {"method": method, "checkpoint": {"everySteps": 3, "keep": 3}}
    if method == "full":
        spec["hyperparameters"] = {"learningRate": 1e-3, "strategy": "fsdp"}
    one = _dpo_subprocess(tmp_path / "one", toy_base_dir, 8, 1, **spec)
    two = _dpo_subprocess(tmp_path / "two", toy_base_dir, 4, 2, **spec)
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        a = [e[key] for e in one["logHistory"] if key in e]
        b = [e[key] for e in two["logHistory"] if key in e]
        assert len(a) == len(b) == 6, (key, a, b)
        assert b == pytest.approx(a, rel=1e-3, abs=1e-5), key
    assert one["figures"] == pytest.approx(two["figures"], rel=1e-3, abs=1e-5)
    assert two["figures"]["rewardsMargin"] > 0  # it learned: the comparison means something
    if method == "full":  # the sharded run really sharded: FSDP's whole-tensor files in its checkpoint
        ckpt = Path(_prefix(tmp_path / "two")) / "checkpoints" / "step-00000003"
        assert "pytorch_model_fsdp.bin" in {p.name for p in ckpt.iterdir()}
