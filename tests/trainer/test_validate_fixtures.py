"""Every bad-data class (tests/trainer/data/bad): the CLI's exit code and a message naming the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import cli

BAD = Path(__file__).parent / "data" / "bad"

# The fixtures are a few lines each: cleanable cases lower the dataset.minTrainExamples floor (default 20).
SMALL = {"minTrainExamples": 1}

# (fixture, dataset overrides, exit code, text the termination message must contain)
CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("invalid_json", {}, 10, "invalid_json.jsonl line 4: invalid JSON: Expecting value"),
    ("invalid_utf8", {}, 10, "invalid_utf8.jsonl line 3: bytes that are not UTF-8 at column 21"),
    ("utf16", {}, 10, "utf16.jsonl line 1: file is UTF-16"),
    ("not_an_object", {}, 10, "not_an_object.jsonl line 2: expected a JSON object, got list"),
    ("missing_field", {}, 10, 'missing_field.jsonl line 5: missing field "completion"'),
    ("empty_field", {}, 10, 'empty_field.jsonl line 2: field "output" is empty'),
    ("wrong_type", {}, 10, "wrong_type.jsonl line 3: messages[1].content must be a string, got int"),
    ("unknown_role", {}, 10, 'unknown_role.jsonl line 4: messages[1].role: unknown role "bot"'),
    ("no_assistant_turn", {}, 10, "no_assistant_turn.jsonl line 2: no assistant turn"),
    (
        "bad_turn_order",
        {},
        10,
        "bad_turn_order.jsonl line 3: messages[0]: assistant turn before any user turn",
    ),
    (
        "format_mismatch",
        {},
        10,
        "format_mismatch.jsonl line 6: looks like completion format but the dataset is chat",
    ),
    # <|user|> what is w0 … w99 <|end|> <|assistant|> w0 <|end|> = 1 + 2 + 100 + 1 + 1 + 1 + 1 tokens
    ("overlong", {}, 10, "overlong.jsonl line 4: 107 tokens > maxSeqLength 64"),
    ("undetectable", {}, 10, "undetectable.jsonl line 1: cannot detect the format"),
    ("empty", {}, 10, "empty.jsonl: no examples (the file is empty)"),
    ("blank_only", {}, 10, "blank_only.jsonl: no examples (the file is empty)"),
    (
        "all_leaked",
        {"test": "all_leaked-test"},
        10,
        "no usable train example remains in all_leaked-train.jsonl: all_leaked-train.jsonl line 1: prompt "
        "also in "
        "all_leaked-test.jsonl line 1",
    ),
    (
        "line_too_long",
        {"maxLineBytes": 1024},
        10,
        "line_too_long.jsonl line 3: line is 2187 bytes, over dataset.maxLineBytes 1024",
    ),
    # By default any invalid line fails (dataset.maxErrorRate 0) ...
    (
        "one_bad_in_twenty",
        {},
        10,
        "1 of 20 lines unusable (5.0% > dataset.maxErrorRate 0%): one_bad_in_twenty.jsonl line 7: "
        "invalid JSON",
    ),
    (
        "one_bad_in_twenty",
        {"maxErrorRate": 0.01},
        10,
        "1 of 20 lines unusable (5.0% > dataset.maxErrorRate 1%): one_bad_in_twenty.jsonl line 7: "
        "invalid JSON",
    ),
    # ... and a dataset below the floor fails, naming both numbers.
    (
        "bom",
        {},
        10,
        "only 5 training examples remain after cleaning and the held-out split, fewer than "
        "dataset.minTrainExamples 20",
    ),
    # Cleanable classes (with the error rate raised explicitly): the run succeeds, the message still points at
    # the line.
    ("one_bad_in_twenty", {"maxErrorRate": 0.1, **SMALL}, 0, "one_bad_in_twenty.jsonl line 7: invalid JSON"),
    ("bom", SMALL, 0, "bom.jsonl line 1: UTF-8 byte order mark removed"),
    ("duplicate", SMALL, 0, "duplicate.jsonl line 5: exact duplicate of line 2"),
    ("near_duplicate", SMALL, 0, "near_duplicate.jsonl line 4: duplicate of line 1 after normalising"),
    (
        "leakage",
        {"test": "leakage-test", **SMALL},
        0,
        "leakage-train.jsonl line 3: prompt also in leakage-test.jsonl line 1",
    ),
    ("imbalanced", SMALL, 0, "imbalanced.jsonl: category 'math' has"),
]


def _fixture_path(name: str) -> str:
    for candidate in (BAD / f"{name}.jsonl", BAD / f"{name}-train.jsonl"):
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError(name)


def run_validate(tmp_path: Path, config: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    code = cli.main(["validate", "--config", str(path)])
    return code, json.loads((tmp_path / "termination-log").read_text())


@pytest.mark.parametrize(
    ("fixture", "dataset", "code", "expected"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES]
)
def test_bad_data_fixture(
    fixture: str,
    dataset: dict[str, Any],
    code: int,
    expected: str,
    tmp_path: Path,
    tiny_tokenizer_dir: Path,
    make_config: Any,
) -> None:
    ds = {"train": _fixture_path(fixture), "format": "auto", **dataset}
    if "test" in ds:
        ds["test"] = _fixture_path(ds["test"])
    config = make_config(str(tmp_path / "run"), baseModel={"uri": str(tiny_tokenizer_dir)}, dataset=ds)
    got_code, term = run_validate(tmp_path, config)
    assert (got_code, term["exitCode"]) == (code, code), term
    assert expected in term["message"], term["message"]
    committed = (tmp_path / "run" / "data" / "MANIFEST.json").exists()
    assert committed == (code == 0)
    if code == 10:
        # The full findings stay next to the (uncommitted) data for the user.
        report_path = tmp_path / "run" / "data" / "report.json"
        if term["summary"].get("lines") and "minTrainExamples" not in term["message"]:
            report = json.loads(report_path.read_text())
            listed = [f for kind in report["errors"].values() for f in kind["first"]] + [
                f for kind in report["removed"].values() for f in kind["first"]
            ]
            assert listed and all(f["line"] >= 1 for f in listed)


def test_fixture_count_covers_every_class() -> None:
    from finetune_vocabulary.records import CLEANING_KINDS, ERROR_KINDS, WARNING_KINDS

    covered = {c[0] for c in CASES}
    assert len(covered) >= 15
    kinds = set(ERROR_KINDS) | set(CLEANING_KINDS) | set(WARNING_KINDS)
    named = {
        "invalid_json",
        "invalid_utf8",
        "not_an_object",
        "missing_field",
        "empty_field",
        "wrong_type",
        "unknown_role",
        "no_assistant_turn",
        "bad_turn_order",
        "format_mismatch",
        "overlong",
        "line_too_long",
        "duplicate",
        "near_duplicate",
        "leakage",
        "bom",
    }
    assert named <= covered | {"category_imbalance"} and named <= kinds
