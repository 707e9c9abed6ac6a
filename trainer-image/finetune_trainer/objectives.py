"""The training objectives beyond SFT: DPO, KTO and GRPO through TRL's trainers (``spec.objective``).

train.py keeps the recipe (config, data, model, train, save); this module builds what differs per objective:

- the training arguments every objective shares (:func:`common_arguments`: schedule, precision, several GPUs,
  checkpoints, logging), so a DPO run checkpoints, resumes and logs exactly as an SFT run does;
- the rows TRL reads, from the canonical files ``validate`` writes (contract of issue 23): ``prompt`` is a
  list of chat messages ending with a user turn; a completion side written as text becomes one assistant
  message (TRL's conversational form, so the chat template wraps it as it wraps an SFT answer);
- the trainer: ``DPOTrainer`` (``preference`` pairs), ``KTOTrainer`` (``unpaired-preference``),
  ``GRPOTrainer`` (``prompt-only`` prompts, rewarded by the evaluation graders, rewards.py).

Reference model: with LoRA/QLoRA TRL computes the reference log-probabilities with the adapter disabled (the
base weights; no second copy); with method ``full`` TRL loads a frozen copy (``ref_model=None``), prepared
like the policy when FSDP shards it. GRPO with ``beta`` 0 (TRL's default) needs no reference at all.

GRPO batches: ``batchSize`` counts prompts per device per micro-batch; each prompt gets ``numGenerations``
completions, so TRL's ``per_device_train_batch_size`` (completions) is ``batchSize x numGenerations`` and the
optimizer steps are those of SFT over the same number of examples.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune_vocabulary.objectives import PROGRESS_FIGURES

from . import formats, modeling
from .config import TrainerConfig
from .exitcodes import InvalidConfigError

DEFAULT_LOGGING_STEPS = 5  # FTJ_LOGGING_STEPS overrides (progress lines still come at least every 15 s)
COMPLETION_FIELDS = {"dpo": ("chosen", "rejected"), "kto": ("completion",), "grpo": ()}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


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


# --- training arguments shared by every objective -----------------------------------------------------------


def common_arguments(
    config: TrainerConfig, device: modeling.Device, output_dir: Path, strategy: str
) -> dict[str, Any]:
    """TrainingArguments fields every objective sets alike (``strategy``: none | ddp | fsdp)."""
    spec, hp = config.spec, config.spec.hyperparameters
    fsdp = strategy == "fsdp"
    return {
        "output_dir": str(output_dir),
        # schedule
        "num_train_epochs": hp.epochs,
        "max_steps": hp.max_steps or -1,
        "per_device_train_batch_size": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "learning_rate": hp.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": hp.warmup_ratio,  # a float < 1 is a ratio of the total steps
        "seed": hp.seed,
        "data_seed": hp.seed,
        "dataloader_num_workers": 0,
        # precision and memory
        "bf16": device.bf16,
        "fp16": False,
        "use_cpu": not device.cuda,
        "gradient_checkpointing": hp.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        # several GPUs
        "ddp_find_unused_parameters": False if world_size() > 1 else None,
        "fsdp": "full_shard auto_wrap" if fsdp else "",
        # checkpoints hold whole tensors gathered on rank 0: written once, resumable on any world size
        "fsdp_config": {"state_dict_type": "FULL_STATE_DICT", "cpu_offload": False} if fsdp else None,
        # checkpoints (committed by CheckpointCallback) and logs (ProgressCallback)
        "save_strategy": "steps",
        "save_steps": spec.checkpoint.every_steps,
        "save_total_limit": spec.checkpoint.keep,
        "logging_strategy": "steps",
        "logging_steps": int(os.environ.get("FTJ_LOGGING_STEPS", DEFAULT_LOGGING_STEPS)),
        "logging_first_step": True,  # (ProgressCallback also logs the last step: a loss is always reported)
        "eval_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
    }


def _unset_is_trl_default(**values: Any) -> dict[str, Any]:
    """Only the hyperparameters the spec sets: unset ones keep TRL's defaults."""
    return {k: v for k, v in values.items() if v is not None}


def objective_arguments(config: TrainerConfig, common: dict[str, Any]) -> Any:
    """The objective's TRL config: common fields plus what only that objective has."""
    objective, hp = config.spec.objective, config.spec.hyperparameters
    if objective == "dpo":
        from trl import DPOConfig

        # validate dropped pairs whose prompt + longer side exceed maxSeqLength: nothing is truncated
        return DPOConfig(
            **common,
            dataset_num_proc=None,
            max_length=hp.max_seq_length,
            **_unset_is_trl_default(beta=hp.beta),
        )
    if objective == "kto":
        from trl import KTOConfig

        return KTOConfig(
            **common,
            dataset_num_proc=None,
            max_length=hp.max_seq_length,
            **_unset_is_trl_default(beta=hp.beta),
        )
    if objective == "grpo":
        from trl import GRPOConfig

        generations = hp.num_generations or GRPOConfig.num_generations  # TRL's default (8) when unset
        return GRPOConfig(
            **{**common, "per_device_train_batch_size": hp.batch_size * generations},
            num_generations=generations,
            use_vllm=False,  # rollouts with the policy itself (transformers generate), on CPU too
            generation_kwargs={"use_cache": True},  # load_model turns the cache off for training
            reward_weights=[r.weight for r in config.spec.rewards],
            log_completions=False,
            **_unset_is_trl_default(beta=hp.beta, max_completion_length=hp.max_completion_length),
        )
    raise ValueError(f"spec.objective: {objective} is not trained by objectives.py")


def fsdp_on_cpu(trainer: Any) -> None:
    """Accelerate runs FSDP only on accelerators: on CPU ranks (gloo) it drops the plugin and runs DDP
    without a word. torch's FSDP2 (``fully_shard``) does run on CPU, so the plugin is put back: the CPU
    emulation then exercises the same sharded path, state dicts and checkpoints as the GPUs do."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    args, state = trainer.args, trainer.accelerator.state
    if not args.fsdp_plugin_args or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True

    def full_state_dict(model: Any, unwrap: bool = True) -> dict[str, Any]:
        # accelerate's "offload to CPU" of a tensor already on the CPU keeps FSDP's gather buffer, which
        # FSDP then frees: gather without offloading and copy the whole tensors out instead
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        gathered = get_model_state_dict(model, options=options)
        return {k: v.detach().clone() for k, v in gathered.items()}

    trainer.accelerator.get_state_dict = full_state_dict


# --- data ---------------------------------------------------------------------------------------------------


def _assistant(side: Any) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": side}] if isinstance(side, str) else list(side)


def trl_rows(path: Path, objective: str) -> list[dict[str, Any]]:
    """One split in the form the objective's TRL trainer reads (conversational)."""
    rows = []
    for row in formats.read_canonical(path, objective):
        out: dict[str, Any] = {"prompt": row["prompt"]}
        for field in COMPLETION_FIELDS[objective]:
            out[field] = _assistant(row[field])
        if objective == "kto":
            out["label"] = bool(row["label"])
        if objective == "grpo":
            out["expected"] = row.get("expected") or ""  # reward functions get it as a keyword
        rows.append(out)
    return rows


# --- the trainer --------------------------------------------------------------------------------------------


def trainer_class(objective: str) -> type:
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer

    return {"dpo": DPOTrainer, "kto": KTOTrainer, "grpo": GRPOTrainer}[objective]


def build_trainer(
    config: TrainerConfig,
    args: Any,
    model: Any,
    tokenizer: Any,
    train_rows: Sequence[Mapping[str, Any]],
    callbacks: list[Any],
) -> Any:
    """The objective's TRL trainer; ``ref_model=None``: TRL's reference (adapter off, or a frozen copy)."""
    from datasets import Dataset

    spec = config.spec
    kwargs: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": Dataset.from_list(list(train_rows)),
        "processing_class": tokenizer,
        "peft_config": modeling.peft_config_for(spec),
        "callbacks": callbacks,
    }
    if spec.objective == "grpo":
        from .rewards import reward_functions

        functions, _weights = reward_functions(config)  # the weights are in args.reward_weights
        kwargs["reward_funcs"] = functions
    else:
        kwargs["ref_model"] = None
    return with_fsdp_on_cpu(trainer_class(spec.objective))(**kwargs)


def with_fsdp_on_cpu(cls: type) -> type:
    class Trainer(cls):  # type: ignore[misc,valid-type]
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            fsdp_on_cpu(self)

    Trainer.__name__ = cls.__name__
    return Trainer


# --- figures ------------------------------------------------------------------------------------------------


def last_figures(objective: str, log_history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The last logged value of each of the objective's figures (the train summary's ``figures``)."""
    out: dict[str, float] = {}
    for key, trl_key in PROGRESS_FIGURES.get(objective, {}).items():
        values = [e[trl_key] for e in log_history if isinstance(e.get(trl_key), int | float)]
        values = [float(v) for v in values if math.isfinite(v)]
        if values:
            out[key] = round(values[-1], 6)
    return out
