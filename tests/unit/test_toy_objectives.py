"""The toy task's forms for the preference and reinforcement objectives (finetune_demo.preference), as the
e2e tests and the examples use them: each record has the shape its objective's dataset format needs, and its
answers say what the task says (chosen = the right answer, never the rejected one)."""

from __future__ import annotations

import json
from typing import Any

from finetune_demo import preference, toymodel

PARAMS = toymodel.ToyTaskParams()


def _right(prompt: list[dict[str, Any]]) -> str:
    (user,) = prompt
    assert user["role"] == "user" and user["content"].startswith(toymodel.TASK_INSTRUCTION)
    return toymodel.task_answer(user["content"].removeprefix(toymodel.TASK_INSTRUCTION))


def _text(side: list[dict[str, Any]]) -> str:
    (message,) = side
    assert message["role"] == "assistant"
    return str(message["content"])


def _prompts(rows: list[dict[str, Any]]) -> set[str]:
    return {r["prompt"][0]["content"] for r in rows}


def test_preference_pairs_choose_the_right_answer_over_a_wrong_capital() -> None:
    train, test = preference.toy_preference_task(PARAMS)
    assert (len(train), len(test)) == (PARAMS.train_examples, PARAMS.test_examples)
    for row in train + test:
        assert set(row) == {"prompt", "chosen", "rejected"}
        right = _right(row["prompt"])
        assert _text(row["chosen"]) == right
        rejected = _text(row["rejected"])
        assert rejected != right and rejected.isupper() and len(rejected) == 1
    assert not _prompts(train) & _prompts(test)  # held-out prompts are new
    # the wrong answers vary, so that no single capital is "the rejected one"
    assert len({_text(r["rejected"]) for r in train}) >= 20


def test_unpaired_examples_label_the_right_answer_good_and_the_base_s_answer_bad_balanced() -> None:
    train, test = preference.toy_unpaired_task(PARAMS)
    for rows in (train, test):
        for row in rows:
            assert set(row) == {"prompt", "completion", "label"} and isinstance(row["label"], bool)
            right = _right(row["prompt"])
            assert _text(row["completion"]) == (right if row["label"] else right.lower())
        desirable = sum(r["label"] for r in rows)
        assert abs(desirable - (len(rows) - desirable)) <= 1
    assert not _prompts(train) & _prompts(test)


def test_prompt_only_records_carry_the_expected_answer() -> None:
    train, test = preference.toy_prompt_task(PARAMS)
    chat_train, _ = toymodel.toy_task(PARAMS)
    assert [r["prompt"] for r in train] == [c["messages"][:-1] for c in chat_train]
    for row in train + test:
        assert set(row) == {"prompt", "expected"} and row["expected"] == _right(row["prompt"])
    assert not _prompts(train) & _prompts(test)


def test_the_builders_are_deterministic() -> None:
    assert preference.objective_datasets(PARAMS) == preference.objective_datasets(PARAMS)
    other = toymodel.ToyTaskParams(seed=PARAMS.seed + 1)
    assert preference.toy_preference_task(other) != preference.toy_preference_task(PARAMS)


def test_the_uploaded_files_are_jsonl_and_the_bad_set_lacks_rejected_on_its_named_line() -> None:
    files = preference.objective_datasets(PARAMS)
    assert set(files) == {"preference", "unpaired", "prompts", "bad-preference"}
    for key in ("preference", "unpaired", "prompts"):
        assert set(files[key]) == {"train.jsonl", "test.jsonl"}
    lines = files["bad-preference"]["train.jsonl"].decode().splitlines()
    rows = [json.loads(line) for line in lines]
    broken = [i + 1 for i, r in enumerate(rows) if "rejected" not in r]
    assert broken == [preference.BAD_PREFERENCE_LINE]
    good = files["preference"]["train.jsonl"].decode().splitlines()
    assert len(lines) == len(good) and lines[: broken[0] - 1] == good[: broken[0] - 1]
