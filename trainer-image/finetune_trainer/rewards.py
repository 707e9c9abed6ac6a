"""GRPO rewards: one reward function per ``spec.rewards`` entry, scored by the evaluation grader it names.

The same grader code scores the rollouts during training and the held-out answers during evaluation
(graders.py), so what was optimised and what is gated are one definition: ``stringCheck`` and ``jsonSchema``
score a completion against the example's ``expected`` answer (empty when the prompt has none); a ``judge``
grader asks the judge model through the same client, egress rules and key variable as evaluation does.
A pairwise judge compares tuned with base answers and cannot score a lone rollout: refused naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import graders
from .config import GraderSpec, TrainerConfig
from .exitcodes import InvalidConfigError

RewardFunction = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """A rollout's text: TRL passes a string (plain prompts) or assistant messages (conversational)."""
    if isinstance(completion, str):
        return completion
    return "".join(
        str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant"
    )


def _grader(config: TrainerConfig, index: int, name: str) -> GraderSpec:
    for grader in config.spec.evaluation.graders:
        if grader.name == name:
            if grader.judge is not None and grader.judge.pairwise:
                raise InvalidConfigError(
                    f"spec.rewards[{index}].grader: {name} is a pairwise judge (tuned vs base); "
                    "a reward scores one rollout at a time"
                )
            return grader
    raise InvalidConfigError(f"spec.rewards[{index}].grader: {name} is not in spec.evaluation.graders")


def reward_function(grader: GraderSpec, client: Any = None) -> RewardFunction:
    """TRL's reward signature: a score in [0, 1] per completion (the grader's); dataset columns as kwargs."""

    def reward(
        prompts: Sequence[Any], completions: Sequence[Any], expected: Sequence[str] | None = None, **_: Any
    ) -> list[float]:
        answers = [completion_text(c) for c in completions]
        references = [e or "" for e in expected] if expected is not None else [""] * len(answers)
        graded = graders.grade(grader, {"tuned": answers}, list(prompts), references, client)
        graders.check_error_rate(grader.name, graded, label=f"reward grader {grader.name}")
        return [float(s) for s in graded.scores["tuned"]]

    reward.__name__ = grader.name  # TRL logs rewards/<name>/mean per reward function
    return reward


def reward_functions(config: TrainerConfig) -> tuple[list[RewardFunction], list[float]]:
    """The reward functions of ``spec.rewards`` and their weights (GRPOConfig.reward_weights)."""
    if not config.spec.rewards:
        raise InvalidConfigError("spec.rewards: objective grpo needs at least one reward grader")
    specs = [_grader(config, i, r.grader) for i, r in enumerate(config.spec.rewards)]
    judges = graders.judges_for(config) if any(not g.deterministic for g in specs) else {}
    functions = [reward_function(g, judges.get(g.name)) for g in specs]
    return functions, [float(r.weight) for r in config.spec.rewards]
