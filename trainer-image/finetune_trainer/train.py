"""``train``: supervised fine-tuning with TRL's SFTTrainer (LoRA, QLoRA or full), resumable and committed.

The recipe, top to bottom:

1. config: the FineTuneJob spec (method, lora, hyperparameters, checkpoint) and the run prefix;
2. data: the cleaned chat JSONL that ``validate`` committed under ``<runPrefix>/data/``;
3. model: the base model and tokenizer (chat template; default one when the base has none);
4. train: ``SFTTrainer`` with loss on assistant tokens only (the same tokens evaluation scores), padding-free
   batches of ``batchSize`` examples (or opt-in packing; see batching.py for the step arithmetic; examples
   never attend to each other), checkpoints committed every N steps / M minutes / on SIGTERM, resumed from
   the newest committed checkpoint;
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
from pathlib import Path
from typing import Any

from . import batching, manifest, modeling, objectives, plots, storage, tracking
from .checkpoints import CheckpointCallback, resume_checkpoint, without_fsdp
from .config import TrainerConfig
from .exitcodes import InvalidConfigError, InvalidDataError, PreemptedError
from .progress import ProgressCallback
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


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """Split a conversation before its last assistant turn (for templates without generation markers)."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def has_generation_markers(template: str | None) -> bool:
    from trl.chat_template_utils import has_generation_markers as _has

    return bool(template) and _has(template)


# --- training arguments -------------------------------------------------------------------------------------


world_size = objectives.world_size


def parallel_strategy(spec: Any) -> str:
    """``ddp`` or ``fsdp`` with several ranks (``none`` with one). The operator resolves ``auto`` from the GPU
    table and the model size before the pod starts; run by hand, ``auto`` shards full fine-tuning only."""
    if world_size() <= 1:
        return "none"
    chosen = str(spec.hyperparameters.strategy)
    if chosen == "auto":
        chosen = "fsdp" if spec.method == "full" else "ddp"
    if chosen == "fsdp" and spec.method == "qlora":
        raise InvalidConfigError("hyperparameters.strategy: fsdp does not support method: qlora; use ddp")
    return chosen


def sft_config(
    config: TrainerConfig, device: modeling.Device, output_dir: Path, *, assistant_only: bool
) -> Any:
    from trl import SFTConfig

    hp = config.spec.hyperparameters
    return SFTConfig(
        **objectives.common_arguments(config, device, output_dir, parallel_strategy(config.spec)),
        # data: each micro-batch is one row of concatenated examples whose position_ids restart per example
        # (no padding, no cross-example attention), so batchSize examples per micro-batch whatever their
        # lengths. Opt-in packing instead fills rows of max_length tokens (fewer, fuller rows: fewer steps).
        padding_free=True,
        packing=hp.packing,
        packing_strategy="bfd",
        # validate already dropped examples over maxSeqLength; TRL enforces max_length only when packing
        max_length=hp.max_seq_length if hp.packing else None,
        assistant_only_loss=assistant_only,
        completion_only_loss=None if assistant_only else True,
        dataset_num_proc=None,
    )


def training_arguments(
    config: TrainerConfig, device: modeling.Device, output_dir: Path, *, assistant_only: bool
) -> Any:
    if config.spec.objective == "sft":
        return sft_config(config, device, output_dir, assistant_only=assistant_only)
    common = objectives.common_arguments(config, device, output_dir, parallel_strategy(config.spec))
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

FUSED_HEAD_MIN_LOGIT_BYTES = 256 * 2**20  # TRL's fused LM head pays off when the logits would be this big


def labelled_positions_only(labels: Any) -> dict[str, Any]:
    """Model kwargs that compute the LM head only where the next token is labelled (assistant tokens).

    The loss is unchanged (the same sum over the labelled tokens divided by ``num_items_in_batch``), but the
    vocabulary projection, its softmax and their backward skip the prompt positions, which are most of a chat
    example. ``logits_to_keep`` (positions, shared by the rows of a batch) and ``shift_labels`` (their next
    tokens) are transformers' own ``ForCausalLM`` arguments.
    """
    import torch

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    keep = (shifted != -100).any(dim=0).nonzero().flatten()
    return {"logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}


def accepts_kept_logits(model: Any) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep``, as transformers' ``...ForCausalLM``
    classes do; any other model gets the full LM head."""
    import inspect

    from transformers.trainer_utils import unwrap_peft_model

    return "logits_to_keep" in inspect.signature(unwrap_peft_model(model).forward).parameters


def lean_sft_trainer_class() -> type:
    """TRL's SFTTrainer without per-step costs that buy nothing when the logits are small.

    - The LM head runs only where the next token is labelled (:func:`labelled_positions_only`): a chat
      example's prompt needs no logits, so the vocabulary projection shrinks to the assistant tokens.
    - TRL computes the loss through a fused (chunked) LM head that never materialises the logits and also
      yields entropy and token accuracy. That saves memory when the logits would be big; when the kept
      logits are small, its chunked autograd function costs more than it saves, so there the model's own
      loss is used: the same mean NLL over the labelled (assistant) tokens, normalised by
      ``num_items_in_batch`` as in ``Trainer.compute_loss``. Entropy and token accuracy are then not logged.
    - The HF Trainer counts the model's parameters (walking every module) on every step for ``total_flos``;
      it is counted once.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):  # type: ignore[misc]
        _non_embedding_parameters: int | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # shift_labels reaches the loss as a loss kwarg, which the HF Trainer has already checked for
            self._head_skips_prompt = self.model_accepts_loss_kwargs and accepts_kept_logits(self.model)

        def _fused_head_pays(self, positions: int) -> bool:
            vocab = self.model.config.get_text_config().vocab_size
            return bool(positions * vocab * 4 >= FUSED_HEAD_MIN_LOGIT_BYTES)

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            plain = (
                self.args.loss_type == "nll"
                and not self.aux_loss_enabled
                and self.compute_loss_func is None
                and self.label_smoother is None
            )
            # evaluation (return_outputs) keeps every position's logits: callers may read them
            kept = (
                labelled_positions_only(inputs["labels"])
                if plain and not return_outputs and self._head_skips_prompt
                else {}
            )
            positions = kept["shift_labels"].numel() if kept else inputs["input_ids"].numel()
            if not plain or self._fused_head_pays(positions):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:  # real tokens, counted as TRL counts them (progress lines read it)
                if "attention_mask" in inputs:
                    tokens = int(inputs["attention_mask"].sum())
                else:
                    tokens = int(inputs["position_ids"].size(1))
                self._total_train_tokens += tokens
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return Trainer.compute_loss(
                self, model, {**inputs, **kept, "use_cache": False}, return_outputs, num_items_in_batch
            )

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            objectives.fsdp_on_cpu(self)

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            if self._non_embedding_parameters is None:
                self._non_embedding_parameters = int(self.model.num_parameters(exclude_embeddings=True))
            return 6 * int(inputs["input_ids"].numel()) * self._non_embedding_parameters

    return LeanSFTTrainer


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
    trainer: Any, train_output: Any, started: float, tokens: int, eval_metrics: dict[str, Any]
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
    from transformers import PrinterCallback, set_seed

    # 1. config
    spec, layout, workdir = config.spec, config.layout, config.workdir / "train"
    done = finished_result(config)
    if done is not None:
        return done
    device = modeling.detect_device()
    modeling.check_method(spec, device)
    set_seed(spec.hyperparameters.seed)
    raise_if_preempted("train (before training started)")

    # several processes on one node share the workdir: rank 0 downloads first, the others then find the files
    ranks = PartialState()

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
    model = modeling.load_model(source.path, spec, device, distributed=world_size() > 1)
    meta = manifest.metadata_from_config(
        config, base_model_revision=source.revision, dataset=data_manifest.dataset if data_manifest else {}
    )
    raise_if_preempted("train (before training started)")

    # 4. train
    from datasets import Dataset

    checkpoint_cb = CheckpointCallback(
        layout.checkpoints,
        every_minutes=spec.checkpoint.every_minutes,
        keep=spec.checkpoint.keep,
        commit_meta=meta,
    )
    trainer = make_trainer(config, device, model, tokenizer, train_rows, assistant_only, [checkpoint_cb])
    tokens_seen = lambda: int(  # noqa: E731 - real tokens, all ranks (GRPO counts them in the state)
        getattr(trainer, "_total_train_tokens", 0) or trainer.state.num_input_tokens_seen or 0
    )
    trainer.remove_callback(PrinterCallback)  # stdout carries JSON lines only; progress replaces its dicts
    hp, ranks_n = spec.hyperparameters, world_size()
    batching_info = batching.describe(hp, len(train_rows), len(trainer.train_dataset), ranks_n)
    if spec.objective != "sft":  # TRL's preference and GRPO collators pad each micro-batch
        batching_info["batching"] = "padded"
    log.info(
        "%s batching: %s training examples, %s per optimizer step, %s optimizer steps",
        batching_info["batching"],
        len(train_rows),
        batching_info["examplesPerStep"],
        batching.total_steps(len(trainer.train_dataset), hp, ranks_n),
    )
    figures = objectives.figures_map(spec.objective)
    trainer.add_callback(ProgressCallback(tokens_seen, context=batching_info, figures=figures))
    tracker = tracking.Tracker.open(config, enabled=ranks.is_main_process)
    tracker.log_params(
        tracking.run_params(
            config,
            base_model_revision=source.revision,
            dataset=data_manifest.dataset if data_manifest else None,
            resolved={
                **batching_info,
                "totalSteps": batching.total_steps(len(trainer.train_dataset), hp, ranks_n),
            },
        )
    )
    trainer.add_callback(tracking.TrackingCallback(tracker, tokens_seen))
    with ranks.main_process_first():
        resume = resume_checkpoint(layout.checkpoints, workdir)
        if resume and parallel_strategy(spec) != "fsdp":  # e.g. 2 FSDP nodes -> 1 GPU after a policy change
            without_fsdp(resume[0])
    started = time.monotonic()
    train_output = trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
    if checkpoint_cb.preempted:
        step = trainer.state.global_step
        raise PreemptedError(
            f"SIGTERM received: checkpoint step-{step:08d} committed; resume from it",
            summary={
                "step": step,
                "totalSteps": trainer.state.max_steps,
                "checkpoint": storage.join(layout.checkpoints, f"step-{step:08d}"),
            },
        )
    eval_metrics: dict[str, Any] = {}
    if splits.get("validation") and spec.objective != "grpo":  # (grpo would generate: its gate evaluates)
        eval_rows = trainer_rows(splits["validation"], spec.objective, assistant_only)
        eval_metrics = trainer.evaluate(eval_dataset=Dataset.from_list(eval_rows))
    metrics = train_metrics(trainer, train_output, started, tokens_seen(), eval_metrics)
    metrics["objective"] = spec.objective
    metrics["figures"] = objectives.last_figures(spec.objective, trainer.state.log_history)

    # 5. save (every rank takes part in save_model: FSDP gathers the shards)
    outputs = workdir / "outputs"
    if trainer.is_world_process_zero():  # ranks of one pod share the workdir: only the writer clears it
        shutil.rmtree(outputs, ignore_errors=True)
    step = trainer.state.global_step
    model_dir = outputs / ("adapter" if spec.method != "full" else "merged")
    trainer.save_model(str(model_dir))
    if not trainer.is_world_process_zero():
        return StageResult()
    tokenizer.save_pretrained(model_dir)
    for name in ("training_args.bin", "README.md"):
        (model_dir / name).unlink(missing_ok=True)
    adapter_uri = merged_uri = None
    if spec.method != "full":
        check_adapter_for_vllm(model_dir)
        adapter_uri = _commit(model_dir, layout.adapter, "adapter", meta, step)
        if spec.wants_merged:
            from .export import merge_adapter

            del trainer, model  # free the training copy before loading the base again
            merge_adapter(source.path, model_dir, outputs / "merged", dtype=device.dtype)
            merged_uri = _commit(outputs / "merged", layout.merged, "merged", meta, step)
    else:
        merged_uri = _commit(model_dir, layout.merged, "merged", meta, step)

    train_dir = outputs / "train"
    train_dir.mkdir(parents=True)
    (train_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    plots.loss_curve(
        metrics["logHistory"], train_dir / "loss.png", title=f"{config.job.name}: {spec.method} training loss"
    )
    _commit(train_dir, layout.train, "train", meta, step)  # last: marks the stage done
    final = {"final_loss": metrics.get("finalLoss"), "train_runtime_seconds": metrics.get("runtimeSeconds")}
    tracker.log_metrics({k: float(v) for k, v in final.items() if v is not None}, step=step)
    tracker.log_artifacts([(train_dir / "loss.png", "train"), (train_dir / "metrics.json", "train")])
    if not spec.evaluation.enabled:
        tracker.finish()  # no evaluation stage: nothing more will be logged
    summary = tracking.with_tracking(summary_of(config, metrics, adapter_uri, merged_uri), tracker)
    loss_of = "assistant tokens" if spec.objective == "sft" else f"{spec.objective} loss"
    loss = "not logged" if summary["loss"] is None else f"{summary['loss']:.4g} ({loss_of})"
    packed = f", packed into {batching_info.get('packedRows')} rows" if hp.packing else ""
    return StageResult(
        summary, f"trained {step} steps on {len(train_rows)} examples{packed}, final training loss {loss}"
    )
