"""Served equals evaluated (issue 22): once the job's version is loaded on every ready replica of its pool
(or its own pool serves the merged weights), and before the stable name routes to it or status.endpoint is
published, a CPU Job (`python -m finetune_trainer servecheck`) sends up to `deployment.servingCheck.examples`
held-out prompts through the pool's OpenAI endpoint and scores the answers by the evaluate stage's code.

- Passed: `status.evaluation.served`, `status.serving.checked: true`; the pool promotes the version
  (modelserver/planner.py), or the merged model serves at once.
- Served below evaluated by more than `tolerance` (direction-aware): phase Rejected, reason
  ServingMismatch; the job stops asking (`status.serving.state` cleared, so its pool drops the unpromoted
  version) and its own ModelServer is deleted.
- Off (`examples: 0`) or nothing to compare with (evaluation disabled): checked at once, said in the Deployed
  condition's message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_vocabulary.evaluation import serving_check_metric
from finetune_vocabulary.metrics import direction, lower_is_better

from finetune_operator.api.conditions import ConditionType, Reason
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunejob_status import Phase, Stage
from finetune_operator.config import OperatorConfig
from finetune_operator.containers.termination import JobOutcome
from finetune_operator.finetunejob import builders
from finetune_operator.finetunejob.gate import primary_metric
from finetune_operator.finetunejob.plan import JobDraft
from finetune_operator.finetunejob.ref import Artifacts, JobRef
from finetune_operator.k8s.observe import finite

LIKELY_CAUSES = (
    "a different chat template in the serving engine, a lower dtype, prompts truncated or refused by "
    "maxModelLen, or requests the engine refused"
)


def check_metric(spec: FineTuneJobSpec) -> str:
    """The metric the check scores: the primary one when the trainer can score generated text with it
    without a judge (a text metric or a deterministic grader); grpo's reward: its first deterministic
    reward grader; else token_f1 (a preference figure needs the weights)."""
    return serving_check_metric(
        primary_metric(spec.evaluation, spec.objective),
        spec.evaluation.deterministic_graders(),
        [r.grader for r in spec.rewards or ()],
    )


def skipped(spec: FineTuneJobSpec) -> str | None:
    """Why the check does not run for this spec, or None when it does."""
    if spec.deployment.serving_check.examples == 0:
        return "serving check off (deployment.servingCheck.examples is 0)"
    if not spec.evaluation.enabled:
        return "serving check skipped: evaluation is disabled, so there is no evaluated figure to compare"
    return None


def accept(p: JobDraft) -> None:
    """When the job asks its pool to load it: without a check to run it is checked at once (promoted as
    soon as it is registered)."""
    if skipped(p.job.spec) is not None:
        p.status["serving"]["checked"] = True


def note(p: JobDraft) -> str:
    why = skipped(p.job.spec)
    return f"; {why}" if why else ""


def pending(p: JobDraft, url: str, model: str) -> bool:
    """The version is loaded: True while its check has still to pass (the servecheck row runs it against
    `model` at `url`; nothing is published meanwhile)."""
    serving = p.status.setdefault("serving", {})
    # Serving already (before this check existed, or across a spec update): it took traffic; nothing to hold.
    serving_now = p.old_phase == Phase.SERVING.value
    if serving.get("checked") or serving_now or skipped(p.job.spec) is not None:
        serving["checked"] = True
        return False
    p.status["endpoint"] = None
    p.serving_target = (url, model)
    return True


def check_job(job: JobRef, config: OperatorConfig, artifacts: Artifacts) -> dict[str, Any]:
    if artifacts.serving_check is None:
        raise ValueError("the serving check needs the loaded version's endpoint")
    url, model = artifacts.serving_check
    target = {
        "url": url,
        "model": model,
        "metric": check_metric(job.spec),
        "examples": job.spec.deployment.serving_check.examples,
    }
    return dict(builders.serving_check_job(job, config, target))


def served_figures(summary: Mapping[str, Any]) -> tuple[str, float | None, dict[str, float]]:
    metric = str(summary.get("metric") or "")
    value = finite(summary.get("value"))
    figures = {metric: value} if metric and value is not None else {}
    for key in ("examples", "refused"):
        count = finite(summary.get(key))
        if count is not None:
            figures[key] = count
    return metric, value, figures


def read_check(p: JobDraft, outcome: JobOutcome) -> bool:
    """The served figures into status.evaluation.served; a mismatch rejects the version."""
    metric, served, figures = served_figures(outcome.summary)
    evaluation = p.status.setdefault("evaluation", {}) or {}
    p.status["evaluation"] = {**evaluation, "served": figures or None}
    evaluated = finite((evaluation.get("tuned") or {}).get(metric))
    tolerance = p.job.spec.deployment.serving_check.tolerance
    n, refused = int(figures.get("examples", 0)), int(figures.get("refused", 0))
    if served is None:
        p.fail(Stage.SERVING_CHECK, Reason.STAGE_FAILED, "servecheck finished without a served score")
        return False
    if evaluated is None:
        comparison = (
            f"served {metric} {served:.4g} on {n} held-out prompts (no evaluated {metric} to compare)"
        )
    else:
        worse = served > evaluated + tolerance if lower_is_better(metric) else served < evaluated - tolerance
        comparison = f"served {metric} {served:.4g} vs evaluated {evaluated:.4g} on {n} held-out prompts"
        if worse:
            why = f"{refused} refused by the engine; {direction(metric)} is better, tolerance {tolerance:g}"
            reject(p, f"{comparison} ({why}); likely causes: {LIKELY_CAUSES}")
            return False
    serving = p.status.setdefault("serving", {})
    serving["checked"] = True
    if p.serving_target is not None and not serving.get("versionName"):  # merged weights: no promotion
        serve_merged(p, *p.serving_target, f"; serving check passed: {comparison}")
        return True
    passed = f"serving check passed: {comparison}"
    p.condition(ConditionType.DEPLOYED, "Unknown", Reason.CHECKING_SERVING, passed)
    p.phase(Phase.DEPLOYING, Reason.CHECKING_SERVING, f"{passed}; waiting for the pool to promote it")
    return True


def serve_merged(p: JobDraft, url: str, model: str, why: str) -> None:
    """The job's own pool serves the merged weights under the served name: published, Serving."""
    server = (p.status.get("serving") or {}).get("server")
    p.status["endpoint"] = {"url": url, "model": model}
    p.condition(
        ConditionType.DEPLOYED,
        "True",
        Reason.DEPLOYMENT_AVAILABLE,
        f"{model} (merged weights) is served by ModelServer {server}{why}",
    )
    p.complete(Phase.SERVING, Reason.SERVING, f"serving {model} at {url}")


def reject(p: JobDraft, message: str) -> None:
    """No traffic for this version: the job stops asking its pool (which drops the unpromoted version), its
    own ModelServer goes, and the job is Rejected (an Event says it)."""
    serving = p.status.setdefault("serving", {})
    serving.update(state=None, checked=None)
    p.status["endpoint"] = None
    p.retire_own_server(p.o.server)
    p.condition(ConditionType.DEPLOYED, "False", Reason.SERVING_MISMATCH, message)
    p.complete(Phase.REJECTED, Reason.SERVING_MISMATCH, f"serving mismatch: {message}")
