"""Evaluation of the preference and reward objectives (issue 23): preference_accuracy and reward_margin for
dpo and kto from the implicit reward beta * (log pi - log pi_ref), the base (adapter disabled) being the
reference, and grpo's `reward`, the weighted mean of its reward graders.

The stage tests run the evaluate stage through the CLI on the toy task (finetune_demo.toymodel): the chosen
answer is the right upper-case letter ("K"), the rejected one the same letter in lower case ("k", what the
toy base's pre-training answers). The tuned model is a LoRA adapter given 40 plain optimizer steps toward
the chosen answers here (the train stage's dpo is part `train`'s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import S3Bucket
from .toy_fixtures import StageRun, run_stage, toy_base_dir, toy_config

__all__ = ["toy_base_dir"]


# --- the rules, on plain numbers ----------------------------------------------------------------------------


def test_accuracy_counts_ties_as_half_and_kto_reads_the_sign_against_the_label() -> None:
    from finetune_trainer.preference_eval import preference_metrics

    dpo = [
        {"chosen": 1.0, "rejected": 0.5},
        {"chosen": 0.2, "rejected": 0.2},
        {"chosen": -1.0, "rejected": 0.0},
    ]
    assert preference_metrics(dpo) == {
        "preference_accuracy": 0.5,
        "reward_margin": pytest.approx((0.5 + 0 - 1) / 3, abs=1e-6),
    }
    # kto: desirable right when its reward is > 0, undesirable when < 0, a zero reward is a tie
    kto = [{"chosen": 0.2}, {"chosen": 0.0}, {"rejected": -0.3}, {"rejected": 0.1}]
    assert preference_metrics(kto) == {
        "preference_accuracy": pytest.approx((1 + 0.5 + 1 + 0) / 4),
        "reward_margin": pytest.approx((0.2 + 0.0) / 2 - (-0.3 + 0.1) / 2, abs=1e-6),
    }


def test_a_test_set_line_not_in_the_objectives_form_is_invalid_data_naming_the_line(tmp_path: Path) -> None:
    from finetune_trainer.exitcodes import InvalidDataError
    from finetune_trainer.formats import read_canonical

    user = [{"role": "user", "content": "shout: 1 k"}]
    path = tmp_path / "test.jsonl"
    lines = [
        {"prompt": user, "chosen": "K", "rejected": "k"},
        {"messages": [*user, {"role": "assistant", "content": "K"}]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(InvalidDataError, match=r"test\.jsonl line 2"):
        read_canonical(path, "dpo")
    path.write_text(json.dumps({"prompt": user, "completion": "K", "label": "yes"}) + "\n")
    with pytest.raises(InvalidDataError, match=r"test\.jsonl line 1.*label"):
        read_canonical(path, "kto")


def test_grpo_reward_is_the_weighted_mean_of_the_reward_graders_per_example() -> None:
    from finetune_trainer.config import parse_config
    from finetune_trainer.graders import Graded
    from finetune_trainer.grading import Judged, model_maps

    config = parse_config(
        {
            "runPrefix": "/tmp/run",
            "spec": {
                "baseModel": {"uri": "hf://org/tiny"},
                "dataset": {"train": "s3://b/t.jsonl", "format": "prompt-only"},
                "objective": "grpo",
                "rewards": [{"grader": "exact", "weight": 3}, {"grader": "judged"}],
                "evaluation": {
                    "metrics": ["exact_match"],
                    "graders": [
                        {"name": "exact", "type": "stringCheck", "stringCheck": {"operation": "equals"}},
                        {"name": "shape", "type": "stringCheck", "stringCheck": {"operation": "contains"}},
                        {
                            "name": "judged",
                            "type": "judge",
                            "judge": {"url": "https://judge.example/v1", "model": "j", "rubric": "right?"},
                        },
                    ],
                },
            },
        }
    )
    judged = Judged(
        graded={
            "exact": Graded(scores={"tuned": [1, 1, 0, 1], "base": [0, 0, 0, 1]}),
            "shape": Graded(scores={"tuned": [0, 0, 0, 0], "base": [1, 1, 1, 1]}),  # not a reward
            "judged": Graded(scores={"tuned": [0.5, 1, 0, 0.5], "base": [0, 0.5, 0, 0]}),
        }
    )
    results = {"tuned": {"exact_match": 0.75}, "base": {"exact_match": 0.25}, "reference": {"error": "down"}}
    maps = model_maps(config, results, judged, ["K"] * 4, ["K"] * 4)
    assert maps["tuned"]["reward"] == pytest.approx(((3 + 0.5) + (3 + 1) + 0 + (3 + 0.5)) / 4 / 4)
    assert maps["base"]["reward"] == pytest.approx((0 + 0.5 + 0 + 3) / 4 / 4)
    assert maps["tuned"]["exact"] == 0.75 and maps["tuned"]["judged"] == 0.5  # each grader's own mean too
    assert "reward" not in maps["reference"]
    # the gate's default figure is the reward; the serving check re-runs the deterministic reward grader
    assert config.spec.deciding_metric == "reward" and config.spec.serving_check_metric == "exact"


def test_objective_figures_are_gateable_only_for_the_objectives_that_measure_them() -> None:
    from finetune_trainer.config import parse_config
    from finetune_trainer.exitcodes import InvalidConfigError

    def spec(objective: str, **evaluation: Any) -> dict[str, Any]:
        return {
            "runPrefix": "/tmp/run",
            "spec": {
                "baseModel": {"uri": "hf://org/tiny"},
                "dataset": {"train": "s3://b/t.jsonl"},
                "objective": objective,
                "evaluation": evaluation,
            },
        }

    dpo = parse_config(spec("dpo", thresholds=[{"metric": "reward_margin", "min": 0}])).spec
    assert dpo.deciding_metric == "reward_margin"  # a threshold's metric still comes first
    kto = parse_config(spec("kto")).spec
    assert kto.deciding_metric == "preference_accuracy" and kto.serving_check_metric == "token_f1"
    assert parse_config(spec("sft")).spec.deciding_metric == "loss"
    with pytest.raises(InvalidConfigError) as refused:
        parse_config(spec("sft", thresholds=[{"metric": "preference_accuracy", "min": 0.9}]))
    assert (
        "spec.evaluation.thresholds[0].metric: preference_accuracy is measured only by objective dpo or kto"
        in (str(refused.value))
    )
    with pytest.raises(InvalidConfigError, match=r"primaryMetric: reward is measured only by objective grpo"):
        parse_config(spec("dpo", primaryMetric="reward"))


def test_report_rows_carry_the_rejected_side_and_tuned_rewards_and_the_page_shows_them() -> None:
    from finetune_trainer import report
    from finetune_trainer.grading import with_rewards
    from finetune_trainer.preference_eval import Pair

    user = [{"role": "user", "content": "shout: 1 k"}]
    rows = [{"index": 0, "input": user, "expected": "K", "outputs": {"tuned": "K"}, "scores": {}}]
    pairs = [Pair(user, "K", None), Pair(user, None, "<b>k</b>")]  # kto: one desirable, one undesirable
    out = with_rewards(rows, pairs, [{"chosen": 0.25}, {"rejected": -0.5}])
    assert out[0]["rewards"] == {"chosen": 0.25} and "rejected" not in out[0]
    assert out[1] == {
        "index": 1,
        "input": user,
        "expected": "",
        "outputs": {},
        "scores": {},
        "rejected": "<b>k</b>",
        "rewards": {"rejected": -0.5},
    }
    page = report.examples_table(out)
    for key in ("rejected", "reward.chosen", "reward.rejected"):
        assert f'data-key="{key}"' in page
    assert "&lt;b&gt;k&lt;/b&gt;" in page and "<b>k</b>" not in page
    assert 'data-v="-0.5">-0.5000<' in page and 'data-v="0.25">0.2500<' in page
    assert 'data-key="reward.chosen"' not in report.examples_table(rows)  # not a preference task


# --- the evaluate stage on the toy task ---------------------------------------------------------------------

TRAIN_STEPS = 40


def _pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat examples of the toy task as preference pairs: chosen the right answer, rejected its lower case."""
    out = []
    for row in rows:
        prompt, answer = row["messages"][:-1], row["messages"][-1]["content"]
        out.append({"prompt": prompt, "chosen": answer, "rejected": answer.lower()})
    return out


@pytest.fixture(scope="module")
def toy_pairs() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from finetune_demo import toymodel

    train, test = toymodel.toy_task(toymodel.ToyTaskParams(train_examples=160, test_examples=24))
    return _pairs(train), _pairs(test)


def _tune(base_dir: Path, pairs: list[dict[str, Any]], out: Path, *, lora: bool) -> Path:
    """TRAIN_STEPS plain AdamW steps of NLL on the chosen answers: a LoRA adapter, or all the weights."""
    import torch
    from finetune_trainer.generation import _answer_row
    from finetune_trainer.modeling import load_tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=5e-3 if lora else 1e-3
    )
    batch = 8
    model.train()
    for step in range(TRAIN_STEPS):
        start = step * batch % len(pairs)
        rows = [_answer_row(tokenizer, p["prompt"], p["chosen"]) for p in pairs[start : start + batch]]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in rows])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tuned_adapter(
    toy_base_dir: Path, toy_pairs: tuple[list[dict[str, Any]], list[dict[str, Any]]], tmp_path_factory: Any
) -> Path:
    return _tune(toy_base_dir, toy_pairs[0], tmp_path_factory.mktemp("tuned-adapter"), lora=True)


def _evaluate(
    s3: S3Bucket,
    tmp_path: Path,
    base_dir: Path,
    adapter: Path,
    test_rows: list[dict[str, Any]],
    **spec: Any,
) -> tuple[StageRun, dict[str, Any], Path]:
    """Commit the test set and the adapter as validate and train would, and run evaluate; returns the run,
    its config and the downloaded evaluation directory."""
    from finetune_trainer import manifest, storage

    storage.upload_dir(base_dir, s3.uri("models/toy"), exclude=["READY"])
    prefix = s3.uri("runs/team-a/toy/uid-pref")
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows))
    manifest.commit_dir(data, f"{prefix}/data", kind="dataset")
    model = "merged" if spec.get("method") == "full" else "adapter"
    manifest.commit_dir(adapter, f"{prefix}/model/{model}", kind=model)
    config = toy_config(prefix, s3.uri("models/toy"), **spec)
    run = run_stage("evaluate", config, tmp_path / "termination-log")
    if run.exit_code == 0:
        manifest.download_committed(f"{prefix}/evaluation", tmp_path / "evaluation")
    return run, config, tmp_path / "evaluation"


@pytest.mark.slow
def test_dpo_evaluation_prefers_chosen_after_tuning_and_the_gate_reads_it(
    s3: S3Bucket,
    tmp_path: Path,
    toy_base_dir: Path,
    tuned_adapter: Path,
    toy_pairs: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    from finetune_trainer import tracking
    from finetune_trainer.config import parse_config

    run, config, out = _evaluate(
        s3,
        tmp_path,
        toy_base_dir,
        tuned_adapter,
        toy_pairs[1],
        objective="dpo",
        dataset={"train": "toy://train.jsonl", "format": "preference"},
        evaluation={"maxNewTokens": 4, "batchSize": 24, "metrics": ["loss", "exact_match"]},
    )
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    tuned, base = summary["tuned"], summary["base"]
    # The base is the reference: every implicit reward is 0, every pair a tie.
    assert base["preference_accuracy"] == 0.5 and base["reward_margin"] == 0.0
    assert tuned["preference_accuracy"] >= 0.9 and tuned["reward_margin"] > 0, tuned
    # Generation metrics compare with the chosen side: the tuned model says "K", the base does not.
    assert tuned["exact_match"] > base["exact_match"] and tuned["loss"] < base["loss"]
    report = json.loads((out / "report.json").read_text())
    assert report["primaryMetric"] == "preference_accuracy" and report["objective"] == "dpo"
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert len(rows) == len(toy_pairs[1]) and rows[0]["rejected"] == toy_pairs[1][0]["rejected"]
    margins = [r["rewards"]["chosen"] - r["rewards"]["rejected"] for r in rows]
    assert sum(margins) / len(margins) == pytest.approx(tuned["reward_margin"], abs=1e-5)
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    assert wins == pytest.approx(tuned["preference_accuracy"])
    assert 'data-key="reward.chosen"' in (out / "report.html").read_text()

    # The operator's gate rule, as the evaluator applies it before registering a model.
    def gate(threshold: float) -> Any:
        doc = json.loads(json.dumps(config))
        doc["spec"]["evaluation"]["thresholds"] = [{"metric": "preference_accuracy", "min": threshold}]
        return tracking.gate_decision(parse_config(doc), tuned, base, summary)

    unreachable = gate(1.01)
    assert not unreachable.passed and unreachable.failed == ("threshold",)
    assert (
        unreachable.failed_reasons[0].startswith("preference_accuracy")
        and "minimum 1.01" in (unreachable.failed_reasons[0])
    )
    reachable = gate(0.5)
    assert reachable.passed and any("vs base 0.5" in r for r in reachable.reasons), reachable.reasons


@pytest.mark.slow
def test_kto_accuracy_reads_each_examples_label(
    s3: S3Bucket,
    tmp_path: Path,
    toy_base_dir: Path,
    tuned_adapter: Path,
    toy_pairs: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    """Half the examples carry the right answer labelled desirable, half the wrong one labelled undesirable:
    only a reading of the labels gives the tuned model an accuracy above 1/2 (by sign alone: about 1/2)."""
    test = [
        {"prompt": p["prompt"], "completion": p["chosen"], "label": True}
        if i % 2 == 0
        else {"prompt": p["prompt"], "completion": p["rejected"], "label": False}
        for i, p in enumerate(toy_pairs[1])
    ]
    run, _, out = _evaluate(
        s3,
        tmp_path,
        toy_base_dir,
        tuned_adapter,
        test,
        objective="kto",
        dataset={"train": "toy://train.jsonl", "format": "unpaired-preference"},
        hyperparameters={"beta": 0.5},
        evaluation={"maxNewTokens": 4, "batchSize": 24, "metrics": ["exact_match"]},
    )
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    tuned, base = summary["tuned"], summary["base"]
    assert base["preference_accuracy"] == 0.5 and base["reward_margin"] == 0.0
    assert tuned["preference_accuracy"] >= 0.9 and tuned["reward_margin"] > 0, tuned
    desirable = len([t for t in test if t["label"]])
    assert summary["n"] == desirable  # answers are compared with the desirable completions only
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text().splitlines()]
    assert [set(r["rewards"]) for r in rows] == [{"chosen"}] * desirable + [{"rejected"}] * (
        len(test) - desirable
    )
    assert [bool(r["outputs"]) for r in rows] == [True] * desirable + [False] * (len(test) - desirable)


@pytest.mark.slow
def test_grpo_evaluation_reports_the_weighted_reward_for_tuned_and_base(
    s3: S3Bucket,
    tmp_path: Path,
    toy_base_dir: Path,
    tuned_adapter: Path,
    toy_pairs: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    test = [{"prompt": p["prompt"], "expected": p["chosen"]} for p in toy_pairs[1]]
    graders = [
        {"name": "exact", "type": "stringCheck", "stringCheck": {"operation": "equals"}},
        {"name": "upper", "type": "stringCheck", "stringCheck": {"operation": "regex", "pattern": "^[A-Z]$"}},
    ]
    run, _, out = _evaluate(
        s3,
        tmp_path,
        toy_base_dir,
        tuned_adapter,
        test,
        objective="grpo",
        dataset={"train": "toy://train.jsonl", "format": "prompt-only"},
        rewards=[{"grader": "exact", "weight": 3.0}, {"grader": "upper", "weight": 1.0}],
        evaluation={"maxNewTokens": 4, "batchSize": 24, "metrics": ["exact_match"], "graders": graders},
    )
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    for model in ("tuned", "base"):
        scores = summary[model]
        assert scores["reward"] == pytest.approx((3 * scores["exact"] + scores["upper"]) / 4, abs=1e-5)
        assert scores["exact"] == pytest.approx(scores["exact_match"])  # expected is what "exact" compares
    assert summary["tuned"]["reward"] > summary["base"]["reward"], summary
    assert json.loads((out / "report.json").read_text())["primaryMetric"] == "reward"


@pytest.mark.slow
def test_full_fine_tuning_is_scored_against_the_base_weights(
    s3: S3Bucket,
    tmp_path: Path,
    toy_base_dir: Path,
    toy_pairs: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    """method full: the tuned weights are scored, released, and the base weights loaded as the reference."""
    merged = _tune(toy_base_dir, toy_pairs[0], tmp_path / "merged-src", lora=False)
    run, _, _ = _evaluate(
        s3,
        tmp_path,
        toy_base_dir,
        merged,
        toy_pairs[1],
        objective="dpo",
        method="full",
        dataset={"train": "toy://train.jsonl", "format": "preference"},
        evaluation={"maxNewTokens": 4, "batchSize": 24, "metrics": ["loss"], "compareToBase": False},
    )
    assert run.exit_code == 0, run.stdout[-3000:]
    summary = run.termination["summary"]
    assert summary["base"] is None  # not compared, yet the base weights were the reference:
    assert summary["tuned"]["preference_accuracy"] >= 0.9 and summary["tuned"]["reward_margin"] > 0, summary
