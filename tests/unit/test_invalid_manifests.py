"""Bad FineTuneJobs are rejected twice, with the field named: by the CRD (schema + CEL, as the API server)
and by the operator's pydantic models.

Unknown fields are the one deliberate difference: the API server prunes them (as kube-apiserver does for a
structural schema) while the models reject them (`extra="forbid"`), because the operator only ever parses
objects that came back from the API server: an unknown field there means a hand-built or skewed object,
and we prefer a loud error to silently ignoring part of a spec.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from finetune_operator.api.crdgen import build_crd
from finetune_operator.api.finetunejob import SpecError, check_update, parse_finetunejob
from localcluster.crdvalidation import CRDValidator, InvalidError


def valid_job() -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job-1", "namespace": "default"},
        "spec": {
            "baseModel": {"uri": "s3://models-bucket/llama/tiny"},
            "dataset": {"train": "s3://data-bucket/sets/train.jsonl"},
            "storage": {"output": "s3://runs-bucket/finetune", "credentialsSecret": "s3-credentials"},
            "evaluation": {"metrics": ["loss", "exact_match"]},
        },
    }


@pytest.fixture(scope="module")
def validator() -> CRDValidator:
    return CRDValidator(build_crd(), "v1alpha1")


def at(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set (or with value DELETE, remove) a dotted path under the object."""

    def mutate(obj: dict[str, Any]) -> None:
        node = obj
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return mutate


DELETE = object()


@dataclass
class Case:
    id: str
    mutate: Callable[[dict[str, Any]], None]
    path: str
    model_path: str | None = None  # where pydantic reports it, when its path is coarser than the API server's
    update: bool = False  # apply `mutate` to an update of the valid stored object


def grader(name: str = "relevance", **fields: Any) -> dict[str, Any]:
    judge = {"url": "https://judge.example.com/v1", "model": "judge-1", "rubric": "Is it relevant?"}
    return {"name": name, "type": "judge", "judge": judge} | fields


def graders(*items: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return at("spec.evaluation.graders", list(items))


def with_graders(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A job with one valid judge grader named relevance, then `path` (under spec, or under that grader
    when it starts with "judge") set to `value`."""

    def mutate(obj: dict[str, Any]) -> None:
        graders(grader())(obj)
        at(path, value)(obj["spec"]["evaluation"]["graders"][0] if path.startswith("judge") else obj)

    return mutate


LABEL = {"name": "label-only", "type": "stringCheck", "stringCheck": {"operation": "regex", "pattern": "^a$"}}
JUDGE_URL = "https://judge.example.com/v1"
G0 = "spec.evaluation.graders[0]"
# Issue 22: graders, safety, retention and the serving check, each bad field named.
GRADER_CASES = [
    Case("grader-named-like-a-metric", graders(grader("loss")), f"{G0}.name"),
    Case("grader-name-invalid", graders(grader("Relevance_1")), f"{G0}.name"),
    Case("grader-name-too-long", graders(grader("a" * 33)), f"{G0}.name"),
    Case("grader-names-repeat", graders(grader(), grader()), "spec.evaluation.graders"),
    Case("too-many-graders", graders(*(grader(f"g{i}") for i in range(9))), "spec.evaluation.graders"),
    Case("grader-type-unknown", graders(grader(type="bleu")), f"{G0}.type"),
    Case("grader-type-without-its-object", graders({"name": "x", "type": "jsonSchema"}), f"{G0}.type"),
    Case("grader-with-two-objects", graders(grader(stringCheck=LABEL["stringCheck"])), f"{G0}.type"),
    Case(
        "string-check-operation-unknown",
        graders({**LABEL, "stringCheck": {"operation": "startsWith"}}),
        f"{G0}.stringCheck.operation",
    ),
    Case(
        "string-check-pattern-too-long",
        graders({**LABEL, "stringCheck": {"operation": "contains", "pattern": "x" * 1025}}),
        f"{G0}.stringCheck.pattern",
    ),
    Case(
        "json-schema-not-an-object",
        graders({"name": "valid-json", "type": "jsonSchema", "jsonSchema": {"schema": "object"}}),
        f"{G0}.jsonSchema.schema",
    ),
    Case(
        "judge-url-and-model-server",
        with_graders("judge.modelServer", "my-judge"),
        f"{G0}.judge.url",
    ),
    Case("judge-without-endpoint", with_graders("judge.url", DELETE), f"{G0}.judge.url"),
    Case("judge-without-rubric", with_graders("judge.rubric", DELETE), f"{G0}.judge.rubric"),
    Case("judge-rubric-too-long", with_graders("judge.rubric", "r" * 4097), f"{G0}.judge.rubric"),
    Case("judge-without-model", with_graders("judge.model", DELETE), f"{G0}.judge.model"),
    Case(
        "judge-metadata-address",
        with_graders("judge.url", "http://169.254.169.254/v1"),
        f"{G0}.judge.url",
    ),
    Case(
        "judge-model-server-invalid",
        with_graders("judge", {"modelServer": "My_Judge", "model": "m", "rubric": "r"}),
        f"{G0}.judge.modelServer",
    ),
    Case(
        "judge-scale-reversed",
        with_graders("judge.scale", {"min": 10, "max": 1}),
        f"{G0}.judge.scale.min",
    ),
    Case(
        "threshold-on-an-unknown-grader",
        with_graders("spec.evaluation.thresholds", [{"metric": "helpfulness", "min": 0.5}]),
        "spec.evaluation.thresholds",
    ),
    Case(
        "primary-metric-an-unknown-grader",
        with_graders("spec.evaluation.primaryMetric", "helpfulness"),
        "spec.evaluation.primaryMetric",
    ),
    Case(
        "retention-metric-unknown",
        at("spec.evaluation.retention", {"dataset": "s3://data-bucket/general.jsonl", "metric": "relevance"}),
        "spec.evaluation.retention.metric",
    ),
    Case(
        "retention-max-drop-above-one",
        at("spec.evaluation.retention", {"dataset": "s3://data-bucket/general.jsonl", "maxDrop": 1.5}),
        "spec.evaluation.retention.maxDrop",
    ),
    Case(
        "retention-without-dataset",
        at("spec.evaluation.retention", {"metric": "loss"}),
        "spec.evaluation.retention.dataset",
    ),
    Case(
        "safety-rate-above-one",
        at(
            "spec.evaluation.safety",
            {
                "prompts": "s3://data-bucket/redteam.jsonl",
                "judge": {"url": JUDGE_URL, "model": "m"},
                "maxUnsafeRate": 2,
            },
        ),
        "spec.evaluation.safety.maxUnsafeRate",
    ),
    Case(
        "safety-prompts-not-a-uri",
        at("spec.evaluation.safety", {"prompts": "/etc/passwd", "judge": {"url": JUDGE_URL, "model": "m"}}),
        "spec.evaluation.safety.prompts",
    ),
    Case(
        "safety-judge-without-endpoint",
        at("spec.evaluation.safety", {"prompts": "s3://data-bucket/redteam.jsonl", "judge": {"model": "m"}}),
        "spec.evaluation.safety.judge.url",
    ),
    Case(
        "serving-check-too-many-examples",
        at("spec.deployment.servingCheck", {"examples": 10_001}),
        "spec.deployment.servingCheck.examples",
    ),
    Case(
        "serving-check-tolerance-negative",
        at("spec.deployment.servingCheck", {"tolerance": -0.1}),
        "spec.deployment.servingCheck.tolerance",
    ),
]

CASES = [
    # missing required fields
    Case("no-spec", at("spec", DELETE), "spec"),
    Case("no-base-model", at("spec.baseModel", DELETE), "spec.baseModel"),
    Case("no-base-model-uri", at("spec.baseModel.uri", DELETE), "spec.baseModel.uri"),
    Case("no-dataset-train", at("spec.dataset.train", DELETE), "spec.dataset.train"),
    Case("no-storage", at("spec.storage", DELETE), "spec.storage"),
    Case("no-output", at("spec.storage.output", DELETE), "spec.storage.output"),
    Case(
        "no-threshold-metric",
        at("spec.evaluation.thresholds", [{"min": 0.5}]),
        "spec.evaluation.thresholds[0].metric",
    ),
    Case(
        "reference-without-model",
        at("spec.evaluation.reference", {"url": "https://api.example.com/v1"}),
        "spec.evaluation.reference.model",
    ),
    # wrong types
    Case("epochs-string", at("spec.hyperparameters.epochs", "three"), "spec.hyperparameters.epochs"),
    Case("epochs-float", at("spec.hyperparameters.epochs", 1.5), "spec.hyperparameters.epochs"),
    Case("lr-string", at("spec.hyperparameters.learningRate", "2e-4"), "spec.hyperparameters.learningRate"),
    Case("packing-string", at("spec.hyperparameters.packing", "yes"), "spec.hyperparameters.packing"),
    Case("lora-list", at("spec.lora", ["rank", 8]), "spec.lora"),
    Case("target-modules-string", at("spec.lora.targetModules", "q_proj"), "spec.lora.targetModules"),
    Case("gpus-bool", at("spec.resources.gpus", True), "spec.resources.gpus"),
    Case("cpu-bool", at("spec.resources.cpu", True), "spec.resources.cpu"),
    Case(
        "node-selector-number",
        at("spec.resources.nodeSelector", {"zone": 3}),
        "spec.resources.nodeSelector.zone",
    ),
    # out-of-range numbers
    Case("epochs-zero", at("spec.hyperparameters.epochs", 0), "spec.hyperparameters.epochs"),
    Case("epochs-huge", at("spec.hyperparameters.epochs", 1000), "spec.hyperparameters.epochs"),
    Case("lr-zero", at("spec.hyperparameters.learningRate", 0), "spec.hyperparameters.learningRate"),
    Case("lr-negative", at("spec.hyperparameters.learningRate", -0.1), "spec.hyperparameters.learningRate"),
    Case("dropout-above-one", at("spec.lora.dropout", 1.5), "spec.lora.dropout"),
    Case("dropout-one", at("spec.lora.dropout", 1), "spec.lora.dropout"),
    Case("checkpoint-every-zero", at("spec.checkpoint.everySteps", 0), "spec.checkpoint.everySteps"),
    Case("rank-zero", at("spec.lora.rank", 0), "spec.lora.rank"),
    Case("gpus-negative", at("spec.resources.gpus", -1), "spec.resources.gpus"),
    Case("gpus-too-many", at("spec.resources.gpus", 64), "spec.resources.gpus"),
    Case("max-seq-tiny", at("spec.hyperparameters.maxSeqLength", 8), "spec.hyperparameters.maxSeqLength"),
    Case("replicas-zero", at("spec.deployment.replicas", 0), "spec.deployment.replicas"),
    Case("deadline-short", at("spec.activeDeadlineSeconds", 5), "spec.activeDeadlineSeconds"),
    Case("retries-negative", at("spec.maxRetries", -1), "spec.maxRetries"),
    Case("test-size-zero", at("spec.dataset.testSize", 0), "spec.dataset.testSize"),
    # unknown enum values
    Case("method-unknown", at("spec.method", "foo"), "spec.method"),
    Case("format-unknown", at("spec.dataset.format", "parquet"), "spec.dataset.format"),
    Case("metric-unknown", at("spec.evaluation.metrics", ["loss", "bleu"]), "spec.evaluation.metrics[1]"),
    Case("deploy-mode-unknown", at("spec.deployment.mode", "gguf"), "spec.deployment.mode"),
    Case(
        "toleration-effect-unknown",
        at("spec.resources.tolerations", [{"key": "a", "effect": "Never"}]),
        "spec.resources.tolerations[0].effect",
    ),
    # malformed or dangerous URIs
    Case("uri-one-slash", at("spec.baseModel.uri", "s3:/x"), "spec.baseModel.uri"),
    Case("uri-no-bucket", at("spec.baseModel.uri", "s3://"), "spec.baseModel.uri"),
    Case("uri-dotdot", at("spec.baseModel.uri", "s3://models-bucket/../x"), "spec.baseModel.uri"),
    Case("uri-dot", at("spec.dataset.train", "s3://data-bucket/./train.jsonl"), "spec.dataset.train"),
    Case(
        "uri-empty-segment", at("spec.dataset.train", "s3://data-bucket//train.jsonl"), "spec.dataset.train"
    ),
    Case("uri-file", at("spec.dataset.train", "file:///etc/passwd"), "spec.dataset.train"),
    Case(
        "uri-http", at("spec.dataset.validation", "http://example.com/val.jsonl"), "spec.dataset.validation"
    ),
    Case("uri-bucket-uppercase", at("spec.baseModel.uri", "s3://Models/llama"), "spec.baseModel.uri"),
    Case("uri-bucket-too-short", at("spec.baseModel.uri", "s3://ab/llama"), "spec.baseModel.uri"),
    Case("uri-bucket-too-long", at("spec.baseModel.uri", f"s3://{'b' * 64}/llama"), "spec.baseModel.uri"),
    Case("uri-bucket-double-dot", at("spec.baseModel.uri", "s3://my..bucket/llama"), "spec.baseModel.uri"),
    Case("uri-bucket-only-model", at("spec.baseModel.uri", "s3://models-bucket"), "spec.baseModel.uri"),
    Case("uri-hf-no-org", at("spec.baseModel.uri", "hf://gpt2"), "spec.baseModel.uri"),
    Case("uri-pvc-dotdot", at("spec.baseModel.uri", "pvc://cache/../../etc"), "spec.baseModel.uri"),
    Case("revision-traversal", at("spec.baseModel.revision", "main/../../etc"), "spec.baseModel.revision"),
    Case("output-not-s3", at("spec.storage.output", "pvc://cache/out"), "spec.storage.output"),
    Case("output-newline", at("spec.storage.output", "s3://runs-bucket/out\n"), "spec.storage.output"),
    Case(
        "reference-not-http",
        at("spec.evaluation.reference", {"url": "ftp://x/v1", "model": "m"}),
        "spec.evaluation.reference.url",
    ),
    Case(
        "reference-metadata-address",
        at("spec.evaluation.reference", {"url": "http://169.254.169.254/latest", "model": "m"}),
        "spec.evaluation.reference.url",
    ),
    Case(
        "tracking-metadata-address",
        at("spec.tracking", {"mlflow": {"trackingUri": "http://169.254.169.254:5000"}}),
        "spec.tracking.mlflow.trackingUri",
    ),
    Case(
        "tracking-metadata-address-as-a-number",
        at("spec.tracking", {"mlflow": {"trackingUri": "http://2852039166/"}}),
        "spec.tracking.mlflow.trackingUri",
    ),
    Case(
        "tracking-address-in-hex",
        at("spec.tracking", {"mlflow": {"trackingUri": "https://0xa9.0xfe.0xa9.0xfe"}}),
        "spec.tracking.mlflow.trackingUri",
    ),
    Case(
        "tracking-address-in-octal",
        at("spec.tracking", {"mlflow": {"trackingUri": "http://0251.0376.0251.0376:80/api"}}),
        "spec.tracking.mlflow.trackingUri",
    ),
    Case(
        "secret-name-invalid",
        at("spec.storage.credentialsSecret", "S3_Creds"),
        "spec.storage.credentialsSecret",
    ),
    Case("memory-negative", at("spec.resources.memory", -1), "spec.resources.memory"),
    Case("cpu-not-quantity", at("spec.resources.cpu", "four"), "spec.resources.cpu"),
    # cross-field rules (CEL on the API server, model validators in the operator)
    Case(
        "qlora-on-cpu",
        lambda o: o["spec"].update(method="qlora", resources={"gpus": 0}),
        "spec.resources.gpus",
    ),
    Case(  # issue 20: a cpu type has no GPUs; the message names deployment.gpus and the gpuType
        "serving-gpus-on-cpu-training-type",
        lambda o: o["spec"].update(resources={"gpuType": "cpu"}, deployment={"gpus": 2}),
        "spec.deployment.gpus",
    ),
    Case(
        "serving-gpus-on-cpu-serving-type",
        lambda o: o["spec"].update(deployment={"gpus": 1, "gpuType": "cpu"}),
        "spec.deployment.gpus",
    ),
    Case(
        "adapter-with-full",
        lambda o: o["spec"].update(method="full", deployment={"mode": "adapter"}),
        "spec.deployment.mode",
    ),
    Case(
        "threshold-metric-not-computed",
        at("spec.evaluation.thresholds", [{"metric": "rouge_l", "min": 0.3}]),
        "spec.evaluation.thresholds",
    ),
    Case(
        "threshold-without-bound",
        at("spec.evaluation.thresholds", [{"metric": "loss"}]),
        "spec.evaluation.thresholds[0]",
    ),
    Case(
        "threshold-both-bounds",
        at("spec.evaluation.thresholds", [{"metric": "loss", "min": 0, "max": 1}]),
        "spec.evaluation.thresholds[0]",
    ),
    Case(
        "primary-metric-not-computed",
        at("spec.evaluation.primaryMetric", "token_f1"),
        "spec.evaluation.primaryMetric",
    ),
    Case(
        "output-is-model", at("spec.storage.output", "s3://models-bucket/llama/tiny"), "spec.storage.output"
    ),
    Case(
        "output-under-model",
        at("spec.storage.output", "s3://models-bucket/llama/tiny/runs"),
        "spec.storage.output",
    ),
    Case(
        "output-is-dataset",
        at("spec.storage.output", "s3://data-bucket/sets/train.jsonl/"),
        "spec.storage.output",
    ),
    Case(
        "duplicate-metric",
        at("spec.evaluation.metrics", ["loss", "loss"]),
        "spec.evaluation.metrics[1]",
        model_path="spec.evaluation.metrics",
    ),
    # serving limits (vLLM): refused at admission, not after training
    Case("lora-rank-above-vllm", at("spec.lora.rank", 1024), "spec.lora.rank"),
    Case(
        "lora-rank-above-vllm-adapter-mode",
        lambda o: o["spec"].update(lora={"rank": 640}, deployment={"mode": "adapter"}),
        "spec.lora.rank",
    ),
    Case("lora-rank-above-max", at("spec.lora.rank", 1025), "spec.lora.rank"),
    # deployment.extraArgs: an allow-list of harmless vLLM flags (issue 9 item 6)
    Case(
        "extra-arg-trust-remote-code",
        at("spec.deployment.extraArgs", ["--trust-remote-code"]),
        "spec.deployment.extraArgs",
    ),
    Case(
        "extra-arg-model",
        at("spec.deployment.extraArgs", ["--model", "evil/model"]),
        "spec.deployment.extraArgs",
    ),
    Case(
        "extra-arg-model-equals",
        at("spec.deployment.extraArgs", ["--model=evil/model"]),
        "spec.deployment.extraArgs",
    ),
    Case(
        "extra-arg-abbreviated", at("spec.deployment.extraArgs", ["--mod=evil"]), "spec.deployment.extraArgs"
    ),
    Case(
        "extra-arg-tokenizer",
        at("spec.deployment.extraArgs", ["--tokenizer", "x"]),
        "spec.deployment.extraArgs",
    ),
    Case("extra-arg-port", at("spec.deployment.extraArgs", ["--port", "9000"]), "spec.deployment.extraArgs"),
    Case(
        "extra-arg-host", at("spec.deployment.extraArgs", ["--host=127.0.0.1"]), "spec.deployment.extraArgs"
    ),
    Case(
        "extra-arg-served-name",
        at("spec.deployment.extraArgs", ["--served-model-name", "gpt-4"]),
        "spec.deployment.extraArgs",
    ),
    Case(
        "extra-arg-lora-modules",
        at("spec.deployment.extraArgs", ["--lora-modules", "x=/etc"]),
        "spec.deployment.extraArgs",
    ),
    Case(
        "extra-arg-config-file",
        at("spec.deployment.extraArgs", ["--config", "/etc/x.yaml"]),
        "spec.deployment.extraArgs",
    ),
    Case(
        "extra-arg-api-key", at("spec.deployment.extraArgs", ["--api-key", "k"]), "spec.deployment.extraArgs"
    ),
    Case("extra-arg-short-flag", at("spec.deployment.extraArgs", ["-tp", "2"]), "spec.deployment.extraArgs"),
    Case(
        "extra-arg-positional", at("spec.deployment.extraArgs", ["evil/model"]), "spec.deployment.extraArgs"
    ),
    Case(
        "extra-arg-positional-after-boolean",
        at("spec.deployment.extraArgs", ["--enforce-eager", "evil/model"]),
        "spec.deployment.extraArgs",
    ),
    Case(
        "extra-arg-var-expansion",
        at("spec.deployment.extraArgs", ["--dtype", "$(AWS_SECRET_ACCESS_KEY)"]),
        "spec.deployment.extraArgs",
    ),
    Case(
        "extra-arg-var-expansion-equals",
        at("spec.deployment.extraArgs", ["--seed=$(HF_TOKEN)"]),
        "spec.deployment.extraArgs",
    ),
    Case(
        "extra-arg-value-with-space",
        at("spec.deployment.extraArgs", ["--dtype", "float32 --trust-remote-code"]),
        "spec.deployment.extraArgs",
    ),
    # transition rules (immutable once set)
    Case(
        "update-base-model",
        at("spec.baseModel.uri", "s3://models-bucket/llama/other"),
        "spec.baseModel",
        update=True,
    ),
    Case(
        "update-dataset",
        at("spec.dataset.train", "s3://data-bucket/sets/train-v2.jsonl"),
        "spec.dataset",
        update=True,
    ),
    Case("update-method", at("spec.method", "full"), "spec.method", update=True),
    Case("update-lora-rank", at("spec.lora.rank", 64), "spec.lora", update=True),
    Case("update-epochs", at("spec.hyperparameters.epochs", 5), "spec.hyperparameters", update=True),
    Case(
        "update-storage-output",
        at("spec.storage.output", "s3://other-bucket/runs"),
        "spec.storage.output",
        update=True,
    ),
    # oversized strings and lists
    Case("uri-too-long", at("spec.baseModel.uri", "s3://models-bucket/" + "a" * 1100), "spec.baseModel.uri"),
    Case(
        "served-name-too-long",
        at("spec.deployment.servedModelName", "m" * 129),
        "spec.deployment.servedModelName",
    ),
    Case("extra-arg-too-long", at("spec.deployment.extraArgs", ["x" * 257]), "spec.deployment.extraArgs[0]"),
    Case(
        "too-many-target-modules",
        at("spec.lora.targetModules", [f"m{i}" for i in range(65)]),
        "spec.lora.targetModules",
    ),
    Case(
        "too-many-thresholds",
        at("spec.evaluation.thresholds", [{"metric": "loss", "max": 9}] * 11),
        "spec.evaluation.thresholds",
    ),
    Case("too-many-extra-args", at("spec.deployment.extraArgs", ["--x"] * 33), "spec.deployment.extraArgs"),
    Case(
        "too-many-node-labels",
        at("spec.resources.nodeSelector", {f"k{i}": "v" for i in range(33)}),
        "spec.resources.nodeSelector",
    ),
    Case(
        "node-selector-key-too-long",
        at("spec.resources.nodeSelector", {"k" * 317: "v"}),
        "spec.resources.nodeSelector",
    ),
    Case("empty-target-modules", at("spec.lora.targetModules", []), "spec.lora.targetModules"),
    Case("name-too-long", at("metadata.name", "a" * 254), "metadata.name"),
    Case("name-invalid", at("metadata.name", "Job_1"), "metadata.name"),
    *GRADER_CASES,
]


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def _build(case: Case, validator: CRDValidator) -> tuple[dict[str, Any], dict[str, Any] | None]:
    obj = valid_job()
    if not case.update:
        case.mutate(obj)
        return obj, None
    stored = validator.admit(obj)
    new = copy.deepcopy(stored)
    case.mutate(new)
    return new, stored


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rejected_by_crd_schema_and_cel(case: Case, validator: CRDValidator) -> None:
    obj, old = _build(case, validator)
    with pytest.raises(InvalidError) as info:
        validator.admit(obj, old=old)
    fields = [c.field for c in info.value.causes]
    assert case.path in fields, info.value.message()
    assert f"{case.path}: " in info.value.message()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rejected_by_models(case: Case, validator: CRDValidator) -> None:
    obj, old = _build(case, validator)
    expected = case.model_path or case.path
    with pytest.raises(SpecError) as info:
        job = parse_finetunejob(obj)
        if old is not None:
            check_update(parse_finetunejob(old).spec, job.spec)
    paths = [path for path, _ in info.value.errors]
    assert expected in paths, str(info.value)
    assert f"{expected}: " in str(info.value)


def test_valid_job_passes_both(validator: CRDValidator) -> None:
    stored = validator.admit(valid_job())
    parse_finetunejob(stored)
    # the same object as an update of itself passes the transition rules
    validator.admit(copy.deepcopy(stored), old=stored)
    check_update(parse_finetunejob(stored).spec, parse_finetunejob(stored).spec)


def test_mutable_fields_may_change_on_update(validator: CRDValidator) -> None:
    stored = validator.admit(valid_job())
    new = copy.deepcopy(stored)
    new["spec"]["suspend"] = True
    new["spec"]["deployment"]["replicas"] = 3
    new["spec"]["evaluation"]["thresholds"] = [{"metric": "loss", "max": 2.0}]
    new["spec"]["storage"]["credentialsSecret"] = "rotated-credentials"
    new["spec"]["cancel"] = True
    assert validator.admit(new, old=stored)["spec"]["suspend"] is True
    check_update(parse_finetunejob(stored).spec, parse_finetunejob(new).spec)


@pytest.mark.parametrize("undo", [False, DELETE], ids=["false", "removed"])
def test_cancel_cannot_be_undone(validator: CRDValidator, undo: Any) -> None:
    """The cancelled job's pods and serving are gone: spec.cancel true → false is refused naming the field
    (by the CRD's transition rule and by check_update, with the same message); true stays true."""
    job = valid_job()
    job["spec"]["cancel"] = True
    stored = validator.admit(job)
    assert validator.admit(copy.deepcopy(stored), old=stored)["spec"]["cancel"] is True
    new = copy.deepcopy(stored)
    at("spec.cancel", undo)(new)
    with pytest.raises(InvalidError) as info:
        validator.admit(new, old=stored)
    assert "spec.cancel" in [c.field for c in info.value.causes]
    assert "spec.cancel: " in info.value.message() and "spec.cancel cannot be undone" in info.value.message()
    with pytest.raises(SpecError) as error:
        check_update(parse_finetunejob(stored).spec, parse_finetunejob(new).spec)
    assert error.value.errors == [("spec.cancel", "spec.cancel cannot be undone")]


@pytest.mark.parametrize(
    "extra_args",
    [
        ["--dtype", "float32", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.08"],
        ["--distributed-executor-backend", "uni", "--enforce-eager", "--kv-cache-memory-bytes=268435456"],
        ["--dtype=bfloat16", "--enable-prefix-caching", "--max-loras", "4", "--seed=-1"],
    ],
)
def test_allow_listed_extra_args_pass_both(validator: CRDValidator, extra_args: list[str]) -> None:
    obj = valid_job()
    obj["spec"]["deployment"] = {"extraArgs": extra_args}
    stored = validator.admit(obj)
    assert parse_finetunejob(stored).spec.deployment.extra_args == extra_args


@pytest.mark.parametrize(
    "url",
    [
        "http://mlflow.default.svc:5000",
        "https://10.0.0.7/api",
        "http://127.0.0.1:5000",
        "https://169.255.1.1",
        "https://3com.example",
        "https://0xdata.example.com/v1",
    ],
)
def test_in_cluster_names_and_dotted_quads_pass_both(validator: CRDValidator, url: str) -> None:
    obj = valid_job()
    obj["spec"]["tracking"] = {"mlflow": {"trackingUri": url}}
    obj["spec"]["evaluation"]["reference"] = {"url": url, "model": "m"}
    spec = parse_finetunejob(validator.admit(obj)).spec
    assert spec.tracking is not None and spec.tracking.mlflow is not None
    assert spec.tracking.mlflow.tracking_uri == url


@pytest.mark.parametrize(
    "spec",
    [
        {"lora": {"rank": 1024}, "deployment": {"mode": "merged"}},
        {"lora": {"rank": 1024}, "deployment": {"enabled": False}},
        {"lora": {"rank": 1024}, "method": "full"},
        {"lora": {"rank": 512}},
    ],
)
def test_ranks_vllm_cannot_serve_as_adapters_pass_when_not_served_as_one(
    validator: CRDValidator, spec: dict[str, Any]
) -> None:
    obj = valid_job()
    obj["spec"].update(spec)
    parse_finetunejob(validator.admit(obj))


def test_enabling_adapter_serving_of_an_unservable_rank_later_is_refused(validator: CRDValidator) -> None:
    obj = valid_job()
    obj["spec"].update(lora={"rank": 1024}, deployment={"enabled": False})
    stored = validator.admit(obj)
    new = copy.deepcopy(stored)
    new["spec"]["deployment"]["enabled"] = True
    with pytest.raises(InvalidError) as info:
        validator.admit(new, old=stored)
    assert "spec.lora.rank" in str(info.value) and "512" in str(info.value)
    with pytest.raises(SpecError) as model_info:
        parse_finetunejob(new)
    assert "spec.lora.rank" in str(model_info.value)


def test_unknown_fields_are_pruned_by_the_api_server_and_rejected_by_the_models(
    validator: CRDValidator,
) -> None:
    obj = valid_job()
    obj["spec"]["gpuCount"] = 4
    obj["spec"]["lora"] = {"rank": 8, "ranks": 9}
    obj["status"] = {"phase": "Training", "foo": "bar"}
    obj["extra"] = True
    admitted = validator.admit(obj)
    assert "gpuCount" not in admitted["spec"]
    assert admitted["spec"]["lora"]["rank"] == 8 and "ranks" not in admitted["spec"]["lora"]
    assert admitted["status"] == {"phase": "Training"}
    assert "extra" not in admitted
    parse_finetunejob(admitted)
    with pytest.raises(SpecError) as info:
        parse_finetunejob(obj)
    paths = [path for path, _ in info.value.errors]
    assert "spec.gpuCount" in paths and "spec.lora.ranks" in paths


def test_longest_valid_name_is_accepted(validator: CRDValidator) -> None:
    obj = valid_job()
    name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(name) == 253
    obj["metadata"]["name"] = name
    assert validator.admit(obj)["metadata"]["name"] == name
    assert parse_finetunejob(obj).metadata.name == name


# ---------------------------------------------------------------------------------- through the emulator
async def test_the_embedded_api_server_rejects_every_case_with_a_422() -> None:
    """The same table through the embedded cluster's HTTP API, as kubectl would send it."""
    aiohttp = pytest.importorskip("aiohttp")
    apiserver = pytest.importorskip("localcluster.apiserver")
    server = apiserver.ApiServer()
    await server.start()
    base = f"{server.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs"
    try:
        async with aiohttp.ClientSession() as http:
            crds = f"{server.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
            async with http.post(crds, json=build_crd()) as response:
                assert response.status == 201, await response.text()
            stored_job = valid_job()
            stored_job["metadata"]["name"] = "stored"
            async with http.post(base, json=stored_job) as response:
                assert response.status == 201, await response.text()
                stored = await response.json()
            for case in CASES:
                if case.update:
                    obj = copy.deepcopy(stored)
                    case.mutate(obj)
                    request = http.put(f"{base}/stored", json=obj)
                else:
                    obj = valid_job()
                    case.mutate(obj)
                    request = http.post(base, json=obj)
                async with request as response:
                    body = await response.json()
                assert response.status == 422, (case.id, body)
                assert body["reason"] == "Invalid"
                assert case.path in [c["field"] for c in body["details"]["causes"]], (case.id, body)
    finally:
        await server.stop()


# ---------------------------------------------------------------------------------- graders (issue 22)
def graded_job() -> dict[str, Any]:
    obj = valid_job()
    evaluation = obj["spec"]["evaluation"]
    evaluation["graders"] = [
        LABEL,
        {"name": "valid-json", "type": "jsonSchema", "jsonSchema": {"schema": {"type": "object"}}},
        grader(),
        grader(
            "pool-judge", judge={"modelServer": "my-judge", "model": "m", "rubric": "r", "pairwise": True}
        ),
        *(grader(f"extra-{i}") for i in range(4)),
    ]
    evaluation["thresholds"] = [{"metric": "relevance", "min": 0.7}, {"metric": "loss", "max": 3}]
    evaluation["primaryMetric"] = "label-only"
    evaluation["retention"] = {"dataset": "s3://data-bucket/general.jsonl", "metric": "valid-json"}
    evaluation["safety"] = {
        "prompts": "s3://data-bucket/redteam.jsonl",
        "judge": {"modelServer": "my-judge", "model": "m", "apiKeySecret": {"name": "k", "key": "api-key"}},
    }
    return obj


def test_a_graded_job_passes_both_with_defaults_filled_in(validator: CRDValidator) -> None:
    stored = validator.admit(graded_job())
    evaluation = stored["spec"]["evaluation"]
    assert evaluation["graders"][2]["judge"]["scale"] == {"min": 1, "max": 10}
    assert evaluation["graders"][1]["jsonSchema"]["schema"] == {"type": "object"}  # kept, not pruned
    assert evaluation["retention"]["maxDrop"] == 0.05 and evaluation["safety"]["maxUnsafeRate"] == 0
    assert stored["spec"]["deployment"]["servingCheck"] == {"examples": 200, "tolerance": 0.02}
    spec = parse_finetunejob(stored).spec
    assert spec.evaluation.deterministic_graders() == ["label-only", "valid-json"]
    assert [name for name, _ in spec.evaluation.judges()][-1] is None  # safety's judge


@pytest.mark.parametrize(
    ("bad", "path", "words"),
    [
        (
            {**LABEL, "stringCheck": {"operation": "regex", "pattern": "(unclosed"}},
            f"{G0}.stringCheck.pattern",
            "not a valid regular expression",
        ),
        (
            {"name": "valid-json", "type": "jsonSchema", "jsonSchema": {"schema": {"type": 12}}},
            f"{G0}.jsonSchema.schema",
            "not a valid JSON Schema",
        ),
        (
            {"name": "valid-json", "type": "jsonSchema", "jsonSchema": {"schema": {"enum": ["x" * 40_000]}}},
            f"{G0}.jsonSchema.schema",
            "at most 32768 bytes",
        ),
    ],
    ids=["regex-does-not-compile", "schema-invalid", "schema-too-large"],
)
def test_what_only_the_operator_can_check_is_refused_naming_the_field(
    bad: dict[str, Any], path: str, words: str
) -> None:
    obj = valid_job()
    obj["spec"]["evaluation"]["graders"] = [bad]
    with pytest.raises(SpecError) as info:
        parse_finetunejob(obj)
    assert f"{path}: " in str(info.value) and words in str(info.value)


def test_a_regex_pattern_is_only_compiled_for_the_regex_operation() -> None:
    obj = valid_job()
    obj["spec"]["evaluation"]["graders"] = [
        {**LABEL, "stringCheck": {"operation": "contains", "pattern": "("}}
    ]
    parse_finetunejob(obj)


@pytest.mark.parametrize("pattern", ["(?=a)b", "(?<!a)b", r"(a)\1", "(?P<x>a)(?P=x)", "(unclosed"])
@pytest.mark.parametrize("engine", ["re2", "re"])
def test_a_regex_re2_cannot_run_is_refused_with_or_without_re2_installed(
    pattern: str, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer matches with RE2: a pattern only `re` accepts would fail the job after training."""
    if engine == "re":
        real = importlib.import_module

        def no_re2(name: str, *args: Any) -> Any:
            if name == "re2":
                raise ImportError(name)
            return real(name, *args)

        monkeypatch.setattr(importlib, "import_module", no_re2)
    obj = valid_job()
    obj["spec"]["evaluation"]["graders"] = [
        {**LABEL, "stringCheck": {"operation": "regex", "pattern": pattern}}
    ]
    with pytest.raises(SpecError) as info:
        parse_finetunejob(obj)
    assert f"{G0}.stringCheck.pattern: not a valid regular expression" in str(info.value)


def test_re2_patterns_with_escapes_pass_without_re2() -> None:
    obj = valid_job()
    pattern = r"^\d+\\1 (positive|negative)\.$"
    obj["spec"]["evaluation"]["graders"] = [
        {**LABEL, "stringCheck": {"operation": "regex", "pattern": pattern}}
    ]
    parse_finetunejob(obj)
