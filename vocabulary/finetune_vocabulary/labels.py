"""The API group, the labels and annotations on every child, and the name the operator writes under."""

from __future__ import annotations

API_GROUP = "finetune.dev"
# The operator's field manager and the value of app.kubernetes.io/managed-by on its children.
MANAGER = "finetune-operator"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"  # the stage: validate, train, evaluate, export, serve
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB_UID = f"{API_GROUP}/job-uid"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SPEC_HASH = f"{API_GROUP}/spec-hash"
LABEL_MODELSERVER_UID = f"{API_GROUP}/modelserver-uid"  # a ModelServer's pool children (issue 11)
