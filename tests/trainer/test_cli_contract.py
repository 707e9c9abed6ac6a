"""Contract drift: every example FineTuneJob, as the operator passes it, parses into the trainer's config.

The trainer never imports the operator; this test does, to keep both sides of CONTRACT.md in step.
"""

from __future__ import annotations

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
