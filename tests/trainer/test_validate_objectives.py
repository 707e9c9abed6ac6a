"""validate for dpo / kto / grpo: the preference, unpaired-preference and prompt-only formats, their canonical
forms, the objective/format mismatch, the pair and label checks, token budgets, and read_canonical."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import cli, formats, validate
from finetune_trainer.config import parse_config
from finetune_trainer.exitcodes import InvalidDataError
from finetune_trainer.formats import read_canonical
from finetune_vocabulary.records import (
    ERROR_KINDS,
    DatasetError,
    Findings,
    RecordError,
    parse_file,
    to_canonical,
)

OBJECTIVES = Path(__file__).parent / "data" / "objectives"
SMALL = {"minTrainExamples": 1}


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "be brief"}

# (input record, format, canonical record): every accepted input form of each objective.
FORMS: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
    # preference (dpo): plain, conversational (TRL), prompt given as messages; category kept
    (
        {"prompt": "what is w1", "chosen": "w2", "rejected": "w9"},
        "preference",
        {"prompt": [_user("what is w1")], "chosen": "w2", "rejected": "w9"},
    ),
    (
        {
            "prompt": [SYSTEM, _user("what is w1")],
            "chosen": [_assistant("w2")],
            "rejected": [_assistant("w9")],
        },
        "preference",
        {"prompt": [SYSTEM, _user("what is w1")], "chosen": "w2", "rejected": "w9"},
    ),
    (
        {
            "messages": [_user("hi"), _assistant("hello"), _user("what is w1")],
            "chosen": [_assistant("w2"), _assistant("surely")],
            "rejected": "w9",
            "category": "math",
        },
        "preference",
        {
            "prompt": [_user("hi"), _assistant("hello"), _user("what is w1")],
            "chosen": "w2\nsurely",
            "rejected": "w9",
            "category": "math",
        },
    ),
    # unpaired-preference (kto): plain and conversational
    (
        {"prompt": "what is w1", "completion": "w2", "label": True},
        "unpaired-preference",
        {"prompt": [_user("what is w1")], "completion": "w2", "label": True},
    ),
    (
        {"messages": [SYSTEM, _user("what is w1")], "completion": [_assistant("w9")], "label": False},
        "unpaired-preference",
        {"prompt": [SYSTEM, _user("what is w1")], "completion": "w9", "label": False},
    ),
    # prompt-only (grpo): a string, a message list under prompt or messages; expected optional
    (
        {"prompt": "what is w1", "expected": "w2"},
        "prompt-only",
        {"prompt": [_user("what is w1")], "expected": "w2"},
    ),
    (
        {"prompt": [SYSTEM, _user("what is w1")]},
        "prompt-only",
        {"prompt": [SYSTEM, _user("what is w1")]},
    ),
    (
        {"messages": [_user("what is w1")], "expected": "w2", "category": "math"},
        "prompt-only",
        {"prompt": [_user("what is w1")], "expected": "w2", "category": "math"},
    ),
]


@pytest.mark.parametrize(("record", "fmt", "canonical"), FORMS)
def test_each_input_form_converts_to_the_objectives_canonical_record(
    record: dict[str, Any], fmt: str, canonical: dict[str, Any]
) -> None:
    assert to_canonical(record, fmt) == canonical
    # The canonical form is a fixed point: what validate writes reads back unchanged.
    assert to_canonical(canonical, fmt) == canonical


# (record, format, error kind, message naming the field)
BAD_RECORDS: list[tuple[Any, str, str, str]] = [
    (
        {"prompt": "what is w1", "chosen": "w2", "rejected": "w2"},
        "preference",
        "identical_pair",
        'fields "chosen" and "rejected" are identical',
    ),
    (
        {"prompt": "q", "chosen": [_assistant(" w2 ")], "rejected": "w2"},
        "preference",
        "identical_pair",
        'fields "chosen" and "rejected" are identical',
    ),
    (
        {"prompt": "q", "chosen": "  ", "rejected": "w2"},
        "preference",
        "empty_field",
        'field "chosen" is empty',
    ),
    (
        {"prompt": "q", "chosen": "w1", "rejected": []},
        "preference",
        "empty_field",
        'field "rejected" is empty',
    ),
    (
        {"prompt": "q", "chosen": "w1", "rejected": [_assistant("")]},
        "preference",
        "empty_field",
        "rejected[0].content is empty",
    ),
    ({"prompt": "q", "chosen": "w1"}, "preference", "missing_field", 'missing field "rejected"'),
    (
        {"chosen": "w1", "rejected": "w2"},
        "preference",
        "missing_field",
        'missing field "prompt" (or "messages")',
    ),
    (
        {"prompt": "q", "chosen": [_user("w1")], "rejected": "w2"},
        "preference",
        "bad_turn_order",
        "chosen[0]: must be an assistant turn, got user",
    ),
    (
        {"prompt": [_user("q"), _assistant("a")], "chosen": "w1", "rejected": "w2"},
        "preference",
        "bad_turn_order",
        "prompt[1]: the prompt must end with a user turn",
    ),
    (
        {"prompt": "q", "messages": [_user("q")], "chosen": "w1", "rejected": "w2"},
        "preference",
        "format_mismatch",
        'both "prompt" and "messages": give the prompt once',
    ),
    ({"prompt": 3, "chosen": "w1", "rejected": "w2"}, "preference", "wrong_type", 'field "prompt" must be'),
    (
        {"prompt": "q", "completion": "w1", "label": "yes"},
        "unpaired-preference",
        "wrong_type",
        'field "label" must be true or false, got str "yes"',
    ),
    (
        {"prompt": "q", "completion": "w1", "label": 1},
        "unpaired-preference",
        "wrong_type",
        'field "label" must be true or false, got int 1',
    ),
    (
        {"prompt": "q", "completion": "", "label": True},
        "unpaired-preference",
        "empty_field",
        'field "completion" is empty',
    ),
    (
        {"prompt": "q", "completion": "w1"},
        "unpaired-preference",
        "format_mismatch",
        "looks like completion format but the dataset is unpaired-preference",
    ),
    (
        {"messages": [_user("q"), _assistant("a")]},
        "prompt-only",
        "format_mismatch",
        "looks like chat format but the dataset is prompt-only",
    ),
    ({"prompt": "q", "expected": " "}, "prompt-only", "empty_field", 'field "expected" is empty'),
    ({"prompt": "q", "expected": 5}, "prompt-only", "wrong_type", 'field "expected" must be a string'),
    (
        {"prompt": [_user("q"), SYSTEM]},
        "prompt-only",
        "bad_turn_order",
        "prompt[1]: system message must come",
    ),
    (["q"], "prompt-only", "not_an_object", "expected a JSON object, got list"),
]


@pytest.mark.parametrize(("record", "fmt", "kind", "message"), BAD_RECORDS)
def test_a_bad_record_is_refused_with_its_kind_naming_the_field(
    record: Any, fmt: str, kind: str, message: str
) -> None:
    with pytest.raises(RecordError) as err:
        to_canonical(record, fmt)
    assert err.value.kind == kind and err.value.message.startswith(message), err.value.message
    assert kind in ERROR_KINDS


def _lines(*records: Any) -> list[bytes]:
    return [(r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records]


def _pairs(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"prompt": f"what is w{i}", "chosen": f"w{i + 1}", "rejected": "w199"} for i in range(start, n)]


def test_a_malformed_preference_line_is_named_by_its_number() -> None:
    findings = Findings()
    pairs = _pairs(6)
    parsed = parse_file(
        _lines(*pairs[:2], '{"prompt": "what is w2", "chosen": ', *pairs[3:]),
        "pairs.jsonl",
        "auto",
        findings,
        objective="dpo",
    )
    assert parsed.fmt == "preference" and len(parsed.examples) == 5
    assert [f.render() for f in findings.first(ERROR_KINDS, 5)] == [
        "pairs.jsonl line 3: invalid JSON: Expecting value at column 36"
    ]


@pytest.mark.parametrize(
    ("objective", "records", "message"),
    [
        (
            "dpo",
            [{"messages": [_user(f"what is w{i}"), _assistant(f"w{i + 1}")]} for i in range(4)],
            'dataset.train: records are chat, but objective dpo needs the preference format ({"prompt"|'
            '"messages", "chosen", "rejected"}) (4 of 4 lines, first t.jsonl line 1)',
        ),
        (
            "kto",
            _pairs(3),
            "dataset.train: records are preference, but objective kto needs the unpaired-preference format "
            '({"prompt"|"messages", "completion", "label": true|false}) (3 of 3 lines, first t.jsonl line 1)',
        ),
        (
            "grpo",
            [{"prompt": f"what is w{i}", "completion": f"w{i}"} for i in range(3)],
            "dataset.train: records are completion, but objective grpo needs the prompt-only format "
            '({"prompt"|"messages", "expected"?}) (3 of 3 lines, first t.jsonl line 1)',
        ),
        (
            "sft",
            _pairs(3),
            "dataset.train: records are preference, but objective sft needs the chat, completion or "
            "instruction format (3 of 3 lines, first t.jsonl line 1)",
        ),
    ],
)
def test_records_in_another_objectives_format_fail_naming_both(
    objective: str, records: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(DatasetError) as err:
        parse_file(_lines(*records), "t.jsonl", "auto", Findings(), objective=objective)
    assert str(err.value) == message


def test_a_few_stray_lines_are_line_errors_not_a_mismatch() -> None:
    findings = Findings()
    stray = {"messages": [_user("what is w9"), _assistant("w10")]}
    parsed = parse_file(_lines(*_pairs(3), stray), "t.jsonl", "preference", findings, objective="dpo")
    assert len(parsed.examples) == 3
    assert [f.render() for f in findings.first(ERROR_KINDS, 5)] == [
        "t.jsonl line 4: looks like chat format but the dataset is preference"
    ]


def test_sft_still_reads_chat_and_completion_lines_that_carry_a_label_field() -> None:
    """Only a boolean label with a completion makes a line kto data; a classifier's label stays SFT data."""
    records = [{"prompt": f"what is w{i}", "completion": f"w{i}", "label": "positive"} for i in range(3)]
    parsed = parse_file(_lines(*records), "t.jsonl", "auto", Findings(), objective="sft")
    assert parsed.fmt == "completion" and len(parsed.examples) == 3


def _run(tmp_path: Path, make_config: Any, tokenizer: Path, **spec: Any) -> tuple[int, dict[str, Any]]:
    config = make_config(str(tmp_path / "run"), baseModel={"uri": str(tokenizer)}, **spec)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code = cli.main(["validate", "--config", str(path)])
    return code, json.loads((tmp_path / "termination-log").read_text())


def _write(path: Path, records: list[Any]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_dpo_dataset_validates_to_canonical_splits_that_read_canonical_reads_back(
    tmp_path: Path, make_config: Any, tiny_tokenizer_dir: Path
) -> None:
    pairs = [
        {
            "prompt": [SYSTEM, _user(f"what is w{i}")],
            "chosen": [_assistant(f"w{i + 1}")],
            "rejected": f"no w{i + 2}",
        }
        if i % 2
        else {
            "prompt": f"what is w{i}",
            "chosen": f"w{i + 1}",
            "rejected": "no",
            "category": "ab"[i % 4 // 2],
        }
        for i in range(40)
    ]
    pairs.append(pairs[3])  # an exact duplicate
    pairs.append({**pairs[4], "rejected": "w77"})  # same prompt, another rejected side: a pair of its own
    train = _write(tmp_path / "pairs.jsonl", pairs)
    code, term = _run(
        tmp_path,
        make_config,
        tiny_tokenizer_dir,
        objective="dpo",
        dataset={"train": train, "testSize": 6},
    )
    assert code == 0, term["message"]
    summary = term["summary"]
    assert summary["format"] == "preference" and summary["removed"] == {"duplicate": 1}
    assert summary["train"] + summary["test"] == 41 and summary["test"] >= 6 and summary["validation"] == 0
    data = tmp_path / "run" / "data"
    train_rows, test_rows = (
        read_canonical(data / "train.jsonl", "dpo"),
        read_canonical(data / "test.jsonl", "dpo"),
    )
    assert all(set(r) <= {"prompt", "chosen", "rejected", "category"} for r in train_rows + test_rows)
    assert {
        "prompt": [SYSTEM, _user("what is w1")],
        "chosen": "w2",
        "rejected": "no w3",
    } in train_rows + test_rows
    # The two pairs of prompt w4 stay on one side of the split; no held-out prompt is trained on.
    w4 = [r for r in train_rows + test_rows if r["prompt"] == [_user("what is w4")]]
    assert len(w4) == 2 and (all(r in test_rows for r in w4) or all(r in train_rows for r in w4))
    assert not {formats.prompt_key(r) for r in train_rows} & {formats.prompt_key(r) for r in test_rows}
    # Tokens: the prompt with the longer side. Odd lines: <|system|> be brief <|end|> <|user|> what is wN
    # <|end|> <|assistant|> no wN+2 <|end|> = 13 tokens (the rejected side); even lines: 5 + 3 = 8.
    report = json.loads((data / "report.json").read_text())
    assert report["tokens"]["train"]["max"] == 13 and report["tokens"]["train"]["min"] == 8
    assert report["objective"] == "dpo"


def test_a_preference_dataset_with_a_malformed_line_fails_naming_the_line(
    tmp_path: Path, make_config: Any, tiny_tokenizer_dir: Path
) -> None:
    code, term = _run(
        tmp_path,
        make_config,
        tiny_tokenizer_dir,
        objective="dpo",
        dataset={"train": str(OBJECTIVES / "preference_bad.jsonl")},
    )
    assert code == 10 and term["reason"] == "INVALID_DATA"
    assert term["summary"]["errors"] == {"identical_pair": 1, "empty_field": 1, "invalid_json": 1}
    for expected in (
        "preference_bad.jsonl line 3: invalid JSON",
        'preference_bad.jsonl line 5: fields "chosen" and "rejected" are identical',
        'preference_bad.jsonl line 7: field "rejected" is empty',
    ):
        assert expected in term["message"], term["message"]
    assert not (tmp_path / "run" / "data" / "MANIFEST.json").exists()


def test_a_chat_dataset_with_objective_dpo_fails_naming_both(
    tmp_path: Path, make_config: Any, tiny_tokenizer_dir: Path
) -> None:
    chat = Path(__file__).parent / "data" / "bad" / "bad_turn_order.jsonl"
    code, term = _run(
        tmp_path, make_config, tiny_tokenizer_dir, objective="dpo", dataset={"train": str(chat)}
    )
    assert code == 10 and term["reason"] == "INVALID_DATA"
    assert term["message"].startswith(
        "dataset.train: records are chat, but objective dpo needs the preference"
    )


def test_an_explicit_format_of_another_objective_is_a_config_error(
    tmp_path: Path, make_config: Any, tiny_tokenizer_dir: Path
) -> None:
    code, term = _run(
        tmp_path,
        make_config,
        tiny_tokenizer_dir,
        objective="dpo",
        dataset={"train": str(OBJECTIVES / "preference_bad.jsonl"), "format": "chat"},
    )
    assert code == 11
    assert (
        term["message"]
        == "spec.dataset.format: chat does not fit spec.objective dpo, which needs preference (or auto)"
    )


def test_identical_pairs_are_dropped_within_max_error_rate(
    tmp_path: Path, make_config: Any, tiny_tokenizer_dir: Path
) -> None:
    pairs = [*_pairs(19), {"prompt": "what is w50", "chosen": "w51", "rejected": "w51"}]
    code, term = _run(
        tmp_path,
        make_config,
        tiny_tokenizer_dir,
        objective="dpo",
        dataset={"train": _write(tmp_path / "p.jsonl", pairs), "maxErrorRate": 0.1, **SMALL},
    )
    assert code == 0 and term["summary"]["errors"] == {"identical_pair": 1}
    assert 'p.jsonl line 20: fields "chosen" and "rejected" are identical' in term["message"]
    rows = read_canonical(tmp_path / "run" / "data" / "train.jsonl", "dpo")
    rows += read_canonical(tmp_path / "run" / "data" / "test.jsonl", "dpo")
    assert len(rows) == 19 and all(r["chosen"] != r["rejected"] for r in rows)


def _unpaired(desirable: int, undesirable: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"what is w{i}", "completion": f"w{i + 1}", "label": i < desirable}
        for i in range(desirable + undesirable)
    ]


@pytest.mark.parametrize(("desirable", "undesirable", "warned"), [(28, 2, True), (25, 5, False)])
def test_kto_reports_label_balance_and_warns_under_ten_percent(
    desirable: int,
    undesirable: int,
    warned: bool,
    tmp_path: Path,
    make_config: Any,
    tiny_tokenizer_dir: Path,
) -> None:
    code, term = _run(
        tmp_path,
        make_config,
        tiny_tokenizer_dir,
        objective="kto",
        dataset={
            "train": _write(tmp_path / "u.jsonl", _unpaired(desirable, undesirable)),
            "testSize": 1,
            **SMALL,
        },
    )
    assert code == 0, term["message"]
    summary = term["summary"]
    assert summary["format"] == "unpaired-preference"
    labels = summary["labels"]
    assert labels["desirable"] + labels["undesirable"] == summary["train"] == 29
    warnings = [w for w in summary.get("warnings", []) if w.startswith("kto label balance")]
    assert bool(warnings) == warned, summary
    if warned:
        n = labels["undesirable"]
        assert (
            warnings[0].startswith(f"kto label balance: {n} of 29 training examples")
            and "undesirable" in warnings[0]
        )
    rows = read_canonical(tmp_path / "run" / "data" / "train.jsonl", "kto")
    assert sum(r["label"] for r in rows) == labels["desirable"]


def test_grpo_prompts_leave_room_for_max_completion_length(
    tmp_path: Path, make_config: Any, tiny_tokenizer_dir: Path
) -> None:
    # <|user|> what is wN <|end|> <|assistant|> = 6 prompt tokens as served; line 5 has 20 words: 23.
    prompts: list[dict[str, Any]] = [{"prompt": f"what is w{i}", "expected": f"w{i + 1}"} for i in range(8)]
    prompts[4] = {"messages": [_user(" ".join(f"w{i}" for i in range(20)))]}
    code, term = _run(
        tmp_path,
        make_config,
        tiny_tokenizer_dir,
        objective="grpo",
        dataset={"train": _write(tmp_path / "g.jsonl", prompts), "maxErrorRate": 0.2, **SMALL},
        hyperparameters={"maxSeqLength": 64, "maxCompletionLength": 50},
    )
    assert code == 0, term["message"]
    assert term["summary"]["format"] == "prompt-only" and term["summary"]["errors"] == {"overlong": 1}
    assert (
        "g.jsonl line 5: prompt 23 tokens + maxCompletionLength 50 = 73 tokens > maxSeqLength 64"
        in term["message"]
    )
    rows = read_canonical(tmp_path / "run" / "data" / "train.jsonl", "grpo")
    rows += read_canonical(tmp_path / "run" / "data" / "test.jsonl", "grpo")
    assert sorted(r["expected"] for r in rows) == sorted(f"w{i + 1}" for i in range(8) if i != 4)


def test_grpo_budgets_trls_default_completion_length_when_unset() -> None:
    import dataclasses

    from trl import GRPOConfig

    default = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}["max_completion_length"]
    assert default == formats.GRPO_DEFAULT_MAX_COMPLETION_LENGTH
    spec = {"baseModel": {"uri": "x"}, "dataset": {"train": "x"}, "objective": "grpo"}
    config = parse_config({"runPrefix": "/tmp/run", "spec": spec})
    assert validate.completion_budget(config) == formats.GRPO_DEFAULT_MAX_COMPLETION_LENGTH


def test_the_operators_grpo_generation_default_is_trls() -> None:
    """The GPU-hour estimate multiplies by numGenerations; unset, the trainer keeps TRL's default."""
    import dataclasses

    from finetune_vocabulary.objectives import TRL_DEFAULT_NUM_GENERATIONS
    from trl import GRPOConfig

    default = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}["num_generations"]
    assert default == TRL_DEFAULT_NUM_GENERATIONS


@pytest.mark.parametrize(
    ("objective", "line", "problem"),
    [
        ("dpo", {"prompt": "what is w1", "chosen": "w2", "rejected": "w3"}, 'field "prompt" must be a list'),
        (
            "dpo",
            {"prompt": [_user("q")], "chosen": [_assistant("w2")], "rejected": "w3"},
            'field "chosen" must be plain text',
        ),
        (
            "dpo",
            {"prompt": [_user("q")], "chosen": "w2", "rejected": "w3", "score": 1},
            'unexpected field "score"',
        ),
        (
            "kto",
            {"prompt": [_user("q")], "completion": "w2", "label": "yes"},
            'field "label" must be true or false',
        ),
        ("grpo", {"prompt": [_user("q")], "chosen": "w2", "rejected": "w3"}, "looks like preference format"),
        ("sft", {"prompt": "q", "completion": "a"}, "looks like completion format but the dataset is chat"),
        ("dpo", '{"prompt": [', "invalid JSON"),
    ],
)
def test_read_canonical_names_the_file_and_line_of_a_non_canonical_record(
    objective: str, line: Any, problem: str, tmp_path: Path
) -> None:
    good = {
        "sft": {"messages": [_user("q"), _assistant("a")]},
        "dpo": {"prompt": [_user("q")], "chosen": "a", "rejected": "b"},
        "kto": {"prompt": [_user("q")], "completion": "a", "label": False},
        "grpo": {"prompt": [SYSTEM, _user("q")]},
    }[objective]
    path = Path(_write(tmp_path / "test.jsonl", [good, "", line]))
    with pytest.raises(InvalidDataError) as err:
        read_canonical(path, objective)
    assert err.value.message.startswith(f"test.jsonl line 3: not a canonical {objective} record: {problem}")
    Path(_write(path, [good, "", good]))
    assert read_canonical(path, objective) == [good, good]
