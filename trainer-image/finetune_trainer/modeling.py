"""Loading the base model and tokenizer, and setting up LoRA / QLoRA / full fine-tuning.

- Tokenizer: its own chat template, or :data:`DEFAULT_CHAT_TEMPLATE` for base models without one (plain-text
  role markers plus the tokenizer's EOS, so no token is added and the embeddings are never resized, which
  keeps the adapter loadable by vLLM ``--lora-modules``). Pad token = EOS when there is none.
- Precision: bf16 on a GPU that supports it, fp32 on CPU. QLoRA: bitsandbytes 4-bit NF4, CUDA only.
- Attention: FlashAttention 2 when installed on a GPU (varlen kernels for padding-free rows). Otherwise
  :data:`VARLEN_SDPA`: causal SDPA within each example of a padding-free (or packed) row (boundaries from
  TRL's ``cu_seq_lens`` or the restarting ``position_ids``): short examples are gathered into one padded
  batch for a single SDPA call per layer (per-op overhead, not FLOPs, dominates there), long uneven ones run
  one call each (sum(len_i^2) instead of the dense block-diagonal mask transformers would build for plain
  SDPA, 2x slower on CPU). Either way examples sharing a row never attend to each other
  (tests/trainer/test_varlen_attention.py, tests/trainer/test_train_packing.py).
"""

from __future__ import annotations

import importlib.util
import itertools
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


VARLEN_SDPA = "sdpa_varlen"


def _segment_bounds(length: int, kwargs: dict[str, Any]) -> list[int] | None:
    """Start offsets of the packed examples in a single-row batch, plus the end; None when not packed."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return [int(x) for x in cu.tolist()]
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        return None
    return [*starts, length]


# Up to this example length the examples of a row are gathered into one padded batch for a single SDPA call
# (a constant number of ops per layer); longer, uneven ones run one SDPA call each (no compute on padding).
BATCHED_VARLEN_MAX_LENGTH = 256


def _batched_segments_attention(
    query: Any, key: Any, value: Any, bounds: list[int], dropout: float, scaling: float | None
) -> Any:
    """Causal attention within each segment of a single row, as one padded SDPA call; returns (1, T, H, D).

    Segment ``i`` (positions ``bounds[i]:bounds[i+1]``) is gathered into row ``i`` of a padded batch, padded
    at the end; plain causal attention then lets a real query see only the keys before it in its own
    segment (padding keys come after every real query), so no mask is needed. Only the real positions are
    scattered back, in order: padding queries' outputs (and so their gradients) are dropped.
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    device = query.device
    starts = torch.tensor(bounds[:-1], device=device)
    lengths = torch.tensor(bounds[1:], device=device) - starts
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    longest = int(lengths.max())
    offsets = torch.arange(longest, device=device)
    valid = offsets[None, :] < lengths[:, None]  # (n, L)
    index = torch.where(valid, starts[:, None] + offsets[None, :], starts[:, None])  # (n, L)

    def gather(x: Any) -> Any:  # (1, H, T, D) -> (n, H, L, D)
        return x[0][:, index].transpose(0, 1)

    out = scaled_dot_product_attention(
        gather(query), gather(key), gather(value), dropout_p=dropout, scale=scaling, is_causal=True
    )
    return out.transpose(1, 2)[valid].unsqueeze(0)  # (n, L, H, D) -> (1, T, H, D)


def sdpa_varlen_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """SDPA that runs causal attention per packed example; anything else goes to transformers' SDPA."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if attention_mask is None and query.shape[0] == 1 and query.shape[2] > 1:
        bounds = _segment_bounds(query.shape[2], kwargs)
        if bounds is not None and len(bounds) > 2:
            n_rep = query.shape[1] // key.shape[1]
            key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
            p = dropout if module.training else 0.0
            lengths = [e - s for s, e in itertools.pairwise(bounds) if e > s]
            longest = max(lengths)
            padded_cost, exact_cost = len(lengths) * longest**2, sum(n * n for n in lengths)
            if longest <= BATCHED_VARLEN_MAX_LENGTH or padded_cost <= 2 * exact_cost:
                return _batched_segments_attention(query, key, value, bounds, p, scaling), None
            parts = [
                scaled_dot_product_attention(
                    query[:, :, s:e],
                    key[:, :, s:e],
                    value[:, :, s:e],
                    dropout_p=p,
                    scale=scaling,
                    is_causal=True,
                )
                for s, e in itertools.pairwise(bounds)
                if e > s
            ]
            return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def _varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """No dense mask for unpadded (single or packed) rows: the attention splits them; padding gets SDPA's."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register_varlen_sdpa() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, sdpa_varlen_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, _varlen_mask)
    return VARLEN_SDPA


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
            raise InvalidConfigError(
                "spec.baseModel: the tokenizer has neither a chat template nor an EOS token"
            )
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
        raise InvalidConfigError(
            "spec.method: qlora needs a CUDA GPU (bitsandbytes 4-bit); this pod has none — "
            "use method lora or request resources.gpus ≥ 1"
        )
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
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        if distributed:
            import os

            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    # every batch is padding-free (examples concatenated in one row), packed or not
    if kwargs["attn_implementation"] == "sdpa" and not _sliding_window(path):
        kwargs["attn_implementation"] = register_varlen_sdpa()
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False  # incompatible with gradient checkpointing; generation turns it back on
    return model


def _sliding_window(path: str | Path) -> bool:
    """Sliding-window attention needs the real mask: such models keep plain SDPA."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return (
        bool(getattr(cfg, "sliding_window", None)) and getattr(cfg, "use_sliding_window", True) is not False
    )


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
