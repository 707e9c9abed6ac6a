"""The toy task ("shout", finetune_demo.toymodel) in the forms the other objectives train on.

- ``preference`` (dpo): the prompt, ``chosen`` = the right answer (the hidden letter in uppercase) and
  ``rejected`` = another uppercase letter. (With the base's own answer, the letter in lowercase, as the
  rejected side, DPO on the toy base learns "answer some capital" and the served model says the same capital
  to every prompt: a wrong capital is the contrast that teaches which letter.)
- ``unpaired-preference`` (kto): each prompt once, with the right answer (``label: true``) or the base's own
  answer, the letter in lowercase (``label: false``: a thumbs-down on what the model said), alternating, so
  that the labels are balanced. (KTO's figure is the sign of each answer's implicit reward: with a wrong
  capital as the undesirable side, the tuned model raised every capital, wrong ones included, and held-out
  accuracy stayed near 0.55; against the base's answer it reaches ~0.85 in 100 steps.)
- ``prompt-only`` (grpo): the prompt and its ``expected`` answer, which a stringCheck grader without a pattern
  compares the rollouts to.

Records are in TRL's conversational form (the prompt a list of chat messages ending with a user turn, the
completions lists of assistant messages), which the chat template turns into the same text as SFT's.
Train and test prompts never overlap (they come from ``toy_task``'s split).
"""

from __future__ import annotations

import json
import random
import string
from typing import Any

from .toymodel import ToyTaskParams, toy_task

Record = dict[str, Any]
# The keys upload_toy_assets stores each form under (s3://data/<key>/train.jsonl and test.jsonl).
PREFERENCE_KEY, UNPAIRED_KEY, PROMPTS_KEY = "preference", "unpaired", "prompts"
BAD_PREFERENCE_KEY = "bad-preference"
# The 1-based line of the bad preference set that lacks its "rejected" answer.
BAD_PREFERENCE_LINE = 5
TOY_TASK = ToyTaskParams()  # the split and seed of toymodel.toy_task()


def _parts(chat: Record) -> tuple[list[Record], str]:
    """(prompt messages, right answer) of one chat example of the toy task."""
    *prompt, answer = chat["messages"]
    return prompt, answer["content"]


def wrong_answer(right: str, rng: random.Random) -> str:
    """A capital letter other than the right answer."""
    return rng.choice([c for c in string.ascii_uppercase if c != right])


def _assistant(text: str) -> list[Record]:
    return [{"role": "assistant", "content": text}]


def preference_record(chat: Record, rng: random.Random) -> Record:
    prompt, right = _parts(chat)
    return {"prompt": prompt, "chosen": _assistant(right), "rejected": _assistant(wrong_answer(right, rng))}


def base_answer(right: str) -> str:
    """What the pre-trained toy base answers: the hidden letter as given (lowercase), not shouted."""
    return right.lower()


def unpaired_record(chat: Record, desirable: bool) -> Record:
    prompt, right = _parts(chat)
    completion = right if desirable else base_answer(right)
    return {"prompt": prompt, "completion": _assistant(completion), "label": desirable}


def prompt_record(chat: Record) -> Record:
    prompt, right = _parts(chat)
    return {"prompt": prompt, "expected": right}


def toy_preference_task(params: ToyTaskParams = TOY_TASK) -> tuple[list[Record], list[Record]]:
    """(train, test) preference pairs of the toy task: chosen = the right answer, rejected = a wrong one."""
    train, test = toy_task(params)
    rng = random.Random(params.seed)
    return [preference_record(r, rng) for r in train], [preference_record(r, rng) for r in test]


def toy_unpaired_task(params: ToyTaskParams = TOY_TASK) -> tuple[list[Record], list[Record]]:
    """(train, test) unpaired-preference examples: the right answer (desirable) and the base's (undesirable)
    alternating, so that the labels are balanced."""
    train, test = toy_task(params)
    return (
        [unpaired_record(r, i % 2 == 0) for i, r in enumerate(train)],
        [unpaired_record(r, i % 2 == 0) for i, r in enumerate(test)],
    )


def toy_prompt_task(params: ToyTaskParams = TOY_TASK) -> tuple[list[Record], list[Record]]:
    """(train, test) prompt-only records with the expected answer."""
    train, test = toy_task(params)
    return [prompt_record(r) for r in train], [prompt_record(r) for r in test]


def jsonl(rows: list[Record]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def bad_preference_lines(params: ToyTaskParams = TOY_TASK) -> bytes:
    """A preference train set whose line BAD_PREFERENCE_LINE has no "rejected" answer (the rest are valid)."""
    train, _ = toy_preference_task(params)
    rows = [dict(r) for r in train]
    del rows[BAD_PREFERENCE_LINE - 1]["rejected"]
    return jsonl(rows)


def objective_datasets(params: ToyTaskParams = TOY_TASK) -> dict[str, dict[str, bytes]]:
    """{key: {file name: JSONL bytes}} of every form above, as upload_toy_assets stores them."""
    out: dict[str, dict[str, bytes]] = {}
    for key, build in (
        (PREFERENCE_KEY, toy_preference_task),
        (UNPAIRED_KEY, toy_unpaired_task),
        (PROMPTS_KEY, toy_prompt_task),
    ):
        train, test = build(params)
        out[key] = {"train.jsonl": jsonl(train), "test.jsonl": jsonl(test)}
    out[BAD_PREFERENCE_KEY] = {"train.jsonl": bad_preference_lines(params)}
    return out
