"""The building blocks of the FineTuneJob API (api/finetunejob.py): patterns, strict string and quantity
types, the messages of cross-field rules and where they point, CEL rule helpers, and errors that name the
field.

Patterns are written in the regex subset shared by Go's RE2 (kube-apiserver, CEL `matches`), Rust's regex
(pydantic-core) and Python's `re`: no look-around, no back-references.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

# ---------------------------------------------------------------------------------------------- patterns
# One path segment of an object key or volume path: never empty, never "." or ".." (no traversal).
_SEG_CHAR = r"[A-Za-z0-9._~=+-]"
_SEG_START = r"[A-Za-z0-9_~=+-]"
SEGMENT = rf"(?:{_SEG_START}{_SEG_CHAR}*|\.{_SEG_START}{_SEG_CHAR}*|\.\.{_SEG_CHAR}+)"
# S3 bucket naming rules: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit
# on each dot-separated label (so no "..", ".-", "-."); the 3..63 length is checked by BUCKET_LENGTH.
BUCKET = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
BUCKET_LENGTH = r"^s3://[a-z0-9.-]{3,63}(?:/|$)"
DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = rf"{DNS_LABEL}(?:\.{DNS_LABEL})*"
HF_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*"

S3_OBJECT = rf"s3://{BUCKET}(?:/{SEGMENT})+/?"
S3_PREFIX = rf"s3://{BUCKET}(?:/{SEGMENT})*/?"
HF_REPO = rf"hf://{HF_NAME}/{HF_NAME}"
PVC_PATH = rf"pvc://{DNS_SUBDOMAIN}(?:/{SEGMENT})*/?"

SOURCE_URI_PATTERN = rf"^(?:{S3_OBJECT}|{HF_REPO}|{PVC_PATH})$"
OUTPUT_URI_PATTERN = rf"^{S3_PREFIX}$"
DNS_LABEL_PATTERN = rf"^{DNS_LABEL}$"
DNS_SUBDOMAIN_PATTERN = rf"^{DNS_SUBDOMAIN}$"
HTTP_URL_PATTERN = r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?$"
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)"
    r"|(\.[0-9]+))))?$"
)
LABEL_VALUE_PATTERN = r"^(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?)?$"
QUALIFIED_NAME_PATTERN = rf"^(?:{DNS_SUBDOMAIN}/)?[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$"  # no "." or ".." segment
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$"
MODULE_NAME_PATTERN = r"^[A-Za-z0-9_.*-]+$"

PATTERN_HINTS = {
    SOURCE_URI_PATTERN: "s3://bucket/key, hf://org/name or pvc://claim/path (no empty, '.' or '..' segments)",
    OUTPUT_URI_PATTERN: "an s3://bucket/prefix URI (no empty, '.' or '..' segments)",
    DNS_LABEL_PATTERN: "a DNS-1123 label (lowercase letters, digits and '-')",
    DNS_SUBDOMAIN_PATTERN: "a DNS-1123 subdomain (lowercase letters, digits, '-' and '.')",
    HTTP_URL_PATTERN: "an http:// or https:// URL",
    QUANTITY_PATTERN: "a Kubernetes quantity such as 4, 500m or 16Gi",
}

BUCKET_LENGTH_RULE = {
    "rule": f"!self.startsWith('s3://') || self.matches('{BUCKET_LENGTH}')",
    "message": "S3 bucket names must be 3 to 63 characters long",
}
BUCKET_LENGTH_MESSAGE = BUCKET_LENGTH_RULE["message"]

# Egress (docs/security.md): what admission can refuse in a URL a credential is sent to (the trainer
# checks again on the resolved addresses, and applies the plain-http allow-list). A host written as a number
# other than a.b.c.d (2852039166, 0xa9fea9fe, 0251.0376...) is refused: resolvers read it as an address.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_NUMBER = r"(?:0[xX][0-9A-Fa-f]*|[0-9]+)"
_HOST_END = r"(?:[:/]|$)"
LINK_LOCAL_URL = rf"^https?://169[.]254[.][0-9]+[.][0-9]+{_HOST_END}"
NUMERIC_HOST_URL = rf"^https?://{_NUMBER}(?:[.]{_NUMBER})*[.]?{_HOST_END}"
DOTTED_QUAD_URL = rf"^https?://(?:{_OCTET}[.]){{3}}{_OCTET}{_HOST_END}"
EGRESS_HOST_RULE = {
    "rule": f"!self.matches('{LINK_LOCAL_URL}') && "
    f"(!self.matches('{NUMERIC_HOST_URL}') || self.matches('{DOTTED_QUAD_URL}'))",
    "message": "must not be a link-local or cloud metadata address (169.254.0.0/16); write an IP address "
    "as a.b.c.d",
}
EGRESS_HOST_MESSAGE = EGRESS_HOST_RULE["message"]

# Cross-field rule messages (the same text from CEL and from the model validators).
QLORA_NEEDS_GPU = "method qlora needs resources.gpus >= 1 (4-bit quantisation runs on GPUs only)"
ADAPTER_NEEDS_PEFT = "deployment.mode adapter needs method lora or qlora"
NODES_NEED_GPUS = (
    "resources.nodes > 1 needs resources.gpus >= 1 on a GPU type (not gpuType cpu): a multi-node run is "
    "one pod per GPU node"
)
QLORA_NO_FSDP = "hyperparameters.strategy fsdp does not support method qlora (4-bit weights); use ddp or auto"
THRESHOLD_METRIC_UNKNOWN = (
    "every threshold metric must be listed in evaluation.metrics, name one of evaluation.graders or be a "
    "figure of the objective (preference_accuracy, reward_margin, reward)"
)
PRIMARY_METRIC_UNKNOWN = (
    "evaluation.primaryMetric must be listed in evaluation.metrics, name one of evaluation.graders or be a "
    "figure of the objective (preference_accuracy, reward_margin, reward)"
)
# Objectives (issue 23): what each one trains on and measures (finetune_vocabulary.objectives).
REWARDS_NEED_GRPO = "rewards are for objective grpo only"
GRPO_NEEDS_REWARDS = (
    "objective grpo needs rewards: at least one {grader, weight} naming one of evaluation.graders"
)
REWARD_GRADER_UNKNOWN = "every rewards[].grader must name one of evaluation.graders"
GRPO_NEEDS_EVALUATION = (
    "objective grpo needs evaluation.enabled true: its rewards are evaluation graders, and the gate "
    "needs them"
)
GRPO_GRADER_NAMED_REWARD = (
    "objective grpo reports its weighted reward as `reward`: no evaluation.graders entry may be named reward"
)
FORMAT_NOT_FOR_OBJECTIVE = (
    "dataset.format must fit the objective: auto, or chat, completion or instruction for sft, preference "
    "for dpo, unpaired-preference for kto, prompt-only for grpo"
)
GRPO_ONLY_HYPERPARAMETERS = (
    "hyperparameters.numGenerations and maxCompletionLength are for objective grpo only"
)
BETA_NEEDS_PREFERENCE = "hyperparameters.beta is for objective dpo, kto or grpo (sft has no KL term)"
PACKING_NEEDS_SFT = "hyperparameters.packing is for objective sft only"
_UNMEASURED = (
    "preference_accuracy and reward_margin are measured for objective dpo or kto only, reward for grpo only"
)
THRESHOLD_NOT_MEASURED = f"{_UNMEASURED}: every threshold metric must be one the objective measures"
PRIMARY_NOT_MEASURED = f"{_UNMEASURED}: evaluation.primaryMetric must be one the objective measures"
# Graders, safety and retention (api/evaluation.py).
GRADER_NAMES_UNIQUE = "evaluation.graders names must be unique"
GRADER_NAME_BUILTIN = "a grader name must not be a built-in metric name (loss, perplexity)"
GRADER_TYPE_MISMATCH = "a grader sets exactly the one of stringCheck, jsonSchema or judge that its type names"
JUDGE_ONE_ENDPOINT = "a judge sets exactly one of url or modelServer"
SCALE_ORDER = "scale.min must be less than scale.max"
RETENTION_METRIC_UNKNOWN = (
    "evaluation.retention.metric must be a metric (loss, perplexity, exact_match, token_f1, rouge_l) or "
    "name one of evaluation.graders"
)
THRESHOLD_ONE_BOUND = "a threshold sets exactly one of min or max"
OUTPUT_OVERLAPS_MODEL = "storage.output must not be the base model's location or under it"
OUTPUT_OVERLAPS_DATA = "storage.output must not be a dataset file's location or under it"
IMMUTABLE = "{field} is immutable once set"
CANCEL_FINAL = "spec.cancel cannot be undone"
LORA_RANK_UNSERVABLE = (
    "lora.rank above 512 cannot be served as a vLLM LoRA adapter (512 is vLLM's largest --max-lora-rank): "
    "use lora.rank <= 512, deployment.mode merged or deployment.enabled false"
)
EXTRA_ARGS_REFUSED = (
    "deployment.extraArgs takes only allow-listed vLLM flags (docs/serving.md), as --flag, --flag=value or "
    "--flag value, with values of letters, digits and ._:+-; flags that change the model, tokenizer, host, "
    "port, served names, LoRA modules or remote code, positional arguments and $(VAR) are refused"
)
SERVER_NEEDS_MODEL_NAME = "deployment.server and deployment.modelName are set together"
SERVER_NEEDS_ADAPTER = (
    "deployment.server serves LoRA adapters: method full produces no adapter (use lora or qlora, or serve "
    "without a server)"
)
SERVER_NEEDS_ADAPTER_MODE = "deployment.server serves adapters: deployment.mode must be auto or adapter"
SERVER_NEEDS_EVALUATION = (
    "deployment.server promotes a version only when it is not worse than the one serving: evaluation.enabled "
    "must be true"
)
# A cpu GPU type has no GPUs: a GPU count above 0 with it is a contradiction, never silently served.
SERVING_GPUS_ON_CPU = (
    "deployment.gpus must be 0 or unset when the serving gpuType (deployment.gpuType, or resources.gpuType "
    "when that is unset) is cpu: a cpu type has no GPUs"
)
POOL_GPUS_ON_CPU = "gpus must be 0 or unset when gpuType is cpu: a cpu type has no GPUs"
CAPTURE_OUTSIDE = "capture.destination must lie under one of spec.adapterSources or spec.captureDestinations"
VLLM_MAX_LORA_RANK = 512
IMMUTABLE_FIELDS = (
    "baseModel",
    "dataset",
    "objective",
    "method",
    "rewards",
    "lora",
    "hyperparameters",
    "storage.output",
)


class SpecError(ValueError):
    """A FineTuneJob that does not satisfy the API; each line names a field path."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors))


# Where each cross-field rule points (CEL `fieldPath`, relative to the object carrying the rule).
RULE_FIELD = {
    QLORA_NEEDS_GPU: ".resources.gpus",
    ADAPTER_NEEDS_PEFT: ".deployment.mode",
    NODES_NEED_GPUS: ".resources.nodes",
    QLORA_NO_FSDP: ".hyperparameters.strategy",
    OUTPUT_OVERLAPS_MODEL: ".storage.output",
    OUTPUT_OVERLAPS_DATA: ".storage.output",
    THRESHOLD_METRIC_UNKNOWN: ".thresholds",
    PRIMARY_METRIC_UNKNOWN: ".primaryMetric",
    GRADER_NAMES_UNIQUE: ".graders",
    GRADER_NAME_BUILTIN: ".name",
    GRADER_TYPE_MISMATCH: ".type",
    JUDGE_ONE_ENDPOINT: ".url",
    SCALE_ORDER: ".min",
    RETENTION_METRIC_UNKNOWN: ".retention.metric",
    LORA_RANK_UNSERVABLE: ".lora.rank",
    SERVER_NEEDS_MODEL_NAME: ".deployment.modelName",
    SERVER_NEEDS_ADAPTER: ".method",
    SERVER_NEEDS_ADAPTER_MODE: ".deployment.mode",
    SERVER_NEEDS_EVALUATION: ".evaluation.enabled",
    SERVING_GPUS_ON_CPU: ".deployment.gpus",
    POOL_GPUS_ON_CPU: ".gpus",
    CAPTURE_OUTSIDE: ".capture.destination",
    REWARDS_NEED_GRPO: ".rewards",
    GRPO_NEEDS_REWARDS: ".rewards",
    REWARD_GRADER_UNKNOWN: ".rewards",
    GRPO_NEEDS_EVALUATION: ".evaluation.enabled",
    GRPO_GRADER_NAMED_REWARD: ".evaluation.graders",
    FORMAT_NOT_FOR_OBJECTIVE: ".dataset.format",
    GRPO_ONLY_HYPERPARAMETERS: ".hyperparameters",
    BETA_NEEDS_PREFERENCE: ".hyperparameters.beta",
    PACKING_NEEDS_SFT: ".hyperparameters.packing",
    THRESHOLD_NOT_MEASURED: ".evaluation.thresholds",
    PRIMARY_NOT_MEASURED: ".evaluation.primaryMetric",
}


def rule(rule: str, message: str) -> dict[str, str]:
    out = {"rule": rule, "message": message}
    if message in RULE_FIELD:
        out["fieldPath"] = RULE_FIELD[message]
    return out


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


# ---------------------------------------------------------------------------------------------- base types
class SpecModel(BaseModel):
    """Base of spec models: camelCase, strict types (as the API server's schema), unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        strict=True,
        frozen=True,
    )


class StatusModel(BaseModel):
    """Base of status models: camelCase, lax so that an older operator reads a newer status."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="ignore",
    )


class ObjectModel(BaseModel):
    """Base of whole stored objects (FineTuneJob, FineTunePolicy): camelCase; metadata the API server adds
    and fields a newer version adds are ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="ignore",
    )


def check_bucket(uri: str) -> str:
    if uri.startswith("s3://") and not re.match(BUCKET_LENGTH, uri):
        raise ValueError(BUCKET_LENGTH_MESSAGE)
    return uri


def _str(value: Any, max_length: int, pattern: str | None) -> str:
    """Strict string check used by PlainValidator types (same rules and messages as pydantic's)."""
    if not isinstance(value, str):
        raise ValueError("Input should be a valid string")
    if len(value) > max_length:
        raise ValueError(f"String should have at most {max_length} characters")
    if not value:
        raise ValueError("String should have at least 1 character")
    if pattern is not None and not re.fullmatch(pattern, value):
        raise ValueError(
            f"must be {PATTERN_HINTS[pattern]}"
            if pattern in PATTERN_HINTS
            else f"String should match pattern '{pattern}'"
        )
    return value


SourceURI = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        pattern=SOURCE_URI_PATTERN,
        json_schema_extra=validations(BUCKET_LENGTH_RULE),
    ),
    AfterValidator(check_bucket),
]
OutputURI = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        pattern=OUTPUT_URI_PATTERN,
        json_schema_extra=validations(BUCKET_LENGTH_RULE),
    ),
    AfterValidator(check_bucket),
]


def check_egress_host(url: str) -> str:
    numeric = re.match(NUMERIC_HOST_URL, url) and not re.match(DOTTED_QUAD_URL, url)
    if re.match(LINK_LOCAL_URL, url) or numeric:
        raise ValueError(EGRESS_HOST_MESSAGE)
    return url


# A URL the trainer sends a credential to (evaluation.reference.url, tracking.mlflow.trackingUri).
EgressURL = Annotated[
    str,
    Field(max_length=2048, pattern=HTTP_URL_PATTERN, json_schema_extra=validations(EGRESS_HOST_RULE)),
    AfterValidator(check_egress_host),
]
DNSLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
DNSSubdomain = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]


def _quantity(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("Input should be an integer or a Kubernetes quantity string")
    if isinstance(value, int):
        if not 0 <= value <= 1_000_000_000_000_000:
            raise ValueError("Input should be between 0 and 10^15")
        return value
    return _str(value, 64, QUANTITY_PATTERN)


Quantity = Annotated[
    int | str,
    PlainValidator(_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "maxLength": 64,
            "minimum": 0,
            "maximum": 1_000_000_000_000_000,
        }
    ),
]


def _path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts[-1] += f"[{part}]"
        elif part == "[key]":
            parts.pop()  # a bad map key: report the map, as the API server does
        elif part.startswith(("function-", "lax-", "strict-")) or part in {"str", "int"}:
            continue  # pydantic's union/function branch labels are not field names
        else:
            parts.append(part)
    return ".".join(parts)


def field_errors(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        message = str(err["msg"])
        if err["type"] == "value_error" and message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        if err["type"] == "string_pattern_mismatch":
            pattern = str((err.get("ctx") or {}).get("pattern", ""))
            message = f"must be {PATTERN_HINTS[pattern]}" if pattern in PATTERN_HINTS else message
        path = _path(prefix + tuple(err["loc"]))
        if message in RULE_FIELD:
            path += RULE_FIELD[message]
        errors.append((path, message))
    return errors


def no_schema_default(schema: dict[str, Any]) -> None:
    """json_schema_extra of a field whose default depends on another field (a model validator fills it in):
    the CRD must not default it, or the API server would fill in a value the user never chose."""
    schema.pop("default", None)


def raw_field(section: Any, alias: str, name: str) -> Any:
    """A field of a section as given to model_validate: a mapping (camelCase or snake_case) or a model."""
    if isinstance(section, Mapping):
        return section.get(alias, section.get(name))
    return getattr(section, name, None) if isinstance(section, BaseModel) else None


def default_gpus(section: Any, gpus: int) -> Any:
    """`section` (a raw mapping or a model) with `gpus` filled in when the user left it unset."""
    if isinstance(section, Mapping):
        return section if "gpus" in section else {**section, "gpus": gpus}
    if isinstance(section, BaseModel) and "gpus" not in section.model_fields_set:
        return section.model_copy(update={"gpus": gpus})
    return section
