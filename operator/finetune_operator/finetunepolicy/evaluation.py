"""FineTunePolicy's rules on a job's evaluation section (the operator's side; admission.py words them the
same in CEL): where prompts and answers may be sent (allowReference and allowedReferenceHosts apply to the
reference model and to every judge URL alike: each receives the held-out data) and which data the safety
and retention sets may come from (allowedDatasets)."""

from __future__ import annotations

from urllib.parse import urlsplit

from finetune_operator.api.finetunejob import EvaluationSpec
from finetune_operator.api.finetunepolicy import FineTunePolicySpec, host_allowed, uri_allowed


def _external_urls(evaluation: EvaluationSpec) -> list[tuple[str, str]]:
    """(field, URL) of every external model the evaluate stage sends data to: reference and judges."""
    found = [("spec.evaluation.reference", evaluation.reference.url)] if evaluation.reference else []
    found += [
        (f"spec.evaluation.graders[{i}].judge.url", g.judge.url)
        for i, g in enumerate(evaluation.graders or ())
        if g.judge is not None and g.judge.url is not None
    ]
    if evaluation.safety is not None and evaluation.safety.judge.url is not None:
        found.append(("spec.evaluation.safety.judge.url", evaluation.safety.judge.url))
    return found


def _host_field(field: str) -> str:
    return "spec.evaluation.reference.url" if field == "spec.evaluation.reference" else field


def evaluation_violations(evaluation: EvaluationSpec, p: FineTunePolicySpec) -> list[str]:
    """allowReference, allowedReferenceHosts (reference and judges), allowedDatasets (safety, retention)."""
    out: list[str] = []
    for field, url in _external_urls(evaluation):
        host = urlsplit(url).hostname or ""
        if not p.allow_reference:
            out.append(f"{field} is not allowed (allowReference is false)")
        elif p.allowed_reference_hosts is not None and not host_allowed(host, p.allowed_reference_hosts):
            out.append(f"{_host_field(field)} host {host} is not in allowedReferenceHosts")
    sets = [
        ("spec.evaluation.safety.prompts", evaluation.safety.prompts if evaluation.safety else None),
        ("spec.evaluation.retention.dataset", evaluation.retention.dataset if evaluation.retention else None),
    ]
    if p.allowed_datasets is not None:
        out += [
            f"{field} {uri} is not in allowedDatasets"
            for field, uri in sets
            if uri is not None and not uri_allowed(uri, p.allowed_datasets)
        ]
    return out
