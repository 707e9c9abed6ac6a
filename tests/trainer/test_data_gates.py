"""Data gates in the validate stage: any invalid line fails by default (listed by line number), a line over
dataset.maxLineBytes is an error read without holding it, a floor on training examples, a warning under the
recommended size, and testSize capped so training never has fewer examples than the held-out set."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import cli
from finetune_trainer.config import DatasetSpec
from finetune_trainer.exitcodes import ExitCode, classify
from finetune_trainer.validate import cap_held_out, held_out_count, train_size_gate
from finetune_vocabulary.records import Findings, OverlongLine, parse_file, read_lines


def _record(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"what is w{i}"},
            {"role": "assistant", "content": f"w{i + 1}"},
        ]
    }


class _RecordingFile(io.BytesIO):
    """Remembers the largest chunk one readline call returned."""

    largest = 0

    def readline(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        line = super().readline(size)
        self.largest = max(self.largest, len(line))
        return line


def test_read_lines_skips_an_overlong_line_without_holding_it() -> None:
    limit = 1024
    data = b"a\n" + b"x" * limit + b"\n" + b"y" * (limit + 1) + b"\n" + b"z" * 5_000_000 + b"\nlast"
    fh = _RecordingFile(data)
    lines = list(read_lines(fh, limit))
    assert lines[0] == b"a\n"
    assert lines[1] == b"x" * limit + b"\n"  # exactly the limit: kept
    assert lines[2] == OverlongLine(limit + 1, limit)
    assert lines[3] == OverlongLine(5_000_000, limit)
    assert lines[4] == b"last"  # the line after an over-long one is read normally, numbering intact
    assert fh.largest <= 1 << 16


def test_a_50_mb_line_is_one_error_and_memory_stays_small(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    with path.open("wb") as out:
        for i in range(3):
            out.write(json.dumps(_record(i)).encode() + b"\n")
        content = "w1 " * (50 * 1024 * 1024 // 3)
        out.write(json.dumps({"messages": [{"role": "user", "content": content}]}).encode() + b"\n")
        out.write(json.dumps(_record(9)).encode() + b"\n")
    findings = Findings()
    tracemalloc.start()
    try:
        with path.open("rb") as fh:
            parsed = parse_file(read_lines(fh, 1024 * 1024), "train.jsonl", "auto", findings)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak
    assert [e.line for e in parsed.examples] == [1, 2, 3, 5]
    (finding,) = findings.listed["line_too_long"]
    assert finding.line == 4 and "over dataset.maxLineBytes 1048576" in finding.message


@pytest.mark.parametrize(
    ("n", "requested", "fraction", "k", "warned"),
    [
        (40, 100, 0.2, 8, True),  # the case: was train 1 / test 39
        (59, 100, 0.2, 11, True),
        (1000, 100, 0.2, 100, False),
        (1000, None, 0.2, 100, False),  # the default (10%, at most 200) is under the cap
        (3, 1, 0.2, 1, False),  # at least one example is held out
    ],
)
def test_test_size_is_capped_to_a_fraction_of_the_valid_examples(
    n: int, requested: int | None, fraction: float, k: int, warned: bool
) -> None:
    got, warning = cap_held_out(held_out_count(n, requested), n, fraction)
    assert got == k
    assert (warning is not None) == warned
    if warning:
        assert (
            f"testSize {min(requested or 0, n - 1)} reduced to {k}" in warning
            and "maxTestFraction" in warning
        )
        assert n - got >= got  # training keeps at least as many examples as the held-out set


def test_train_size_gate_fails_below_the_floor_and_warns_below_the_recommended_size() -> None:
    failure, warning = train_size_gate(12, 20, 500)
    assert failure is not None and "12" in failure and "dataset.minTrainExamples 20" in failure
    assert warning is None
    failure, warning = train_size_gate(32, 20, 500)
    assert failure is None and warning is not None and "32" in warning and "500" in warning
    assert train_size_gate(500, 20, 500) == (None, None)
    assert train_size_gate(32, 20, 0) == (None, None)  # 0 turns the warning off


def test_trainer_fallback_defaults_equal_the_api_defaults() -> None:
    """The operator always passes the spec with the API's defaults; a hand-written config gets the same."""
    models = pytest.importorskip("finetune_operator.api.finetunejob")
    api = models.DatasetSpec.model_validate({"train": "s3://data-bucket/train.jsonl"})
    ours = DatasetSpec.model_validate({"train": "s3://data-bucket/train.jsonl"})
    for name in (
        "max_error_rate",
        "max_line_bytes",
        "min_train_examples",
        "recommended_train_examples",
        "max_test_fraction",
    ):
        assert getattr(ours, name) == getattr(api, name), name


def test_memory_error_in_validate_gives_a_validation_hint_not_a_training_one() -> None:
    code, message = classify(MemoryError(), "validate")
    assert code == ExitCode.OUT_OF_MEMORY
    assert "validateMemory" in message and "maxLineBytes" in message
    assert "batchSize" not in message and "qlora" not in message
    _, train_message = classify(MemoryError(), "train")
    assert "batchSize" in train_message


def _validate(tmp_path: Path, make_config: Any, tokenizer: Path, lines: list[bytes], **dataset: Any) -> Any:
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"".join(line + b"\n" for line in lines))
    config = make_config(
        str(tmp_path / "run"), baseModel={"uri": str(tokenizer)}, dataset={"train": str(train), **dataset}
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = cli.main(["validate", "--config", str(tmp_path / "config.json")])
    return code, json.loads((tmp_path / "termination-log").read_text())


def test_sixty_lines_with_a_truncated_line_seven_fail_naming_the_line(
    tmp_path: Path, tiny_tokenizer_dir: Path, make_config: Any
) -> None:
    lines = [json.dumps(_record(i)).encode() for i in range(60)]
    lines[6] = lines[6][:20]  # truncated JSON
    code, term = _validate(tmp_path, make_config, tiny_tokenizer_dir, lines, testSize=100)
    assert code == term["exitCode"] == ExitCode.INVALID_DATA
    assert "train.jsonl line 7: invalid JSON" in term["message"]
    assert "dataset.maxErrorRate 0%" in term["message"]
    assert not (tmp_path / "run" / "data" / "MANIFEST.json").exists()


def test_forty_examples_with_test_size_100_keep_train_above_test_and_warn(
    tmp_path: Path, tiny_tokenizer_dir: Path, make_config: Any
) -> None:
    lines = [json.dumps(_record(i)).encode() for i in range(40)]
    code, term = _validate(tmp_path, make_config, tiny_tokenizer_dir, lines, testSize=100)
    assert code == 0, term
    summary = term["summary"]
    assert (summary["train"], summary["test"]) == (32, 8)
    warnings = summary["warnings"]
    assert any("testSize 39 reduced to 8" in w for w in warnings), warnings
    assert any("only 32 training examples" in w and "500" in w for w in warnings), warnings
    assert "warning: " in term["message"]


def test_too_few_examples_fail_before_training_naming_both_numbers(
    tmp_path: Path, tiny_tokenizer_dir: Path, make_config: Any
) -> None:
    lines = [json.dumps(_record(i)).encode() for i in range(15)]
    code, term = _validate(tmp_path, make_config, tiny_tokenizer_dir, lines)
    assert code == ExitCode.INVALID_DATA
    assert "only 13 training examples" in term["message"] and "dataset.minTrainExamples 20" in term["message"]


def test_a_test_file_larger_than_train_is_kept_with_a_warning(
    tmp_path: Path, tiny_tokenizer_dir: Path, make_config: Any
) -> None:
    test = tmp_path / "test.jsonl"
    test.write_bytes(b"".join(json.dumps(_record(i)).encode() + b"\n" for i in range(100, 130)))
    lines = [json.dumps(_record(i)).encode() for i in range(25)]
    code, term = _validate(tmp_path, make_config, tiny_tokenizer_dir, lines, test=str(test))
    assert code == 0, term
    assert (term["summary"]["train"], term["summary"]["test"]) == (25, 30)
    assert any("test file has 30 examples, more than the 25" in w for w in term["summary"]["warnings"])
