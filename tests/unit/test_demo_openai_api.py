"""`make demo`'s model mapping for the OpenAI-compatible API (finetune_demo.openai_api): model `tiny-llama`
trains like examples/demo.yaml, from the demo's own assets, and the printed snippet is runnable Python."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from finetune_demo import openai_api
from finetune_operator.api.finetunejob import parse_spec

REPO = Path(__file__).resolve().parents[2]


def demo_manifest() -> dict:
    return yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())


def test_tiny_llama_maps_to_the_demo_jobs_assets_and_settings() -> None:
    manifest = demo_manifest()
    spec = manifest["spec"]
    configmap = openai_api.configmap(manifest, "default")
    assert configmap["metadata"] == {"name": "finetune-api-models", "namespace": "default"}
    assert set(configmap["data"]) == {"tiny-llama"}
    mapping = yaml.safe_load(configmap["data"]["tiny-llama"])
    assert mapping["baseModel"] == spec["baseModel"]
    assert mapping["storage"] == {"output": spec["storage"]["output"], "credentialsSecret": "s3-credentials"}
    for section in ("method", "hyperparameters", "lora", "resources", "evaluation", "deployment"):
        assert mapping[section] == spec[section], section
    # The job's own data comes from the uploaded files: never the demo's train URI; per-job keys stay out.
    assert mapping["dataset"] == {"testSize": 16, "format": "chat"}
    assert not {"tracking", "maxRetries", "suspend"} & set(mapping)


def test_the_api_accepts_the_demo_mapping_as_a_finetunejob_spec() -> None:
    """The service's own reader (finetune_api.mapping, which also tries each entry as a whole spec)."""
    from finetune_api.mapping import parse_mappings

    valid, problems = parse_mappings(openai_api.configmap(demo_manifest(), "default")["data"])
    assert problems == {}
    assert set(valid) == {"tiny-llama"}
    mapping = openai_api.model_mapping(demo_manifest())
    spec = {
        **mapping,
        "dataset": {**mapping["dataset"], "train": "s3://finetune-api/files/default/files/x.jsonl"},
    }
    parsed = parse_spec(spec)
    assert parsed.hyperparameters.epochs == 6 and parsed.storage.credentials_secret == "s3-credentials"


def test_the_snippet_is_three_lines_of_python_calling_the_api() -> None:
    text = openai_api.snippet("http://127.0.0.9:8000/", "/tmp/openai-demo.token", "/tmp/train.jsonl")
    lines = text.splitlines()
    assert len(lines) == 3
    ast.parse(text)
    assert 'base_url="http://127.0.0.9:8000/v1"' in lines[1] and 'open("/tmp/openai-demo.token")' in lines[1]
    assert 'model="tiny-llama"' in lines[2] and 'purpose="fine-tune"' in lines[2]
