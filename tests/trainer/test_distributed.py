"""Data-parallel training on the CPU with torch's gloo backend, through the real CLI and torchrun.

- DDP is exact up to float reduction order: 2 processes in one pod, and 2 pods x 1 process (each with its own
  workdir, meeting at rank 0's address as the pods of an Indexed Job do), with the same global batch as 1
  process, log the same loss at every step (1e-4 relative).
- A checkpoint written by 2 ranks resumes on 1 rank: the final weights equal those of an uninterrupted
  1-rank run (the checkpoint holds whole tensors, written once by rank 0). One test shares the runs.
The figures (steps per second) are printed; they are noisy on a shared machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import cli
from finetune_trainer.exitcodes import InvalidConfigError, TransientError

from .toy_fixtures import commit_toy_data, toy_base_dir, toy_config

__all__ = ["toy_base_dir"]

STEPS = 10
GLOBAL_BATCH = 8
# AdamW moves an element by up to ~lr (2e-4) a step whatever its gradient's size, so summing 8 examples in
# one process vs 4 + 4 across ranks can shift a near-zero gradient element's update: adapters agree to within
# a fraction of one step's update (6.3e-5 measured on an AMD EPYC, <1e-5 on another CPU). A skipped or
# duplicated batch or unsynchronised ranks move weights by several steps' worth and change the per-step
# losses, which are compared to 1e-4 relative.
WEIGHT_TOLERANCE = 1e-4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(config: dict[str, Any], workdir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "FTJ_CONFIG": json.dumps(config),
        "FTJ_LOGGING_STEPS": "1",
        "FTJ_WORKDIR": str(workdir / "ws"),
        "FTJ_TERMINATION_LOG": str(workdir / "termination-log"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _train(prefix: str, base: Path, batch: int, pods: list[dict[str, str]], workdir: Path) -> dict[str, Any]:
    """One `train` per pod (each with the extra environment given); returns the committed metrics + time."""
    config = toy_config(
        prefix,
        str(base),
        hyperparameters={"maxSteps": STEPS, "batchSize": batch},
        checkpoint={"everySteps": 5, "keep": 3},
    )
    started = time.monotonic()
    procs = []
    for index, extra in enumerate(pods):
        pod_dir = workdir / f"pod-{index}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "finetune_trainer", "train"],
                env=_env(config, pod_dir, **extra),
                stdout=(pod_dir / "log").open("w"),
                stderr=subprocess.STDOUT,
            )
        )
    codes = [p.wait(timeout=600) for p in procs]
    elapsed = time.monotonic() - started
    logs = [(workdir / f"pod-{i}" / "log").read_text()[-3000:] for i in range(len(pods))]
    assert codes == [0] * len(pods), logs
    metrics = json.loads((Path(prefix) / "train" / "metrics.json").read_text())
    metrics["wall"] = elapsed
    return metrics


def _losses(metrics: dict[str, Any]) -> list[float]:
    return [e["loss"] for e in metrics["logHistory"] if "loss" in e]


def _adapter(prefix: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(Path(prefix) / "model" / "adapter" / "adapter_model.safetensors")))


def _run(tmp_path: Path, name: str, base: Path, batch: int, pods: list[dict[str, str]]) -> tuple[str, dict]:
    prefix = str(tmp_path / name / "bucket" / "run")
    commit_toy_data(f"{prefix}/data")
    return prefix, _train(prefix, base, batch, pods, tmp_path / name)


@pytest.mark.slow
def test_ddp_matches_one_process_and_resumes_on_another_world_size(
    tmp_path: Path, toy_base_dir: Path
) -> None:
    one_prefix, one = _run(tmp_path, "one", toy_base_dir, GLOBAL_BATCH, [{"FTJ_NPROC_PER_NODE": "1"}])
    procs_prefix, procs = _run(
        tmp_path, "procs", toy_base_dir, GLOBAL_BATCH // 2, [{"FTJ_NPROC_PER_NODE": "2"}]
    )
    port = str(_free_port())
    pod = {
        "FTJ_NNODES": "2",
        "FTJ_NPROC_PER_NODE": "1",
        "FTJ_MASTER_ADDR": "localhost",
        "FTJ_MASTER_PORT": port,
    }
    pods_prefix, pods = _run(
        tmp_path,
        "pods",
        toy_base_dir,
        GLOBAL_BATCH // 2,
        [{**pod, "JOB_COMPLETION_INDEX": "0"}, {**pod, "JOB_COMPLETION_INDEX": "1"}],
    )
    reference = _losses(one)
    assert len(reference) == STEPS
    for metrics in (procs, pods):
        assert metrics["step"] == STEPS
        got = _losses(metrics)
        assert len(got) == STEPS
        for step, (a, b) in enumerate(zip(reference, got, strict=True), 1):
            assert abs(a - b) <= 1e-4 * abs(a), (step, a, b)
    weights = _adapter(one_prefix)
    for prefix in (procs_prefix, pods_prefix):
        other = _adapter(prefix)
        assert other.keys() == weights.keys()
        assert max(float((weights[k] - other[k]).abs().max()) for k in weights) < WEIGHT_TOLERANCE
    # rank 1 of the two pods committed nothing: checkpoints and outputs come from rank 0 only
    assert not (tmp_path / "pods" / "pod-1" / "termination-log").read_text().count('"adapter"')
    for name, metrics in (("1 process", one), ("2 processes, 1 pod", procs), ("2 pods x 1 process", pods)):
        print(
            f"ddp-cpu {name}: {STEPS} steps of {GLOBAL_BATCH} examples, "
            f"train {metrics['runtimeSeconds']:.2f} s "
            f"({STEPS / metrics['runtimeSeconds']:.2f} steps/s), wall {metrics['wall']:.1f} s, "
            f"final loss {metrics['finalLoss']:.6f}"
        )

    # the 2-rank checkpoint of step 5, resumed on 1 rank in a new run prefix, ends where 1 rank ends
    resumed_prefix = tmp_path / "resumed" / "bucket" / "run"
    shutil.copytree(Path(procs_prefix) / "data", resumed_prefix / "data")
    shutil.copytree(
        Path(procs_prefix) / "checkpoints" / "step-00000005", resumed_prefix / "checkpoints" / "step-00000005"
    )
    resumed = _train(
        str(resumed_prefix), toy_base_dir, GLOBAL_BATCH, [{"FTJ_NPROC_PER_NODE": "1"}], tmp_path / "resumed"
    )
    assert resumed["step"] == STEPS
    history = [e["step"] for e in resumed["logHistory"] if "loss" in e]
    assert history[:5] == [1, 2, 3, 4, 5] and history[-1] == STEPS  # the 2-rank history carried over
    assert _losses(resumed)[5:] == pytest.approx(reference[5:], rel=1e-4)
    a = _adapter(str(resumed_prefix))
    diff = max(float((a[k] - weights[k]).abs().max()) for k in a)
    scale = max(float(weights[k].abs().max()) for k in weights)
    assert diff < WEIGHT_TOLERANCE, (diff, scale)
    print(
        f"resume 2 -> 1 ranks at step 5 of {STEPS}: max |weight difference| {diff:.3g} "
        f"(largest weight {scale:.3g}) vs the uninterrupted 1-rank run; "
        f"final loss {resumed['finalLoss']:.6f} "
        f"vs {one['finalLoss']:.6f}; resumed run {resumed['runtimeSeconds']:.2f} s for {STEPS - 5} steps"
    )


def _held_out_loss(model_dir: Path, test_file: Path) -> float:
    """Mean token NLL of the held-out examples (whole conversations) under the model in ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = count = 0.0
    with torch.no_grad():
        for line in test_file.read_text().splitlines():
            ids = tokenizer.apply_chat_template(json.loads(line)["messages"], return_dict=False)
            ids = torch.tensor([ids])
            tokens = ids.numel() - 1
            total += float(model(input_ids=ids, labels=ids).loss) * tokens
            count += tokens
    return total / count


@pytest.mark.slow
def test_fsdp_full_fine_tuning_on_two_ranks_matches_one_process(tmp_path: Path, toy_base_dir: Path) -> None:
    """Full fine-tuning sharded over 2 gloo ranks (FSDP2 full-shard; checkpoints hold whole tensors,
    written by rank 0) reaches the held-out loss of 1 process with the same global batch."""
    runs = {}
    for name, batch, nproc in (("one", GLOBAL_BATCH, "1"), ("fsdp", GLOBAL_BATCH // 2, "2")):
        prefix = str(tmp_path / name / "bucket" / "run")
        commit_toy_data(f"{prefix}/data")
        config = toy_config(
            prefix,
            str(toy_base_dir),
            method="full",
            hyperparameters={"maxSteps": STEPS, "batchSize": batch, "learningRate": 1e-3, "strategy": "fsdp"},
            checkpoint={"everySteps": 5, "keep": 3},
        )
        pod_dir = tmp_path / name
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "finetune_trainer", "train"],
            env=_env(config, pod_dir, FTJ_NPROC_PER_NODE=nproc),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        metrics = json.loads((Path(prefix) / "train" / "metrics.json").read_text())
        loss = _held_out_loss(Path(prefix) / "model" / "merged", Path(prefix) / "data" / "test.jsonl")
        runs[name] = (prefix, metrics, loss, time.monotonic() - started)
    one, fsdp = runs["one"], runs["fsdp"]
    # the sharded run really sharded: its checkpoint holds FSDP's whole-tensor model and optimizer files
    files = {p.name for p in (Path(fsdp[0]) / "checkpoints" / "step-00000005").iterdir()}
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "model.safetensors"} <= files, files
    base_loss = _held_out_loss(toy_base_dir, Path(one[0]) / "data" / "test.jsonl")
    assert one[2] < base_loss  # training helped, so the comparison means something
    assert abs(fsdp[2] - one[2]) <= 0.01 * one[2], (fsdp[2], one[2])
    # the FSDP checkpoint of step 5 resumed by 1 process (no FSDP) ends where the 1-process run ends
    resumed_prefix = tmp_path / "resumed" / "bucket" / "run"
    shutil.copytree(Path(fsdp[0]) / "data", resumed_prefix / "data")
    shutil.copytree(
        Path(fsdp[0]) / "checkpoints" / "step-00000005", resumed_prefix / "checkpoints" / "step-00000005"
    )
    config = toy_config(
        str(resumed_prefix),
        str(toy_base_dir),
        method="full",
        hyperparameters={"maxSteps": STEPS, "batchSize": GLOBAL_BATCH, "learningRate": 1e-3},
        checkpoint={"everySteps": 5, "keep": 3},
    )
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "train"],
        env=_env(config, tmp_path / "resumed", FTJ_NPROC_PER_NODE="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "converted the FSDP checkpoint" in done.stdout + done.stderr
    from safetensors.torch import load_file

    a = load_file(str(resumed_prefix / "model" / "merged" / "model.safetensors"))
    b = load_file(str(Path(one[0]) / "model" / "merged" / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in b)
    moved = max(float((b[k] - load_file(str(toy_base_dir / "model.safetensors"))[k]).abs().max()) for k in b)
    # (float reduction order differs between 2 shards and 1 process; Adam amplifies it in its first steps:
    # a lost optimizer state would differ by about as much as the weights moved)
    assert diff <= 1e-2 * moved, (diff, moved)
    print(
        f"resume FSDP 2 ranks -> 1 process at step 5 of {STEPS}: max |weight difference| {diff:.3g} vs the "
        f"uninterrupted 1-process run (largest change from the base {moved:.3g})"
    )
    print(
        f"fsdp-cpu full fine-tuning, {STEPS} steps of {GLOBAL_BATCH}: held-out loss 1 process {one[2]:.6f}, "
        f"2 FSDP ranks {fsdp[2]:.6f} (base {base_loss:.6f}); train {one[1]['runtimeSeconds']:.2f} s vs "
        f"{fsdp[1]['runtimeSeconds']:.2f} s"
    )


# --- the launch (no training) -------------------------------------------------------------------------------


def _config(**resources: Any) -> Any:
    from finetune_trainer.config import parse_config

    return parse_config(
        {
            "runPrefix": "/r",
            "job": {"namespace": "n", "name": "j", "uid": "u"},
            "spec": {"baseModel": {"uri": "x"}, "dataset": {"train": "t"}, "resources": resources},
        }
    )


def test_several_nodes_launch_a_static_rendezvous_at_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOCAL_RANK", "FTJ_NNODES", "FTJ_NPROC_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FTJ_MASTER_ADDR", "localhost")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    launch = cli._distributed_launch("train", _config(gpus=4, nodes=2))
    assert launch == cli.Launch(nproc=4, nnodes=2, node_rank=1, master_addr="localhost", master_port=29500)
    with socket.socket() as store:  # node 1 waits until rank 0's store accepts connections
        store.bind(("127.0.0.1", 0))
        store.listen(1)
        launch = dataclasses.replace(launch, master_port=store.getsockname()[1])
        command = cli.torchrun_command(launch, ["train"])
    assert "--nnodes=2" in command and "--node-rank=1" in command and "--nproc-per-node=4" in command
    assert "--master-addr=127.0.0.1" in command  # resolved here, not by torch's C++ store
    assert cli._distributed_launch("evaluate", _config(gpus=4, nodes=2)) is None
    assert cli._distributed_launch("train", _config(gpus=1, nodes=1)) is None
    assert cli._distributed_launch("train", _config(gpus=2)) == cli.Launch(nproc=2)


def test_several_nodes_without_an_index_or_rank_zero_address_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("LOCAL_RANK", "FTJ_NNODES", "FTJ_NPROC_PER_NODE", "FTJ_MASTER_ADDR", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(InvalidConfigError, match="JOB_COMPLETION_INDEX"):
        cli._distributed_launch("train", _config(gpus=1, nodes=2))
    monkeypatch.setenv("FTJ_MASTER_ADDR", "j-0.j")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    with pytest.raises(InvalidConfigError, match="< 2"):
        cli._distributed_launch("train", _config(gpus=1, nodes=2))


def test_rank_zero_that_never_resolves_or_listens_is_transient() -> None:
    with pytest.raises(TransientError, match=r"no-such-host\.invalid not reachable"):
        cli.resolve_master("no-such-host.invalid", timeout=0.1)
    port = _free_port()
    with pytest.raises(TransientError, match=f"localhost:{port} not reachable"):
        cli.resolve_master("localhost", timeout=0.1, port=port)


def test_fsdp_checkpoint_is_converted_for_a_run_without_fsdp(tmp_path: Path) -> None:
    import torch
    from finetune_trainer.checkpoints import without_fsdp

    state = {"step": torch.tensor(5.0), "exp_avg": torch.ones(2), "exp_avg_sq": torch.ones(2)}
    groups = [{"lr": 0.1, "params": ["a.weight", "b.weight"]}, {"lr": 0.1, "params": ["norm.weight"]}]
    whole = {"state": {"b.weight": state, "norm.weight": state}, "param_groups": groups}
    torch.save(whole, tmp_path / "optimizer.bin")
    torch.save({}, tmp_path / "pytorch_model_fsdp.bin")
    assert not without_fsdp(tmp_path)  # no model.safetensors: nothing a plain run could load
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert without_fsdp(tmp_path)
    plain = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert sorted(plain["state"]) == [1, 2] and [g["params"] for g in plain["param_groups"]] == [[0, 1], [2]]
    assert not (tmp_path / "optimizer.bin").exists() and not (tmp_path / "pytorch_model_fsdp.bin").exists()
    assert not without_fsdp(tmp_path)  # once
