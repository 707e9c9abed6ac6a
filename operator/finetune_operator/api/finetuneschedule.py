"""FineTuneSchedule v1alpha1: retrain on a cron schedule or when enough new captured examples exist.

Each run assembles a training set with the operator's own data Job (base file + captured chats of a
ModelServer's model name since the last run, docs/schedules.md) and creates a FineTuneJob from
`jobTemplate` whose `dataset.train` is that file. Generated into a CRD like FineTuneJob (crdgen.KINDS).
The cron expression and the template are checked by the operator (finetuneschedule/planner.py), which names
the field; the API server refuses what its schema can say.
"""

from __future__ import annotations

import zoneinfo
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune_operator.api.finetunejob_status import Condition, ShortText, StatusURI
from finetune_operator.api.modelnames import MODEL_NAME_MAX, MODEL_NAME_PATTERN
from finetune_operator.api.schema import (
    BUCKET_LENGTH_RULE,
    S3_OBJECT,
    DNSSubdomain,
    SpecError,
    SpecModel,
    StatusModel,
    check_bucket,
    field_errors,
    rule,
    validations,
)

KIND = "FineTuneSchedule"
PLURAL = "finetuneschedules"
SINGULAR = "finetuneschedule"
SHORT_NAMES = ("fts",)

# Five fields separated by blanks, or a macro: the cron grammar itself is checked by the operator
# (finetuneschedule/cron.py), which names the field and the part that is wrong.
SCHEDULE_PATTERN = r"^(?:@[a-z]+|[A-Za-z0-9*,/-]+(?: +[A-Za-z0-9*,/-]+){4})$"
TIME_ZONE_PATTERN = r"^[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9_+-]+){0,2}$"
NEEDS_SCHEDULE_OR_TRIGGER = (
    "set schedule, trigger or both: a FineTuneSchedule needs something that starts runs"
)
TRIGGER_NEEDS_CAPTURE = "trigger counts new captured examples: it needs dataset.fromCapture"
UNKNOWN_TIME_ZONE = "must be an IANA time zone name such as Europe/Berlin or UTC"

S3File = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        pattern=rf"^{S3_OBJECT}$",
        json_schema_extra=validations(BUCKET_LENGTH_RULE),
    ),
]


class TriggerSpec(SpecModel):
    """Start a run when this many new captured examples (kept by the assembly's rules) exist."""

    new_examples: int = Field(ge=1, le=10_000_000, description="New examples that start a run.")
    check_seconds: int = Field(
        default=300, ge=10, le=86_400, description="How often the count is taken (a data Job each time)."
    )


class CaptureSource(SpecModel):
    """Captured chats of one stable model name of a ModelServer with spec.capture on."""

    model_server: DNSSubdomain = Field(description="The ModelServer (in this namespace) that captures.")
    model: str = Field(
        min_length=1,
        max_length=MODEL_NAME_MAX,
        pattern=MODEL_NAME_PATTERN,
        description="Its stable model name.",
    )
    min_rating: int = Field(
        default=1,
        ge=-1,
        le=1,
        description="Keep chats rated at least this (-1, 0: also unrated, 1: positive feedback only); a chat "
        "with a correction is always kept.",
    )


class ScheduleDataset(SpecModel):
    """What each run trains on."""

    base: S3File = Field(description="s3:// JSONL file always included (the curated set).")
    from_capture: CaptureSource | None = Field(default=None, description="Captured chats to add.")

    @field_validator("base")
    @classmethod
    def _bucket(cls, uri: str) -> str:
        return check_bucket(uri)


class TemplateMeta(SpecModel):
    """Labels and annotations copied onto each run's FineTuneJob."""

    labels: dict[Annotated[str, Field(max_length=253)], Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=32
    )
    annotations: (
        dict[Annotated[str, Field(max_length=253)], Annotated[str, Field(max_length=4096)]] | None
    ) = Field(default=None, max_length=32)


class JobTemplate(SpecModel):
    """A FineTuneJob without dataset.train (each run fills it in)."""

    metadata: TemplateMeta | None = Field(default=None)
    spec: dict[str, Any] = Field(
        description="A FineTuneJob spec: dataset.test (the fixed held-out set) is required, dataset.train "
        "must be unset. Checked by the operator as a FineTuneJob spec (errors name "
        "spec.jobTemplate.spec.<field>).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "maxProperties": 32},
    )


class FineTuneScheduleSpec(SpecModel):
    """When to retrain, on what, and the FineTuneJob each run creates."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule("has(self.schedule) || has(self.trigger)", NEEDS_SCHEDULE_OR_TRIGGER),
            {
                **rule("!has(self.trigger) || has(self.dataset.fromCapture)", TRIGGER_NEEDS_CAPTURE),
                "fieldPath": ".trigger",
            },
        )
    )

    schedule: str | None = Field(
        default=None,
        max_length=128,
        pattern=SCHEDULE_PATTERN,
        description="Cron: minute hour day-of-month month day-of-week (numbers, *, lists, ranges, steps, "
        "month and day names) or @hourly, @daily, @weekly, @monthly, @yearly.",
    )
    time_zone: str | None = Field(
        default=None, max_length=64, pattern=TIME_ZONE_PATTERN, description="IANA time zone (default UTC)."
    )
    starting_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=31_536_000,
        description="A scheduled run missed by more than this is skipped (counted in status.missedRuns).",
    )
    suspend: bool = Field(default=False, description="Start no new runs (running ones go on).")
    trigger: TriggerSpec | None = Field(default=None, description="Start on a count of new examples.")
    dataset: ScheduleDataset = Field(description="The training set each run assembles.")
    job_template: JobTemplate = Field(description="The FineTuneJob each run creates.")
    concurrency_policy: Literal["Forbid", "Replace"] = Field(
        default="Forbid",
        description="Forbid: no new run while one is active; Replace: delete the active run first.",
    )
    history_limit: int = Field(
        default=5, ge=0, le=50, description="Ended runs kept (the one serving is never deleted)."
    )

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, zone: str | None) -> str | None:
        if zone is not None:
            try:
                zoneinfo.ZoneInfo(zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{UNKNOWN_TIME_ZONE}; {zone!r} is unknown") from None
        return zone

    @model_validator(mode="after")
    def _starts(self) -> FineTuneScheduleSpec:
        if self.schedule is None and self.trigger is None:
            raise ValueError(NEEDS_SCHEDULE_OR_TRIGGER)
        if self.trigger is not None and self.dataset.from_capture is None:
            raise ValueError(TRIGGER_NEEDS_CAPTURE)
        return self


# ---------------------------------------------------------------------------------------------- status
class ScheduleRun(StatusModel):
    """One run (a FineTuneJob this schedule created), newest first in status.runs."""

    name: str = Field(max_length=253)
    created: str | None = Field(default=None, max_length=32)
    phase: str | None = Field(default=None, max_length=32)
    reason: str | None = Field(default=None, max_length=64)
    examples: int | None = Field(default=None, ge=0, description="Training examples assembled.")
    serving: bool = Field(default=False, description="Its version is what the pool serves now.")


class FineTuneScheduleStatus(StatusModel):
    """Observed state, written by the operator."""

    last_run: int = Field(default=0, ge=0, description="n of the newest run <name>-<n>.")
    latest: str | None = Field(default=None, max_length=253, description="The newest run's FineTuneJob.")
    last_schedule_time: str | None = Field(default=None, max_length=32)
    next_schedule_time: str | None = Field(default=None, max_length=32)
    last_trigger_check: str | None = Field(default=None, max_length=32)
    new_examples: int | None = Field(default=None, ge=0, description="New examples at the last check.")
    cutoff: str | None = Field(default=None, max_length=32, description="`until` of the last run's data.")
    missed_runs: int = Field(default=0, ge=0, description="Scheduled runs skipped (startingDeadlineSeconds).")
    active: list[Annotated[str, Field(max_length=253)]] | None = Field(default=None, max_length=8)
    runs: list[ScheduleRun] | None = Field(default=None, max_length=64)
    serving: str | None = Field(default=None, max_length=253, description="The run the pool serves now.")
    train: StatusURI | None = Field(default=None, description="The newest assembled training file.")
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, ge=0)
    message: ShortText | None = None


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Schedule", "type": "string", "jsonPath": ".spec.schedule"},
    {"name": "Suspend", "type": "boolean", "jsonPath": ".spec.suspend"},
    {"name": "Runs", "type": "integer", "jsonPath": ".status.lastRun"},
    {"name": "Last run", "type": "string", "jsonPath": ".status.latest"},
    {"name": "Serving", "type": "string", "jsonPath": ".status.serving"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def parse_schedule_spec(spec: dict[str, Any]) -> FineTuneScheduleSpec:
    """Parse a FineTuneSchedule .spec; errors are reported under `spec.`."""
    try:
        return FineTuneScheduleSpec.model_validate(spec)
    except ValidationError as exc:
        raise SpecError(field_errors(exc, ("spec",))) from None
