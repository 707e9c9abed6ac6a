"""The pipeline as a table: one row per stage, in order. A row says which child the stage runs, when it
is wanted, which condition, phase and running reason report it, and how its outcome is read into the
status. The planner (planner.py) walks the rows and knows nothing about any one stage; adding a stage is
adding a row, its builder and its reader. Readers write into the pass's draft (plan.JobDraft), never into
the planner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from finetune_vocabulary import steps
from finetune_vocabulary.gate import RETENTION, SAFETY, GateResult, Retention, Safety
from finetune_vocabulary.objectives import metrics_for

from finetune_operator.api.conditions import ConditionType, Reason, short
from finetune_operator.api.finetunejob import FineTuneJobSpec
from finetune_operator.api.finetunejob_status import Phase, Stage
from finetune_operator.config import OperatorConfig
from finetune_operator.containers.termination import JobOutcome
from finetune_operator.finetunejob import builders, ownedserver, pooljob, serving, servingcheck
from finetune_operator.finetunejob.accounting import gpu_hours_estimate
from finetune_operator.finetunejob.gate import (
    evaluate_gate,
    primary_metric,
    retention_figures,
    safety_figures,
)
from finetune_operator.finetunejob.outcome import metric_values, progress_figures
from finetune_operator.finetunejob.plan import Builder, JobDraft, StageRow
from finetune_operator.finetunejob.ref import JobRef
from finetune_operator.k8s.actions import Event
from finetune_operator.k8s.manifests import Job
from finetune_operator.k8s.observe import finite


def _job(builder: Callable[[JobRef, OperatorConfig], Job]) -> Builder:
    return lambda job, config, artifacts: dict(builder(job, config))


# --- outcome readers ---------------------------------------------------------------------------


def dataset_status(summary: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("format", "train", "validation", "test", "trainTokens", "removed", "errors")
    out = {key: summary[key] for key in keys if summary.get(key) is not None}
    labels = summary.get("labels")
    if isinstance(labels, Mapping):  # kto's label balance
        counts = {k: int(n) for k in ("desirable", "undesirable") if (n := finite(labels.get(k))) is not None}
        out["labels"] = {k: n for k, n in counts.items() if n >= 0} or None
    return {key: value for key, value in out.items() if value is not None}


def dataset_warnings(summary: Mapping[str, Any]) -> list[str]:
    """The validate stage's warnings (too few examples, testSize reduced), at most five."""
    warnings = summary.get("warnings")
    if not isinstance(warnings, list):
        return []
    return [short(str(w), 256) for w in warnings if isinstance(w, str) and w][:5]


def _count(value: Any) -> str | None:
    number = finite(value)
    return None if number is None else f"{number:.0f}"


def validated_message(dataset: Mapping[str, Any], warnings: Sequence[str] = ()) -> str:
    """e.g. "40 training examples, 8 held out, 1234 tokens; warning: ..." (numbers that are known only)."""
    parts = [
        f"{n} {label}"
        for key, label in (("train", "training examples"), ("test", "held out"), ("trainTokens", "tokens"))
        if (n := _count(dataset.get(key))) is not None
    ]
    message = ", ".join(parts) or "dataset validated"
    return message + "".join(f"; warning: {w}" for w in warnings)


def trained_message(progress: Mapping[str, Any]) -> str:
    """e.g. "trained 20 steps, final loss 0.412" (a number that is not known is left out, never '?')."""
    step, loss = _count(progress.get("step")), finite(progress.get("loss"))
    message = f"trained {step} steps" if step is not None else "training finished"
    return message + (f", final loss {loss:.4g}" if loss is not None else "")


def read_validation(p: JobDraft, outcome: JobOutcome) -> bool:
    dataset = dataset_status(outcome.summary)
    if p.job.sources:
        dataset["sources"] = dict(p.job.sources)  # a FineTuneSchedule's run: counts by source
    p.status["dataset"] = dataset
    p.status["gpuHoursEstimate"] = gpu_hours_estimate(p.job.spec, dataset, p.config)
    p.status["artifacts"]["data"] = f"{p.job.layout.data}/"
    warnings = dataset_warnings(outcome.summary)
    planned = planned_progress(p.job.spec, dataset)
    if planned and not (p.status.get("progress") or {}).get("step"):
        p.status["progress"] = planned
    p.condition(ConditionType.VALIDATED, "True", Reason.DATASET_VALID, validated_message(dataset, warnings))
    for warning in warnings:
        p.out.events.append(Event("Warning", Reason.DATASET_WARNING.value, short(warning)))
    return True


def planned_progress(spec: FineTuneJobSpec, dataset: Mapping[str, Any]) -> dict[str, Any] | None:
    """Optimizer steps the run will make, known once validation counted the training examples (padding-free
    batching; with packing the trainer counts packed rows and reports them in its first progress line)."""
    examples = finite(dataset.get("train"))
    hyper = spec.hyperparameters
    if not examples or hyper.packing:
        return None
    ranks = max(1, spec.resources.gpus) * spec.resources.nodes
    total = steps.total_steps(
        int(examples),
        hyper.batch_size,
        hyper.epochs,
        hyper.gradient_accumulation_steps,
        ranks,
        hyper.max_steps,
    )
    return {
        "step": 0,
        "totalSteps": total,
        "display": f"0/{total}",
        "batching": "padding-free",
        "examplesPerStep": steps.examples_per_step(
            hyper.batch_size, hyper.gradient_accumulation_steps, ranks
        ),
    }


def read_training(p: JobDraft, outcome: JobOutcome) -> bool:
    summary = outcome.summary
    artifacts = p.status["artifacts"]
    for key in ("adapter", "merged"):
        if summary.get(key):
            artifacts[key] = summary[key]
    artifacts["checkpoint"] = f"{p.job.layout.checkpoints}/"
    progress = dict(p.status.get("progress") or {})
    for key in ("step", "totalSteps", "loss"):
        if finite(summary.get(key)) is not None:
            progress[key] = summary[key]
    progress.update(progress_figures(summary.get("figures")))
    if progress.get("step") is not None and progress.get("totalSteps"):
        progress["display"] = f"{progress['step']}/{progress['totalSteps']}"
    progress["etaSeconds"] = 0
    p.status["progress"] = progress or None
    p.condition(ConditionType.TRAINED, "True", Reason.TRAINING_SUCCEEDED, trained_message(progress))
    return True


def record_progress(p: JobDraft) -> None:
    """The trainer's newest progress line while training runs."""
    line = p.o.progress
    if not line or p.status.get("phase") != Phase.TRAINING.value:
        return
    progress: dict[str, Any] = {}
    for key in ("step", "totalSteps", "etaSeconds"):
        value = finite(line.get(key))
        if value is not None and value >= 0:
            progress[key] = int(value)
    for key in ("epoch", "loss", "learningRate", "tokensPerSecond", "examplesPerStep"):
        value = finite(line.get(key))
        if value is not None:
            progress[key] = round(value, 6)
    progress.update(progress_figures(line))
    if line.get("batching") in ("padding-free", "packed"):
        progress["batching"] = line["batching"]
    rows = finite(line.get("packedRows"))
    if rows is not None and rows >= 0:
        progress["packedRows"] = int(rows)
    if "step" in progress and progress.get("totalSteps"):
        progress["display"] = f"{progress['step']}/{progress['totalSteps']}"
    if progress:
        spread = (p.status.get("progress") or {}).get("parallelism")
        p.status["progress"] = progress | ({"parallelism": spread} if spread else {})


def _counts(values: Any, names: Sequence[str]) -> dict[str, int] | None:
    """graderErrors: the whole, non-negative counts of known graders."""
    if not isinstance(values, Mapping):
        return None
    found = {name: int(n) for name in names if (n := finite(values.get(name))) is not None and n >= 0}
    return found or None


def _verdict_status(result_safety: Safety | None, retention: Retention | None) -> dict[str, Any]:
    """status.evaluation.safety / .retention: the figures the gate decided on, and their limits."""
    out: dict[str, Any] = {}
    if result_safety is not None:
        out["safety"] = {
            "tuned": result_safety.tuned,
            "base": result_safety.base,
            "maxUnsafeRate": result_safety.max_unsafe_rate,
        }
    if retention is not None:
        drop = retention.drop
        out["retention"] = {
            "metric": retention.metric,
            "base": retention.base,
            "tuned": retention.tuned,
            "drop": round(drop, 6) if drop is not None and math.isfinite(drop) else None,
            "maxDrop": retention.max_drop,
        }
    return {key: {k: v for k, v in value.items() if v is not None} for key, value in out.items()}


# The reason of a failed gate: the first failed check in this order names it.
_FAILED_REASONS = ((SAFETY, Reason.SAFETY_FAILED), (RETENTION, Reason.RETENTION_FAILED))


def _gate_reason(result: GateResult) -> Reason:
    return next((reason for kind, reason in _FAILED_REASONS if kind in result.failed), Reason.GATE_FAILED)


def evaluation_summary(result: GateResult, primary: str, tuned: Mapping[str, float], base: Any) -> str:
    """The EVAL column, e.g. "passed: relevance 0.82 vs 0.41" (a grader as primary reads the same); a
    model rejected for safety or retention says so."""
    brief = f"{primary} {tuned.get(primary, float('nan')):.3g}"
    if isinstance(base, Mapping) and primary in base:
        brief += f" vs {base[primary]:.3g}"
    failed = _gate_reason(result) if not result.passed else None
    if failed is not None and failed is not Reason.GATE_FAILED:
        brief = f"{failed.value.removesuffix('Failed').lower()} ({brief})"
    return short(("passed: " if result.passed else "rejected: ") + brief, 64)


def read_evaluation(p: JobDraft, outcome: JobOutcome) -> bool:
    """Scores (metrics and graders) into the status, then the gate: a failed gate, an unsafe rate above
    maxUnsafeRate or a retention drop beyond maxDrop rejects the model."""
    summary, evaluation, objective = outcome.summary, p.job.spec.evaluation, p.job.spec.objective
    names = evaluation.grader_names()
    scored = [*names, *metrics_for(objective)]  # dpo/kto: preference_accuracy ...; grpo: reward
    tuned = metric_values(summary.get("tuned"), scored) or {}
    base = metric_values(summary.get("base"), scored)
    result = evaluate_gate(evaluation, tuned, base, summary, objective=objective)
    primary = primary_metric(evaluation, objective)
    champion_name, report = summary.get("championName"), summary.get("reportUri")
    p.status["evaluation"] = {
        "passed": result.passed,
        "tuned": tuned or None,
        "base": base,
        "reference": metric_values(summary.get("reference"), scored),
        "champion": metric_values(summary.get("champion"), scored),
        "championVersion": champion_name if isinstance(champion_name, str) else None,
        "examples": summary.get("n") if isinstance(summary.get("n"), int) else None,
        "reasons": [short(r, 512) for r in result.reasons][:16],
        "summary": evaluation_summary(result, primary, tuned, base),
        "graderErrors": _counts(summary.get("graderErrors"), names),
        "reportUri": report if isinstance(report, str) and report.startswith(p.job.run_prefix) else None,
        **_verdict_status(safety_figures(evaluation, summary), retention_figures(evaluation, summary)),
    }
    p.status["artifacts"]["evaluationReport"] = p.job.layout.evaluation_report
    if result.passed and not pooljob.beats_champion(p, tuned, primary):
        return False
    if result.passed:
        p.condition(ConditionType.EVALUATED, "True", Reason.GATE_PASSED, "; ".join(result.reasons))
        return True
    message = "; ".join(result.failed_reasons)
    reason = _gate_reason(result)
    p.condition(ConditionType.EVALUATED, "True", reason, message)
    p.phase(Phase.REJECTED, reason, f"evaluation gate failed: {message}")
    return False


def gate_held(p: JobDraft) -> bool:
    if (p.status.get("evaluation") or {}).get("passed") is False:
        evaluated = p.conditions.get(ConditionType.EVALUATED.value) or {}
        failed = {Reason.SAFETY_FAILED.value, Reason.RETENTION_FAILED.value}
        reason = Reason(evaluated["reason"]) if evaluated.get("reason") in failed else Reason.GATE_FAILED
        p.phase(Phase.REJECTED, reason, "the evaluation gate failed")
        return False
    return True


def evaluation_disabled(p: JobDraft) -> bool:
    if not p.done(ConditionType.EVALUATED):
        p.condition(
            ConditionType.EVALUATED,
            "True",
            Reason.EVALUATION_DISABLED,
            "evaluation.enabled is false; no gate",
        )
    return True


def read_export(p: JobDraft, outcome: JobOutcome) -> bool:
    merged = outcome.summary.get("merged")
    if not merged:
        p.fail(Stage.EXPORT, Reason.STAGE_FAILED, "export finished without a merged model URI")
        return False
    p.status["artifacts"]["merged"] = merged
    return True


def deployment_disabled(p: JobDraft) -> bool:
    """Nothing to serve: remove what an earlier generation deployed; the job ends Succeeded."""
    ownedserver.retire(p)
    p.condition(ConditionType.DEPLOYED, "False", Reason.DEPLOYMENT_DISABLED, "deployment.enabled is false")
    p.complete(Phase.SUCCEEDED, Reason.SUCCEEDED, "the model passed evaluation; deployment is disabled")
    return False


STAGES: tuple[StageRow, ...] = (
    # CPU only: nothing asks for a GPU before the data is known to be good.
    StageRow(
        Stage.VALIDATE,
        "Job",
        _job(builders.validation_job),
        ConditionType.VALIDATED,
        Phase.VALIDATING,
        Reason.VALIDATING,
        read=read_validation,
    ),
    StageRow(
        Stage.TRAIN,
        "Job",
        _job(builders.training_job),
        ConditionType.TRAINED,
        Phase.TRAINING,
        Reason.TRAINING,
        read=read_training,
        while_running=record_progress,
        counts_gpu_hours=True,
    ),
    StageRow(
        Stage.EVALUATE,
        "Job",
        pooljob.evaluation_job,  # builders.evaluation_job, plus the ModelServer's champion if any
        ConditionType.EVALUATED,
        Phase.EVALUATING,
        Reason.EVALUATING,
        read=read_evaluation,
        wanted=lambda spec, artifacts: spec.evaluation.enabled,
        skip=evaluation_disabled,
        holds=gate_held,
        counts_gpu_hours=True,
    ),
    StageRow(
        Stage.EXPORT,
        "Job",
        _job(builders.export_job),
        ConditionType.DEPLOYED,
        Phase.DEPLOYING,
        Reason.EXPORTING,
        read=read_export,
        wanted=serving.needs_export,
        owns_condition=False,  # Deployed is the serving stage's; a merged model in storage ends export
        running_messages=("merging the adapter", "merging the adapter into the base model"),
    ),
    StageRow(
        Stage.SERVE,
        "ModelServer",
        lambda job, config, artifacts: dict(ownedserver.job_modelserver(job, config, artifacts)),
        ConditionType.DEPLOYED,
        Phase.DEPLOYING,
        Reason.DEPLOYING,
        wanted=lambda spec, artifacts: spec.deployment.enabled,
        skip=deployment_disabled,
        owns_condition=False,  # serving is never finished: a changed deployment section rolls out
    ),
    # Reached only in a pass where SERVE found the version loaded and its check still to pass.
    StageRow(
        Stage.SERVING_CHECK,
        "Job",
        servingcheck.check_job,
        ConditionType.DEPLOYED,
        Phase.DEPLOYING,
        Reason.CHECKING_SERVING,
        read=servingcheck.read_check,
        wanted=lambda spec, artifacts: artifacts.serving_check is not None,
        owns_condition=False,  # Deployed is the serving stage's
        running_messages=(
            "checking the served model on held-out prompts",
            "checking that the served model scores as evaluated (deployment.servingCheck)",
        ),
    ),
)
ROWS = {row.stage: row for row in STAGES}
