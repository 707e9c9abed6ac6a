"""Who a FineTuneJob is (namespace, name, uid) and, once its spec parsed, what it asks for."""

from __future__ import annotations

from dataclasses import dataclass

from finetune_vocabulary.labels import LABEL_JOB_UID
from finetune_vocabulary.layout import RunLayout, run_prefix

from finetune_operator.api.finetunejob import API_VERSION, KIND, FineTuneJobSpec
from finetune_operator.k8s.pods import OwnerKind

# What every child of a FineTuneJob carries (k8s/pods.py: labels, owner reference, child names).
FINETUNEJOB = OwnerKind(API_VERSION, KIND, app="finetunejob", uid_label=LABEL_JOB_UID, name_lead="j")


@dataclass(frozen=True)
class ObjectRef:
    """A FineTuneJob whose spec may not have parsed (the planner then only reports the error)."""

    namespace: str
    name: str
    uid: str

    @property
    def owner_kind(self) -> OwnerKind:
        return FINETUNEJOB


@dataclass(frozen=True)
class JobRef(ObjectRef):
    """A FineTuneJob with its parsed, frozen spec: every default is the model's, stated once there."""

    spec: FineTuneJobSpec

    @property
    def run_prefix(self) -> str:
        return run_prefix(self.spec.storage.output, self.namespace, self.name, self.uid)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_prefix)


@dataclass(frozen=True)
class Artifacts:
    """What training (or export) left in storage, from the trainer's termination summaries."""

    adapter: str | None = None
    merged: str | None = None
    champion: tuple[str, str] | None = None  # (name, adapter) serving the job's ModelServer model name
    serving_check: tuple[str, str] | None = None  # (pool URL, model): the loaded version to check
