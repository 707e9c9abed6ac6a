"""The Pod Security Standards "restricted" profile for rendered pod specs: the same checks and messages as
the embedded cluster's PodSecurity admission (localcluster.podsecurity, kube-apiserver's wording), so a chart
render and a live `pod-security.kubernetes.io/enforce: restricted` namespace apply one standard.

`check_restricted(spec, annotations)` returns the violations as `reason (detail)` strings, as kube-apiserver
lists them after `violates PodSecurity "restricted:latest": ` (empty list: the pod is admitted).
"""

from __future__ import annotations

from typing import Any

from localcluster.podsecurity import check_pod


def check_restricted(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Violations of the PSS restricted profile by a pod spec (and its pod annotations)."""
    results = check_pod("restricted", {"annotations": dict(annotations or {})}, spec)
    return [f"{reason} ({detail})" if detail else reason for reason, detail in results]
