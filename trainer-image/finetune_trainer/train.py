"""``train``: fine-tuning (LoRA, QLoRA or full) by ``spec.objective``, resumable and committed: ``sft``
with TRL's SFTTrainer (sft.py); ``dpo`` / ``kto`` / ``grpo`` with TRL's DPO / KTO / GRPO trainers
(objectives.py).

The recipe, top to bottom:

1. config: the FineTuneJob spec (method, lora, hyperparameters, checkpoint) and the run prefix;
2. data: the cleaned JSONL that ``validate`` committed under ``<runPrefix>/data/`` (chat, or the objective's
   canonical preference / unpaired / prompt-only form);
3. model: the base model and tokenizer (chat template; default one when the base has none);
4. train: (sft) loss on assistant tokens only (the same tokens evaluation scores), padding-free batches of
   ``batchSize`` examples (or opt-in packing; see batching.py for the step arithmetic; examples never attend
   to each other); checkpoints committed every N steps / M minutes / on SIGTERM, resumed from the newest
   committed checkpoint; the objective's own figures in progress lines, summary and MLflow;
5. save: adapter (vLLM ``--lora-modules``), merged model when wanted, ``train/metrics.json`` + ``loss.png``.

Several GPUs or nodes: the CLI relaunches this stage under torchrun; the Trainer then runs DDP or FSDP
full-shard (``hyperparameters.strategy``, resolved by the operator; docs/distributed.md), every rank resumes
from the same committed checkpoint, and only rank 0 writes checkpoints and outputs.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_vocabulary.objectives import PROGRESS_FIGURES

from . import batching, manifest, modeling, objectives, plots, storage, tracking
from .checkpoints import CheckpointCallback, resume_checkpoint, without_fsdp
from .config import TrainerConfig
from .exitcodes import InvalidDataError, PreemptedError
from .progress import ProgressCallback
from .sft import has_generation_markers, lean_sft_trainer_class, sft_config, to_prompt_completion
from .termination import StageResult, raise_if_preempted

log = logging.getLogger(__name__)

DATA_FILES = {"train": "train.jsonl", "validation": "validation.jsonl"}


# --- data ---------------------------------------------------------------------------------------------------


def read_chat_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = row["messages"]
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidDataError(
                    f"{path.name} line {number}: not a canonical chat example ({exc}); "
                    "was it written by validate?"
                ) from None
            rows.append({"messages": messages})
    return rows


def fetch_data(data_uri: str, dest: Path, objective: str = "sft") -> dict[str, list[dict[str, Any]]]:
    """The cleaned splits ``validate`` committed (train, and validation when there is one), in the form the
    objective's trainer reads (sft: chat; dpo/kto/grpo: objectives.trl_rows)."""
    if not manifest.is_committed(data_uri):
        raise InvalidDataError(f"{data_uri} is not committed: run validate first")
    manifest.download_committed(data_uri, dest)
    read = read_chat_jsonl if objective == "sft" else (lambda path: objectives.trl_rows(path, objective))
    splits = {name: read(dest / file) for name, file in DATA_FILES.items() if (dest / file).is_file()}
    if not splits.get("train"):
        raise InvalidDataError(f"{data_uri}/train.jsonl has no examples")
    return splits


# --- training arguments -------------------------------------------------------------------------------------


def training_arguments(
    config: TrainerConfig, device: modeling.Device, output_dir: Path, *, assistant_only: bool
) -> Any:
    if config.spec.objective == "sft":
        return sft_config(config, device, output_dir, assistant_only=assistant_only)
    common = objectives.common_arguments(
        config, device, output_dir, objectives.parallel_strategy(config.spec)
    )
    return objectives.objective_arguments(config, common)


def trainer_rows(rows: list[dict[str, Any]], objective: str, assistant_only: bool) -> list[dict[str, Any]]:
    if objective != "sft" or assistant_only:
        return rows
    return [to_prompt_completion(r) for r in rows]


def make_trainer(
    config: TrainerConfig,
    device: modeling.Device,
    model: Any,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    assistant_only: bool,
    callbacks: list[Any],
) -> Any:
    """SFT: the lean SFTTrainer below; dpo/kto/grpo: TRL's trainer for the objective (objectives.py)."""
    args = training_arguments(
        config, device, config.workdir / "train" / "checkpoints", assistant_only=assistant_only
    )
    if config.spec.objective != "sft":
        return objectives.build_trainer(config, args, model, tokenizer, rows, callbacks)
    from datasets import Dataset

    return lean_sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=modeling.peft_config_for(config.spec),
        callbacks=callbacks,
    )


# --- trainer ------------------------------------------------------------------------------------------------

# --- progress, preemption, validation -------------------------------------------------------------------


def watch_training(
    config: TrainerConfig,
    trainer: Any,
    examples: int,
    revision: str | None,
    data_manifest: Any,
    main_process: bool,
) -> tuple[Callable[[], int], dict[str, Any], tracking.Tracker]:
    """Progress lines and MLflow on the trainer: (tokens seen, the batching context, the tracker)."""
    from transformers import PrinterCallback

    spec = config.spec
    watched = weakref.ref(trainer)  # the callbacks must not keep the training copy alive after training

    def tokens_seen() -> int:  # real tokens, all ranks (GRPO counts them in the state)
        current = watched()
        if current is None:
            return 0
        return int(getattr(current, "_total_train_tokens", 0) or current.state.num_input_tokens_seen or 0)

    trainer.remove_callback(PrinterCallback)  # stdout carries JSON lines only; progress replaces its dicts
    hp, ranks_n = spec.hyperparameters, objectives.world_size()
    batching_info = batching.describe(hp, examples, len(trainer.train_dataset), ranks_n)
    if spec.objective != "sft":  # TRL's preference and GRPO collators pad each micro-batch
        batching_info["batching"] = "padded"
    log.info(
        "%s batching: %s training examples, %s per optimizer step, %s optimizer steps",
        batching_info["batching"],
        examples,
        batching_info["examplesPerStep"],
        batching.total_steps(len(trainer.train_dataset), hp, ranks_n),
    )
    figures = PROGRESS_FIGURES.get(spec.objective, {})  # progress key -> TRL log key
    trainer.add_callback(ProgressCallback(tokens_seen, context=batching_info, figures=figures))
    tracker = tracking.Tracker.open(config, enabled=main_process)
    tracker.log_params(
        tracking.run_params(
            config,
            base_model_revision=revision,
            dataset=data_manifest.dataset if data_manifest else None,
            resolved={
                **batching_info,
                "totalSteps": batching.total_steps(len(trainer.train_dataset), hp, ranks_n),
            },
        )
    )
    trainer.add_callback(tracking.TrackingCallback(tracker, tokens_seen))
    return tokens_seen, batching_info, tracker


def raise_if_stopped_by_sigterm(trainer: Any, checkpoint_cb: CheckpointCallback, checkpoints: str) -> None:
    if checkpoint_cb.preempted:
        step = trainer.state.global_step
        raise PreemptedError(
            f"SIGTERM received: checkpoint step-{step:08d} committed; resume from it",
            summary={
                "step": step,
                "totalSteps": trainer.state.max_steps,
                "checkpoint": storage.join(checkpoints, f"step-{step:08d}"),
            },
        )


def evaluate_validation(
    trainer: Any, rows: list[dict[str, Any]], objective: str, assistant_only: bool
) -> dict[str, Any]:
    """The objective's loss on the validation split (``evalLoss`` in metrics.json)."""
    from datasets import Dataset

    return dict(
        trainer.evaluate(eval_dataset=Dataset.from_list(trainer_rows(rows, objective, assistant_only)))
    )


def checkpoint_callback(config: TrainerConfig, meta: dict[str, Any]) -> CheckpointCallback:
    spec = config.spec
    return CheckpointCallback(
        config.layout.checkpoints,
        every_minutes=spec.checkpoint.every_minutes,
        keep=spec.checkpoint.keep,
        commit_meta=meta,
    )


def train_from_newest_checkpoint(trainer: Any, config: TrainerConfig, ranks: Any) -> Any:
    """``trainer.train``, resumed from the newest committed checkpoint when there is one."""
    with ranks.main_process_first():
        resume = resume_checkpoint(config.layout.checkpoints, config.workdir / "train")
        # e.g. 2 FSDP nodes -> 1 GPU after a policy change
        if resume and objectives.parallel_strategy(config.spec) != "fsdp":
            without_fsdp(resume[0])
    return trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)


def result_message(
    spec: Any, summary: dict[str, Any], step: int, examples: int, batching: dict[str, Any]
) -> str:
    loss_of = "assistant tokens" if spec.objective == "sft" else f"{spec.objective} loss"
    loss = "not logged" if summary["loss"] is None else f"{summary['loss']:.4g} ({loss_of})"
    packed = f", packed into {batching.get('packedRows')} rows" if spec.hyperparameters.packing else ""
    return f"trained {step} steps on {examples} examples{packed}, final training loss {loss}"


# --- outputs ------------------------------------------------------------------------------------------------


def check_adapter_for_vllm(adapter_dir: Path) -> None:
    """vLLM ``--lora-modules`` loads LoRA weights only: no modules_to_save, no resized embeddings."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("modules_to_save"):
        raise RuntimeError(f"adapter has modules_to_save={cfg['modules_to_save']}; vLLM cannot load it")
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as weights:
        extra = [k for k in weights.keys() if "lora_" not in k]  # noqa: SIM118 - safe_open has no __iter__
    if extra:
        raise RuntimeError(f"adapter carries non-LoRA weights {extra[:3]}; vLLM cannot load it")


def _commit(local: Path, uri: str, kind: str, meta: dict[str, Any], step: int) -> str:
    try:
        manifest.commit_dir(local, uri, kind=kind, step=step, **meta)
    except manifest.AlreadyCommitted:  # a rerun after a crash between two commits
        log.info("%s already committed", uri)
    return uri


def final_loss(log_history: list[dict[str, Any]], train_output: Any = None) -> float | None:
    """The last logged training loss (assistant tokens, mean over the last logging window)."""
    losses = [e["loss"] for e in log_history if "loss" in e and math.isfinite(e["loss"])]
    if losses:
        return float(losses[-1])
    overall = getattr(train_output, "training_loss", None)
    return float(overall) if overall is not None and math.isfinite(overall) else None


def train_metrics(
    trainer: Any,
    train_output: Any,
    started: float,
    tokens: int,
    eval_metrics: dict[str, Any],
    objective: str = "sft",
) -> dict[str, Any]:
    state = trainer.state
    elapsed = time.monotonic() - started
    return {
        "step": state.global_step,
        "totalSteps": state.max_steps,
        "epoch": state.epoch,
        "finalLoss": final_loss(state.log_history, train_output),
        "trainLoss": getattr(train_output, "training_loss", None),
        "evalLoss": eval_metrics.get("eval_loss"),
        "tokens": tokens,
        "tokensPerSecond": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "runtimeSeconds": round(elapsed, 2),
        "logHistory": state.log_history,
        "objective": objective,
        "figures": objectives.last_figures(objective, state.log_history),
    }


def summary_of(
    config: TrainerConfig, metrics: dict[str, Any], adapter: str | None, merged: str | None
) -> dict[str, Any]:
    loss = metrics.get("finalLoss")
    summary: dict[str, Any] = {
        "step": metrics.get("step"),
        "totalSteps": metrics.get("totalSteps"),
        "loss": None if loss is None or math.isnan(loss) else round(loss, 6),
        "adapter": adapter,
        "merged": merged,
        "loraRank": config.spec.lora.rank if config.spec.method != "full" else None,
    }
    if config.spec.objective != "sft":  # the objective's own figures (PROGRESS_FIGURES keys), last logged
        summary["objective"] = config.spec.objective
        summary["figures"] = dict(metrics.get("figures") or {})
    return summary


def save_model(trainer: Any, tokenizer: Any, outputs: Path, method: str) -> Path | None:
    """The trained adapter (lora, qlora) or model (full) with its tokenizer; None on ranks other than 0."""
    if trainer.is_world_process_zero():  # ranks of one pod share the workdir: only the writer clears it
        shutil.rmtree(outputs, ignore_errors=True)
    model_dir = outputs / ("adapter" if method != "full" else "merged")
    trainer.save_model(str(model_dir))
    if not trainer.is_world_process_zero():
        return None
    tokenizer.save_pretrained(model_dir)
    for name in ("training_args.bin", "README.md"):
        (model_dir / name).unlink(missing_ok=True)
    return model_dir


def commit_models(
    config: TrainerConfig,
    model_dir: Path,
    base: Path,
    device: modeling.Device,
    meta: dict[str, Any],
    step: int,
) -> tuple[str | None, str | None]:
    """Commit the adapter (and the merged model when wanted) or the full model: (adapter uri, merged uri)."""
    spec, layout = config.spec, config.layout
    if spec.method == "full":
        return None, _commit(model_dir, layout.merged, "merged", meta, step)
    check_adapter_for_vllm(model_dir)
    adapter_uri = _commit(model_dir, layout.adapter, "adapter", meta, step)
    if not spec.wants_merged:
        return adapter_uri, None
    from .export import merge_adapter

    merged = model_dir.parent / "merged"
    merge_adapter(base, model_dir, merged, dtype=device.dtype)
    return adapter_uri, _commit(merged, layout.merged, "merged", meta, step)


def commit_train_dir(
    config: TrainerConfig,
    metrics: dict[str, Any],
    adapter_uri: str | None,
    merged_uri: str | None,
    tracker: tracking.Tracker,
    meta: dict[str, Any],
    step: int,
) -> dict[str, Any]:
    """``train/`` (metrics.json, loss.png) committed last, as it marks the stage done; returns the summary."""
    spec = config.spec
    train_dir = config.workdir / "train" / "outputs" / "train"
    train_dir.mkdir(parents=True)
    (train_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    plots.loss_curve(
        metrics["logHistory"], train_dir / "loss.png", title=f"{config.job.name}: {spec.method} training loss"
    )
    _commit(train_dir, config.layout.train, "train", meta, step)
    final = {"final_loss": metrics.get("finalLoss"), "train_runtime_seconds": metrics.get("runtimeSeconds")}
    tracker.log_metrics({k: float(v) for k, v in final.items() if v is not None}, step=step)
    tracker.log_artifacts([(train_dir / "loss.png", "train"), (train_dir / "metrics.json", "train")])
    if not spec.evaluation.enabled:
        tracker.finish()  # no evaluation stage: nothing more will be logged
    return tracking.with_tracking(summary_of(config, metrics, adapter_uri, merged_uri), tracker)


def finished_result(config: TrainerConfig) -> StageResult | None:
    """A rerun after train committed everything (e.g. the pod restarted after success) changes nothing."""
    layout = config.layout
    if not manifest.is_committed(layout.train):
        return None
    metrics = json.loads(storage.read_text(storage.join(layout.train, "metrics.json")))
    adapter = layout.adapter if manifest.is_committed(layout.adapter) else None
    merged = layout.merged if manifest.is_committed(layout.merged) else None
    return StageResult(summary_of(config, metrics, adapter, merged), "train already committed; nothing to do")


# --- the stage ----------------------------------------------------------------------------------------------


def run(config: TrainerConfig) -> StageResult:
    from accelerate import PartialState
    from transformers import set_seed

    # 1. config
    spec, layout, workdir = config.spec, config.layout, config.workdir / "train"
    done = finished_result(config)
    if done is not None:
        return done
    device = modeling.detect_device()
    modeling.check_method(spec, device)
    set_seed(spec.hyperparameters.seed)
    raise_if_preempted("train (before training started)")

    ranks = PartialState()  # ranks of a pod share the workdir: rank 0 downloads first, the others find it

    # 2. data
    with ranks.main_process_first():
        splits = fetch_data(layout.data, workdir / "data", spec.objective)
    data_manifest = manifest.read_manifest(layout.data)

    # 3. model
    with ranks.main_process_first():
        source = storage.fetch_model(
            spec.base_model.uri, revision=spec.base_model.revision, dest=workdir / "base"
        )
    tokenizer = modeling.load_tokenizer(source.path)
    assistant_only = has_generation_markers(tokenizer.chat_template)
    train_rows = trainer_rows(splits["train"], spec.objective, assistant_only)
    model = modeling.load_model(source.path, spec, device, distributed=objectives.world_size() > 1)
    meta = manifest.metadata_from_config(
        config, base_model_revision=source.revision, dataset=data_manifest.dataset if data_manifest else {}
    )
    raise_if_preempted("train (before training started)")

    # 4. train
    checkpoint_cb = checkpoint_callback(config, meta)
    trainer = make_trainer(config, device, model, tokenizer, train_rows, assistant_only, [checkpoint_cb])
    tokens_seen, batching_info, tracker = watch_training(
        config, trainer, len(train_rows), source.revision, data_manifest, ranks.is_main_process
    )
    started = time.monotonic()
    train_output = train_from_newest_checkpoint(trainer, config, ranks)
    raise_if_stopped_by_sigterm(trainer, checkpoint_cb, layout.checkpoints)
    eval_metrics: dict[str, Any] = {}
    if splits.get("validation") and spec.objective != "grpo":  # (grpo would generate: its gate evaluates)
        eval_metrics = evaluate_validation(trainer, splits["validation"], spec.objective, assistant_only)
    metrics = train_metrics(trainer, train_output, started, tokens_seen(), eval_metrics, spec.objective)

    # 5. save (every rank takes part in save_model: FSDP gathers the shards)
    model_dir = save_model(trainer, tokenizer, workdir / "outputs", spec.method)
    if model_dir is None:
        return StageResult()
    step = trainer.state.global_step
    trainer = model = None  # free the training copy before a merged export loads the base again
    adapter_uri, merged_uri = commit_models(config, model_dir, source.path, device, meta, step)
    summary = commit_train_dir(config, metrics, adapter_uri, merged_uri, tracker, meta, step)
    return StageResult(summary, result_message(spec, summary, step, len(train_rows), batching_info))
