"""Graders, safety and retention in the evaluate stage, end to end through the CLI on the toy LoRA run
(toy_fixtures.lora_pipeline) with the deterministic judge (tests/judge_server.py) on loopback.

The toy task's answer is one upper-case letter; the tuned adapter gets it right (exact match >= 0.95), the
base model does not. The judge scores an answer high when it equals the reference, so a judge grader must
agree with exact_match for every model; its pairwise mode must prefer tuned. The retention set is the base
model's pre-training task ("find:" the letter, case kept) on lower-case letters: tuning on "shout:" (upper
case) bleeds into it, so the tuned model's loss there rises above the base model's, and the drop is reported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ..judge_server import JudgeServer
from .conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY
from .toy_fixtures import StageRun, environment, lora_pipeline, run_stage, toy_base_dir, toy_config

__all__ = ["lora_pipeline", "toy_base_dir"]

pytestmark = pytest.mark.slow

KEY = "sk-relevance-judge-key-0123456789abcdef"
SAFETY_KEY = "sk-safety-judge-key-0123456789abcdef"


def _env(moto_endpoint: str, tmp_path: Path) -> dict[str, str | None]:
    return {
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
        "FTJ_JUDGE_API_KEY_RELEVANCE": KEY,
        "FTJ_SAFETY_JUDGE_API_KEY": SAFETY_KEY,
    }


def _evaluate(pipeline: dict[str, Any], tmp_path: Path, name: str, evaluation: dict[str, Any]) -> StageRun:
    """Evaluate the pipeline's trained adapter again, under a fresh run prefix, with ``evaluation``."""
    from finetune_trainer import manifest, storage

    prefix, bucket = pipeline["prefix"], pipeline["prefix"].removeprefix("s3://").split("/", 1)[0]
    run_prefix = f"s3://{bucket}/runs/team-a/toy/uid-{name}"
    for part, kind in (("data", "dataset"), ("model/adapter", "adapter")):
        local = tmp_path / part.replace("/", "-")
        manifest.download_committed(f"{prefix}/{part}", local)
        manifest.commit_dir(local, f"{run_prefix}/{part}", kind=kind)
    test = [json.loads(x) for x in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    general = [
        {
            "messages": [
                {"role": "user", "content": r["messages"][0]["content"].replace("shout:", "find:")},
                {"role": "assistant", "content": r["messages"][1]["content"].lower()},
            ]
        }
        for r in test
    ]
    storage.write_text(
        f"s3://{bucket}/sets/{name}/general.jsonl", "".join(json.dumps(r) + "\n" for r in general)
    )
    red_team = [{"prompt": test[i]["messages"][0]["content"]} for i in range(5)]
    red_team += [{"messages": [test[i]["messages"][0]]} for i in range(5, 10)]
    storage.write_text(
        f"s3://{bucket}/sets/{name}/redteam.jsonl", "".join(json.dumps(r) + "\n" for r in red_team)
    )
    for key in ("retention", "safety"):
        if key in evaluation:
            field = "dataset" if key == "retention" else "prompts"
            file = "general.jsonl" if key == "retention" else "redteam.jsonl"
            evaluation[key] = {**evaluation[key], field: f"s3://{bucket}/sets/{name}/{file}"}
    config = toy_config(run_prefix, f"s3://{bucket}/models/toy-llama", evaluation=evaluation)
    config["referencePolicy"] = {"allowPlainHttpHosts": ["127.0.0.1"]}
    run = run_stage("evaluate", config, tmp_path / "termination")
    if run.exit_code == 0:
        manifest.download_committed(f"{run_prefix}/evaluation", tmp_path / "eval")
    return run


def test_graders_safety_and_retention_in_the_evaluate_stage(
    lora_pipeline: dict[str, Any], moto_endpoint: str, tmp_path: Path
) -> None:
    with JudgeServer(unsafe_pattern=r"^[A-Z]$") as judge, environment(**_env(moto_endpoint, tmp_path)):
        judge_spec = {"url": judge.url, "model": "toy-judge", "rubric": "Is the letter right?"}
        run = _evaluate(
            lora_pipeline,
            tmp_path,
            "graded",
            {
                "metrics": ["loss", "exact_match"],  # token_f1 (the serving check's figure) is not asked for
                "graders": [
                    {
                        "name": "label-only",
                        "type": "stringCheck",
                        "stringCheck": {"operation": "regex", "pattern": "^[A-Z]$"},
                    },
                    {"name": "echo", "type": "stringCheck", "stringCheck": {"operation": "equals"}},
                    {"name": "relevance", "type": "judge", "judge": judge_spec},
                    {"name": "preference", "type": "judge", "judge": {**judge_spec, "pairwise": True}},
                ],
                "thresholds": [{"metric": "relevance", "min": 0.7}],
                "safety": {"judge": {"url": judge.url, "model": "toy-judge"}, "maxUnsafeRate": 0.0},
                "retention": {"metric": "loss", "maxDrop": 0.05},
            },
        )
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    tuned, base = summary["tuned"], summary["base"]
    assert tuned["exact_match"] >= 0.9 > base["exact_match"], summary
    # The judge scores "equals the reference" 10 of 10, else 1 of 10: normalised, that is exact match.
    assert (
        tuned["relevance"] == pytest.approx(tuned["exact_match"]) and base["relevance"] == base["exact_match"]
    )
    assert tuned["echo"] == tuned["exact_match"] and base["echo"] == base["exact_match"]
    assert tuned["label-only"] >= 0.9
    assert tuned["preference"] > 0.8 and base["preference"] == pytest.approx(
        1 - tuned["preference"], abs=1e-5
    )
    assert "token_f1" in tuned and "token_f1" not in base  # the serving check has its evaluated figure
    assert (
        summary["safety"]["prompts"] == 10 and summary["safety"]["tuned"] >= 0.9 > summary["safety"]["base"]
    )
    retention = summary["retention"]
    assert retention["metric"] == "loss" and retention["examples"] == 40
    assert retention["tuned"] > retention["base"] and retention["drop"] > 0.05, retention
    assert retention["drop"] == pytest.approx(
        (retention["tuned"] - retention["base"]) / retention["base"], rel=1e-3
    )
    assert "graderErrors" not in summary and summary["champion"] is None
    assert summary["reportUri"].endswith("/uid-graded/evaluation/report.html")

    rows = [json.loads(x) for x in (tmp_path / "eval" / "report.jsonl").read_text().splitlines()]
    assert len(rows) == summary["n"] == 40 and (tmp_path / "eval" / "report.html").is_file()
    row = rows[0]
    assert set(row) == {"index", "input", "expected", "outputs", "scores", "reasons"}
    assert set(row["outputs"]) == {"tuned", "base"} and row["input"][-1]["role"] == "user"
    assert set(row["scores"]["tuned"]) == {"exact_match", "label-only", "echo", "relevance", "preference"}
    assert row["reasons"]["tuned"]["relevance"] in ("good", "not good")
    mean = sum(r["scores"]["tuned"]["relevance"] for r in rows) / len(rows)
    assert mean == pytest.approx(tuned["relevance"], abs=1e-5)

    # Every judge call greedy; each key only on its own judge's requests; no key in the logs.
    assert judge.requests and all(r["body"]["temperature"] == 0 for r in judge.requests)
    auth = {
        kind: {r["headers"].get("Authorization") for r in judge.requests if kind(r)}
        for kind in (
            lambda r: "safety reviewer" in r["body"]["messages"][0]["content"],
            lambda r: "two answers" in r["body"]["messages"][0]["content"],
        )
    }
    assert list(auth.values()) == [{f"Bearer {SAFETY_KEY}"}, {None}]
    pointwise = [r for r in judge.requests if "one answer" in r["body"]["messages"][0]["content"]]
    assert len(pointwise) == 80 and {r["headers"].get("Authorization") for r in pointwise} == {
        f"Bearer {KEY}"
    }
    assert KEY not in run.stdout and SAFETY_KEY not in run.stdout
    [graded] = run.of("graded")  # the wall time judging added, for the operator's log readers
    assert graded["graderErrors"] == {} and graded["seconds"] >= 0


def test_a_judge_whose_verdicts_are_unusable_fails_the_stage_naming_the_grader(
    lora_pipeline: dict[str, Any], moto_endpoint: str, tmp_path: Path
) -> None:
    with JudgeServer(garbage_word="") as judge, environment(**_env(moto_endpoint, tmp_path)):
        run = _evaluate(
            lora_pipeline,
            tmp_path,
            "garbage",
            {
                "metrics": ["exact_match"],
                "graders": [
                    {
                        "name": "relevance",
                        "type": "judge",
                        "judge": {"url": judge.url, "model": "j", "rubric": "r"},
                    }
                ],
            },
        )
    assert run.exit_code == 11, run.stdout[-3000:]
    text = json.dumps(run.termination)
    assert "grader relevance: 80 of 80 verdicts failed" in text, text
    assert len(judge.requests) == 160  # each verdict asked twice
