"""validate: formats, cleaning, the held-out split, token estimates, and the stage end to end on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import formats, manifest, storage, validate
from finetune_trainer.config import parse_config
from finetune_vocabulary.records import ERROR_KINDS, MAX_JSON_DEPTH, Example, Findings, parse_file, to_chat

from .conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, S3Bucket


def _lines(*records: Any) -> list[bytes]:
    return [(r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records]


def test_three_formats_normalise_to_the_same_chat() -> None:
    expected = {
        "messages": [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}],
        "category": "math",
    }
    assert to_chat({"prompt": "Add 2 and 3", "completion": "5", "category": "math"}, "completion") == expected
    assert (
        to_chat({"instruction": "Add 2 and 3", "output": "5", "category": "math"}, "instruction") == expected
    )
    assert to_chat({"messages": expected["messages"], "category": "math"}, "chat") == expected
    with_input = to_chat({"instruction": "Translate", "input": "chat", "output": "cat"}, "instruction")
    assert with_input["messages"][0]["content"] == "Translate\n\nchat"


@pytest.mark.parametrize(
    ("records", "fmt"),
    [
        ([{"messages": []}, {"messages": []}, {"prompt": "a", "completion": "b"}], "chat"),
        (
            [
                {"prompt": "a", "completion": "b"},
                {"instruction": "a", "output": "b"},
                {"prompt": "c", "completion": "d"},
            ],
            "completion",
        ),
        ([{"instruction": "a", "output": "b"}], "instruction"),
    ],
)
def test_auto_detection_takes_the_majority(records: list[dict[str, Any]], fmt: str) -> None:
    assert parse_file(_lines(*records), "f.jsonl", "auto", Findings()).fmt == fmt


def test_line_numbers_count_blank_lines_and_explicit_format_is_enforced() -> None:
    findings = Findings()
    parsed = parse_file(
        _lines(
            {"prompt": "a", "completion": "b"},
            "",
            "  ",
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        ),
        "t.jsonl",
        "completion",
        findings,
    )
    assert parsed.lines == 2 and len(parsed.examples) == 1
    assert [f.render() for f in findings.first(ERROR_KINDS, 5)] == [
        "t.jsonl line 4: looks like chat format but the dataset is completion"
    ]


def test_findings_list_first_twenty_but_count_all() -> None:
    findings = Findings()
    parse_file(_lines(*["{oops"] * 45), "t.jsonl", "completion", findings)
    report = findings.as_report(ERROR_KINDS)
    assert report["invalid_json"]["count"] == 45
    assert [f["line"] for f in report["invalid_json"]["first"]] == list(range(1, 21))


def test_json_nested_100000_deep_is_an_invalid_line_named_by_number() -> None:
    findings = Findings()
    good = {"prompt": "a", "completion": "b"}
    deep = "[" * 100_000 + "]" * 100_000
    just_over = json.dumps({"prompt": "a", "completion": "b", "x": json.loads("[" * 64 + "]" * 64)})
    parsed = parse_file(_lines(good, deep, just_over, good), "t.jsonl", "auto", findings)
    assert parsed.lines == 4 and len(parsed.examples) == 2
    assert [f.render() for f in findings.first(ERROR_KINDS, 5)] == [
        f"t.jsonl line {n}: invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels" for n in (2, 3)
    ]


def test_deeply_nested_json_fails_the_stage_as_invalid_data_not_a_crash(
    tmp_path: Path, make_config: Any
) -> None:
    train = tmp_path / "deep.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    train.write_text(f"{good}\n" + "{" + '"a":{' * 100_000 + "}" * 100_001 + "\n")
    config = make_config(
        str(tmp_path / "run"), baseModel={"uri": str(tmp_path / "no-model")}, dataset={"train": str(train)}
    )
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "validate"],
        env={**os.environ, "FTJ_CONFIG": json.dumps(config)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 10, proc.stdout + proc.stderr  # INVALID_DATA: permanent, never retried
    term = json.loads(Path(os.environ["FTJ_TERMINATION_LOG"]).read_text())
    assert (
        term["reason"] == "INVALID_DATA"
        and "deep.jsonl line 2: invalid JSON: nested deeper" in term["message"]
    )


def _examples(n: int, categories: tuple[str, ...] = ("",)) -> list[Example]:
    out = []
    for i in range(n):
        data: dict[str, Any] = {
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        }
        if categories != ("",):
            data["category"] = categories[i % len(categories)]
        out.append(Example("t.jsonl", i + 1, data, tokens=10))
    return out


def test_held_out_split_is_deterministic_order_independent_and_stratified() -> None:
    examples = _examples(200, ("a", "a", "a", "b"))
    train1, test1 = validate.split_held_out(examples, 20, seed=42)
    _, test2 = validate.split_held_out(list(reversed(examples)), 20, seed=42)
    _, test3 = validate.split_held_out(examples, 20, seed=7)
    key = lambda ex: sorted(e.line for e in ex)  # noqa: E731
    assert key(test1) == key(test2) and key(test1) != key(test3)
    assert len(test1) == 20 and len(train1) == 180 and not {id(e) for e in train1} & {id(e) for e in test1}
    assert sum(e.data["category"] == "b" for e in test1) == 5  # 25% of 20, like the whole set


def test_equal_prompts_stay_on_one_side_of_the_split() -> None:
    examples = _examples(40)
    for e in examples[:10]:  # ten answers to one prompt
        e.data = {
            "messages": [{"role": "user", "content": "same"}, {"role": "assistant", "content": str(e.line)}]
        }
    for seed in range(8):
        _, test = validate.split_held_out(examples, 5, seed=seed)
        sides = {("test" if e in test else "train") for e in examples[:10]}
        assert len(sides) == 1


@pytest.mark.parametrize(
    ("n", "test_size", "k"),
    [(100, None, 10), (5000, None, 200), (3, None, 1), (100, 0.25, 25), (100, 30, 30), (10, 50, 9)],
)
def test_held_out_count(n: int, test_size: float | None, k: int) -> None:
    assert validate.held_out_count(n, test_size) == k


def _config(**spec: Any) -> Any:
    base = {"baseModel": {"uri": "x"}, "dataset": {"train": "x"}}
    base.update(spec)
    return parse_config({"runPrefix": "/tmp/run", "spec": base})


def test_training_token_estimate_respects_epochs_max_steps_and_packing() -> None:
    train = _examples(100)  # 10 tokens each: 1000 per epoch
    hp = {"epochs": 2, "maxSeqLength": 100, "batchSize": 2, "gradientAccumulationSteps": 1, "packing": True}
    est = validate.estimate_training(train, _config(hyperparameters=hp, resources={"gpus": 1}))
    assert est["tokensPerEpoch"] == 1000 and est["stepsPerEpoch"] == 5 and est["trainTokens"] == 2000
    est = validate.estimate_training(
        train, _config(hyperparameters={**hp, "maxSteps": 3}, resources={"gpus": 1})
    )
    assert est["estimatedSteps"] == 3 and est["trainTokens"] == 600
    est = validate.estimate_training(
        train, _config(hyperparameters={**hp, "packing": False}, resources={"gpus": 2})
    )
    assert est["stepsPerEpoch"] == 25 and est["trainTokens"] == 2000


def test_default_chat_template_adds_no_tokens(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from .conftest import build_tokenizer

    path = build_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = None
    vocab = len(tok)
    assert formats.ensure_chat_template(tok) and not formats.ensure_chat_template(tok)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}], tokenize=False
    )
    assert text == "<s>### User:\nhello\n\n### Assistant:\nyes</s>\n\n" and len(tok) == vocab


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_validate_on_s3_end_to_end(
    s3: S3Bucket, tmp_path: Path, tiny_tokenizer_dir: Path, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI in a subprocess: dataset and model on S3, cleaned data + manifest on S3, no leaked secrets."""
    s3.client.put_bucket_versioning(Bucket=s3.bucket, VersioningConfiguration={"Status": "Enabled"})
    records = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"what is w{i}"},
                {"role": "assistant", "content": f"w{i + 1}"},
            ],
            "category": "ab"[i % 2],
        }
        for i in range(60)
    ]
    records.append(records[0])  # a duplicate
    storage.upload_file(_write_jsonl(tmp_path / "train.jsonl", records), s3.uri("in/train.jsonl"))
    storage.upload_file(_write_jsonl(tmp_path / "val.jsonl", records[50:55]), s3.uri("in/val.jsonl"))
    storage.upload_dir(tiny_tokenizer_dir, s3.uri("models/tiny"))
    storage.write_bytes(s3.uri("models/tiny/model.safetensors"), b"weights are never downloaded by validate")
    run_prefix = s3.uri("runs/team-a/demo/uid-1234")
    config = make_config(
        run_prefix,
        baseModel={"uri": s3.uri("models/tiny")},
        dataset={"train": s3.uri("in/train.jsonl"), "validation": s3.uri("in/val.jsonl"), "testSize": 6},
    )
    env = {**os.environ, "FTJ_CONFIG": json.dumps(config), "HF_TOKEN": "hf_secretsecretsecretsecret123"}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "validate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    term_text = Path(os.environ["FTJ_TERMINATION_LOG"]).read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    term = json.loads(term_text)
    assert term["reason"] == "OK" and term["summary"]["format"] == "chat"
    # 61 lines - 1 duplicate = 60; 5 validation prompts leak into train and go; 6 held out.
    assert term["summary"]["removed"] == {"duplicate": 1, "leakage": 5}
    assert (term["summary"]["train"], term["summary"]["validation"], term["summary"]["test"]) == (49, 5, 6)
    # <|system|> be brief <|end|> <|user|> what is wN <|end|> <|assistant|> wN+1 <|end|>: 12 tokens, 3 epochs.
    assert term["summary"]["trainTokens"] == 49 * 12 * 3

    data = f"{run_prefix}/data"
    assert sorted(s3.keys("runs/team-a/demo/uid-1234/data/")) == [
        f"runs/team-a/demo/uid-1234/data/{n}"
        for n in ("MANIFEST.json", "report.json", "test.jsonl", "train.jsonl", "validation.jsonl")
    ]
    m = manifest.read_manifest(data)
    assert m is not None and m.kind == "dataset"
    head = s3.client.head_object(Bucket=s3.bucket, Key="in/train.jsonl")
    assert (
        m.dataset["train"]["etag"] == head["ETag"].strip('"')
        and m.dataset["train"]["versionId"] == head["VersionId"]
    )
    assert m.base_model["revision"].startswith("s3:") and m.hyperparameters["lora"]["rank"] == 16
    local = tmp_path / "downloaded"
    manifest.download_committed(data, local)
    train_lines = [json.loads(x) for x in (local / "train.jsonl").read_text().splitlines()]
    test_lines = [json.loads(x) for x in (local / "test.jsonl").read_text().splitlines()]
    assert all(set(r) == {"messages", "category"} for r in train_lines + test_lines)
    assert not {formats.prompt_key(r) for r in train_lines} & {formats.prompt_key(r) for r in test_lines}
    report = json.loads((local / "report.json").read_text())
    assert report["categories"]["counts"]["test"] == {"a": 3, "b": 3}
    assert report["removed"]["duplicate"]["first"] == [
        {"file": "train.jsonl", "line": 61, "message": "exact duplicate of line 1"}
    ]
    assert report["tokens"]["train"]["max"] == 12 and report["policy"]["maxErrorRate"] == 0

    # Weights stayed on S3: only tokenizer files were fetched.
    assert not list(Path(os.environ["FTJ_WORKDIR"]).rglob("model.safetensors"))
    everything = proc.stdout + proc.stderr + term_text + json.dumps(report)
    for secret in (FAKE_SECRET_KEY, FAKE_ACCESS_KEY, "hf_secretsecretsecretsecret123"):
        assert secret not in everything
    for line in proc.stdout.splitlines():
        json.loads(line)  # JSON lines only

    # A retried pod finds the committed data and reuses it.
    again = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "validate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        again.returncode == 0
        and "reusing" in json.loads(Path(os.environ["FTJ_TERMINATION_LOG"]).read_text())["message"]
    )


def test_missing_dataset_is_a_config_error_naming_the_field(
    s3: S3Bucket, tmp_path: Path, make_config: Any, tiny_tokenizer_dir: Path
) -> None:
    from finetune_trainer import cli

    config = make_config(
        s3.uri("run"),
        baseModel={"uri": str(tiny_tokenizer_dir)},
        dataset={"train": s3.uri("nope/train.jsonl")},
    )
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert cli.main(["validate", "--config", str(tmp_path / "c.json")]) == 11
    term = json.loads((tmp_path / "termination-log").read_text())
    assert term["message"] == f"spec.dataset.train: {s3.uri('nope/train.jsonl')} not found"


def test_bad_data_exits_10_in_a_subprocess_without_loading_torch(tmp_path: Path, make_config: Any) -> None:
    bad = Path(__file__).parent / "data" / "bad" / "invalid_json.jsonl"
    config = make_config(
        str(tmp_path / "run"),
        baseModel={"uri": str(tmp_path / "no-model-needed")},
        dataset={"train": str(bad)},
    )
    code = (
        "import runpy, sys; sys.argv = ['finetune_trainer', 'validate'];\n"
        "try:\n    runpy.run_module('finetune_trainer', run_name='__main__')\n"
        "except SystemExit as e:\n    print('TORCH', 'torch' in sys.modules); raise"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "FTJ_CONFIG": json.dumps(config)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 10, proc.stdout + proc.stderr
    assert "TORCH False" in proc.stdout
    term = json.loads(Path(os.environ["FTJ_TERMINATION_LOG"]).read_text())
    assert term["reason"] == "INVALID_DATA" and "invalid_json.jsonl line 4: invalid JSON" in term["message"]
    assert term["summary"]["errors"] == {"invalid_json": 1}


def test_validate_with_tokenizer_from_hf_cache_and_data_on_a_pvc(
    tmp_path: Path,
    tiny_tokenizer_dir: Path,
    hf_offline_cache: Path,
    make_config: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from finetune_trainer import cli

    from .conftest import make_hf_cache_snapshot

    make_hf_cache_snapshot(hf_offline_cache, "acme/tiny", tiny_tokenizer_dir, commit="c" * 40)
    monkeypatch.setenv("FTJ_PVC_ROOT", str(tmp_path / "mnt"))
    (tmp_path / "mnt" / "datasets").mkdir(parents=True)
    records = [{"instruction": f"what is w{i}", "input": "", "output": f"w{i + 1}"} for i in range(30)]
    _write_jsonl(tmp_path / "mnt" / "datasets" / "qa.jsonl", records)
    config = make_config(
        "pvc://runs/team-a/demo",
        baseModel={"uri": "hf://acme/tiny"},
        dataset={"train": "pvc://datasets/qa.jsonl"},
    )
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert cli.main(["validate", "--config", str(tmp_path / "c.json")]) == 0
    m = manifest.read_manifest("pvc://runs/team-a/demo/data")
    assert m is not None and m.base_model == {"uri": "hf://acme/tiny", "revision": "c" * 40}
    assert m.dataset["train"]["etag"].startswith("sha256:")
    assert (tmp_path / "mnt/runs/team-a/demo/data/train.jsonl").is_file()
    term = json.loads((tmp_path / "termination-log").read_text())
    assert (
        term["summary"]["format"] == "instruction"
        and term["summary"]["train"] + term["summary"]["test"] == 30
    )


def _max_model_len_config(
    s3: S3Bucket, tmp_path: Path, make_config: Any, tokenizer: Path, limit: int
) -> Path:
    """30 short chat examples and, at line 31, one whose long system prompt 128 tokens cannot hold."""
    short = [
        {
            "messages": [
                {"role": "user", "content": f"what is w{i}"},
                {"role": "assistant", "content": f"w{i}"},
            ]
        }
        for i in range(30)
    ]
    long = {
        "messages": [
            {"role": "system", "content": " ".join(f"rule{i}" for i in range(100))},
            {"role": "user", "content": "what is w99"},
            {"role": "assistant", "content": "w99"},
        ]
    }
    storage.upload_file(_write_jsonl(tmp_path / "train.jsonl", [*short, long]), s3.uri("in/train.jsonl"))
    config = make_config(
        s3.uri(f"run-{limit}"),
        baseModel={"uri": str(tokenizer)},
        dataset={"train": s3.uri("in/train.jsonl"), "testSize": 3},
        hyperparameters={"maxSeqLength": 2048},
        evaluation={"maxNewTokens": 64},
        deployment={"maxModelLen": limit},
    )
    path = tmp_path / f"c-{limit}.json"
    path.write_text(json.dumps(config))
    return path


def test_max_model_len_shorter_than_a_prompt_plus_max_new_tokens_is_refused_naming_the_field_and_line(
    s3: S3Bucket, tmp_path: Path, make_config: Any, tiny_tokenizer_dir: Path
) -> None:
    """The serving engine would refuse that prompt (ServingMismatch much later); validate says so first."""
    from finetune_trainer import cli

    assert (
        cli.main(
            [
                "validate",
                "--config",
                str(_max_model_len_config(s3, tmp_path, make_config, tiny_tokenizer_dir, 128)),
            ]
        )
        == 11
    )
    message = json.loads((tmp_path / "termination-log").read_text())["message"]
    assert message.startswith(
        "spec.deployment.maxModelLen: 128 tokens cannot hold train.jsonl line 31: its prompt is "
    )
    assert "+ evaluation.maxNewTokens 64 = " in message
    assert not manifest.is_committed(s3.uri("run-128/data"))

    # Room for the longest prompt plus 64 new tokens: validated and committed.
    assert (
        cli.main(
            [
                "validate",
                "--config",
                str(_max_model_len_config(s3, tmp_path, make_config, tiny_tokenizer_dir, 256)),
            ]
        )
        == 0
    )
    assert manifest.is_committed(s3.uri("run-256/data"))
