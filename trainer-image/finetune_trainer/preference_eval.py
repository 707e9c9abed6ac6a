"""The held-out set of every objective, and the evaluation figures of the preference and reward objectives
(finetune_vocabulary.objectives).

The test set is read in its objective's canonical form (what validate writes): sft ``{"messages"}``, dpo
``{"prompt", "chosen", "rejected"}``, kto ``{"prompt", "completion", "label"}``, grpo ``{"prompt",
"expected"?}``, ``prompt`` a list of chat messages ending with a user turn.

dpo/kto: the implicit reward of a completion y is r(y|x) = beta * (log pi(y|x) - log pi_ref(y|x)), summed over
y's tokens, with pi_ref the base model (a LoRA adapter disabled, or the base weights of a full fine-tune) and
beta = hyperparameters.beta or 0.1 (TRL's default). ``preference_accuracy``: share of pairs whose chosen
reward is above the rejected one (kto: whose reward's sign matches the label), ties counting 1/2, so the base
(reward 0 everywhere) scores 0.5; ``reward_margin``: mean r(chosen) - r(rejected) (kto: mean r(desirable)
- mean r(undesirable)), 0 for the base.

grpo: ``reward`` is the weighted mean of the ``spec.rewards`` graders' per-example scores, the weights divided
by the sum of their absolute values (a plain weighted mean when they are positive: in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_vocabulary.objectives import PREFERENCE_ACCURACY, REWARD_MARGIN

from .config import RewardSpec
from .generation import answer_logps
from .graders import Graded

DEFAULT_BETA = 0.1  # TRL's DPO and KTO default


@dataclass(frozen=True)
class Pair:
    """One held-out preference example: dpo has both sides; kto has the side its label names."""

    prompt: list[dict[str, Any]]
    chosen: str | None
    rejected: str | None


def pairs_from_rows(rows: Sequence[Mapping[str, Any]], objective: str) -> list[Pair]:
    """dpo and kto rows as pairs (a kto row has one side, by its label); other objectives have none."""
    if objective == "dpo":
        return [Pair(list(r["prompt"]), str(r["chosen"]), str(r["rejected"])) for r in rows]
    if objective == "kto":
        return [
            Pair(
                list(r["prompt"]),
                *((str(r["completion"]), None) if r["label"] else (None, str(r["completion"]))),
            )
            for r in rows
        ]
    return []


def generation_targets(
    rows: Sequence[Mapping[str, Any]], objective: str
) -> list[tuple[list[dict[str, Any]], str]]:
    """(prompt, expected answer) that the generation metrics and graders use: dpo the chosen side, kto the
    desirable completions only, grpo `expected` ("" when absent)."""
    if objective == "dpo":
        return [(list(r["prompt"]), str(r["chosen"])) for r in rows]
    if objective == "kto":
        return [(list(r["prompt"]), str(r["completion"])) for r in rows if r["label"]]
    return [(list(r["prompt"]), str(r.get("expected") or "")) for r in rows]


# --- implicit rewards ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Logps:
    """Summed completion log-probabilities of one model, per pair (None where the pair has no such side)."""

    chosen: list[float | None]
    rejected: list[float | None]


def completion_logps(model: Any, tokenizer: Any, pairs: Sequence[Pair], *, batch_size: int) -> Logps:
    sides: dict[str, list[float | None]] = {}
    for side in ("chosen", "rejected"):
        items = [(p.prompt, getattr(p, side)) for p in pairs if getattr(p, side) is not None]
        found = iter(answer_logps(model, tokenizer, items, batch_size=batch_size))
        sides[side] = [next(found)[0] if getattr(p, side) is not None else None for p in pairs]
    return Logps(sides["chosen"], sides["rejected"])


def _reward(beta: float, policy: float | None, reference: float | None) -> float | None:
    return None if policy is None or reference is None else beta * (policy - reference)


def rewards(policy: Logps, reference: Logps, beta: float) -> list[dict[str, float]]:
    """Per pair, the implicit reward of each side it has: ``{"chosen": r, "rejected": r}``."""
    out = []
    for i in range(len(policy.chosen)):
        row = {
            "chosen": _reward(beta, policy.chosen[i], reference.chosen[i]),
            "rejected": _reward(beta, policy.rejected[i], reference.rejected[i]),
        }
        out.append({k: v for k, v in row.items() if v is not None})
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _agreement(reward: dict[str, float]) -> float:
    """1 when the reward prefers the right side, 1/2 on a tie, else 0."""
    if "chosen" in reward and "rejected" in reward:
        difference = reward["chosen"] - reward["rejected"]
    else:  # kto: the sign of the one side's reward against its label
        difference = reward["chosen"] if "chosen" in reward else -reward["rejected"]
    return 0.5 if difference == 0 else float(difference > 0)


def preference_metrics(per_pair: Sequence[dict[str, float]]) -> dict[str, float]:
    """preference_accuracy and reward_margin of one model's per-pair rewards (paired: dpo; unpaired: kto)."""
    paired = [r["chosen"] - r["rejected"] for r in per_pair if "chosen" in r and "rejected" in r]
    if paired:
        margin = _mean(paired)
    else:
        margin = _mean([r["chosen"] for r in per_pair if "chosen" in r]) - _mean(
            [r["rejected"] for r in per_pair if "rejected" in r]
        )
    return {
        PREFERENCE_ACCURACY: round(_mean([_agreement(r) for r in per_pair]), 6),
        REWARD_MARGIN: round(margin, 6),
    }


def beta_of(beta: float | None) -> float:
    return DEFAULT_BETA if beta is None else beta


# --- grpo ---------------------------------------------------------------------------------------------------


def weighted_reward(rewards_spec: Sequence[RewardSpec], graded: Mapping[str, Graded]) -> dict[str, float]:
    """Per model, the mean over examples of the weighted mean of the reward graders' scores."""
    total = sum(abs(r.weight) for r in rewards_spec)
    models = (
        set.intersection(*(set(graded[r.grader].scores) for r in rewards_spec)) if rewards_spec else set()
    )
    out: dict[str, float] = {}
    for model in sorted(models):
        columns = [(r.weight, graded[r.grader].scores[model]) for r in rewards_spec]
        per_example = [sum(w * s[i] for w, s in columns) / total for i in range(len(columns[0][1]))]
        out[model] = round(_mean(per_example), 6) if total else 0.0
    return out
