"""The upload check of the OpenAI-compatible API (finetune_vocabulary.records.check_upload): a file's format
is detected among every objective's formats, and its lines are judged by the validate stage's own parser, so
an upload is refused for exactly the lines the validate stage would drop, named by line number."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from finetune_vocabulary.records import (
    ERROR_KINDS,
    MAX_LISTED,
    DatasetError,
    Findings,
    check_upload,
    parse_file,
    read_lines,
)

BAD_FIXTURES = Path(__file__).resolve().parents[1] / "trainer" / "data" / "bad"


def _chat(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def _file(*lines: Any) -> io.BytesIO:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return io.BytesIO(text.encode())


def _rendered(check: Any) -> list[str]:
    return [f.render() for f in check.errors]


@pytest.mark.parametrize(
    ("records", "fmt", "objectives"),
    [
        ([_chat(i) for i in range(3)], "chat", ("sft",)),
        ([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)], "completion", ("sft",)),
        ([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)], "instruction", ("sft",)),
        ([{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)], "preference", ("dpo",)),
        (
            [{"prompt": f"q{i}", "completion": "yes", "label": i % 2 == 0} for i in range(3)],
            "unpaired-preference",
            ("kto",),
        ),
        ([{"prompt": f"q{i}", "expected": "4"} for i in range(3)], "prompt-only", ("grpo",)),
    ],
)
def test_a_good_file_of_each_objective_is_detected_and_has_no_errors(
    records: list[dict[str, Any]], fmt: str, objectives: tuple[str, ...]
) -> None:
    check = check_upload(_file(*records, ""), "train.jsonl")
    assert (check.format, check.objectives) == (fmt, objectives)
    assert (check.lines, check.examples, check.errors, check.error_count) == (3, 3, (), 0)


def test_a_broken_line_is_named_by_its_number() -> None:
    broken = {"messages": [{"role": "user", "content": "q"}]}
    check = check_upload(
        _file(_chat(1), broken, _chat(3), {"messages": [{"role": "robot", "content": "x"}]}), "t.jsonl"
    )
    assert _rendered(check) == [
        "t.jsonl line 2: no assistant turn (nothing to learn from)",
        't.jsonl line 4: messages[0].role: unknown role "robot" (expected system, user or assistant)',
    ]
    assert (check.format, check.lines, check.examples, check.error_count) == ("chat", 4, 2, 2)


def test_invalid_json_and_a_line_in_another_format_are_line_errors_in_line_order() -> None:
    check = check_upload(
        _file(_chat(1), {"prompt": "q", "completion": "a"}, _chat(3), "{not json", _chat(5)), "t.jsonl"
    )
    assert _rendered(check) == [
        "t.jsonl line 2: looks like completion format but the dataset is chat",
        "t.jsonl line 4: invalid JSON: Expecting property name enclosed in double quotes at column 2",
    ]
    assert [f.kind for f in check.errors] == ["format_mismatch", "invalid_json"]


def test_a_utf16_file_is_refused_on_line_1() -> None:
    data = "".join(json.dumps(_chat(i)) + "\n" for i in range(3)).encode("utf-16")
    check = check_upload(io.BytesIO(data), "t.jsonl")
    assert _rendered(check)[0] == "t.jsonl line 1: file is UTF-16 (byte order mark found); save it as UTF-8"
    assert check.examples == 0 and check.error_count == check.lines


def test_a_utf8_byte_order_mark_is_removed_not_an_error() -> None:
    data = b"\xef\xbb\xbf" + _file(_chat(1), _chat(2)).getvalue()
    check = check_upload(io.BytesIO(data), "t.jsonl")
    assert (check.format, check.examples, check.errors) == ("chat", 2, ())


def test_an_over_long_line_is_an_error_read_without_holding_it() -> None:
    long_line = _chat(2)
    long_line["messages"][1]["content"] = "x" * 5000
    check = check_upload(_file(_chat(1), long_line, _chat(3)), "t.jsonl", max_line_bytes=1024)
    size = len(json.dumps(long_line))
    assert _rendered(check) == [f"t.jsonl line 2: line is {size} bytes, over dataset.maxLineBytes 1024"]
    assert check.examples == 2


def test_errors_list_the_first_ones_and_count_all() -> None:
    lines = [_chat(0), *["[1]"] * (MAX_LISTED + 5)]
    check = check_upload(_file(*lines), "t.jsonl")
    assert check.error_count == MAX_LISTED + 5 and len(check.errors) == MAX_LISTED
    assert [f.line for f in check.errors] == list(range(2, MAX_LISTED + 2))


def test_an_undetectable_file_names_line_1() -> None:
    with pytest.raises(DatasetError, match=r"^t\.jsonl line 1: cannot detect the format"):
        check_upload(_file({"question": "q", "answer": "a"}, {"question": "q2", "answer": "a2"}), "t.jsonl")


def test_a_file_mostly_in_another_objectives_format_is_refused_naming_both() -> None:
    pairs = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    check = check_upload(_file(*pairs, {"prompt": "q", "completion": "a", "label": True}), "t.jsonl")
    assert check.objectives == ("dpo",)
    assert _rendered(check) == [
        "t.jsonl line 4: looks like unpaired-preference format but the dataset is preference"
    ]


@pytest.mark.parametrize("fixture", sorted(p.name for p in BAD_FIXTURES.glob("*.jsonl")))
def test_the_same_lines_as_the_validate_stage_are_refused(fixture: str) -> None:
    """Every fixture of the validate stage's data tests: the upload check lists the same line errors."""
    path = BAD_FIXTURES / fixture
    findings = Findings()
    try:
        with path.open("rb") as fh:
            parse_file(read_lines(fh, 1024), fixture, "auto", findings)
    except DatasetError:
        with path.open("rb") as fh, pytest.raises(DatasetError):
            check_upload(fh, fixture, max_line_bytes=1024)
        return
    with path.open("rb") as fh:
        check = check_upload(fh, fixture, max_line_bytes=1024)
    assert list(check.errors) == findings.first(ERROR_KINDS, MAX_LISTED)
    assert check.error_count == sum(findings.of(ERROR_KINDS).values())
