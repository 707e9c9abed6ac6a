"""The assemble stage (a FineTuneSchedule's data Job): base + captured chats joined with their feedback,
redacted, deduplicated, the test set's prompts removed, written whole when enough is new. Runs the CLI
(`python -m finetune_trainer assemble`) in-process against moto's S3, as the data Job runs it."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import cli, storage
from finetune_vocabulary.capture import capture_prefix, captured_prefix, feedback_prefix
from finetune_vocabulary.records import CANONICAL_FORMAT, ERROR_KINDS, Findings, parse_file, read_lines

UNTIL = "2026-12-06T12:00:00Z"
PREFIX_KEY = "capture/team-a/support"


def chat(prompt: str, answer: str, system: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def captured(cid: str, messages: list[dict[str, str]], time: str = "2026-12-06T10:00:00Z") -> dict[str, Any]:
    return {
        "id": cid,
        "time": time,
        "model": "support-bot",
        "version": "support-bot-v1",
        "latencyMs": 12.5,
        "messages": messages,
    }


def feedback(cid: str, rating: int, time: str = "2026-12-06T10:30:00Z", **extra: Any) -> dict[str, Any]:
    return {"id": cid, "time": time, "rating": rating, **extra}


def put_lines(s3: Any, key: str, lines: list[Any]) -> None:
    body = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)


def key_of(uri: str) -> str:
    return uri.split("/", 3)[3]


class World:
    """One bucket holding a base file, a test file and a pool's capture prefix."""

    def __init__(self, s3: Any) -> None:
        self.s3 = s3
        self.prefix = capture_prefix(s3.uri("capture"), "team-a", "support")
        self.output = s3.uri("schedules/team-a/nightly/3/train.jsonl")
        self.seq = 0

    def base(self, records: list[Any]) -> None:
        put_lines(self.s3, "data/train.jsonl", records)

    def test(self, records: list[Any]) -> None:
        put_lines(self.s3, "data/test.jsonl", records)

    def chats(self, records: list[Any], flushed: str = "100000") -> None:
        self.seq += 1
        where = key_of(captured_prefix(self.prefix, "support-bot"))
        put_lines(self.s3, f"{where}/2026-12-06/{flushed}-router-0-{self.seq:06d}.jsonl", records)

    def feedback(self, records: list[Any], flushed: str = "103000") -> None:
        self.seq += 1
        where = key_of(feedback_prefix(self.prefix))
        put_lines(self.s3, f"{where}/2026-12-06/{flushed}-router-1-{self.seq:06d}.jsonl", records)

    def document(self, **overrides: Any) -> dict[str, Any]:
        change = overrides.pop("capture", {})
        capture = (
            None
            if change is None
            else {"prefix": self.prefix, "model": "support-bot", "minRating": 1, **change}
        )
        section = {
            "base": self.s3.uri("data/train.jsonl"),
            "test": self.s3.uri("data/test.jsonl"),
            "capture": capture,
            "since": None,
            "until": UNTIL,
            "minNewExamples": 0,
            "objective": "sft",
            "output": self.output,
            **overrides,
        }
        return {"stage": "assemble", "assemble": section}

    def run(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any
    ) -> tuple[int, dict[str, Any]]:
        monkeypatch.setenv("FTJ_CONFIG", json.dumps(self.document(**overrides)))
        code = cli.main(["assemble"])
        return code, json.loads((tmp_path / "termination-log").read_text())

    def written(self) -> list[dict[str, Any]]:
        body = self.s3.client.get_object(Bucket=self.s3.bucket, Key=key_of(self.output))["Body"].read()
        return [json.loads(line) for line in body.decode().splitlines()]


@pytest.fixture
def world(s3: Any) -> World:
    w = World(s3)
    w.test([{"messages": chat("What is the refund window?", "30 days.")}])
    return w


def validated(records: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """The records as validate's parser reads a train file: no line may be an error."""
    findings = Findings()
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    parsed = parse_file(
        read_lines(io.BytesIO(body), 1 << 20), "train.jsonl", "auto", findings, objective=objective
    )
    assert findings.of(ERROR_KINDS) == {}
    assert parsed.fmt == CANONICAL_FORMAT[objective]
    return [e.data for e in parsed.examples]


def test_sft_keeps_rated_chats_once_without_test_prompts(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hello = chat("Hello", "Hi! How can I help?")
    world.base(
        [
            {"messages": hello},
            {"messages": chat("Reset my password", "Use the link.")},
            {"messages": hello},
        ]
    )
    world.chats(
        [
            captured("c-dup-base", chat("hello ", "Hi!  How can I help?")),  # normalised duplicate of base
            captured("c-new", chat("Where is my order?", "It ships today.")),
            captured("c-dup-capture", chat("Where is my order?", "It ships today.")),
            captured("c-leak", chat("what is the  REFUND window?", "Thirty days.")),
            captured("c-unrated", chat("Do you ship abroad?", "Yes.")),
            captured("c-flip-up", chat("Can I pay by card?", "Yes, all major cards.")),
            captured("c-flip-down", chat("Is there a discount?", "No.")),
        ]
    )
    world.feedback([feedback(c, 1) for c in ("c-dup-base", "c-new", "c-dup-capture", "c-leak")])
    world.feedback([feedback("c-flip-up", -1), feedback("c-flip-down", 1)], flushed="103000")
    world.feedback(
        [
            feedback("c-flip-up", 1, "2026-12-06T11:00:00Z"),
            feedback("c-flip-down", -1, "2026-12-06T11:00:00Z"),
        ],
        flushed="110000",
    )

    code, term = world.run(tmp_path, monkeypatch)

    assert code == 0, term
    summary = term["summary"]
    assert summary["examples"] == {
        "base": 2,
        "captured": 2,
        "corrected": 0,
        "duplicates": 3,  # one in base, one base/capture, one within capture
        "heldOut": 1,
        "total": 4,
    }
    assert (summary["ready"], summary["newExamples"], summary["train"]) == (True, 2, world.output)
    assert summary["cutoff"] == UNTIL
    prompts = [r["messages"][0]["content"] for r in world.written()]
    assert prompts == ["Hello", "Reset my password", "Where is my order?", "Can I pay by card?"]
    assert len(validated(world.written(), "sft")) == 4
    record = json.loads(
        world.s3.client.get_object(Bucket=world.s3.bucket, Key="schedules/team-a/nightly/3/assembly.json")[
            "Body"
        ].read()
    )
    assert record["summary"] == summary and record["until"] == UNTIL


@pytest.mark.parametrize(
    ("min_rating", "kept"), [(-1, ["bad", "unrated", "good"]), (0, ["unrated", "good"]), (1, ["good"])]
)
def test_min_rating_decides_which_chats_are_kept(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_rating: int, kept: list[str]
) -> None:
    world.base([{"messages": chat("Hello", "Hi")}])
    world.chats(
        [
            captured(name, chat(f"question {name}", f"answer {name}"), f"2026-12-06T10:0{i}:00Z")
            for i, name in enumerate(("bad", "unrated", "good"))
        ]
    )
    world.feedback([feedback("bad", -1), feedback("good", 1)])

    code, term = world.run(tmp_path, monkeypatch, capture={"minRating": min_rating})

    assert code == 0, term
    assert [r["messages"][0]["content"] for r in world.written()[1:]] == [f"question {n}" for n in kept]
    assert term["summary"]["examples"]["captured"] == len(kept)


TESTS = {
    "sft": {"messages": chat("What is the refund window?", "30 days.")},
    "dpo": {"prompt": "What is the refund window?", "chosen": "30 days.", "rejected": "Never."},
    "kto": {"prompt": "What is the refund window?", "completion": "30 days.", "label": True},
}
BASES = {
    "sft": {"messages": chat("Hello", "Hi")},
    "dpo": {"prompt": "Hello", "chosen": "Hi, how can I help?", "rejected": "What."},
    "kto": {"prompt": "Hello", "completion": "Hi, how can I help?", "label": True},
}
EXPECTED = {
    "sft": [
        {"messages": chat("Where is my order?", "It ships tomorrow from Berlin.")},
        {"messages": chat("Thanks", "You're welcome.")},
    ],
    "dpo": [
        {
            "prompt": [{"role": "user", "content": "Where is my order?"}],
            "chosen": "It ships tomorrow from Berlin.",
            "rejected": "No idea.",
        }
    ],
    "kto": [
        {
            "prompt": [{"role": "user", "content": "Where is my order?"}],
            "completion": "No idea.",
            "label": False,
        },
        {
            "prompt": [{"role": "user", "content": "Where is my order?"}],
            "completion": "It ships tomorrow from Berlin.",
            "label": True,
        },
        {"prompt": [{"role": "user", "content": "Thanks"}], "completion": "You're welcome.", "label": True},
    ],
}


@pytest.mark.parametrize("objective", ["sft", "dpo", "kto"])
def test_corrections_per_objective(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, objective: str
) -> None:
    """sft: the correction replaces the answer; dpo: a pair (correction chosen, original rejected) and only
    corrected chats; kto: rated answers labelled by their rating, a correction a desirable completion."""
    world.base([BASES[objective]])
    world.test([TESTS[objective]])
    world.chats(
        [
            captured("fixed", chat("Where is my order?", "No idea.")),
            captured("liked", chat("Thanks", "You're welcome.")),
        ]
    )
    world.feedback([feedback("fixed", -1, correction="It ships tomorrow from Berlin."), feedback("liked", 1)])

    code, term = world.run(tmp_path, monkeypatch, objective=objective, capture={"minRating": -1})

    assert code == 0, term
    written = world.written()
    assert written[1:] == EXPECTED[objective]
    assert validated(written, objective) == written
    assert term["summary"]["examples"]["corrected"] == 1


def test_captured_text_is_redacted_again(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.base([BASES["dpo"]])
    world.test([TESTS["dpo"]])
    world.chats(
        [
            captured(
                "pii", chat("I am jane.doe@example.com, where is my order?", "Call us at +1 415 555 0100.")
            )
        ]
    )
    world.feedback([feedback("pii", -1, correction="Charged to card 4111 1111 1111 1111 today.")])

    code, term = world.run(tmp_path, monkeypatch, objective="dpo")

    assert code == 0, term
    body = json.dumps(world.written())
    for secret in ("jane.doe@example.com", "415 555 0100", "4111 1111 1111 1111"):
        assert secret not in body
    pair = world.written()[1]
    assert pair["prompt"][0]["content"] == "I am [email], where is my order?"
    assert pair["rejected"] == "Call us at [phone]."
    assert pair["chosen"] == "Charged to card [creditCard] today."


def test_since_and_until_window(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chats up to `until` are read (older ones included again), only those after `since` are new."""
    world.base([{"messages": chat("Hello", "Hi")}])
    times = {"old": "2026-12-05T08:00:00Z", "recent": "2026-12-06T09:00:00Z", "late": "2026-12-06T12:00:01Z"}
    world.chats([captured(name, chat(f"question {name}", "answer"), when) for name, when in times.items()])
    world.feedback([feedback(name, 1, "2026-12-06T12:30:00Z") for name in times])

    code, term = world.run(tmp_path, monkeypatch, since="2026-12-06T00:00:00Z")

    assert code == 0, term
    assert [r["messages"][0]["content"] for r in world.written()[1:]] == ["question old", "question recent"]
    assert term["summary"]["newExamples"] == 1 and term["summary"]["cutoff"] == UNTIL


def test_not_ready_below_min_new_examples_writes_nothing(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.base([{"messages": chat("Hello", "Hi")}])
    world.chats([captured(f"c{i}", chat(f"question {i}", "answer")) for i in range(2)])
    world.feedback([feedback(f"c{i}", 1) for i in range(2)])

    code, term = world.run(tmp_path, monkeypatch, minNewExamples=3)

    assert code == 0, term
    assert (term["summary"]["ready"], term["summary"]["newExamples"], term["summary"]["train"]) == (
        False,
        2,
        None,
    )
    assert world.s3.keys("schedules/") == []
    code, term = world.run(tmp_path, monkeypatch, minNewExamples=2)
    assert term["summary"]["ready"] is True
    assert world.s3.keys("schedules/") == [
        "schedules/team-a/nightly/3/assembly.json",
        "schedules/team-a/nightly/3/train.jsonl",
    ]


def test_a_malformed_base_line_fails_naming_the_line(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.base([{"messages": chat("Hello", "Hi")}, b'{"messages": [{"role": "user", "content": "cut off'])

    code, term = world.run(tmp_path, monkeypatch)

    assert (code, term["reason"]) == (10, "INVALID_DATA")
    assert "train.jsonl line 2: invalid JSON" in term["message"]
    assert world.s3.keys("schedules/") == []


def test_a_base_file_in_another_objectives_format_fails_as_invalid_data(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.base([{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)])

    code, term = world.run(tmp_path, monkeypatch)

    assert (code, term["reason"]) == (10, "INVALID_DATA")
    assert term["message"].startswith("dataset.train: records are preference, but objective sft needs")
    assert world.s3.keys("schedules/") == []


def test_a_broken_captured_line_is_skipped_and_counted(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.base([{"messages": chat("Hello", "Hi")}])
    world.chats(
        [
            captured("ok", chat("Where is my order?", "It ships today.")),
            b'{"id": "cut", "time": "2026-12-06T10:00:00Z", "messages": [{"role": "us',
            b"\xff\xfe garbled",
            {
                "id": "no-answer",
                "time": "2026-12-06T10:00:00Z",
                "messages": [{"role": "user", "content": "Hi"}],
            },
        ]
    )
    world.feedback([feedback("ok", 1), b'{"id": "ok", "rat'])

    code, term = world.run(tmp_path, monkeypatch)

    assert code == 0, term
    assert term["summary"]["skipped"] == 4
    assert [r["messages"][0]["content"] for r in world.written()] == ["Hello", "Where is my order?"]


def test_without_capture_the_base_is_cleaned_and_written(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.base(
        [{"messages": chat("Hello", "Hi")}, {"messages": chat("What is the refund window?", "A month.")}]
    )

    code, term = world.run(tmp_path, monkeypatch, capture=None)

    assert code == 0, term
    assert term["summary"]["examples"] == {
        "base": 1,
        "captured": 0,
        "corrected": 0,
        "duplicates": 0,
        "heldOut": 1,
        "total": 1,
    }
    assert world.written() == [{"messages": chat("Hello", "Hi")}]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"capture": {"model": "../other"}}, "assemble.capture.model"),
        ({"output": "s3://bucket/a/../b/train.jsonl"}, "assemble.output"),
        ({"capture": {"minRating": 2}}, "assemble.capture.minRating"),
        ({"capture": {"redact": ["email", "ssn"]}}, "assemble.capture.redact: unknown redactor ssn"),
        ({"since": "2026-12-07T00:00:00Z"}, "assemble.since"),
        ({"maxSeqLength": 64}, "assemble.baseModel: is required with maxSeqLength"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any], named: str
) -> None:
    code, term = world.run(tmp_path, monkeypatch, **change)

    assert (code, term["reason"]) == (11, "INVALID_CONFIG")
    assert named in term["message"]


# --- the template's token budget ----------------------------------------------------------------------------

LONG_ANSWER = " ".join(f"w{i}" for i in range(100))  # the toy tokenizer: one token per word


def test_a_captured_chat_over_max_seq_length_is_left_out_counted_and_the_run_validates(
    world: World,
    s3: Any,
    tmp_path: Path,
    tiny_tokenizer_dir: Path,
    make_config: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One long chat in the traffic must not fail the run's validate stage (maxErrorRate 0): assemble
    counts tokens as validate does and leaves it out; a short one is kept."""
    storage.upload_dir(tiny_tokenizer_dir, s3.uri("models/tiny"))
    world.base([{"messages": chat(f"what is w{i}", f"w{i + 1}")} for i in range(20)])
    world.chats(
        [
            captured("c-short", chat("is the fox quick", "yes the fox is quick")),
            captured("c-long", chat("tell me every word", LONG_ANSWER)),
        ]
    )
    world.feedback([feedback("c-short", 1), feedback("c-long", 1)])
    model = {"uri": s3.uri("models/tiny")}

    code, term = world.run(tmp_path, monkeypatch, baseModel=model, maxSeqLength=64)

    assert code == 0, term
    examples = term["summary"]["examples"]
    assert (examples["tooLong"], examples["captured"], examples["total"]) == (1, 1, 21)
    assert term["summary"]["newExamples"] == 1
    answers = [r["messages"][-1]["content"] for r in world.written()]
    assert "yes the fox is quick" in answers and LONG_ANSWER not in answers
    record = json.loads(
        s3.client.get_object(Bucket=s3.bucket, Key="schedules/team-a/nightly/3/assembly.json")["Body"].read()
    )
    assert record["summary"]["examples"]["tooLong"] == 1 and record["maxSeqLength"] == 64

    config = make_config(
        s3.uri("runs/team-a/nightly-3/uid-1"),
        baseModel=model,
        dataset={"train": world.output, "test": s3.uri("data/test.jsonl"), "maxErrorRate": 0},
        hyperparameters={"maxSeqLength": 64},
    )
    monkeypatch.setenv("FTJ_CONFIG", json.dumps(config))
    assert cli.main(["validate"]) == 0, (tmp_path / "termination-log").read_text()
    validated_summary = json.loads((tmp_path / "termination-log").read_text())["summary"]
    assert validated_summary["errors"] == {} and validated_summary["train"] == 21


def test_base_examples_over_the_budget_stay_and_no_tokenizer_is_loaded_without_captured_ones(
    world: World, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The curated set is the user's own (validate reports it as before), and a base-only run stays cheap:
    the base model here has no files, so loading its tokenizer would fail the stage."""
    long_base = {"messages": chat("tell me every word", LONG_ANSWER)}
    world.base([{"messages": chat("Hello", "Hi")}, long_base])
    world.chats([captured("c-unrated", chat("Do you ship abroad?", "Yes."))])  # not kept: minRating 1

    code, term = world.run(tmp_path, monkeypatch, baseModel={"uri": s3.uri("models/absent")}, maxSeqLength=64)

    assert code == 0, term
    assert term["summary"]["examples"]["tooLong"] == 0
    assert long_base in world.written()
