"""CLI, config, exit codes and the termination message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import cli, termination
from finetune_trainer.config import load_config, parse_config
from finetune_trainer.exitcodes import (
    OOM_HINT,
    ExitCode,
    InvalidConfigError,
    PreemptedError,
    TransientError,
    classify,
)
from finetune_trainer.termination import StageResult, build_termination_message


def _term(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "termination-log").read_text())


# --- config -------------------------------------------------------------------------------------------------


def test_defaults_match_the_api(make_config: Any) -> None:
    doc = {
        "runPrefix": "s3://b/p/",
        "job": {"namespace": "n", "name": "j", "uid": "u"},
        "spec": {
            "baseModel": {"uri": "hf://org/m"},
            "dataset": {"train": "s3://b/t.jsonl"},
            "futureField": {"x": 1},
        },
    }
    spec = parse_config(doc).spec
    assert (
        spec.method,
        spec.lora.rank,
        spec.lora.alpha,
        spec.lora.dropout,
        spec.lora.peft_target_modules,
    ) == ("lora", 16, 32, 0.05, "all-linear")
    hp = spec.hyperparameters
    assert (
        hp.epochs,
        hp.max_steps,
        hp.learning_rate,
        hp.batch_size,
        hp.gradient_accumulation_steps,
        hp.max_seq_length,
        hp.warmup_ratio,
        hp.packing,
        hp.gradient_checkpointing,
        hp.seed,
    ) == (3, None, 2e-4, 4, 1, 2048, 0.03, False, True, 42)
    ev = spec.evaluation
    assert (
        ev.max_new_tokens == 128
        and ev.compare_to_base
        and ev.metrics == ["loss", "perplexity", "exact_match", "token_f1", "rouge_l"]
    )
    assert spec.dataset.format == "auto" and spec.resources.gpus == 1 and not spec.wants_merged
    cfg = parse_config(doc)
    assert cfg.run_prefix == "s3://b/p" and cfg.layout.checkpoint(7) == "s3://b/p/checkpoints/step-00000007"
    assert cfg.layout.adapter == "s3://b/p/model/adapter" and cfg.layout.data == "s3://b/p/data"


def test_explicit_nulls_mean_defaults() -> None:
    doc = {
        "runPrefix": "/r",
        "spec": {
            "baseModel": {"uri": "x", "revision": None},
            "dataset": {"train": "t", "test": None, "testSize": None},
            "method": None,
            "hyperparameters": {"maxSteps": None, "seed": None},
            "evaluation": {"thresholds": None, "primaryMetric": None, "reference": None},
        },
    }
    spec = parse_config(doc).spec
    assert (
        spec.method == "lora" and spec.hyperparameters.seed == 42 and spec.hyperparameters.max_steps is None
    )
    assert spec.evaluation.thresholds == [] and spec.deciding_metric == "loss"


def test_unset_primary_metric_resolves_like_the_operator_gate() -> None:
    def deciding(evaluation: dict) -> str:
        doc = {
            "runPrefix": "/r",
            "spec": {"baseModel": {"uri": "x"}, "dataset": {"train": "t"}, "evaluation": evaluation},
        }
        return parse_config(doc).spec.deciding_metric

    thresholds = [{"metric": "rouge_l", "min": 0.3}, {"metric": "loss", "max": 2}]
    assert deciding({"metrics": ["loss", "exact_match"]}) == "loss"
    assert deciding({"metrics": ["token_f1", "loss"]}) == "token_f1"
    assert deciding({"metrics": ["loss", "rouge_l"], "thresholds": thresholds}) == "rouge_l"
    assert deciding({"metrics": ["loss", "rouge_l"], "thresholds": thresholds, "primaryMetric": "loss"}) == (
        "loss"
    )


def test_target_modules_accepts_a_list_or_one_string() -> None:
    base = {"runPrefix": "/r", "spec": {"baseModel": {"uri": "x"}, "dataset": {"train": "x"}}}
    for value, want in ((["q_proj", "v_proj"], ["q_proj", "v_proj"]), ("all-linear", "all-linear")):
        base["spec"]["lora"] = {"targetModules": value}
        assert parse_config(base).spec.lora.peft_target_modules == want


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"hyperparameters": {"learningRate": 0}},
            "spec.hyperparameters.learningRate: Input should be greater than 0",
        ),
        (
            {"hyperparameters": {"batchSize": "four"}},
            "spec.hyperparameters.batchSize: Input should be a valid integer",
        ),
        ({"method": "dpo"}, "spec.method: Input should be 'lora', 'qlora' or 'full'"),
        ({"lora": {"rank": 0}}, "spec.lora.rank: Input should be greater than or equal to 1"),
        ({"method": "qlora", "resources": {"gpus": 0}}, "spec.method: qlora needs resources.gpus ≥ 1"),
        (
            {"method": "full", "deployment": {"mode": "adapter"}},
            "spec.deployment.mode: adapter needs method lora",
        ),
        (
            {"evaluation": {"metrics": ["loss"], "thresholds": [{"metric": "rouge_l", "min": 0.2}]}},
            "spec.evaluation.thresholds[0].metric: rouge_l is neither in evaluation.metrics nor a grader",
        ),
        ({"dataset": {"format": "csv"}}, "spec.dataset.format: Input should be"),
        ({"baseModel": None}, "spec.baseModel: Field required"),
        ({"dataset": {"testSize": -1}}, "spec.dataset.testSize: Input should be greater than 0"),
    ],
)
def test_invalid_config_names_the_field(spec: dict[str, Any], message: str) -> None:
    doc: dict[str, Any] = {"runPrefix": "/r", "spec": {"baseModel": {"uri": "x"}, "dataset": {"train": "x"}}}
    for key, value in spec.items():
        if value is None:
            del doc["spec"][key]
        else:
            doc["spec"][key] = {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(InvalidConfigError) as err:
        parse_config(doc)
    assert message in err.value.message and err.value.code == ExitCode.INVALID_CONFIG


def test_config_sources(tmp_path: Path) -> None:
    doc = {"runPrefix": "/r", "spec": {"baseModel": {"uri": "x"}, "dataset": {"train": "t"}}}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    assert load_config(tmp_path / "c.json").spec.dataset.train == "t"
    assert load_config(env={"FTJ_CONFIG": json.dumps(doc)}).spec.dataset.train == "t"
    with pytest.raises(InvalidConfigError, match="set FTJ_CONFIG or pass --config"):
        load_config(env={})
    with pytest.raises(InvalidConfigError, match=r"--config .*nope\.json"):
        load_config(tmp_path / "nope.json")
    with pytest.raises(InvalidConfigError, match="not valid JSON"):
        load_config(env={"FTJ_CONFIG": "{runPrefix"})


def test_cli_invalid_config_subprocess(tmp_path: Path) -> None:
    doc = {
        "runPrefix": "/r",
        "spec": {
            "baseModel": {"uri": "x"},
            "dataset": {"train": "t"},
            "hyperparameters": {"maxSeqLength": 0},
        },
    }
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "validate"],
        capture_output=True,
        text=True,
        env={**os.environ, "FTJ_CONFIG": json.dumps(doc)},
        timeout=60,
    )
    assert proc.returncode == 11
    term = _term(tmp_path)
    assert term == {
        "stage": "validate",
        "exitCode": 11,
        "reason": "INVALID_CONFIG",
        "summary": {},
        "message": "invalid config: spec.hyperparameters.maxSeqLength: Input should be greater than or "
        "equal to 16",
    }
    last = json.loads(proc.stdout.splitlines()[-1])
    assert last["level"] == "error" and last["exitCode"] == 11


def test_cli_usage_errors_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "fly"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# --- exit codes ---------------------------------------------------------------------------------------------


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError (matched by name: exitcodes never imports torch)."""


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (
            OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            ExitCode.OUT_OF_MEMORY,
            OOM_HINT,
        ),
        (RuntimeError("CUDA out of memory. Tried to allocate"), ExitCode.OUT_OF_MEMORY, "batchSize"),
        (MemoryError(), ExitCode.OUT_OF_MEMORY, "gradientCheckpointing"),
        (_client_error("SlowDown", 503), ExitCode.TRANSIENT, "SlowDown"),
        (_client_error("InternalError", 500), ExitCode.TRANSIENT, "InternalError"),
        (_client_error("AccessDenied", 403), ExitCode.INVALID_CONFIG, "credentialsSecret"),
        (ConnectionResetError("reset"), ExitCode.TRANSIENT, "network error"),
        (TimeoutError("slow"), ExitCode.TRANSIENT, "network error"),
        (TransientError("x"), ExitCode.TRANSIENT, "x"),
        (PreemptedError("stop"), ExitCode.PREEMPTED, "stop"),
        (ValueError("bug"), ExitCode.CRASH, "ValueError: bug"),
    ],
)
def test_classify(exc: BaseException, code: ExitCode, text: str) -> None:
    got, message = classify(exc)
    assert got == code and text in message


def test_botocore_network_errors_are_transient() -> None:
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    for exc in (
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="x"),
    ):
        assert classify(exc)[0] == ExitCode.TRANSIENT


@pytest.mark.parametrize(
    ("raised", "code", "reason"),
    [
        (OutOfMemoryError("CUDA out of memory"), 12, "OUT_OF_MEMORY"),
        (
            PreemptedError("SIGTERM received; checkpoint step-00000040 committed", summary={"step": 40}),
            21,
            "PREEMPTED",
        ),
        (KeyError("oops"), 1, "CRASH"),
    ],
)
def test_main_turns_stage_failures_into_contract_codes(
    raised: BaseException,
    code: int,
    reason: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def stage(name: str, config: Any) -> StageResult:
        raise raised

    monkeypatch.setattr(cli, "run_stage", stage)
    monkeypatch.setenv(
        "FTJ_CONFIG",
        json.dumps({"runPrefix": "/r", "spec": {"baseModel": {"uri": "x"}, "dataset": {"train": "t"}}}),
    )
    assert cli.main(["evaluate"]) == code
    term = _term(tmp_path)
    assert term["reason"] == reason and term["stage"] == "evaluate"
    if code == 21:
        assert term["summary"] == {"step": 40}
    if code == 1:
        assert "Traceback" in capsys.readouterr().out  # crashes keep their traceback in the log


def test_main_writes_the_stage_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "run_stage", lambda name, config: StageResult({"merged": "s3://b/m"}, "merged"))
    monkeypatch.setenv(
        "FTJ_CONFIG",
        json.dumps({"runPrefix": "/r", "spec": {"baseModel": {"uri": "x"}, "dataset": {"train": "t"}}}),
    )
    assert cli.main(["export"]) == 0
    assert _term(tmp_path) == {
        "stage": "export",
        "exitCode": 0,
        "reason": "OK",
        "message": "merged",
        "summary": {"merged": "s3://b/m"},
    }


# --- termination message ------------------------------------------------------------------------------------


def test_termination_message_fits_4kib_and_stays_valid_json() -> None:
    summary = {"format": "chat", "train": 10, "huge": ["x" * 100] * 100, "errors": {"invalid_json": 3}}
    data = build_termination_message("validate", 10, "é" * 5000, summary)
    assert len(data) <= 4096
    doc = json.loads(data)
    assert doc["truncated"] is True and "huge" not in doc["summary"] and doc["summary"]["train"] == 10
    assert doc["message"].endswith("...") and doc["message"].startswith("éé")

    small = json.loads(build_termination_message("train", 0, "ok", {"step": 5}))
    assert small == {"stage": "train", "exitCode": 0, "reason": "OK", "message": "ok", "summary": {"step": 5}}
    assert len(build_termination_message("x", 1, "m" * 10000, {"k": "v" * 10000})) <= 4096


def test_termination_message_never_carries_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    data = build_termination_message(
        "train", 20, "failed with very-secret-value-123", {"u": "very-secret-value-123"}
    )
    assert b"very-secret-value-123" not in data


def test_only_rank_zero_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    termination.write_termination_message("train", 0, "ok")
    assert not (tmp_path / "termination-log").exists()


# --- SIGTERM ------------------------------------------------------------------------------------------------


def test_sigterm_sets_the_flag_for_train() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        termination.install_sigterm_handler(raise_immediately=False)
        assert not termination.preemption_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert termination.preemption_requested()
        with pytest.raises(PreemptedError):
            termination.raise_if_preempted("train")
    finally:
        signal.signal(signal.SIGTERM, previous)
        termination.clear_preemption()


def test_sigterm_stops_other_stages_with_preempted(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import os, signal, sys, time
        from finetune_trainer import cli
        def slow(name, config):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        cli.run_stage = slow
        sys.exit(cli.main(["evaluate"]))
    """)
    doc = {"runPrefix": "/r", "spec": {"baseModel": {"uri": "x"}, "dataset": {"train": "t"}}}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "FTJ_CONFIG": json.dumps(doc)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 21, proc.stdout + proc.stderr
    assert _term(tmp_path)["reason"] == "PREEMPTED"


# --- several processes ------------------------------------------------------------------------------------


def test_distributed_launch_keeps_rank_zero_exit_code(tmp_path: Path) -> None:
    """gpus > 1: the CLI runs torch.distributed.run itself and exits with rank 0's contract code, not 1."""
    pkg = tmp_path / "probe"
    (pkg / "finetune_trainer").mkdir(parents=True)
    src = Path(cli.__file__).parent
    for f in src.glob("*.py"):
        (pkg / "finetune_trainer" / f.name).write_text(f.read_text())
    (pkg / "finetune_trainer" / "train.py").write_text(
        textwrap.dedent("""
        import os
        from finetune_trainer.exitcodes import PreemptedError
        def run(config):
            assert os.environ["WORLD_SIZE"] == "2"
            if os.environ["RANK"] == "0":
                raise PreemptedError("checkpoint committed", summary={"step": 3})
            raise SystemExit(0)
    """)
    )
    doc = {
        "runPrefix": "/r",
        "spec": {"baseModel": {"uri": "x"}, "dataset": {"train": "t"}, "resources": {"gpus": 2}},
    }
    env = {**os.environ, "FTJ_CONFIG": json.dumps(doc), "PYTHONPATH": str(pkg), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pkg,
    )
    assert proc.returncode == 21, proc.stdout[-3000:] + proc.stderr[-3000:]
    term = _term(tmp_path)
    assert term["reason"] == "PREEMPTED" and term["summary"] == {"step": 3}


# --- fetch (init containers of the serving Deployment) ----------------------------------------------------


def test_fetch_verifies_committed_directories(s3: Any, tmp_path: Path) -> None:
    from finetune_trainer import manifest, storage

    src = tmp_path / "merged"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"abc")
    manifest.commit_dir(src, s3.uri("run/model/merged"), kind="merged", step=9)
    storage.write_text(s3.uri("run/model/merged/stray-uncommitted.bin"), "not listed")
    assert cli.main(["fetch", s3.uri("run/model/merged"), str(tmp_path / "out")]) == 0
    assert sorted(storage.local_files(tmp_path / "out")) == ["MANIFEST.json", "config.json", "sub/w.bin"]
    assert _term(tmp_path)["summary"] == {"source": s3.uri("run/model/merged"), "files": 2, "step": 9}

    storage.write_bytes(s3.uri("run/model/merged/sub/w.bin"), b"xyz")  # corrupted after commit
    assert cli.main(["fetch", s3.uri("run/model/merged"), str(tmp_path / "out2")]) == 20
    assert "sha256 mismatch" in _term(tmp_path)["message"]


def test_a_manifest_nested_100000_deep_is_a_config_error_not_a_crash(s3: Any, tmp_path: Path) -> None:
    from finetune_trainer import storage

    storage.write_text(s3.uri("models/base/config.json"), "{}")
    storage.write_text(s3.uri("models/base/MANIFEST.json"), "[" * 100_000 + "]" * 100_000)
    assert cli.main(["fetch", s3.uri("models/base"), str(tmp_path / "base")]) == 11  # permanent, not retried
    assert "MANIFEST.json is nested too deeply" in _term(tmp_path)["message"]


def test_fetch_copies_plain_model_directories(s3: Any, tmp_path: Path) -> None:
    from finetune_trainer import storage

    storage.write_text(s3.uri("models/base/config.json"), '{"model_type": "llama"}')
    assert cli.main(["fetch", s3.uri("models/base"), str(tmp_path / "base")]) == 0
    assert (tmp_path / "base" / "config.json").read_text() == '{"model_type": "llama"}'
    assert cli.main(["fetch", s3.uri("models/none"), str(tmp_path / "none")]) == 11
    assert "models/none: not found" in _term(tmp_path)["message"]
