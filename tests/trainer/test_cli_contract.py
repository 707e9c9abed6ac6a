"""Contract drift: every example FineTuneJob, as the operator passes it, parses into the trainer's config.

The trainer never imports the operator; this test does, to keep both sides of CONTRACT.md in step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_trainer.config import parse_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
models = pytest.importorskip("finetune_operator.api.finetunejob")
pool_url = pytest.importorskip("finetune_operator.serving_contract").pool_url


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "FineTuneJob"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_specs_parse_with_the_same_values(path: Path) -> None:
    for obj in _docs(path):
        spec = models.parse_spec(obj["spec"])
        # With explicit nulls and defaults, as a JSON round trip through the API server leaves them.
        for dumped in (
            spec.model_dump(mode="json", by_alias=True),
            spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        ):
            cfg = parse_config(
                {
                    "runPrefix": "s3://b/runs/ns/name/uid",
                    "job": {"namespace": "ns", "name": obj["metadata"]["name"], "uid": "uid"},
                    "spec": dumped,
                    # What the operator adds for judges on a ModelServer (builders.model_server_urls).
                    "modelServerUrls": {
                        j.model_server: pool_url(j.model_server, "ns", 8000)
                        for _, j in spec.evaluation.judges()
                        if j.model_server
                    },
                }
            )
            got, want = cfg.spec, spec
            assert got.method == str(want.method)
            assert got.objective == str(want.objective)
            assert [r.grader for r in got.rewards] == [r.grader for r in want.rewards or ()]
            assert got.base_model.uri == str(want.base_model.uri)
            assert got.dataset.train == str(want.dataset.train)
            assert got.dataset.format == str(want.dataset.format)
            assert got.dataset.max_error_rate == want.dataset.max_error_rate
            assert (got.lora.rank, got.lora.alpha, got.lora.dropout) == (
                want.lora.rank,
                want.lora.alpha,
                want.lora.dropout,
            )
            assert got.lora.target_modules == list(want.lora.target_modules)
            for name in (
                "epochs",
                "max_steps",
                "learning_rate",
                "batch_size",
                "gradient_accumulation_steps",
                "max_seq_length",
                "warmup_ratio",
                "packing",
                "gradient_checkpointing",
                "seed",
                "beta",
                "num_generations",
                "max_completion_length",
            ):
                assert getattr(got.hyperparameters, name) == getattr(want.hyperparameters, name), name
            assert got.resources.gpus == want.resources.gpus
            assert (got.checkpoint.every_steps, got.checkpoint.keep) == (
                want.checkpoint.every_steps,
                want.checkpoint.keep,
            )
            ev = want.evaluation
            assert got.evaluation.metrics == [str(m) for m in ev.metrics]
            assert got.evaluation.max_new_tokens == ev.max_new_tokens
            assert len(got.evaluation.thresholds) == len(ev.thresholds or [])
            if ev.reference is not None:
                assert got.evaluation.reference is not None
                assert got.evaluation.reference.endpoint == ev.reference.url
            assert got.deployment.mode == str(want.deployment.mode)


# Issue 23: the objective, its rewards and hyperparameters reach the trainer as the operator passes them.
EXACT = {"name": "exact", "type": "stringCheck", "stringCheck": {"operation": "equals"}}
JUDGE = {
    "name": "helpful",
    "type": "judge",
    "judge": {"url": "https://j.example.com/v1", "model": "m", "rubric": "r"},
}
OBJECTIVE_SPECS = {
    "sft": {},
    "dpo": {"objective": "dpo", "dataset": {"format": "preference"}, "hyperparameters": {"beta": 0.25}},
    "kto": {"objective": "kto", "method": "full", "dataset": {"format": "unpaired-preference"}},
    "grpo": {
        "objective": "grpo",
        "dataset": {"format": "prompt-only"},
        "hyperparameters": {"beta": 0.04, "numGenerations": 4, "maxCompletionLength": 64},
        "evaluation": {"graders": [EXACT, JUDGE]},
        "rewards": [{"grader": "exact"}, {"grader": "helpful", "weight": 0.5}],
    },
}


@pytest.mark.parametrize("objective", OBJECTIVE_SPECS)
def test_the_objective_reaches_the_trainer_through_ftj_config(objective: str) -> None:
    builders = pytest.importorskip("finetune_operator.finetunejob.builders")
    ref = pytest.importorskip("finetune_operator.finetunejob.ref")
    operator_config = pytest.importorskip("finetune_operator.config").load_config(env={})
    raw: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/tiny"},
        "storage": {"output": "s3://runs/out"},
        **OBJECTIVE_SPECS[objective],
    }
    raw["dataset"] = {"train": "s3://data/train.jsonl", **raw.get("dataset", {})}
    job = ref.JobRef(namespace="ns", name="job", uid="uid", spec=models.parse_spec(raw))
    document = builders.trainer_config(job, operator_config)
    cfg = parse_config(json.loads(json.dumps(document))).spec  # as FTJ_CONFIG carries it
    want = job.spec
    assert cfg.objective == want.objective == objective
    assert cfg.method == want.method and cfg.dataset.format == want.dataset.format
    for name in ("beta", "num_generations", "max_completion_length"):
        assert getattr(cfg.hyperparameters, name) == getattr(want.hyperparameters, name), name
    assert [(r.grader, r.weight) for r in cfg.rewards] == [(r.grader, r.weight) for r in want.rewards or ()]
    assert [g.name for g in cfg.evaluation.graders] == want.evaluation.grader_names()
    # the trainer decides, reports and checks the served model on the same figures as the operator's gate
    gate = pytest.importorskip("finetune_operator.finetunejob.gate")
    servingcheck = pytest.importorskip("finetune_operator.finetunejob.servingcheck")
    assert cfg.deciding_metric == gate.primary_metric(want.evaluation, want.objective)
    assert cfg.serving_check_metric == servingcheck.check_metric(want)
