"""Pure builders of what a FineTuneSchedule run creates: the data Job (the trainer's `assemble` stage, its
FTJ_CONFIG: trainer-image/CONTRACT.md) and the FineTuneJob from `jobTemplate`. Nothing here talks to the API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary.capture import capture_prefix
from finetune_vocabulary.labels import API_GROUP
from pydantic import ValidationError

from finetune_operator.api.finetunejob import (
    ANNOTATION_DATASET_SOURCES,
    API_VERSION,
    FineTuneJobSpec,
    spec_to_dict,
)
from finetune_operator.api.finetunejob import KIND as JOB_KIND
from finetune_operator.api.finetuneschedule import KIND, FineTuneScheduleSpec
from finetune_operator.api.schema import SpecError, field_errors
from finetune_operator.config import OperatorConfig
from finetune_operator.containers.trainer import (
    TERMINATION_LOG,
    TrainerContainer,
    pod_failure_policy,
    trainer_container,
)
from finetune_operator.k8s.manifests import EnvVar, Job, PodSpec
from finetune_operator.k8s.naming import label_safe
from finetune_operator.k8s.pods import (
    WORKDIR,
    OwnerKind,
    child_name_of,
    credentials_env_from,
    labels,
    owner_reference,
    pod_security_context,
    pvc_volumes,
    resource_block,
    scratch_volumes,
    service_account,
)

STAGE = "assemble"  # the trainer's subcommand and the data Job's component label
LABEL_SCHEDULE = f"{API_GROUP}/schedule"  # on each run's FineTuneJob: the schedule's name
LABEL_SCHEDULE_UID = f"{API_GROUP}/schedule-uid"  # on each data Job and FineTuneJob: the schedule's uid
ANNOTATION_RUN = f"{API_GROUP}/schedule-run"  # n of the run
ANNOTATION_PURPOSE = f"{API_GROUP}/schedule-purpose"  # data Job: cron | trigger
ANNOTATION_SINCE = f"{API_GROUP}/since"
ANNOTATION_UNTIL = f"{API_GROUP}/until"
ANNOTATION_SOURCES = ANNOTATION_DATASET_SOURCES  # JSON of the assembly's `examples` (contract §4)
PLACEHOLDER_TRAIN = "train.jsonl"
FINETUNESCHEDULE = OwnerKind(
    API_VERSION, KIND, app="finetuneschedule", uid_label=LABEL_SCHEDULE_UID, name_lead="s"
)


@dataclass(frozen=True)
class ScheduleRef:
    """A FineTuneSchedule with its parsed spec and the template's parsed FineTuneJob spec."""

    namespace: str
    name: str
    uid: str
    schedule: FineTuneScheduleSpec
    spec: FineTuneJobSpec  # the template's, with a placeholder train file (storage, service account)

    @property
    def owner_kind(self) -> OwnerKind:
        return FINETUNESCHEDULE


@dataclass(frozen=True)
class Assembly:
    """One data Job's inputs, decided by the planner."""

    run: int
    purpose: str  # cron | trigger
    since: str | None
    until: str
    min_new_examples: int


def train_uri(output: str, namespace: str, schedule: str, run: int) -> str:
    """Where run `run` assembles its training file: under the template's storage.output."""
    return f"{output.rstrip('/')}/schedules/{namespace}/{schedule}/{run}/{PLACEHOLDER_TRAIN}"


def template_spec(schedule: FineTuneScheduleSpec, train: str) -> FineTuneJobSpec:
    """The template's FineTuneJob spec with `train` filled in; SpecError names
    spec.jobTemplate.spec.<field>."""
    raw = schedule.job_template.spec
    dataset = raw.get("dataset")
    errors: list[tuple[str, str]] = []
    if isinstance(dataset, Mapping) and "train" in dataset:
        errors.append(("spec.jobTemplate.spec.dataset.train", "must be unset: each run fills it in"))
    if not isinstance(dataset, Mapping) or not dataset.get("test"):
        errors.append(
            (
                "spec.jobTemplate.spec.dataset.test",
                "is required: the fixed held-out set every run is gated on",
            )
        )
    if errors:
        raise SpecError(errors)
    try:
        assert isinstance(dataset, Mapping)
        return FineTuneJobSpec.model_validate({**raw, "dataset": {**dataset, "train": train}})
    except ValidationError as exc:
        raise SpecError(field_errors(exc, ("spec", "jobTemplate", "spec"))) from None


def served_model(schedule: FineTuneScheduleSpec, job: FineTuneJobSpec) -> tuple[str | None, str | None]:
    """(ModelServer, stable model name) whose promoted version the runs challenge."""
    source = schedule.dataset.from_capture
    if source is not None:
        return source.model_server, source.model
    return job.deployment.server, job.deployment.model_name


def assemble_config(ref: ScheduleRef, server: Mapping[str, Any] | None, assembly: Assembly) -> dict[str, Any]:
    """FTJ_CONFIG of a data Job (contract §5): base, the template's held-out set, the pool's capture."""
    source = ref.schedule.dataset.from_capture
    capture: dict[str, Any] | None = None
    if source is not None and server is not None:
        wanted = (server.get("spec") or {}).get("capture") or {}
        capture = {
            "prefix": capture_prefix(str(wanted.get("destination")), ref.namespace, source.model_server),
            "model": source.model,
            "minRating": source.min_rating,
            "redact": list(wanted.get("redact", ["email", "phone", "creditCard"])),
        }
    return {
        "stage": STAGE,
        "assemble": {
            "base": ref.schedule.dataset.base,
            "test": ref.spec.dataset.test,
            "capture": capture,
            "since": assembly.since,
            "until": assembly.until,
            "minNewExamples": assembly.min_new_examples,
            "objective": ref.spec.objective,
            "output": train_uri(ref.spec.storage.output, ref.namespace, ref.name, assembly.run),
            # The validate stage's token budget: a captured chat over it is left out (examples.tooLong)
            # instead of failing the run; the typed spec carries the defaults.
            "baseModel": ref.spec.base_model.model_dump(mode="json"),
            "maxSeqLength": ref.spec.hyperparameters.max_seq_length,
            "maxCompletionLength": ref.spec.hyperparameters.max_completion_length,
        },
    }


def data_job_name(ref: ScheduleRef, run: int) -> str:
    return child_name_of(ref, f"{run}-data")


def data_job(
    ref: ScheduleRef, config: OperatorConfig, server: Mapping[str, Any] | None, assembly: Assembly
) -> Job:
    """The data Job of one run: the trainer's assemble stage, CPU only, restricted pod, credentials by
    reference (the template's storage.credentialsSecret), its summary in the termination message."""
    document = assemble_config(ref, server, assembly)
    env: list[EnvVar] = [
        {"name": "FTJ_CONFIG", "value": json.dumps(document, sort_keys=True, separators=(",", ":"))},
        {"name": "FTJ_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "FTJ_WORKDIR", "value": WORKDIR},
        {"name": "HOME", "value": WORKDIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    volumes, mounts = scratch_volumes(None)
    claim_volumes, claim_mounts, claim_env = pvc_volumes(ref)  # a pvc:// base model's tokenizer, test set
    cpu_type = config.gpu_types.get("cpu") or config.gpu_type(ref.spec.resources.gpu_type)
    container = trainer_container(
        TrainerContainer(
            image=config.images.trainer,
            pull_policy=config.images.pull_policy,
            stage=STAGE,
            env=env + claim_env,
            mounts=mounts + claim_mounts,
            resources=resource_block(
                config.defaults.validate_cpu, config.defaults.validate_memory, 0, cpu_type
            ),
            env_from=credentials_env_from(ref),
        )
    )
    job_labels = labels(ref, STAGE)
    annotations = {
        ANNOTATION_RUN: str(assembly.run),
        ANNOTATION_PURPOSE: assembly.purpose,
        ANNOTATION_UNTIL: assembly.until,
        **({ANNOTATION_SINCE: assembly.since} if assembly.since else {}),
    }
    pod: PodSpec = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(config),
        "containers": [container],
        "volumes": volumes + claim_volumes,
    }
    pod = {**pod, **service_account(ref)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": data_job_name(ref, assembly.run),
            "namespace": ref.namespace,
            "labels": dict(job_labels),
            "annotations": annotations,
            "ownerReferences": [owner_reference(ref)],
        },
        "spec": {
            "backoffLimit": config.defaults.validate_backoff_limit,
            "podFailurePolicy": pod_failure_policy(),
            "template": {"metadata": {"labels": dict(job_labels)}, "spec": pod},
        },
    }


def run_name(ref: ScheduleRef, run: int) -> str:
    return child_name_of(ref, str(run))


def finetune_job(ref: ScheduleRef, run: int, train: str, examples: Mapping[str, Any]) -> dict[str, Any]:
    """Run `run`'s FineTuneJob: the template with dataset.train = the assembled file, owned by the
    schedule."""
    spec = template_spec(ref.schedule, train)
    meta = ref.schedule.job_template.metadata
    sources = {k: v for k, v in examples.items() if isinstance(v, int) and not isinstance(v, bool)}
    return {
        "apiVersion": API_VERSION,
        "kind": JOB_KIND,
        "metadata": {
            "name": run_name(ref, run),
            "namespace": ref.namespace,
            "labels": {
                **((meta.labels if meta else None) or {}),
                LABEL_SCHEDULE: label_safe(ref.name),
                LABEL_SCHEDULE_UID: ref.uid,
            },
            "annotations": {
                **((meta.annotations if meta else None) or {}),
                ANNOTATION_RUN: str(run),
                ANNOTATION_SOURCES: json.dumps(sources, sort_keys=True, separators=(",", ":")),
            },
            "ownerReferences": [owner_reference(ref)],
        },
        "spec": spec_to_dict(spec),
    }
