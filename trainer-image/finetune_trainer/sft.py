"""SFT's trainer: TRL's SFTTrainer with padding-free batches and a leaner loss (train.py's recipe, sft)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import modeling, objectives
from .config import TrainerConfig


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """Split a conversation before its last assistant turn (for templates without generation markers)."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": messages[:last], "completion": [messages[last]]}


def has_generation_markers(template: str | None) -> bool:
    from trl.chat_template_utils import has_generation_markers as _has

    return bool(template) and _has(template)


def sft_config(
    config: TrainerConfig, device: modeling.Device, output_dir: Path, *, assistant_only: bool
) -> Any:
    from trl import SFTConfig

    hp = config.spec.hyperparameters
    return SFTConfig(
        **objectives.common_arguments(config, device, output_dir, objectives.parallel_strategy(config.spec)),
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
