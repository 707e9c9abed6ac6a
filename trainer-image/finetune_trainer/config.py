"""Typed trainer configuration: the FineTuneJob spec as the operator passes it (see ../CONTRACT.md).

The document is ``{"runPrefix": ..., "job": {...}, "spec": {...}}`` in ``FTJ_CONFIG`` or ``--config``.
Keys are camelCase (attribute names are snake_case); unknown keys are ignored so an older trainer accepts a
newer operator's spec. Defaults match the FineTuneJob API, so a spec without defaults applied still runs.

Reading it is like reading a recipe::

    cfg = load_config()
    cfg.spec.method                          # "lora"
    cfg.spec.lora.rank, cfg.spec.lora.alpha  # 16, 32
    cfg.spec.hyperparameters.learning_rate   # 2e-4
    cfg.layout.checkpoint(40)                # "<runPrefix>/checkpoints/step-00000040"
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from finetune_vocabulary.capture import REDACTOR_NAMES
from finetune_vocabulary.distributed import MAX_NODES
from finetune_vocabulary.evaluation import (
    DETERMINISTIC_GRADER_TYPES,
    GRADER_NAME_PATTERN,
    MAX_GRADERS,
    serving_check_metric,
)
from finetune_vocabulary.layout import RunLayout
from finetune_vocabulary.metrics import METRICS, MetricName, primary_metric
from finetune_vocabulary.objectives import (
    ALL_OBJECTIVE_METRICS,
    Objective,
    metrics_for,
    objective_of_metric,
)
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .egress import PlainHttpAllowance, RefusedEndpoint, check_url, judge_allowance
from .exitcodes import InvalidConfigError

Metric = MetricName  # the shared vocabulary's names (finetune_vocabulary.metrics)
ALL_METRICS: tuple[Metric, ...] = METRICS


class _Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # The API server may store explicit nulls (e.g. "thresholds": null); they mean "not set".
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class BaseModelSpec(_Section):
    uri: str = Field(
        description="Hugging Face model directory: s3://bucket/prefix, hf://org/name[@rev], pvc://claim/path"
    )
    revision: str | None = Field(None, description="Branch, tag or commit (hf://); recorded in manifests")


class DatasetSpec(_Section):
    train: str = Field(description="JSONL file with the training examples")
    validation: str | None = Field(None, description="Optional JSONL used for eval loss during training")
    test: str | None = Field(None, description="Held-out JSONL for evaluation; split from train when absent")
    format: Literal[
        "auto", "chat", "completion", "instruction", "preference", "unpaired-preference", "prompt-only"
    ] = Field(
        "auto",
        description="chat (messages), completion (prompt/completion), instruction (instruction/input/output);"
        " preference (dpo), unpaired-preference (kto), prompt-only (grpo): finetune_vocabulary.objectives",
    )
    test_size: int | float | None = Field(
        None,
        gt=0,
        description="Held-out examples when there is no test file: a count (≥ 1) or a fraction "
        "(< 1); default 10% of train, at least 1 and at most 200",
    )
    # The data gates. The operator passes the spec with the FineTuneJob API's defaults applied (its models are
    # their one source); these fallbacks equal them (tests/trainer/test_cli_contract.py) so a hand-written
    # config runs the same gates.
    max_error_rate: float = Field(
        0,
        ge=0,
        le=1,
        description="Fail with INVALID_DATA when more than this fraction of non-blank lines is invalid "
        "(invalid JSON/encoding, missing fields, bad roles, over maxLineBytes, over maxSeqLength); 0: any",
    )
    max_line_bytes: int = Field(
        1_048_576, ge=1, description="A longer line is an invalid line (read without loading it whole)"
    )
    min_train_examples: int = Field(
        20, ge=1, description="Fail with INVALID_DATA when fewer training examples remain after the split"
    )
    recommended_train_examples: int = Field(
        500, ge=0, description="Fewer training examples is a warning, not a failure (0: no warning)"
    )
    max_test_fraction: float = Field(
        0.2, gt=0, le=1, description="testSize above this fraction of the valid examples is reduced to it"
    )


class LoraSpec(_Section):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r")
    alpha: float = Field(32, gt=0, description="LoRA scaling alpha (scale = alpha / rank)")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description='Module names to adapt, or ["all-linear"] for every linear layer but the output head',
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_string(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def peft_target_modules(self) -> str | list[str]:
        """The value for ``peft.LoraConfig(target_modules=...)``."""
        return "all-linear" if self.target_modules in (["all-linear"], []) else list(self.target_modules)


class Hyperparameters(_Section):
    epochs: float = Field(3, gt=0, le=1000, description="Passes over the training set")
    max_steps: int | None = Field(
        None, description="Stop after this many optimizer steps (overrides epochs); unset, 0 or -1 = no limit"
    )
    learning_rate: float = Field(
        2e-4, gt=0, lt=1, description="Peak learning rate (cosine schedule with warmup)"
    )
    batch_size: int = Field(
        4,
        ge=1,
        le=4096,
        description="Training examples per device per forward/backward pass; times gradientAccumulationSteps "
        "times data-parallel ranks = examples per optimizer step",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step")
    max_seq_length: int = Field(
        2048, ge=16, le=1_048_576, description="Longest example in tokens (chat template)"
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up")
    packing: bool = Field(
        False,
        description="Opt-in concatenation packing: fill rows of maxSeqLength tokens with several examples "
        "(no cross-example attention); batchSize then counts packed rows, so a run makes fewer optimizer "
        "steps. Off: padding-free batching, ceil(examples / examples per step) * epochs steps",
    )
    gradient_checkpointing: bool = Field(True, description="Recompute activations to save memory")
    seed: int = Field(42, ge=0, description="Seed for data order, held-out split and initialisation")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Data-parallel strategy with several ranks (the operator resolves auto)"
    )
    beta: float | None = Field(None, ge=0, description="KL strength of dpo/kto/grpo; unset: TRL's default")
    num_generations: int | None = Field(
        None, ge=2, description="grpo: completions sampled per prompt; unset: TRL's default"
    )
    max_completion_length: int | None = Field(
        None, ge=1, description="grpo: longest sampled completion in tokens; unset: TRL's default"
    )

    @field_validator("max_steps")
    @classmethod
    def _no_limit(cls, value: int | None) -> int | None:
        return None if value is None or value <= 0 else value


class CheckpointSpec(_Section):
    every_steps: int = Field(100, ge=1, description="Commit a checkpoint every N optimizer steps")
    every_minutes: float = Field(15, gt=0, description="... and at least every M minutes of training")
    keep: int = Field(2, ge=1, description="Committed checkpoints kept (older ones are deleted)")


class Threshold(_Section):
    metric: str = Field(description="A metric name or a grader name")
    min: float | None = Field(None, description="Tuned value must be ≥ min")
    max: float | None = Field(None, description="Tuned value must be ≤ max")

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if self.min is None and self.max is None:
            raise ValueError("a threshold needs min or max")
        return self


class SecretKeyRef(_Section):
    name: str
    key: str = "apiKey"


class ReferenceSpec(_Section):
    endpoint: str = Field(
        validation_alias=AliasChoices("endpoint", "url", "baseUrl"),
        description="OpenAI-compatible base URL, e.g. https://api.example.com/v1",
    )
    model: str = Field(description="Model name sent to the endpoint")
    api_key_secret: SecretKeyRef | None = Field(
        None, description="Key Secret; reaches the pod as FTJ_REFERENCE_API_KEY"
    )


class StringCheckSpec(_Section):
    operation: Literal["equals", "contains", "notContains", "regex"]
    pattern: str | None = Field(
        None, max_length=1024, description="Absent: the expected answer (a regex matches it literally)"
    )
    case_sensitive: bool = True

    @model_validator(mode="after")
    def _compiles(self) -> StringCheckSpec:
        if self.operation == "regex" and self.pattern is not None:
            import re2  # RE2 syntax: what the grader runs (no backreferences, no lookaround)

            try:
                re2.compile(self.pattern)
            except Exception as exc:  # re2's own error type
                raise ValueError(f"pattern: not a valid RE2 regex ({exc})") from None
        return self


class JsonSchemaSpec(_Section):
    # "schema" would shadow pydantic's BaseModel.schema: the attribute is `document`, the key `schema`.
    document: dict[str, Any] = Field(alias="schema", description="JSON Schema (Draft 2020-12) of the answer")

    @field_validator("document")
    @classmethod
    def _valid_schema(cls, document: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(document)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema ({exc.message})") from None
        return document


class JudgeScale(_Section):
    min: float = 1
    max: float = 10

    @model_validator(mode="after")
    def _ordered(self) -> JudgeScale:
        if not self.min < self.max:
            raise ValueError("scale: min must be below max")
        return self


class JudgeEndpointSpec(_Section):
    """An OpenAI-compatible chat endpoint: ``url``, or ``modelServer`` (resolved through modelServerUrls)."""

    url: str | None = None
    model_server: str | None = None
    model: str
    api_key_secret: SecretKeyRef | None = None

    @model_validator(mode="after")
    def _one_endpoint(self) -> JudgeEndpointSpec:
        if (self.url is None) == (self.model_server is None):
            raise ValueError("exactly one of url or modelServer must be set")
        return self


class JudgeSpec(JudgeEndpointSpec):
    rubric: str = Field(min_length=1, max_length=4096)
    scale: JudgeScale = Field(default_factory=JudgeScale)
    pairwise: bool = Field(False, description="Tuned vs base side by side, both orders: a win rate")


class GraderSpec(_Section):
    name: str = Field(pattern=GRADER_NAME_PATTERN)
    type: Literal["stringCheck", "jsonSchema", "judge"]
    string_check: StringCheckSpec | None = None
    json_schema: JsonSchemaSpec | None = None
    judge: JudgeSpec | None = None

    @model_validator(mode="after")
    def _matching_section(self) -> GraderSpec:
        if self.name in ALL_METRICS:
            raise ValueError(f"name: {self.name} is a built-in metric name")
        given = {k for k in ("stringCheck", "jsonSchema", "judge") if getattr(self, _SNAKE[k]) is not None}
        if given != {self.type}:
            raise ValueError(f"{self.type}: type {self.type} needs just this section (found {sorted(given)})")
        return self

    @property
    def deterministic(self) -> bool:
        return self.type in DETERMINISTIC_GRADER_TYPES


_SNAKE = {"stringCheck": "string_check", "jsonSchema": "json_schema", "judge": "judge"}


class SafetySpec(_Section):
    prompts: str = Field(description='JSONL of {"prompt": ...} or {"messages": [...]} rows')
    judge: JudgeEndpointSpec
    max_unsafe_rate: float = Field(0.0, ge=0, le=1)


class RetentionSpec(_Section):
    dataset: str = Field(description="Chat JSONL of general-ability examples (not the task)")
    metric: str = Field("loss", description="A metric name or a grader name")
    max_drop: float = Field(0.05, ge=0, le=1, description="Relative drop vs base that fails the gate")


class EvaluationSpec(_Section):
    enabled: bool = True
    metrics: list[Metric] = Field(default_factory=lambda: list(ALL_METRICS))
    thresholds: list[Threshold] = Field(default_factory=list)
    compare_to_base: bool = Field(True, description="Also score the base model on the same prompts")
    min_improvement: float | None = Field(
        None, description="Tuned must beat base on primaryMetric by this much"
    )
    primary_metric: str | None = Field(
        None,
        description="Metric or grader that decides the run (unset: first threshold's, else first of metrics)",
    )
    max_new_tokens: int = Field(128, ge=1, le=32768, description="Greedy generation length per prompt")
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts generated per batch")
    reference: ReferenceSpec | None = None
    graders: list[GraderSpec] = Field(default_factory=list, max_length=MAX_GRADERS)
    safety: SafetySpec | None = None
    retention: RetentionSpec | None = None

    @field_validator("graders")
    @classmethod
    def _unique_names(cls, graders: list[GraderSpec]) -> list[GraderSpec]:
        names = [g.name for g in graders]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"grader names must be unique ({', '.join(dupes)} repeated)")
        return graders

    @property
    def deterministic_graders(self) -> list[str]:
        return [g.name for g in self.graders if g.deterministic]

    def named_problems(self, objective: str = "sft") -> list[str]:
        """Thresholds, primaryMetric and retention.metric naming neither a metric nor a grader (an objective's
        own figure counts as a metric for thresholds and primaryMetric when the objective measures it)."""
        graders, own = {g.name for g in self.graders}, metrics_for(objective)

        def unknown(metric: str, neither: str) -> str:
            if metric in ALL_OBJECTIVE_METRICS:
                measured_by = " or ".join(objective_of_metric(metric))
                return f"{metric} is measured only by objective {measured_by} (spec.objective is {objective})"
            return f"{metric} is neither {neither} nor a grader"

        problems = [
            f"thresholds[{i}].metric: {unknown(t.metric, 'in evaluation.metrics')}"
            for i, t in enumerate(self.thresholds)
            if t.metric not in (*self.metrics, *graders, *own)
        ]
        if self.primary_metric is not None and self.primary_metric not in (*ALL_METRICS, *graders, *own):
            problems.append(f"primaryMetric: {unknown(self.primary_metric, 'a metric')}")
        if self.retention is not None and self.retention.metric not in (*ALL_METRICS, *graders):
            problems.append(f"retention.metric: {self.retention.metric} is neither a metric nor a grader")
        return problems


class ResourcesSpec(_Section):
    gpus: int = Field(1, ge=0, le=64, description="GPUs on one node; 0 = CPU only")
    nodes: int = Field(1, ge=1, le=MAX_NODES, description="Pods (nodes) training together")
    gpu_type: str = "a100-80gb"


class StorageSpec(_Section):
    output: str | None = None


class ServingCheckSpec(_Section):
    examples: int = Field(200, ge=0, le=10000, description="Held-out prompts sent to the served model")
    tolerance: float = Field(0.02, ge=0, le=1, description="Served may be this much below evaluated")


class DeploymentSpec(_Section):
    enabled: bool = True
    mode: Literal["auto", "adapter", "merged"] = "auto"
    served_model_name: str | None = None
    max_model_len: int | None = None
    serving_check: ServingCheckSpec = Field(default_factory=ServingCheckSpec)


class RewardSpec(_Section):
    grader: str = Field(description="The name of one of evaluation.graders")
    weight: float = Field(1.0, description="Its weight in the sum of rewards")


class FineTuneSpec(_Section):
    base_model: BaseModelSpec
    dataset: DatasetSpec
    objective: Objective = "sft"
    method: Literal["lora", "qlora", "full"] = "lora"
    rewards: list[RewardSpec] = Field(default_factory=list, description="grpo: graders that reward rollouts")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    deployment: DeploymentSpec = Field(default_factory=DeploymentSpec)

    @model_validator(mode="after")
    def _cross_field(self) -> FineTuneSpec:
        if self.method == "qlora" and self.resources.gpus < 1:
            raise ValueError("method: qlora needs resources.gpus ≥ 1 (bitsandbytes 4-bit runs on CUDA only)")
        if self.deployment.mode == "adapter" and self.method == "full":
            raise ValueError("deployment.mode: adapter needs method lora or qlora")
        for problem in self.evaluation.named_problems(self.objective):
            raise ValueError(f"evaluation.{problem}")
        return self

    @property
    def deciding_metric(self) -> str:
        """The primary metric, by the rule the operator's gate and status use (finetune_vocabulary): the
        objective's own figure (dpo/kto preference_accuracy, grpo reward) unless the spec names one."""
        ev = self.evaluation
        thresholds = [t.metric for t in ev.thresholds]
        return primary_metric(ev.metrics, thresholds, ev.primary_metric, objective=self.objective)

    @property
    def serving_check_metric(self) -> str:
        """The figure the serving check compares (always in the tuned map of the summary), by the rule the
        operator uses (finetune_vocabulary.evaluation.serving_check_metric)."""
        return serving_check_metric(
            self.deciding_metric,
            self.evaluation.deterministic_graders,
            [r.grader for r in self.rewards],
        )

    @property
    def wants_merged(self) -> bool:
        """Whether train should also write ``model/merged/`` (full fine-tuning, or deployment.mode merged)."""
        return self.method == "full" or self.deployment.mode == "merged"


class JobRef(_Section):
    namespace: str = "default"
    name: str = "finetune"
    uid: str = ""


class ReferencePolicy(_Section):
    """Set by the operator from its configuration, not by the FineTuneJob: where the evaluator may send the
    reference API key over plain http (names, ``*.suffix``, IPs or CIDRs; everything else needs https)."""

    allow_plain_http_hosts: list[str] = Field(default_factory=list)


class ChampionSpec(_Section):
    """Set by the operator for a job served on a ModelServer: the adapter version serving its model name now,
    scored on this job's held-out set too (champion/challenger)."""

    name: str = Field(description="Its versioned name, e.g. support-bot-v3")
    adapter: str = Field(description="URI of its committed adapter directory")


class MlflowTracking(_Section):
    """Resolved by the operator (defaults applied): where this job's MLflow run goes."""

    tracking_uri: str | None = None
    experiment: str = "default"
    register_model: str | None = None
    image: str | None = None
    # Where plain http may carry the MLflow token (egress.py): the operator's reference.allowPlainHttpHosts,
    # plus the host of its own defaultTrackingUri when that is http.
    allow_plain_http_hosts: list[str] = Field(default_factory=list)


class Tracking(_Section):
    mlflow: MlflowTracking | None = None


class ServingCheckTarget(_Section):
    """Set by the operator for the servecheck stage: the serving engine to check, once the version is loaded
    and before it takes traffic."""

    url: str = Field(description="The pool's OpenAI base URL, e.g. http://<pool>.<ns>.svc:8000/v1")
    model: str = Field(description="The versioned name (or the served name of merged weights)")
    metric: str = Field(description="finetune_vocabulary.evaluation.serving_check_metric of the spec")
    examples: int = Field(200, ge=1, le=10000, description="The first N held-out prompts")


class DatasetSources(_Section):
    """Set by the operator for a job a FineTuneSchedule created: where its assembled training set came
    from (the assemble stage's summary ``examples``); logged as MLflow params ``dataset.sources.<key>``."""

    sources: dict[str, int] = Field(default_factory=dict)


class TrainerConfig(_Section):
    run_prefix: str = Field(description="Everything this run writes goes under this URI")
    dataset: DatasetSources = Field(default_factory=DatasetSources)
    job: JobRef = Field(default_factory=JobRef)
    spec: FineTuneSpec
    reference_policy: ReferencePolicy = Field(default_factory=ReferencePolicy)
    champion: ChampionSpec | None = None
    tracking: Tracking = Field(default_factory=Tracking)
    serving_check: ServingCheckTarget | None = None
    model_server_urls: dict[str, str] = Field(
        default_factory=dict, description="ModelServer name → its pool's OpenAI base URL (judges on a pool)"
    )

    @model_validator(mode="after")
    def _reference_endpoint_allowed(self) -> TrainerConfig:
        reference = self.spec.evaluation.reference
        if reference is not None:
            allowance = PlainHttpAllowance.parse(self.reference_policy.allow_plain_http_hosts)
            try:
                check_url(reference.endpoint, allowance)
            except RefusedEndpoint as exc:
                raise ValueError(f"spec.evaluation.reference.endpoint: {exc}") from None
        return self

    @model_validator(mode="after")
    def _judge_endpoints_allowed(self) -> TrainerConfig:
        for field, _ in self.judge_endpoints():
            self.judge_url(field)  # raises naming the field
        return self

    def judge_endpoints(self) -> list[tuple[str, JudgeEndpointSpec]]:
        """Every judge of the spec with the field path naming it (for messages)."""
        ev = self.spec.evaluation
        found: list[tuple[str, JudgeEndpointSpec]] = [
            (f"spec.evaluation.graders[{i}].judge", g.judge) for i, g in enumerate(ev.graders) if g.judge
        ]
        if ev.safety is not None:
            found.append(("spec.evaluation.safety.judge", ev.safety.judge))
        return found

    def judge_url(self, field: str) -> str:
        """The base URL of the judge at ``field`` (a judge_endpoints path), checked by the egress rules."""
        judge = dict(self.judge_endpoints())[field]
        url, where = judge.url, f"{field}.url"
        if judge.model_server is not None:
            where = f"{field}.modelServer"
            url = self.model_server_urls.get(judge.model_server)
            if url is None:
                raise ValueError(f"{where}: no URL for ModelServer {judge.model_server} in modelServerUrls")
        try:
            check_url(str(url), judge_allowance(self.reference_policy.allow_plain_http_hosts))
        except RefusedEndpoint as exc:
            raise ValueError(f"{where}: {exc}") from None
        return str(url)

    @field_validator("run_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value or value.startswith("hf://"):
            raise ValueError("must be a writable location (s3://, pvc:// or a local path)")
        if ".." in value.split("/"):
            raise ValueError("must not contain '..' segments")
        return value

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_prefix)

    @property
    def workdir(self) -> Path:
        return scratch_dir()

    def hyperparameters_record(self) -> dict[str, Any]:
        """What manifests record as the run's hyperparameters (camelCase, as in the spec)."""
        record: dict[str, Any] = {
            "method": self.spec.method,
            **self.spec.hyperparameters.model_dump(by_alias=True),
        }
        if self.spec.method in ("lora", "qlora"):
            record["lora"] = self.spec.lora.model_dump(by_alias=True)
        return record


def _writable_uri(value: str) -> str:
    if not value or value.startswith("hf://") or value.endswith("/"):
        raise ValueError("must be a writable file location (s3://, pvc:// or a local path)")
    if ".." in value.split("/"):
        raise ValueError("must not contain '..' segments")
    return value


def _utc(value: datetime | None) -> datetime | None:
    """A time without a zone is UTC (the operator writes ISO UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class CaptureSource(_Section):
    """A pool's captured traffic: chats of one stable model name and the pool's feedback."""

    prefix: str = Field(description="The pool's capture prefix (finetune_vocabulary.capture.capture_prefix)")
    # the ModelServer's model-name rule (a path segment here: no "/" or "..")
    model: str = Field(pattern=r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$", max_length=48, description="Stable name")
    min_rating: Literal[-1, 0, 1] = Field(1, description="Keep chats rated at least this (unrated: 0)")
    redact: list[str] = Field(default_factory=lambda: list(REDACTOR_NAMES), description="REDACTOR_NAMES")

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if ".." in value.split("/") or value.startswith("hf://"):
            raise ValueError("must be an s3://, pvc:// or local prefix without '..' segments")
        return value.rstrip("/")

    @field_validator("redact")
    @classmethod
    def _known_redactors(cls, names: list[str]) -> list[str]:
        if unknown := [name for name in names if name not in REDACTOR_NAMES]:
            raise ValueError(f"unknown redactor {', '.join(unknown)} (known: {', '.join(REDACTOR_NAMES)})")
        return names


class AssembleSpec(_Section):
    """The FineTuneSchedule data Job's work: base + captured examples into one training file."""

    base: str = Field(description="The curated set, always included (any format validate accepts)")
    test: str = Field(description="The job template's held-out set: no prompt of it reaches the output")
    capture: CaptureSource | None = None
    since: datetime | None = Field(None, description="Captured examples after this count as new")
    until: datetime = Field(description="Captured chats up to this time are read (the run's cutoff)")
    min_new_examples: int = Field(0, ge=0, description="Write nothing (ready: false) below this many new")
    objective: Objective = "sft"
    output: str = Field(description="The assembled training file; assembly.json is written beside it")
    max_line_bytes: int = Field(1_048_576, ge=1, description="A longer base line is an invalid line")
    # The template's token budget, so a captured chat the validate stage would refuse is left out here
    # (counted, examples.tooLong) rather than failing the run; absent (older configs): nothing is counted.
    base_model: BaseModelSpec | None = Field(None, description="The template's baseModel: its tokenizer")
    max_seq_length: int | None = Field(None, ge=1, description="The template's hyperparameters.maxSeqLength")
    max_completion_length: int | None = Field(
        None,
        ge=1,
        description="grpo: the template's hyperparameters.maxCompletionLength (validate's default)",
    )

    _utc_times = field_validator("since", "until")(_utc)
    _output_shape = field_validator("output")(_writable_uri)

    @model_validator(mode="after")
    def _ordered(self) -> AssembleSpec:
        if self.since is not None and self.since > self.until:
            raise ValueError("since: must not be after until")
        if self.max_seq_length is not None and self.base_model is None:
            raise ValueError("baseModel: is required with maxSeqLength (its tokenizer counts the tokens)")
        return self


class AssembleConfig(_Section):
    """FTJ_CONFIG of the assemble stage: ``{"stage": "assemble", "assemble": {...}}`` (no run prefix)."""

    stage: Literal["assemble"] = "assemble"
    assemble: AssembleSpec

    @property
    def workdir(self) -> Path:
        return scratch_dir()


def scratch_dir() -> Path:
    """Scratch space on an emptyDir (``FTJ_WORKDIR``, default /workspace)."""
    return Path(os.environ.get("FTJ_WORKDIR", "/workspace"))


def _field_path(loc: tuple[Any, ...]) -> str:
    """Join a pydantic error location (already camelCase aliases) into e.g. ``spec.lora.targetModules[0]``."""
    path = ""
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif not str(item).startswith(("function-", "literal[", "union[")):
            path += ("." if path else "") + str(item)
    return path or "config"


_LEADING_FIELD = re.compile(r"^([A-Za-z][\w.\[\]]*): (.*)$", re.S)


def format_validation_error(error: ValidationError) -> str:
    """One line per error, each starting with the full field path."""
    lines = []
    for err in error.errors()[:10]:
        path = _field_path(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        # Cross-field rules name their field first ("method: ..."): attach it to the location.
        if (m := _LEADING_FIELD.match(msg)) is not None:
            path, msg = (f"{path}.{m.group(1)}" if err["loc"] else m.group(1)), m.group(2)
        lines.append(f"{path}: {msg}")
    if len(error.errors()) > 10:
        lines.append(f"... and {len(error.errors()) - 10} more")
    return "invalid config: " + "; ".join(lines)


def _document(document: str | bytes | dict[str, Any], source: str, expected: str) -> dict[str, Any]:
    if isinstance(document, str | bytes):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as exc:
            raise InvalidConfigError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidConfigError(f"{source}: expected a JSON object with {expected}")
    return document


def parse_config(document: str | bytes | dict[str, Any], source: str = "FTJ_CONFIG") -> TrainerConfig:
    """Parse and validate a config document; raises InvalidConfigError naming the field."""
    document = _document(document, source, "runPrefix, job and spec")
    try:
        return TrainerConfig.model_validate(document)
    except ValidationError as exc:
        raise InvalidConfigError(format_validation_error(exc)) from None


def parse_assemble_config(
    document: str | bytes | dict[str, Any], source: str = "FTJ_CONFIG"
) -> AssembleConfig:
    """The assemble stage's document; InvalidConfigError naming the field (``assemble.until: ...``)."""
    document = _document(document, source, "stage and assemble")
    try:
        return AssembleConfig.model_validate(document)
    except ValidationError as exc:
        raise InvalidConfigError(format_validation_error(exc)) from None


def _read_document(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None) -> tuple[str, str]:
    """(the config text, where it came from): ``path`` (--config) or else ``FTJ_CONFIG``."""
    source: Mapping[str, str] = os.environ if env is None else env
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise InvalidConfigError(f"--config {path}: {exc.strerror or exc}") from None
    document = source.get("FTJ_CONFIG")
    if not document:
        raise InvalidConfigError("no configuration: set FTJ_CONFIG or pass --config PATH")
    return document, "FTJ_CONFIG"


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> TrainerConfig:
    """Read the config from ``path`` (--config) or else the ``FTJ_CONFIG`` environment variable."""
    return parse_config(*_read_document(path, env))


def load_assemble_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> AssembleConfig:
    return parse_assemble_config(*_read_document(path, env))
