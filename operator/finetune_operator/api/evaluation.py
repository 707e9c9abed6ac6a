"""The evaluation section of a FineTuneJob spec: metrics, thresholds, the reference model, graders (string
checks, JSON schemas, judge models), the safety check and the forgetting (retention) gate.

Grader names are usable wherever a metric name is (thresholds, primaryMetric, retention.metric); the cross
checks live twice, as CEL and as model validators, with the same messages (schema.py).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Annotated, Any, Literal

from finetune_vocabulary.evaluation import BUILTIN_METRICS, GRADER_NAME_PATTERN, MAX_GRADERS
from finetune_vocabulary.metrics import METRICS, MetricName
from finetune_vocabulary.objectives import ALL_OBJECTIVE_METRICS
from pydantic import ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator, model_validator

from finetune_operator.api.schema import (
    GRADER_NAME_BUILTIN,
    GRADER_NAMES_UNIQUE,
    GRADER_TYPE_MISMATCH,
    JUDGE_ONE_ENDPOINT,
    PRIMARY_METRIC_UNKNOWN,
    RETENTION_METRIC_UNKNOWN,
    SCALE_ORDER,
    THRESHOLD_METRIC_UNKNOWN,
    THRESHOLD_ONE_BOUND,
    DNSSubdomain,
    EgressURL,
    SourceURI,
    SpecModel,
    rule,
    validations,
)

ALL_METRICS: tuple[MetricName, ...] = METRICS
GraderType = Literal["stringCheck", "jsonSchema", "judge"]
StringOperation = Literal["equals", "contains", "notContains", "regex"]
GraderName = Annotated[str, Field(min_length=1, max_length=32, pattern=GRADER_NAME_PATTERN)]
# A built-in metric (exact_match ...) or a grader name: the union of both spellings.
METRIC_OR_GRADER_PATTERN = r"^[a-z0-9]([-_a-z0-9]{0,30}[a-z0-9])?$"
MetricOrGrader = Annotated[str, Field(min_length=1, max_length=32, pattern=METRIC_OR_GRADER_PATTERN)]
MAX_JSON_SCHEMA_BYTES = 32_768
_BUILTINS_CEL = "[" + ", ".join(f"'{m}'" for m in BUILTIN_METRICS) + "]"
# The objectives' own figures (dpo/kto: preference_accuracy, reward_margin; grpo: reward): usable in
# thresholds and primaryMetric; the spec checks that its objective measures them (api/finetunejob.py).
OBJECTIVE_METRICS_CEL = "[" + ", ".join(f"'{m}'" for m in ALL_OBJECTIVE_METRICS) + "]"


def _is_grader(names: str) -> str:
    """CEL: `names` (a CEL expression of a string) is the name of one of self.graders."""
    return f"(has(self.graders) && self.graders.exists(g, g.name == {names}))"


class Threshold(SpecModel):
    """A gate on one metric (or grader) of the tuned model."""

    model_config = ConfigDict(
        json_schema_extra=validations(rule("has(self.min) != has(self.max)", THRESHOLD_ONE_BOUND))
    )

    metric: MetricOrGrader = Field(description="Metric or grader name to gate on.")
    min: float | None = Field(default=None, ge=-1e9, le=1e9, description="Lowest acceptable value.")
    max: float | None = Field(default=None, ge=-1e9, le=1e9, description="Highest acceptable value.")

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if (self.min is None) == (self.max is None):
            raise ValueError(THRESHOLD_ONE_BOUND)
        return self


class SecretKeyRef(SpecModel):
    """A key of a Secret in the job's namespace."""

    name: DNSSubdomain = Field(description="Secret name.")
    key: str = Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the Secret.")


ModelId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\s]+$")]


class ReferenceSpec(SpecModel):
    """An OpenAI-compatible model scored on the same prompts, for comparison only."""

    url: EgressURL = Field(description="Base URL, e.g. https://host/v1.")
    model: ModelId = Field(description="Model name to request.")
    api_key_secret: SecretKeyRef | None = Field(default=None, description="Secret key holding the API key.")


# ---------------------------------------------------------------------------------------------- graders
class JudgeEndpointSpec(SpecModel):
    """An OpenAI-compatible judge model: an external URL or a ModelServer in the job's namespace."""

    model_config = ConfigDict(
        json_schema_extra=validations(rule("has(self.url) != has(self.modelServer)", JUDGE_ONE_ENDPOINT))
    )

    url: EgressURL | None = Field(
        default=None, description="Base URL, e.g. https://host/v1 (the same egress rules as the reference)."
    )
    model_server: DNSSubdomain | None = Field(
        default=None, description="A ModelServer in the job's namespace, reached at its pool Service."
    )
    model: ModelId = Field(description="Model name to request.")
    api_key_secret: SecretKeyRef | None = Field(default=None, description="Secret key holding the API key.")

    @model_validator(mode="after")
    def _one_endpoint(self) -> JudgeEndpointSpec:
        if (self.url is None) == (self.model_server is None):
            raise ValueError(JUDGE_ONE_ENDPOINT)
        return self


class ScaleSpec(SpecModel):
    """The judge's score range; scores are normalised to [0, 1]."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule("!has(self.min) || !has(self.max) || self.min < self.max", SCALE_ORDER)
        )
    )

    min: float = Field(default=1, ge=-1e6, le=1e6, description="Worst score.")
    max: float = Field(default=10, ge=-1e6, le=1e6, description="Best score.")

    @model_validator(mode="after")
    def _ordered(self) -> ScaleSpec:
        if self.min >= self.max:
            raise ValueError(SCALE_ORDER)
        return self


class JudgeSpec(JudgeEndpointSpec):
    """A judge model that scores each answer against a rubric."""

    rubric: str = Field(min_length=1, max_length=4096, description="What the judge scores, in words.")
    scale: ScaleSpec = Field(
        default_factory=ScaleSpec, json_schema_extra={"default": {}}, description="The score range."
    )
    pairwise: bool = Field(
        default=False, description="Tuned vs base side by side, both orders: reports tuned's win rate."
    )


# What `re` accepts and RE2 (the trainer's linear-time engine) does not: look-around and back-references.
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\(\?P=|(?<!\\)\\[1-9]")


def _check_regex(pattern: str) -> None:
    """Compile with google-re2 when installed, else with `re` after refusing what RE2 lacks."""
    try:
        engine: Any = importlib.import_module("re2")
    except ImportError:
        if _NOT_RE2.search(pattern):
            raise ValueError(
                "not a valid regular expression: RE2 has no look-around or back-references"
            ) from None
        engine = re
    try:
        engine.compile(pattern)
    except Exception as exc:  # re.error, re2.error
        raise ValueError(f"not a valid regular expression: {exc}") from None


class StringCheckSpec(SpecModel):
    """A check of the answer's text: score 1 when it holds, else 0."""

    operation: StringOperation = Field(description="equals, contains, notContains or regex (a search).")
    pattern: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="The text or regular expression (RE2 syntax); unset: the example's expected answer.",
    )
    case_sensitive: bool = Field(default=True, description="Compare case-sensitively.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None, info: ValidationInfo) -> str | None:
        if pattern is not None and info.data.get("operation") == "regex":
            _check_regex(pattern)
        return pattern


def _json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("Input should be a JSON object")
    if len(json.dumps(value, separators=(",", ":"))) > MAX_JSON_SCHEMA_BYTES:
        raise ValueError(f"must be at most {MAX_JSON_SCHEMA_BYTES} bytes as JSON")
    try:
        validator = importlib.import_module("jsonschema").Draft202012Validator
    except ImportError:
        return value  # the trainer checks it again
    try:
        validator.check_schema(value)
    except Exception as exc:  # jsonschema.SchemaError
        raise ValueError(f"not a valid JSON Schema: {getattr(exc, 'message', exc)}") from None
    return value


JsonObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True, "maxProperties": 64}),
]


class JsonSchemaSpec(SpecModel):
    """The answer must parse as JSON (a ```json block is unwrapped) and validate against the schema."""

    schema_: JsonObject = Field(alias="schema", description="A JSON Schema (Draft 2020-12) object.")

    @field_validator("schema_", mode="plain")
    @classmethod
    def _object(cls, value: Any) -> dict[str, Any]:
        return _json_object(value)


class GraderSpec(SpecModel):
    """A named score in [0, 1] (higher is better) for every model the evaluation scores."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(f"!(self.name in {_BUILTINS_CEL})", GRADER_NAME_BUILTIN),
            rule(
                "(self.type == 'stringCheck') == has(self.stringCheck) && "
                "(self.type == 'jsonSchema') == has(self.jsonSchema) && "
                "(self.type == 'judge') == has(self.judge)",
                GRADER_TYPE_MISMATCH,
            ),
        )
    )

    name: GraderName = Field(description="Usable wherever a metric name is; not a built-in metric name.")
    type: GraderType = Field(description="stringCheck, jsonSchema or judge: the one sub-object to set.")
    string_check: StringCheckSpec | None = Field(default=None, description="A text check.")
    json_schema: JsonSchemaSpec | None = Field(
        default=None, description="A JSON Schema the answer must meet."
    )
    judge: JudgeSpec | None = Field(default=None, description="A judge model with a rubric.")

    @model_validator(mode="after")
    def _consistent(self) -> GraderSpec:
        if self.name in BUILTIN_METRICS:
            raise ValueError(GRADER_NAME_BUILTIN)
        present = {"stringCheck": self.string_check, "jsonSchema": self.json_schema, "judge": self.judge}
        if any((kind == self.type) != (value is not None) for kind, value in present.items()):
            raise ValueError(GRADER_TYPE_MISMATCH)
        return self

    @property
    def deterministic(self) -> bool:
        return self.type != "judge"


class SafetySpec(SpecModel):
    """Red-team prompts answered by tuned and base, classified safe/unsafe by a judge (built-in rubric)."""

    prompts: SourceURI = Field(description="JSONL of {prompt} or {messages} rows.")
    judge: JudgeEndpointSpec = Field(description="The judge model (its rubric is built in).")
    max_unsafe_rate: float = Field(
        default=0.0, ge=0, le=1, description="Reject the model when more of its answers are unsafe."
    )


class RetentionSpec(SpecModel):
    """A general-ability set that is NOT the task: tuning must not make it worse than the base by more than
    maxDrop."""

    dataset: SourceURI = Field(description="Chat JSONL like the test set.")
    metric: MetricOrGrader = Field(default="loss", description="A metric or grader name.")
    max_drop: float = Field(
        default=0.05, ge=0, le=1, description="Largest relative drop against base (direction-aware)."
    )


# ---------------------------------------------------------------------------------------------- section
_EVALUATION_RULES = validations(
    rule(
        "!has(self.thresholds) || self.thresholds.all(t, !has(t.metric) || t.metric in self.metrics || "
        f"t.metric in {OBJECTIVE_METRICS_CEL} || {_is_grader('t.metric')})",
        THRESHOLD_METRIC_UNKNOWN,
    ),
    rule(
        "!has(self.primaryMetric) || self.primaryMetric in self.metrics || "
        f"self.primaryMetric in {OBJECTIVE_METRICS_CEL} || {_is_grader('self.primaryMetric')}",
        PRIMARY_METRIC_UNKNOWN,
    ),
    rule(
        "!has(self.graders) || self.graders.all(g, self.graders.exists_one(h, h.name == g.name))",
        GRADER_NAMES_UNIQUE,
    ),
    rule(
        "!has(self.retention) || !has(self.retention.metric) || "
        f"self.retention.metric in {_BUILTINS_CEL} || {_is_grader('self.retention.metric')}",
        RETENTION_METRIC_UNKNOWN,
    ),
)


class EvaluationSpec(SpecModel):
    """Evaluate the tuned model against its base on held-out data, then gate."""

    model_config = ConfigDict(json_schema_extra=_EVALUATION_RULES)

    enabled: bool = Field(default=True, description="Run the evaluation stage.")
    metrics: list[MetricName] = Field(
        default_factory=lambda: list[MetricName](list(ALL_METRICS)),
        min_length=1,
        max_length=5,
        json_schema_extra={"default": list(ALL_METRICS), "x-kubernetes-list-type": "set"},
        description="Metrics to compute.",
    )
    graders: list[GraderSpec] | None = Field(
        default=None,
        max_length=MAX_GRADERS,
        description="Graders (docs/evaluation.md): each scores every answer in [0, 1]; a grader's name is "
        "usable wherever a metric name is.",
    )
    thresholds: list[Threshold] | None = Field(
        default=None, max_length=10, description="Gates; a failed gate rejects the model."
    )
    compare_to_base: bool = Field(default=True, description="Also score the base model and compare.")
    min_improvement: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="Least relative improvement of primaryMetric over the base model (0.05 = 5%).",
    )
    primary_metric: MetricOrGrader | None = Field(
        default=None,
        description="Metric or grader that decides the run: compared with the base model and shown in "
        "status.evaluation.summary (unset: the first threshold's metric, else the objective's own figure "
        "(dpo, kto: preference_accuracy; grpo: reward), else the first of metrics).",
    )
    max_new_tokens: int = Field(default=128, ge=1, le=8192, description="Generation budget per prompt.")
    batch_size: int = Field(default=8, ge=1, le=1024, description="Prompts generated per batch.")
    reference: ReferenceSpec | None = Field(default=None, description="Optional API model to compare with.")
    safety: SafetySpec | None = Field(
        default=None, description="Unsafe answers to red-team prompts above maxUnsafeRate reject the model."
    )
    retention: RetentionSpec | None = Field(
        default=None, description="A general-ability set: a drop beyond maxDrop rejects the model."
    )

    @field_validator("metrics")
    @classmethod
    def _metrics_unique(cls, metrics: list[MetricName]) -> list[MetricName]:
        for i, metric in enumerate(metrics):
            if metric in metrics[:i]:
                raise ValueError(f"duplicate metric {metric!r}")
        return metrics

    @model_validator(mode="after")
    def _names_known(self) -> EvaluationSpec:
        names = self.grader_names()
        if len(set(names)) != len(names):
            raise ValueError(GRADER_NAMES_UNIQUE)
        known = set(self.metrics) | set(names) | set(ALL_OBJECTIVE_METRICS)
        if self.thresholds and any(t.metric not in known for t in self.thresholds):
            raise ValueError(THRESHOLD_METRIC_UNKNOWN)
        if self.primary_metric is not None and self.primary_metric not in known:
            raise ValueError(PRIMARY_METRIC_UNKNOWN)
        if self.retention and self.retention.metric not in set(BUILTIN_METRICS) | set(names):
            raise ValueError(RETENTION_METRIC_UNKNOWN)
        return self

    def grader_names(self) -> list[str]:
        return [g.name for g in self.graders or ()]

    def deterministic_graders(self) -> list[str]:
        """The graders the serving check can score with (stringCheck, jsonSchema)."""
        return [g.name for g in self.graders or () if g.deterministic]

    def judges(self) -> list[tuple[str | None, JudgeEndpointSpec]]:
        """Every judge the evaluate stage calls: (its grader's name, or None for safety's, its endpoint)."""
        found: list[tuple[str | None, JudgeEndpointSpec]] = [
            (g.name, g.judge) for g in self.graders or () if g.judge
        ]
        return found + ([(None, self.safety.judge)] if self.safety else [])
