"""The platform team's model mapping (ConfigMap finetune-api-models): each entry is checked by the
FineTuneJob spec's own rules, a bad entry names its key and field and leaves the others usable, and the
request's names resolve to a mapping or to OpenAI's model_not_found."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from finetune_api.errors import ApiError
from finetune_api.mapping import (
    DEFAULT_LEARNING_RATE,
    ModelMapping,
    parse_mappings,
    resolve_model,
    spec_from,
    stable_name,
)
from finetune_operator.api.finetunejob import parse_spec

TINY = """
baseModel: {uri: s3://models/tiny-llama}
storage: {output: s3://runs/finetune, credentialsSecret: s3}
"""

FULL = """
baseModel: {uri: hf://org/tiny, revision: main}
storage: {output: s3://runs/finetune, credentialsSecret: s3}
method: qlora
hyperparameters: {learningRate: 0.001, epochs: 2, beta: 0.3}
lora: {rank: 8}
resources: {gpus: 1, gpuType: l4}
evaluation: {enabled: true}
deployment: {server: shared-pool}
dataset: {test: s3://data/heldout.jsonl, testSize: 16, format: chat, maxErrorRate: 0}
"""


def test_a_valid_entry_keeps_only_what_it_sets() -> None:
    valid, problems = parse_mappings({"tiny-llama": TINY, "full": FULL})
    assert problems == {}
    full = valid["full"]
    assert full.section("base_model") == {"uri": "hf://org/tiny", "revision": "main"}
    assert full.section("hyperparameters") == {"learningRate": 0.001, "epochs": 2, "beta": 0.3}
    assert full.section("dataset") == {
        "test": "s3://data/heldout.jsonl",
        "testSize": 16,
        "format": "chat",
        "maxErrorRate": 0,
    }
    assert valid["tiny-llama"].section("lora") == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "baseModel: {uri: s3://models/t}\nstorage: {credentialsSecret: s3}\n",
            "tiny: storage.output: field required",
        ),
        ("storage: {output: s3://runs/x}\n", "tiny: baseModel: field required"),
        (TINY + "colour: blue\n", "tiny: colour: unknown field"),
        (TINY + "method: sgd\n", "tiny: method: Input should be 'lora', 'qlora' or 'full'"),
        (
            TINY + "hyperparameters: {epochs: 0}\n",
            "tiny: hyperparameters.epochs: Input should be greater than",
        ),
        (
            TINY + "hyperparameters: {learningRate: '0.001'}\n",
            "tiny: hyperparameters.learningRate: Input should",
        ),
        (TINY + "dataset: {train: s3://data/t.jsonl}\n", "tiny: dataset.train: unknown field"),
        (
            TINY + "dataset: {testSize: 0}\n",
            "tiny: dataset.testSize: Input should be greater than or equal to 1",
        ),
        (
            "baseModel: {uri: ftp://x/y}\nstorage: {output: s3://runs/x}\n",
            "tiny: baseModel.uri: must be s3://",
        ),
        ("- a\n- b\n", "tiny: must be a YAML mapping with baseModel and storage"),
        ("baseModel: [\n", "tiny: not YAML"),
        # the sections are fine alone, but no FineTuneJob spec could be made of them (CEL's rule, by key)
        (
            TINY + "method: full\ndeployment: {server: pool}\n",
            "tiny: not a valid FineTuneJob spec: spec.method",
        ),
        (TINY.replace("s3://runs/finetune", "s3://models/tiny-llama/out"), "spec.storage.output: "),
    ],
)
def test_a_bad_entry_names_its_key_and_field(text: str, problem: str) -> None:
    valid, problems = parse_mappings({"tiny": text, "ok": TINY})
    assert list(valid) == ["ok"], "a bad entry must not take the good ones down"
    assert problems["tiny"].startswith(problem) or problem in problems["tiny"], problems["tiny"]


def test_the_base_learning_rate_is_the_mappings_else_the_spec_default() -> None:
    valid, _ = parse_mappings({"a": TINY, "b": FULL})
    assert valid["a"].base_learning_rate() == DEFAULT_LEARNING_RATE == 2e-4
    assert valid["b"].base_learning_rate() == 0.001


def _spec(mapping: ModelMapping, objective: str, **hyper: object) -> dict[str, object]:
    return spec_from(
        mapping,
        training_uri="s3://files/team-a/files/file-1.jsonl",
        validation_uri=None,
        objective=objective,  # type: ignore[arg-type]
        hyperparameters=hyper,
        deployment={"modelName": "m"},
    )


def test_the_mappings_beta_applies_to_dpo_only_and_the_request_wins() -> None:
    full = parse_mappings({"full": FULL})[0]["full"]
    sft = _spec(full, "sft", epochs=5)
    assert sft["hyperparameters"] == {"learningRate": 0.001, "epochs": 5}
    parse_spec(sft)  # beta on sft would be refused: the mapping's preference default is left out
    dpo = _spec(full, "dpo", beta=0.5)
    assert dpo["hyperparameters"] == {"learningRate": 0.001, "epochs": 2, "beta": 0.5}
    assert dpo["dataset"] == {
        "train": "s3://files/team-a/files/file-1.jsonl",
        "test": "s3://data/heldout.jsonl",
        "testSize": 16,
        "format": "chat",
        "maxErrorRate": 0,
    }
    assert (dpo["method"], dpo["lora"], dpo["deployment"]) == (
        "qlora",
        {"rank": 8},
        {"server": "shared-pool", "modelName": "m"},
    )


def test_resolve_model_unknown_is_model_not_found_and_a_broken_entry_says_why() -> None:
    valid, problems = parse_mappings({"tiny-llama": TINY, "broken": "storage: {}\n"})
    assert resolve_model("tiny-llama", valid, problems) is valid["tiny-llama"]
    with pytest.raises(ApiError) as missing:
        resolve_model("gpt-4o-mini-2024-07-18", valid, problems)
    assert (missing.value.status, missing.value.code, missing.value.param) == (
        404,
        "model_not_found",
        "model",
    )
    assert "tiny-llama" in missing.value.message
    with pytest.raises(ApiError) as broken:
        resolve_model("broken", valid, problems)
    assert broken.value.status == 500 and "mapping of model 'broken' is invalid" in broken.value.message
    assert "baseModel" not in broken.value.message  # the why (and the mapping's URIs) stay in the log
    with pytest.raises(ApiError) as absent:
        resolve_model(None, valid, problems)
    assert (absent.value.status, absent.value.param) == (400, "model")


@pytest.mark.parametrize(
    ("model", "suffix", "name"),
    [
        ("tiny-llama", None, "tiny-llama"),
        ("tiny-llama", "support", "tiny-llama-support"),
        ("Llama-3.1-8B_Instruct", None, "llama-3-1-8b-instruct"),
        ("base", None, "base-ft"),
        ("model-v2", None, "model-v2-ft"),
        ("x" * 60, "abc", "x" * 48),
    ],
)
def test_a_pool_name_is_a_valid_stable_model_name(model: str, suffix: str | None, name: str) -> None:
    assert stable_name(model, suffix) == name
    parse_spec(
        {
            "baseModel": {"uri": "s3://models/m"},
            "dataset": {"train": "s3://data/t.jsonl"},
            "storage": {"output": "s3://runs/x"},
            "deployment": {"server": "pool", "modelName": name},
        }
    )


def test_the_docs_configmap_example_is_a_valid_mapping() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "openai-api.md").read_text()
    match = re.search(r"   ```yaml\n(   apiVersion: v1\n.*?)   ```", text, re.S)
    assert match, "docs/openai-api.md lost its ConfigMap example"
    configmap = yaml.safe_load("\n".join(line[3:] for line in match.group(1).splitlines()))
    valid, problems = parse_mappings(configmap["data"])
    assert not problems and list(valid) == ["tiny-llama"]
    assert set(valid["tiny-llama"].model_fields_set) == set(ModelMapping.model_fields), "show every key"
