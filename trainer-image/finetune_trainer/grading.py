"""After every model has answered: graders, the safety judge and the retention figures, then the evaluate
stage's summary (contract: the operator's gate reads it) and the report rows (one per held-out example)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_vocabulary.evaluation import SAFETY_JUDGE_KEY_ENV
from finetune_vocabulary.metrics import TEXT_METRICS
from finetune_vocabulary.objectives import REWARD_METRIC

from . import graders, metrics, preference_eval, safety
from .config import TrainerConfig
from .graders import Graded

log = logging.getLogger(__name__)


@dataclass
class Extras:
    """What a local model produced on the safety and retention sets while its weights were loaded."""

    safety: list[str] | None = None
    retention_answers: list[str] | None = None
    retention_value: float | None = None


@dataclass
class Judged:
    graded: dict[str, Graded] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    safety: dict[str, Any] | None = None
    retention: dict[str, Any] | None = None


def _count(judged: Judged, name: str, graded: Graded) -> None:
    if graded.errors:
        judged.errors[name] = judged.errors.get(name, 0) + graded.errors


def _safety(
    config: TrainerConfig, extras: Mapping[str, Extras], prompts: Sequence[Any]
) -> tuple[Any, Graded]:
    client = graders.make_judge(config, "spec.evaluation.safety.judge", "safety", SAFETY_JUDGE_KEY_ENV)
    answers = {m: x.safety for m, x in extras.items() if x.safety is not None}
    rates, graded = safety.judge_safety(client, prompts, answers)
    graders.check_error_rate("safety", graded, label="safety judge")
    return {"tuned": rates.get("tuned"), "base": rates.get("base"), "prompts": len(prompts)}, graded


def _retention(
    config: TrainerConfig, extras: Mapping[str, Extras], retention: Sequence[Any], judged: Judged
) -> dict[str, Any]:
    spec = config.spec.evaluation.retention
    assert spec is not None
    values = {m: extras[m].retention_value for m in ("tuned", "base")}
    by_name = {g.name: g for g in config.spec.evaluation.graders}
    if spec.metric in by_name:
        answers = {m: extras[m].retention_answers or [] for m in ("tuned", "base")}
        grader = by_name[spec.metric]
        client = graders.judges_for(config).get(grader.name)
        prompts, expected = [e.prompt for e in retention], [e.reference for e in retention]
        graded = graders.grade(grader, answers, prompts, expected, client)
        graders.check_error_rate(grader.name, graded, label=f"grader {grader.name} (retention set)")
        _count(judged, grader.name, graded)
        values = dict(graded.means())
    tuned, base = values.get("tuned"), values.get("base")
    return safety.retention_summary(spec.metric, float(base or 0.0), float(tuned or 0.0), len(retention))


def judge_all(
    config: TrainerConfig,
    examples: Sequence[Any],
    answers: Mapping[str, Sequence[str]],
    extras: Mapping[str, Extras],
    safety_prompts: Sequence[Any] = (),
    retention: Sequence[Any] = (),
) -> Judged:
    """Graders over every model's held-out answers, the safety verdicts and the retention figures."""
    ev = config.spec.evaluation
    started = time.monotonic()
    judged = Judged()
    prompts, expected = [e.prompt for e in examples], [e.reference for e in examples]
    judged.graded = graders.grade_all(ev.graders, answers, prompts, expected, graders.judges_for(config))
    for name, graded in judged.graded.items():
        _count(judged, name, graded)
    if ev.safety is not None:
        judged.safety, graded = _safety(config, extras, safety_prompts)
        _count(judged, "safety", graded)
    if ev.retention is not None:
        judged.retention = _retention(config, extras, retention, judged)
    seconds = round(time.monotonic() - started, 3)
    log.info(
        "graders, safety and retention judged in %.1f s",
        seconds,
        extra={"fields": {"event": "graded", "seconds": seconds, "graderErrors": judged.errors}},
    )
    return judged


def model_maps(
    config: TrainerConfig,
    results: Mapping[str, Mapping[str, Any]],
    judged: Judged,
    tuned_answers: Sequence[str],
    expected: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Each model's metrics plus its grader means (grpo: and its reward); tuned's always holds the serving
    check's metric."""
    maps = {m: dict(s) for m, s in results.items()}
    for name, graded in judged.graded.items():
        for model, mean in graded.means().items():
            if model in maps and "error" not in maps[model]:
                maps[model][name] = mean
    if config.spec.objective == "grpo":
        for model, reward in preference_eval.weighted_reward(config.spec.rewards, judged.graded).items():
            if model in maps and "error" not in maps[model]:
                maps[model][REWARD_METRIC] = reward
    check = config.spec.serving_check_metric
    if check not in maps["tuned"] and check in TEXT_METRICS:
        maps["tuned"][check] = round(metrics.score_text(tuned_answers, expected)[check], 6)
    return maps


def summary(
    config: TrainerConfig, maps: Mapping[str, Mapping[str, Any]], judged: Judged, n: int
) -> dict[str, Any]:
    """The evaluate stage's termination summary (contract section 4)."""
    out: dict[str, Any] = {
        "tuned": maps["tuned"],
        "base": maps.get("base") if config.spec.evaluation.compare_to_base else None,
        "reference": maps.get("reference"),
        "champion": maps.get("champion"),
        "championName": config.champion.name if config.champion is not None else None,
        "n": n,
        "reportUri": f"{config.layout.evaluation}/report.html",
    }
    if judged.errors:
        out["graderErrors"] = dict(judged.errors)
    if judged.safety is not None:
        out["safety"] = judged.safety
    if judged.retention is not None:
        out["retention"] = judged.retention
    return out


def report_rows(
    config: TrainerConfig,
    examples: Sequence[Any],
    answers: Mapping[str, Sequence[str]],
    judged: Judged,
) -> list[dict[str, Any]]:
    """One row per held-out example: input, expected, every model's output, scores and judge reasons."""
    wanted = [m for m in TEXT_METRICS if m in config.spec.evaluation.metrics]
    rows = []
    for i, example in enumerate(examples):
        scores: dict[str, dict[str, float]] = {}
        reasons: dict[str, dict[str, str]] = {}
        for model, outs in answers.items():
            per = metrics.score_text([outs[i]], [example.reference])
            scores[model] = {m: round(per[m], 6) for m in wanted}
            for name, graded in judged.graded.items():
                if model in graded.scores:
                    scores[model][name] = round(graded.scores[model][i], 6)
                if model in graded.reasons and graded.reasons[model][i]:
                    reasons.setdefault(model, {})[name] = graded.reasons[model][i]
        rows.append(
            {
                "index": i,
                "input": example.prompt,
                "expected": example.reference,
                "outputs": {m: outs[i] for m, outs in answers.items()},
                "scores": scores,
                "reasons": reasons,
            }
        )
    return rows


def with_rewards(
    rows: list[dict[str, Any]],
    pairs: Sequence[preference_eval.Pair],
    tuned_rewards: Sequence[dict[str, float]],
) -> list[dict[str, Any]]:
    """The report rows of a preference task: each gets its pair's rejected text and the tuned model's implicit
    rewards (``{"chosen": r, "rejected": r}``). The rows are the pairs with a chosen side, in order (dpo: all;
    kto: the desirable ones); kto's undesirable examples, which nothing answered, follow as rows of their
    own."""
    if not pairs or len(tuned_rewards) != len(pairs):
        return rows
    out, answered = [dict(r) for r in rows], iter(range(len(rows)))
    for pair, reward in zip(pairs, tuned_rewards, strict=True):
        if pair.chosen is not None:
            row = out[next(answered)]
        else:
            row = {"index": len(out), "input": pair.prompt, "expected": "", "outputs": {}, "scores": {}}
            out.append(row)
        if pair.rejected is not None:
            row["rejected"] = pair.rejected
        row["rewards"] = {side: round(value, 6) for side, value in reward.items()}
    return out
