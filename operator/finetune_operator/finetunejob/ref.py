"""Who a FineTuneJob is (namespace, name, uid) and, once its spec parsed, what it asks for."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary.labels import LABEL_JOB_UID
from finetune_vocabulary.layout import RunLayout, run_prefix

from finetune_operator.api.finetunejob import ANNOTATION_DATASET_SOURCES, API_VERSION, KIND, FineTuneJobSpec
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
    # A FineTuneSchedule's run: its training set's counts by source (the dataset-sources annotation).
    sources: Mapping[str, int] | None = None

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


def dataset_sources(metadata: Mapping[str, Any]) -> dict[str, int] | None:
    """The dataset-sources annotation's counts (non-negative ints only; anything else is dropped)."""
    raw = (metadata.get("annotations") or {}).get(ANNOTATION_DATASET_SOURCES)
    try:
        found = json.loads(raw) if isinstance(raw, str) and len(raw) <= 4096 else None
    except ValueError:
        return None
    if not isinstance(found, dict):
        return None
    counts = {
        str(k)[:32]: v for k, v in found.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0
    }
    return dict(list(counts.items())[:16]) or None
