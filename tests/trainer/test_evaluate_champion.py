"""Champion/challenger in the evaluate stage (ModelServer, issue 11): with `champion` in its config, evaluate
scores the serving champion's adapter on this job's held-out set beside the tuned model and its base, and the
summary, report and predictions carry all three.

The challenger is the toy LoRA adapter the session's pipeline trained (toy_fixtures.lora_pipeline); the
champion is a freshly initialised LoRA adapter of the same shape (peft zero-initialises lora_B), which answers
exactly like the base model. So the champion's figures must equal the base's and fall well short of the
tuned model's: scoring the tuned adapter twice, or the base under the champion's name, both fail here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from .toy_fixtures import environment, lora_pipeline, run_stage, toy_base_dir, toy_config

__all__ = ["lora_pipeline", "toy_base_dir"]

pytestmark = pytest.mark.slow


def untrained_adapter(base_dir: Path, like: Path, out: Path) -> None:
    """A LoRA adapter shaped like `like` whose update is zero (lora_B initialised to 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig.from_pretrained(str(like))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.save_pretrained(out)


def test_evaluate_scores_the_serving_champion_beside_tuned_and_base(
    lora_pipeline: dict[str, Any], moto_endpoint: str, tmp_path: Path
) -> None:
    from finetune_trainer import manifest

    pipeline = lora_pipeline
    bucket = pipeline["prefix"].removeprefix("s3://").split("/", 1)[0]
    env = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_PROFILE": None,
        "FTJ_WORKDIR": str(tmp_path / "workspace"),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "FTJ_CONFIG": None,
        "FTJ_TERMINATION_LOG": str(tmp_path / "termination"),
    }
    prefix = pipeline["prefix"]
    champion_uri = f"s3://{bucket}/runs/team-a/bot-v1/uid-v1/model/adapter"
    with environment(**env):
        untrained_adapter(pipeline["base"], pipeline["local"]["adapter"], tmp_path / "champion")
        manifest.commit_dir(tmp_path / "champion", champion_uri, kind="adapter")
        # A second evaluation of the pipeline's run, under its own prefix (the first is committed).
        challenger = f"s3://{bucket}/runs/team-a/toy/uid-challenger"
        for part, kind in (("data", "dataset"), ("model/adapter", "adapter")):
            local = tmp_path / part.replace("/", "-")
            manifest.download_committed(f"{prefix}/{part}", local)
            manifest.commit_dir(local, f"{challenger}/{part}", kind=kind)
        config = toy_config(challenger, f"s3://{bucket}/models/toy-llama")
        config["champion"] = {"name": "bot-v1", "adapter": champion_uri}
        run = run_stage("evaluate", config, tmp_path / "termination")
        assert run.exit_code == 0, run.stdout[-3000:]
        manifest.download_committed(f"{challenger}/evaluation", tmp_path / "eval")

    summary = run.termination["summary"]
    tuned, base, champion = summary["tuned"], summary["base"], summary["champion"]
    assert summary["championName"] == "bot-v1" and summary["n"] == 40
    assert set(champion) == set(tuned) == {"loss", "perplexity", "exact_match", "token_f1", "rouge_l"}
    # The champion (a zero update) answers like the base model, not like the tuned adapter.
    assert champion["exact_match"] == base["exact_match"], summary
    assert champion["loss"] == pytest.approx(base["loss"], rel=1e-3), summary
    assert tuned["exact_match"] >= champion["exact_match"] + 0.3, summary
    assert tuned["loss"] < champion["loss"], summary

    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["summary"] == summary
    predictions = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {"tuned", "base", "champion"} <= set(predictions[0])
    assert [p["champion"] for p in predictions] == [p["base"] for p in predictions]
    # the champion's exact match is the share of its predictions equal to the expected answer
    hits = sum(p["champion"] == p["expected"] for p in predictions)
    assert hits / len(predictions) == pytest.approx(champion["exact_match"])
    assert "| metric | tuned | base | champion |" in (tmp_path / "eval" / "report.md").read_text()
