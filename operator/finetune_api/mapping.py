"""The platform team's model mapping: OpenAI `model` names → FineTuneJob spec defaults (docs/openai-api.md).

The ConfigMap `finetune-api-models` holds one data key per model name; its value is YAML with the FineTuneJob
spec's own sections (`baseModel`, `storage`, optional `method`, `hyperparameters`, `lora`, `resources`,
`evaluation`, `deployment`, `dataset` without train/validation). The sections are the operator's own types
(finetune_operator.api), so a mapping is checked by the same rules as a FineTuneJob spec, and each entry is
also tried as a whole spec (`spec_from`), so a mapping kubectl would refuse is reported here, by key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from finetune_operator.api.finetunejob import (
    BaseModelSpec,
    DatasetSpec,
    DeploymentSpec,
    EvaluationSpec,
    HyperparametersSpec,
    LoraSpec,
    Method,
    ResourcesSpec,
    StorageSpec,
    parse_spec,
)
from finetune_operator.api.modelnames import MODEL_NAME_MAX, model_name_problem
from finetune_operator.api.schema import SpecError, SpecModel, field_errors
from finetune_vocabulary.objectives import Objective
from pydantic import Field, ValidationError

from finetune_api.errors import ApiError

# The learning rate a `learning_rate_multiplier` multiplies when the mapping sets none: the FineTuneJob
# spec's own default (HyperparametersSpec.learningRate).
DEFAULT_LEARNING_RATE: float = HyperparametersSpec.model_fields["learning_rate"].default
# A placeholder training file for trying a mapping as a whole spec (parse_mappings): never stored.
_TRIAL_TRAIN = "s3://finetune-api-mapping-check/train.jsonl"
TRIAL_OBJECTIVES: tuple[Objective, ...] = ("sft", "dpo")


def _like(field: str) -> Any:
    """DatasetSpec's own field (type, bounds, description): the mapping's dataset defaults check the same."""
    return DatasetSpec.model_fields[field]


class DatasetDefaults(SpecModel):
    """The dataset settings a mapping may fix; train and validation are the request's files, never here."""

    test: Any = _like("test")
    test_size: Any = _like("test_size")
    format: Any = _like("format")
    max_error_rate: Any = _like("max_error_rate")
    max_line_bytes: Any = _like("max_line_bytes")
    min_train_examples: Any = _like("min_train_examples")
    recommended_train_examples: Any = _like("recommended_train_examples")
    max_test_fraction: Any = _like("max_test_fraction")


class ModelMapping(SpecModel):
    """One model name's FineTuneJob defaults (one data key of the ConfigMap), typed as the spec is."""

    base_model: BaseModelSpec = Field(description="As FineTuneJob spec.baseModel.")
    storage: StorageSpec = Field(description="spec.storage; credentialsSecret is in the caller's namespace.")
    method: Method | None = Field(default=None, description="lora, qlora or full (default: the spec's).")
    hyperparameters: HyperparametersSpec | None = None
    lora: LoraSpec | None = None
    resources: ResourcesSpec | None = None
    evaluation: EvaluationSpec | None = None
    deployment: DeploymentSpec | None = None
    dataset: DatasetDefaults | None = None

    def base_learning_rate(self) -> float:
        """What learning_rate_multiplier 1 means: the mapping's learningRate, else the spec's default."""
        hyper = self.hyperparameters
        if hyper is not None and "learning_rate" in hyper.model_fields_set:
            return hyper.learning_rate
        return DEFAULT_LEARNING_RATE

    def section(self, name: str) -> dict[str, Any]:
        """A section as the mapping wrote it (camelCase, only the keys it set), {} when absent."""
        value = getattr(self, name)
        if value is None:
            return {}
        out: dict[str, Any] = value.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return out


def spec_from(
    mapping: ModelMapping,
    *,
    training_uri: str,
    validation_uri: str | None,
    objective: Objective,
    hyperparameters: Mapping[str, Any],
    deployment: Mapping[str, Any],
) -> dict[str, Any]:
    """The FineTuneJob spec of `mapping` with the request's files, objective, hyperparameters (over the
    mapping's) and served name (over the mapping's deployment). The mapping's beta applies to dpo only."""
    hyper = {**mapping.section("hyperparameters"), **hyperparameters}
    if objective == "sft":
        hyper.pop("beta", None)  # a preference default must not make a supervised job invalid
    dataset = {**mapping.section("dataset"), "train": training_uri}
    if validation_uri:
        dataset["validation"] = validation_uri
    spec: dict[str, Any] = {
        "baseModel": mapping.section("base_model"),
        "dataset": dataset,
        "objective": objective,
        "storage": mapping.section("storage"),
        "hyperparameters": hyper,
        "deployment": {**mapping.section("deployment"), **deployment},
    }
    if mapping.method is not None:
        spec["method"] = mapping.method
    for name in ("lora", "resources", "evaluation"):
        if getattr(mapping, name) is not None:
            spec[name] = mapping.section(name)
    return spec


def _problem(exc: ValidationError) -> str:
    """`storage.output: field required; method: ...`: each bad field by its camelCase path."""
    lines = []
    for path, message in field_errors(exc):
        message = "field required" if message == "Field required" else message
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def _trial_problem(mapping: ModelMapping) -> str | None:
    """Why the mapping, filled in with a placeholder training file, makes no valid FineTuneJob spec for any
    method (supervised or dpo: a mapping may be for preference tuning only), or None."""
    server = mapping.deployment.server if mapping.deployment else None
    served = {"modelName": "check"} if server else {"servedModelName": "check"}
    problems: list[str] = []
    for objective in TRIAL_OBJECTIVES:
        spec = spec_from(
            mapping,
            training_uri=_TRIAL_TRAIN,
            validation_uri=None,
            objective=objective,
            hyperparameters={},
            deployment=served,
        )
        try:
            parse_spec(spec)
        except SpecError as exc:
            problems.append("; ".join(f"{path}: {message}" for path, message in exc.errors))
            continue
        return None
    return problems[0]


def parse_mapping(text: str) -> ModelMapping:
    """One entry; raises ValueError naming each bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"not YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError("must be a YAML mapping with baseModel and storage")
    try:
        mapping = ModelMapping.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_problem(exc)) from None
    trial = _trial_problem(mapping)
    if trial:
        raise ValueError(f"not a valid FineTuneJob spec: {trial}")
    return mapping


def parse_mappings(data: Mapping[str, str]) -> tuple[dict[str, ModelMapping], dict[str, str]]:
    """The ConfigMap's data → (valid mappings by model name, model name → what is wrong with its entry).
    A bad entry leaves the others usable; its problem reads like `tiny: storage.output: field required`."""
    valid: dict[str, ModelMapping] = {}
    problems: dict[str, str] = {}
    for name in sorted(data):
        try:
            valid[name] = parse_mapping(data[name])
        except ValueError as exc:
            problems[name] = f"{name}: {exc}"
    return valid, problems


def resolve_model(
    model: object, mappings: Mapping[str, ModelMapping], problems: Mapping[str, str]
) -> ModelMapping:
    """The mapping of the request's `model`: unknown → 404 `model_not_found`; a broken entry → 500 (the
    platform team's problem: the service logs why; the message keeps the mapping's URIs from the user)."""
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: a model name is required", code="invalid_request_error", param="model")
    if model in problems:
        raise ApiError(
            500,
            f"the platform's mapping of model {model!r} is invalid (the service's log says why)",
            code="server_error",
            param="model",
        )
    if model not in mappings:
        known = ", ".join(sorted(mappings)) or "none"
        raise ApiError(
            404,
            f"The model {model!r} does not exist or you do not have access to it (models: {known})",
            code="model_not_found",
            param="model",
        )
    return mappings[model]


# ---------------------------------------------------------------------------------------------- the request
REQUEST_FIELDS = frozenset(
    {"model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed", "metadata"}
)
METHODS: dict[str, Objective] = {"supervised": "sft", "dpo": "dpo"}
# OpenAI hyperparameter → (spec key, lowest, highest, integer): the spec's own bounds.
HYPERPARAMETERS: dict[str, tuple[str, float, float, bool]] = {
    "n_epochs": ("epochs", 1, 100, True),
    "batch_size": ("batchSize", 1, 1024, True),
    "learning_rate_multiplier": ("learningRate", 0, 1, False),  # checked on base x multiplier, exclusive
    "beta": ("beta", 0, 100, False),
}
SUFFIX_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,16}[a-z0-9])?$")
SUFFIX_MAX = 18
METADATA_MAX_PAIRS, METADATA_KEY_MAX, METADATA_VALUE_MAX = 16, 64, 512
SEED_MAX = 2_147_483_647
SERVED_MIDDLE_MAX = 100  # ft-<this>-<8>: within servedModelName's 128
# The spec field a problem names → the OpenAI parameter to name instead.
SPEC_PARAMS = {
    "spec.hyperparameters.epochs": "hyperparameters.n_epochs",
    "spec.hyperparameters.batchSize": "hyperparameters.batch_size",
    "spec.hyperparameters.learningRate": "hyperparameters.learning_rate_multiplier",
    "spec.hyperparameters.beta": "hyperparameters.beta",
    "spec.hyperparameters.seed": "seed",
    "spec.dataset.train": "training_file",
    "spec.dataset.validation": "validation_file",
    "spec.deployment.servedModelName": "suffix",
    "spec.deployment.modelName": "suffix",
}


def bad_param(param: str, message: str, code: str | None = None) -> ApiError:
    """A 400 in OpenAI's shape whose message starts with the parameter at fault."""
    return ApiError(400, f"{param}: {message}", code=code, param=param)


def _check_fields(request: Mapping[str, Any]) -> None:
    if not request.get("training_file"):
        raise bad_param("training_file", "required: the id of a file uploaded with purpose fine-tune")
    unknown = sorted(set(request) - REQUEST_FIELDS - {"integrations"})
    if unknown:
        raise bad_param(
            unknown[0], f"unknown parameter(s) {', '.join(unknown)}; supported: {sorted(REQUEST_FIELDS)}"
        )
    if request.get("integrations"):
        raise bad_param(
            "integrations", "integrations (e.g. wandb) are not supported; the job's metrics are in its events"
        )


def _method(request: Mapping[str, Any]) -> tuple[Objective, Mapping[str, Any], str]:
    """(objective, the request's hyperparameters, their parameter path) from `method` or `hyperparameters`."""
    method = request.get("method")
    top = request.get("hyperparameters")
    if method is None:
        if top is not None and not isinstance(top, Mapping):
            raise bad_param("hyperparameters", "must be an object")
        return "sft", top or {}, "hyperparameters"
    if top:
        raise bad_param(
            "hyperparameters", "give hyperparameters inside method.<type>.hyperparameters, not both"
        )
    if not isinstance(method, Mapping):
        raise bad_param("method", "must be an object with type supervised or dpo")
    kind = method.get("type")
    if not isinstance(kind, str) or kind not in METHODS:
        raise bad_param("method.type", f"{kind!r} is not supported; use one of {sorted(METHODS)}")
    unknown = sorted(set(method) - {"type", kind})
    if unknown:
        raise bad_param(f"method.{unknown[0]}", f"unknown for method.type {kind}")
    inner = method.get(kind) or {}
    if not isinstance(inner, Mapping) or set(inner) - {"hyperparameters"}:
        raise bad_param(f"method.{kind}", "must be an object with only hyperparameters")
    hyper = inner.get("hyperparameters") or {}
    if not isinstance(hyper, Mapping):
        raise bad_param(f"method.{kind}.hyperparameters", "must be an object")
    return METHODS[kind], hyper, f"method.{kind}.hyperparameters"


def _number(value: Any, param: str, integer: bool) -> float:
    wanted = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise bad_param(param, f'must be {wanted} or "auto", not {value!r}')
    return value


def _hyperparameters(
    hyper: Mapping[str, Any], where: str, objective: Objective, mapping: ModelMapping
) -> dict[str, Any]:
    """The request's hyperparameters as spec keys; "auto" or absent: the mapping's or spec's default."""
    allowed = ("n_epochs", "batch_size", "learning_rate_multiplier") + (
        ("beta",) if objective == "dpo" else ()
    )
    out: dict[str, Any] = {}
    for name, value in hyper.items():
        param = f"{where}.{name}"
        if name not in allowed:
            raise bad_param(param, f"unknown hyperparameter for this method; supported: {', '.join(allowed)}")
        if value == "auto" or value is None:
            continue
        key, low, high, integer = HYPERPARAMETERS[name]
        number = _number(value, param, integer)
        if name == "learning_rate_multiplier":
            rate = mapping.base_learning_rate() * number
            if not 0 < rate < 1:
                raise bad_param(
                    param, f"must be above 0 with base rate {mapping.base_learning_rate():g} x it below 1"
                )
            out[key] = rate
        elif not low <= number <= high:
            raise bad_param(param, f"must be between {low:g} and {high:g}, not {value!r}")
        else:
            out[key] = number
    return out


def _seed(request: Mapping[str, Any]) -> dict[str, Any]:
    seed = request.get("seed")
    if seed is None:
        return {}
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise bad_param("seed", f"must be an integer between 0 and {SEED_MAX}")
    return {"seed": seed}


def _suffix(request: Mapping[str, Any]) -> str | None:
    suffix = request.get("suffix")
    if suffix is None or suffix == "":
        return None
    if not isinstance(suffix, str) or len(suffix) > SUFFIX_MAX or not SUFFIX_PATTERN.match(suffix):
        raise bad_param(
            "suffix", f"must be 1 to {SUFFIX_MAX} lowercase letters, digits and '-' (not at either end)"
        )
    return suffix


def _metadata(request: Mapping[str, Any]) -> dict[str, str] | None:
    metadata = request.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or len(metadata) > METADATA_MAX_PAIRS:
        raise bad_param("metadata", f"must be an object of at most {METADATA_MAX_PAIRS} string pairs")
    for key, value in metadata.items():
        if not isinstance(key, str) or not 0 < len(key) <= METADATA_KEY_MAX:
            raise bad_param("metadata", f"keys are strings of at most {METADATA_KEY_MAX} characters: {key!r}")
        if not isinstance(value, str) or len(value) > METADATA_VALUE_MAX:
            raise bad_param(f"metadata.{key}", f"must be a string of at most {METADATA_VALUE_MAX} characters")
    return dict(metadata)


def stable_name(model: str, suffix: str | None) -> str:
    """`<model>[-<suffix>]` as a pool's stable model name: lowercase, [a-z0-9-], at most 48 characters, not
    `base` nor ending in -v<digits> (api.modelnames)."""
    raw = f"{model}-{suffix}" if suffix else model
    name = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")[:MODEL_NAME_MAX].strip("-") or "model"
    if model_name_problem(name):
        name = f"{name[: MODEL_NAME_MAX - 3]}-ft"
    return name


def served_name(model: str, suffix: str | None, job_name: str, mapping: ModelMapping) -> dict[str, str]:
    """The deployment key naming the tuned model: a pool's stable modelName, or the job's own servedModelName
    `ft-<model>[-<suffix>]-<last 8 of the id>` (unique per job)."""
    if mapping.deployment is not None and mapping.deployment.server:
        return {"modelName": stable_name(model, suffix)}
    middle = f"{model}-{suffix}" if suffix else model
    # a ConfigMap key may hold '_', which no served name may; 128 characters at most
    middle = re.sub(r"[^A-Za-z0-9.-]+", "-", middle)[:SERVED_MIDDLE_MAX]
    return {"servedModelName": f"ft-{middle}-{job_name[-8:]}"}


@dataclass(frozen=True)
class RequestFields:
    """What an OpenAI job request asks for, checked, as FineTuneJob terms."""

    objective: Objective
    hyperparameters: dict[str, Any]  # spec keys (epochs, batchSize, learningRate, beta, seed)
    suffix: str | None
    metadata: dict[str, str] | None


def read_request(request: Mapping[str, Any], mapping: ModelMapping) -> RequestFields:
    """The request's fields; ApiError 400 naming the OpenAI parameter (unknown fields, bad values, ranges)."""
    _check_fields(request)
    objective, hyper, where = _method(request)
    return RequestFields(
        objective=objective,
        hyperparameters={**_hyperparameters(hyper, where, objective, mapping), **_seed(request)},
        suffix=_suffix(request),
        metadata=_metadata(request),
    )
