"""Training objectives: which dataset format each one trains on, the figures it adds to evaluation and to
progress, and the metric that decides its gate unless the spec names one.

- ``sft``: supervised fine-tuning on chat / completion / instruction records (the default);
- ``dpo``: direct preference optimisation on ``preference`` pairs;
- ``kto``: Kahneman-Tversky optimisation on ``unpaired-preference`` examples (a completion and a label);
- ``grpo``: group relative policy optimisation on ``prompt-only`` records, rewarded by evaluation graders.
"""

from __future__ import annotations

from typing import Literal, get_args

Objective = Literal["sft", "dpo", "kto", "grpo"]
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
DEFAULT_OBJECTIVE: Objective = "sft"

SFT_FORMATS = ("chat", "completion", "instruction")
PREFERENCE_FORMAT = "preference"  # {"prompt"|"messages", "chosen", "rejected"}
UNPAIRED_PREFERENCE_FORMAT = "unpaired-preference"  # {"prompt"|"messages", "completion", "label": bool}
PROMPT_ONLY_FORMAT = "prompt-only"  # {"prompt"|"messages", "expected"?}
# The dataset formats each objective trains on (the first is what `dataset.format: auto` must detect).
OBJECTIVE_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": SFT_FORMATS,
    "dpo": (PREFERENCE_FORMAT,),
    "kto": (UNPAIRED_PREFERENCE_FORMAT,),
    "grpo": (PROMPT_ONLY_FORMAT,),
}
ALL_FORMATS: tuple[str, ...] = (
    *SFT_FORMATS,
    PREFERENCE_FORMAT,
    UNPAIRED_PREFERENCE_FORMAT,
    PROMPT_ONLY_FORMAT,
)

# Evaluation figures of the preference objectives, on held-out examples, tuned vs base; higher is better.
# preference_accuracy: share of held-out pairs whose implicit reward beta*(log pi(y|x) - log pi_ref(y|x))
# prefers chosen (kto: whose reward's sign matches the label), ties counted 1/2 (so the base scores 0.5);
# reward_margin: mean implicit reward of chosen minus rejected (kto: desirable minus undesirable).
PREFERENCE_ACCURACY = "preference_accuracy"
REWARD_MARGIN = "reward_margin"
PREFERENCE_METRICS: tuple[str, ...] = (PREFERENCE_ACCURACY, REWARD_MARGIN)
# grpo: the weighted mean of the `spec.rewards` graders' scores on the held-out prompts (in [0, 1] when the
# weights are positive); each reward grader's own mean sits beside it under the grader's name.
REWARD_METRIC = "reward"
OBJECTIVE_METRICS: dict[str, tuple[str, ...]] = {
    "sft": (),
    "dpo": PREFERENCE_METRICS,
    "kto": PREFERENCE_METRICS,
    "grpo": (REWARD_METRIC,),
}
ALL_OBJECTIVE_METRICS: tuple[str, ...] = (*PREFERENCE_METRICS, REWARD_METRIC)
_DEFAULT_PRIMARY: dict[str, str] = {
    "dpo": PREFERENCE_ACCURACY,
    "kto": PREFERENCE_ACCURACY,
    "grpo": REWARD_METRIC,
}

# The objective's own training figures: the trainer's progress lines and summary carry them under these
# keys (status.progress shows them; MLflow gets TRL's own names). Value: the TRL log key they come from
# (checked against what TRL 1.16's trainers log; grpo's kl is logged only when beta > 0).
PROGRESS_FIGURES: dict[str, dict[str, str]] = {
    "sft": {},
    "dpo": {
        "rewardsChosen": "rewards/chosen",
        "rewardsRejected": "rewards/rejected",
        "rewardsMargin": "rewards/margins",
        "rewardsAccuracy": "rewards/accuracies",
    },
    "kto": {
        "rewardsChosen": "rewards/chosen",
        "rewardsRejected": "rewards/rejected",
        "rewardsMargin": "rewards/margins",
        "kl": "kl",
    },
    "grpo": {"reward": "reward", "kl": "kl", "completionLength": "completions/mean_length"},
}
PROGRESS_FIGURE_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for f in PROGRESS_FIGURES.values() for k in f))


def formats_for(objective: str) -> tuple[str, ...]:
    return OBJECTIVE_FORMATS.get(objective, SFT_FORMATS)


def metrics_for(objective: str) -> tuple[str, ...]:
    return OBJECTIVE_METRICS.get(objective, ())


def default_primary(objective: str) -> str | None:
    """The metric that decides the gate of `objective` when the spec names none (None: the SFT rule)."""
    return _DEFAULT_PRIMARY.get(objective)


def objective_of_metric(metric: str) -> tuple[str, ...]:
    """The objectives that measure `metric` (empty for a metric every objective measures)."""
    return tuple(o for o, names in OBJECTIVE_METRICS.items() if metric in names)


# TRL 1.16's GRPOConfig.num_generations, which the trainer leaves in place when numGenerations is unset
# (tests/trainer checks the two agree); the operator needs it for the GPU-hour estimate.
TRL_DEFAULT_NUM_GENERATIONS = 8


def compute_factor(objective: str, num_generations: int | None = None) -> float:
    """Training compute per counted token, relative to SFT (the GPU-hour estimate's multiplier; rough).

    Units: a forward pass 1, a forward + backward 3. validate counts each example once (dpo: the prompt and
    the longer side; grpo: the prompt and the completion budget). dpo runs chosen and rejected through the
    policy (3 + 3) and the reference (1 + 1); kto one completion through the policy (3), the reference (1)
    and a mismatched KL pair through both (1 + 1); grpo samples numGenerations completions per prompt,
    decoding them (about a forward + backward's cost, token by token) and training on them (3)."""
    if objective == "dpo":
        return 8 / 3
    if objective == "kto":
        return 2.0
    if objective == "grpo":
        return 2.0 * (num_generations or TRL_DEFAULT_NUM_GENERATIONS)
    return 1.0
