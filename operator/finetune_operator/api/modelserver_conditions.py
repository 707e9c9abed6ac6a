"""The ModelServer's status vocabulary: its condition types and the closed set of their reasons (FineTuneJob's
are in conditions.py). modelserver/status.py writes them; docs/serving.md lists what each means."""

from __future__ import annotations

from enum import StrEnum


class PoolConditionType(StrEnum):
    READY = "Ready"  # every wanted replica serves with every adapter it should hold
    POLICY_ALLOWED = "PolicyAllowed"  # FineTunePolicy serving rules (policy.server_refusal); only under one
    PINS_RESOLVED = "PinsResolved"  # every spec.models[...].pin names a registered version
    ADAPTERS_ALLOWED = "AdaptersAllowed"  # every registered adapter lies under spec.adapterSources


class PoolReason(StrEnum):
    """The reasons of the ModelServer's conditions (PolicyAllowed=False carries the policy's own reason:
    conditions.Reason.SERVING_GPU_LIMIT or POLICY_VIOLATION)."""

    AVAILABLE = "Available"  # Ready: every replica of spec.replicas is ready and in sync
    PROGRESSING = "Progressing"  # Ready: replicas starting, rolling out or loading adapters
    DEGRADED = "Degraded"  # Ready: it was Available at this generation and has lost replicas since
    SCALED_TO_ZERO = "ScaledToZero"  # Ready: spec.replicas is 0
    REFUSED_BY_POLICY = "RefusedByPolicy"  # Ready: a FineTunePolicy refuses the Deployment (PolicyAllowed)
    INVALID_SPEC = "InvalidSpec"  # Ready: the spec does not parse (an older or hand-made CRD admitted it)
    # Ready: the newest pod cannot start and will not by waiting (kubelet's image pull back-off: a missing
    # image or runtime); the message is kubelet's, and a job served only by this pool fails with it.
    IMAGE_PULL_FAILED = "ImagePullFailed"
    ALLOWED = "Allowed"  # PolicyAllowed, AdaptersAllowed
    RESOLVED = "Resolved"  # PinsResolved
    PIN_UNKNOWN = "PinUnknown"  # PinsResolved=False (and its Warning Event)
    ADAPTER_OUTSIDE_SOURCES = "AdapterOutsideSources"  # AdaptersAllowed=False
