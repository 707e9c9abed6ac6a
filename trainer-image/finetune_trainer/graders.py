"""Graders: task-specific scores in [0, 1] (higher is better) for every held-out example, for every model the
evaluate stage scores, by the same code and the same judge (finetune_vocabulary.evaluation).

* ``stringCheck``: equals / contains / notContains on stripped text, or a regex *search* run by RE2 (linear
  time: a pattern like ``(a+)+$`` cannot backtrack catastrophically on untrusted model output);
* ``jsonSchema``: the answer parses as JSON (a ```json fence is unwrapped) and validates (Draft 2020-12);
* ``judge``: a rubric, scored by a judge model (judge.py) and normalised from its scale; ``pairwise`` compares
  tuned and base side by side in both orders and reports tuned's win rate (ties count 0.5).

A judge verdict that stays unusable scores 0 and is counted; more than MAX_GRADER_ERROR_RATE of them fails the
stage with INVALID_CONFIG naming the grader, rather than letting a broken judge decide silently.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from finetune_vocabulary.evaluation import MAX_GRADER_ERROR_RATE, judge_key_env

from . import egress, judge
from .config import GraderSpec, StringCheckSpec, TrainerConfig
from .exitcodes import InvalidConfigError

log = logging.getLogger(__name__)

Prompt = Sequence[Mapping[str, Any]]


# --- deterministic graders ----------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _regex(pattern: str, case_sensitive: bool) -> Any:
    import re2

    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.max_mem = 64 << 20  # RE2 gives up (no match) rather than grow without bound
    try:
        return re2.compile(pattern, options)
    except Exception as exc:  # re2 raises its own error type
        raise InvalidConfigError(
            f"stringCheck.pattern {pattern[:80]!r}: not a valid RE2 regex ({exc})"
        ) from None


def string_check(spec: StringCheckSpec, answer: str, expected: str) -> float:
    """1.0 when the check holds, else 0.0; without a pattern the expected answer is the pattern."""
    if spec.operation == "regex":
        import re2

        pattern = spec.pattern if spec.pattern is not None else re2.escape(expected.strip())
        return float(_regex(pattern, spec.case_sensitive).search(answer) is not None)
    text, pattern = answer.strip(), (spec.pattern if spec.pattern is not None else expected).strip()
    if not spec.case_sensitive:
        text, pattern = text.casefold(), pattern.casefold()
    if spec.operation == "equals":
        return float(text == pattern)
    if spec.operation == "contains":
        return float(pattern in text)
    return float(pattern not in text)  # notContains


@lru_cache(maxsize=16)
def _validator(schema_json: str) -> Any:
    import jsonschema

    schema = json.loads(schema_json)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidConfigError(f"jsonSchema.schema: not a valid JSON Schema ({exc.message})") from None
    return jsonschema.Draft202012Validator(schema)


def json_schema_check(schema: Mapping[str, Any], answer: str) -> float:
    """1.0 when ``answer`` is JSON (fence unwrapped) that validates against ``schema``."""
    text = answer.strip()
    if (m := judge._FENCED.match(text)) is not None:
        text = m.group(1)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return 0.0
    return float(_validator(json.dumps(schema, sort_keys=True)).is_valid(value))


def score_answers(grader: GraderSpec, answers: Sequence[str], expected: Sequence[str]) -> list[float]:
    """Per-answer scores of a deterministic grader (stringCheck, jsonSchema); the serving check uses it."""
    if len(answers) != len(expected):
        raise ValueError(f"{len(answers)} answers for {len(expected)} expected answers")
    if grader.string_check is not None:
        spec = grader.string_check
        return [string_check(spec, a, e) for a, e in zip(answers, expected, strict=True)]
    if grader.json_schema is not None:
        schema = grader.json_schema.document
        return [json_schema_check(schema, a) for a in answers]
    raise ValueError(f"grader {grader.name} ({grader.type}) is not deterministic")


# --- graded results -----------------------------------------------------------------------------------------


@dataclass
class Graded:
    """One grader's per-example scores (and judge reasons) per model, and its unusable verdicts."""

    scores: dict[str, list[float]] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    errors: int = 0
    verdicts: int = 0
    first_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def means(self) -> dict[str, float]:
        return {m: round(sum(s) / len(s), 6) if s else 0.0 for m, s in self.scores.items()}

    def failed(self, message: str) -> None:
        with self._lock:  # judge threads report concurrently
            self.errors += 1
            self.first_error = self.first_error or message


def check_error_rate(name: str, graded: Graded, label: str | None = None) -> None:
    """INVALID_CONFIG when more than MAX_GRADER_ERROR_RATE of ``name``'s verdicts were unusable."""
    if graded.verdicts and graded.errors / graded.verdicts > MAX_GRADER_ERROR_RATE:
        raise InvalidConfigError(
            f"{label or 'grader ' + name}: {graded.errors} of {graded.verdicts} verdicts failed "
            f"({graded.first_error})"[:900]
        )


def make_judge(config: TrainerConfig, field_path: str, name: str, key_env: str) -> judge.Judge:
    endpoint = dict(config.judge_endpoints())[field_path]
    return judge.Judge(
        name=name,
        url=config.judge_url(field_path),
        model=endpoint.model,
        key_env=key_env,
        allowance=egress.judge_allowance(config.reference_policy.allow_plain_http_hosts),
    )


def judges_for(config: TrainerConfig) -> dict[str, judge.Judge]:
    """A Judge for every judge grader, keyed by grader name (its key env: judge_key_env(name))."""
    return {
        g.name: make_judge(config, f"spec.evaluation.graders[{i}].judge", g.name, judge_key_env(g.name))
        for i, g in enumerate(config.spec.evaluation.graders)
        if g.judge is not None
    }


def _judged(graded: Graded, ask: Callable[[], tuple[float, str]]) -> tuple[float, str]:
    try:
        return ask()
    except judge.JudgeError as exc:
        graded.failed(str(exc))
        return 0.0, f"judge error: {exc}"[:300]


def _pointwise(
    spec: GraderSpec,
    client: judge.Judge,
    answers: Mapping[str, Sequence[str]],
    prompts: Sequence[Prompt],
    expected: Sequence[str],
) -> Graded:
    assert spec.judge is not None
    scale = spec.judge.scale
    system = judge.pointwise_prompt(spec.judge.rubric, scale.min, scale.max)
    check = judge.score_check(scale.min, scale.max)
    graded = Graded()
    for model, outs in answers.items():
        items = list(zip(prompts, expected, outs, strict=True))
        results = client.map(
            lambda item: _judged(
                graded, lambda: client.ask(system, judge.pointwise_request(*item), judge.SCORE_SCHEMA, check)
            ),
            items,
        )
        graded.scores[model] = [s for s, _ in results]
        graded.reasons[model] = [r for _, r in results]
        graded.verdicts += len(items)
    return graded


def _pairwise(
    spec: GraderSpec,
    client: judge.Judge,
    answers: Mapping[str, Sequence[str]],
    prompts: Sequence[Prompt],
    expected: Sequence[str],
) -> Graded:
    """Tuned vs base in both orders; per example tuned's share of the two verdicts (a tie is half)."""
    assert spec.judge is not None
    if "base" not in answers:
        raise InvalidConfigError(f"grader {spec.name}: a pairwise judge needs evaluation.compareToBase: true")
    system = judge.pairwise_prompt(spec.judge.rubric)
    graded = Graded()

    def one(item: tuple[Prompt, str, str, str, bool]) -> tuple[float, str]:
        prompt, exp, tuned, base, tuned_first = item
        first, second = (tuned, base) if tuned_first else (base, tuned)
        request = judge.pairwise_request(prompt, exp, first, second)
        try:
            winner, reason = client.ask(system, request, judge.PAIRWISE_SCHEMA, judge.winner_check)
        except judge.JudgeError as exc:
            graded.failed(str(exc))
            return 0.0, f"judge error: {exc}"[:300]
        tuned_label = "A" if tuned_first else "B"
        return (0.5 if winner == "tie" else float(winner == tuned_label)), f"{winner}: {reason}"

    rows = list(zip(prompts, expected, answers["tuned"], answers["base"], strict=True))
    items = [(*row, order) for row in rows for order in (True, False)]
    results = client.map(one, items)
    graded.verdicts = len(items)
    tuned_scores = [(results[2 * i][0] + results[2 * i + 1][0]) / 2 for i in range(len(rows))]
    graded.scores = {"tuned": tuned_scores, "base": [1.0 - s for s in tuned_scores]}
    reasons = [
        f"tuned first: {results[2 * i][1]} | base first: {results[2 * i + 1][1]}" for i in range(len(rows))
    ]
    graded.reasons = {"tuned": reasons, "base": reasons}
    return graded


def grade(
    spec: GraderSpec,
    answers: Mapping[str, Sequence[str]],
    prompts: Sequence[Prompt],
    expected: Sequence[str],
    client: judge.Judge | None = None,
) -> Graded:
    """Score every model's answers (``answers``: model name → one answer per example) with one grader."""
    if spec.deterministic:
        return Graded(scores={m: score_answers(spec, outs, expected) for m, outs in answers.items()})
    if client is None or spec.judge is None:
        raise ValueError(f"grader {spec.name}: a judge grader needs a judge client")
    if spec.judge.pairwise:
        graded = _pairwise(spec, client, answers, prompts, expected)
    else:
        graded = _pointwise(spec, client, answers, prompts, expected)
    if graded.errors:
        log.warning(
            "grader %s: %d of %d verdicts failed",
            spec.name,
            graded.errors,
            graded.verdicts,
            extra={"fields": {"event": "graderErrors", "grader": spec.name, "errors": graded.errors}},
        )
    return graded


def grade_all(
    graders: Sequence[GraderSpec],
    answers: Mapping[str, Sequence[str]],
    prompts: Sequence[Prompt],
    expected: Sequence[str],
    judges: Mapping[str, judge.Judge],
) -> dict[str, Graded]:
    """Every grader over every model's answers; raises INVALID_CONFIG for a grader with too many errors."""
    out: dict[str, Graded] = {}
    for spec in graders:
        out[spec.name] = grade(spec, answers, prompts, expected, judges.get(spec.name))
        check_error_rate(spec.name, out[spec.name])
    return out
