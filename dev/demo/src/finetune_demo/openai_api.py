"""The demo's OpenAI-compatible API (docs/openai-api.md): the model mapping that makes `model="tiny-llama"` in
`client.fine_tuning.jobs.create` train like examples/demo.yaml, and the three lines that call it.

Pure builders; demo.py applies them (ConfigMap `finetune-api-models` in `default`, where the embedded cluster
runs the API) and prints the snippet.
"""

from __future__ import annotations

from typing import Any

import yaml

MODEL = "tiny-llama"  # the OpenAI model name the demo maps
CONFIGMAP = "finetune-api-models"  # the chart's api.modelsConfigMap default
ACCOUNT = "openai-demo"  # the ServiceAccount whose token is the demo's API key (bound to `edit` in default)
# What a mapping may carry besides baseModel and storage (the rest of examples/demo.yaml is per job: the
# dataset's train/validation come from the uploaded files, tracking and retries are not mapped).
MAPPED_SECTIONS = ("method", "hyperparameters", "lora", "resources", "evaluation", "deployment")
MAPPED_DATASET_KEYS = ("test", "testSize", "format", "maxErrorRate")


def model_mapping(manifest: dict[str, Any]) -> dict[str, Any]:
    """The mapping of MODEL to the demo job's assets and settings (its base model, output, credentials Secret,
    hyperparameters, LoRA, resources, evaluation and deployment), so an OpenAI-client job behaves like it."""
    spec = manifest["spec"]
    mapping: dict[str, Any] = {
        "baseModel": dict(spec["baseModel"]),
        "storage": {
            "output": spec["storage"]["output"],
            "credentialsSecret": spec["storage"]["credentialsSecret"],
        },
    }
    for section in MAPPED_SECTIONS:
        if section in spec:
            mapping[section] = spec[section]
    dataset = {k: v for k, v in (spec.get("dataset") or {}).items() if k in MAPPED_DATASET_KEYS}
    if dataset:
        mapping["dataset"] = dataset
    return mapping


def configmap(manifest: dict[str, Any], namespace: str) -> dict[str, Any]:
    """ConfigMap CONFIGMAP: one key per model name, its value the mapping as YAML."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIGMAP, "namespace": namespace},
        "data": {MODEL: yaml.safe_dump(model_mapping(manifest), sort_keys=False)},
    }


def account_binding(namespace: str) -> dict[str, Any]:
    """ACCOUNT may manage FineTuneJobs in `namespace` as any namespace editor (the built-in `edit` role with
    the chart's aggregated FineTuneJob rules): the API acts with this token, never with rights of its own."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"{ACCOUNT}-edit", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": namespace}],
    }


def snippet(url: str, token_file: str, train_file: str) -> str:
    """Three lines of the official openai client against the demo's API; the API key is read from a file
    (a token is a credential: never printed)."""
    return "\n".join(
        [
            "from openai import OpenAI",
            f'client = OpenAI(base_url="{url.rstrip("/")}/v1", api_key=open("{token_file}").read().strip())',
            f'job = client.fine_tuning.jobs.create(model="{MODEL}", training_file=client.files.create('
            f'file=open("{train_file}", "rb"), purpose="fine-tune").id)',
        ]
    )
