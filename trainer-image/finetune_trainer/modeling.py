"""Loading the base model and tokenizer, and setting up LoRA / QLoRA / full fine-tuning.

- Tokenizer: its own chat template, or :data:`DEFAULT_CHAT_TEMPLATE` for base models without one (plain-text
  role markers plus the tokenizer's EOS, so no token is added and the embeddings are never resized, which
  keeps the adapter loadable by vLLM ``--lora-modules``). Pad token = EOS when there is none.
- Precision: bf16 on a GPU that supports it, fp32 on CPU. QLoRA: bitsandbytes 4-bit NF4, CUDA only.
- Attention: FlashAttention 2 when installed on a GPU (varlen kernels for padding-free packing), otherwise
  SDPA; with SDPA/eager transformers turns the packed ``position_ids`` into a block-diagonal mask, so packed
  examples never attend to each other either way (tests/trainer/test_train_packing.py checks it).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .exitcodes import InvalidConfigError

if TYPE_CHECKING:
    from .config import FineTuneSpec

log = logging.getLogger(__name__)

# For base models without a chat template. The {% generation %} markers let the trainer put the loss on
# assistant tokens only; EOS closes each assistant turn inside them so the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Device:
    """Where and in what precision this process trains."""

    cuda: bool
    bf16: bool

    @property
    def dtype(self) -> Any:
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def attn_implementation(self) -> str:
        if self.cuda and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa"


def detect_device() -> Device:
    import torch

    cuda = torch.cuda.is_available()
    return Device(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())


def load_tokenizer(path: str | Path) -> Any:
    """The base model's tokenizer with a chat template and a pad token (no new tokens are ever added)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        if tokenizer.eos_token is None:
            raise InvalidConfigError("spec.baseModel: the tokenizer has neither a chat template nor an EOS token")
        log.info("base model has no chat template: using the default one")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_method(spec: FineTuneSpec, device: Device) -> None:
    """QLoRA needs CUDA and bitsandbytes: refuse early with a message naming the field."""
    if spec.method != "qlora":
        return
    if not device.cuda:
        raise InvalidConfigError("spec.method: qlora needs a CUDA GPU (bitsandbytes 4-bit); this pod has none — "
                                 "use method lora or request resources.gpus ≥ 1")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InvalidConfigError("spec.method: qlora needs the bitsandbytes package, missing from this image")


def load_model(path: str | Path, spec: FineTuneSpec, device: Device, *, distributed: bool = False) -> Any:
    """The base model, in the precision and quantisation the method wants, ready for SFTTrainer."""
    import torch
    from transformers import AutoModelForCausalLM

    check_method(spec, device)
    kwargs: dict[str, Any] = {"dtype": device.dtype, "attn_implementation": device.attn_implementation}
    if spec.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        if distributed:
            import os

            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False  # incompatible with gradient checkpointing; generation turns it back on
    return model


def lora_config(spec: FineTuneSpec) -> Any:
    """PEFT LoRA config from spec.lora; never ``modules_to_save`` (vLLM's --lora-modules rejects them)."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.peft_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=None,
    )


def peft_config_for(spec: FineTuneSpec) -> Any | None:
    return None if spec.method == "full" else lora_config(spec)
