"""LoRA on the toy task through the real CLI, everything on S3 (moto server): train -> evaluate -> export.

One module-scoped pipeline run; the tests check what a user and the operator rely on: the committed
checkpoints, adapter, metrics and reports; progress lines; the tuned model beating its base; the merged
export answering like the adapter.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from finetune_demo import toymodel

from .conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from .toy_fixtures import lora_pipeline, toy_base_dir

__all__ = ["lora_pipeline", "toy_base_dir"]

pytestmark = pytest.mark.slow

# ceil(300 examples / batches of 8) x 6 epochs = 228
STEPS = toymodel.toy_train_steps(toymodel.ToyTaskParams().train_examples)


def test_train_commits_checkpoints_adapter_and_metrics_on_s3(lora_pipeline: dict[str, Any]) -> None:
    run = lora_pipeline["runs"]["train"]
    assert run.exit_code == 0, run.stdout[-3000:]
    term = run.termination
    assert term["stage"] == "train" and term["reason"] == "OK"
    prefix = lora_pipeline["prefix"]
    assert term["summary"] == {
        "step": STEPS,
        "totalSteps": STEPS,
        "loss": pytest.approx(term["summary"]["loss"]),
        "adapter": f"{prefix}/model/adapter",
        "merged": None,
        "loraRank": 8,
    }
    assert STEPS == 228
    assert term["summary"]["loss"] < 0.5  # the base starts near 4 on this task

    run_keys = [k.split("uid-toy/", 1)[1] for k in lora_pipeline["keys"]]
    # checkpoints every 20 steps (and at the end), the newest 2 kept, each committed with a manifest and
    # holding what resuming needs
    for step in (STEPS // 20 * 20, STEPS):
        ckpt = f"checkpoints/step-{step:08d}/"
        for name in (
            "MANIFEST.json",
            "adapter_model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
        ):
            assert ckpt + name in run_keys, (ckpt + name, run_keys)
    assert not [k for k in run_keys if k.endswith("training_args.bin")], (
        "a full pickle must never be uploaded"
    )
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "MANIFEST.json"):
        assert f"model/adapter/{name}" in run_keys
    assert {"train/metrics.json", "train/loss.png", "train/MANIFEST.json"} <= set(run_keys)

    m = lora_pipeline["adapter_manifest"]
    assert m.kind == "adapter" and m.step == STEPS
    assert m.hyperparameters["lora"]["rank"] == 8 and m.hyperparameters["method"] == "lora"
    assert m.base_model["uri"].endswith("/models/toy-llama") and m.base_model["revision"].startswith("s3:")
    assert "transformers" in m.libraries and "peft" in m.libraries
    assert {f.path for f in m.files} >= {"adapter_config.json", "adapter_model.safetensors"}

    metrics = json.loads((lora_pipeline["train_dir"] / "metrics.json").read_text())
    assert (
        metrics["step"] == STEPS
        and metrics["tokens"] > 0
        and metrics["finalLoss"] == pytest.approx(term["summary"]["loss"], abs=1e-6)
    )
    assert (lora_pipeline["train_dir"] / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_is_loadable_by_vllm_lora_modules(lora_pipeline: dict[str, Any]) -> None:
    from safetensors import safe_open

    adapter = lora_pipeline["local"]["adapter"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and not cfg.get("modules_to_save")
    # all-linear: every projection of every layer, never the output head or the embeddings
    assert {m.rsplit(".", 1)[-1] for m in cfg["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    base_cfg = json.loads((lora_pipeline["base"] / "config.json").read_text())
    tok = json.loads((adapter / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) + 0 <= base_cfg["vocab_size"]  # no resized embeddings


def test_progress_lines_follow_the_contract(lora_pipeline: dict[str, Any]) -> None:
    progress = lora_pipeline["runs"]["train"].of("progress")
    assert len(progress) >= STEPS // 5, "one line per logging step at least"
    for line in progress:
        assert {
            "step",
            "totalSteps",
            "epoch",
            "loss",
            "learningRate",
            "tokensPerSecond",
            "etaSeconds",
        } <= set(line)
        assert line["totalSteps"] == STEPS
    steps = [p["step"] for p in progress]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == STEPS
    last = progress[-1]
    assert (
        last["tokensPerSecond"] > 0
        and last["etaSeconds"] == 0
        and last["loss"] > 0
        and last["learningRate"] >= 0
    )


def test_tuned_model_beats_base_on_exact_match(lora_pipeline: dict[str, Any]) -> None:
    run = lora_pipeline["runs"]["evaluate"]
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    assert summary["n"] == 40
    tuned, base = summary["tuned"], summary["base"]
    assert set(tuned) == {"loss", "perplexity", "exact_match", "token_f1", "rouge_l"}
    assert tuned["exact_match"] >= 0.95 and tuned["exact_match"] >= base["exact_match"] + 0.3, summary
    assert tuned["loss"] < base["loss"] and tuned["perplexity"] < base["perplexity"]
    assert summary["reference"] is None

    out = lora_pipeline["eval_dir"]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"] == summary
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 40 and {"prompt", "expected", "tuned", "base"} <= set(predictions[0])
    # the reported exact match is the share of predictions equal to the expected answer
    assert sum(p["tuned"] == p["expected"] for p in predictions) / 40 == pytest.approx(tuned["exact_match"])
    assert "| exact_match |" in (out / "report.md").read_text()
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"


def test_export_merges_adapter_into_base(lora_pipeline: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = lora_pipeline["runs"]["export"]
    assert run.exit_code == 0, run.stdout[-3000:]
    assert run.termination["summary"] == {"merged": f"{lora_pipeline['prefix']}/model/merged"}
    merged_dir, adapter_dir = lora_pipeline["local"]["merged"], lora_pipeline["local"]["adapter"]
    assert (merged_dir / "model.safetensors").is_file() and not list(merged_dir.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(lora_pipeline["base"]), str(adapter_dir)
    )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "shout: 1 2 q 3"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        torch.testing.assert_close(merged(**ids).logits, adapted(**ids).logits, atol=1e-4, rtol=1e-4)


def test_credentials_never_reach_logs_or_termination(lora_pipeline: dict[str, Any]) -> None:
    for run in lora_pipeline["runs"].values():
        for text in (run.stdout, json.dumps(run.termination)):
            assert FAKE_SECRET_KEY not in text and FAKE_ACCESS_KEY not in text
