"""``export``: merge the committed adapter into its base model for serving in merged mode.

The base is loaded unquantised (bf16 on GPU, fp32 on CPU) even after QLoRA, the adapter applied and merged
(``merge_and_unload``), and the result written as safetensors with the tokenizer and its chat template to
``<runPrefix>/model/merged/``, committed with a manifest.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from . import manifest, modeling, storage
from .config import TrainerConfig
from .exitcodes import InvalidConfigError
from .termination import StageResult

log = logging.getLogger(__name__)


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path, *, dtype: Any) -> Path:
    """Write base + adapter, merged, as a Hugging Face model directory (safetensors, tokenizer)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(out, safe_serialization=True)
    # The adapter directory carries the tokenizer as trained (with the chat template actually used).
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_dir
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if not tokenizer.chat_template:
        tokenizer.chat_template = modeling.DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def run(config: TrainerConfig) -> StageResult:
    spec, layout = config.spec, config.layout
    if spec.method == "full":
        if manifest.is_committed(layout.merged):
            return StageResult({"merged": layout.merged}, "full fine-tuning already wrote the merged model")
        raise InvalidConfigError(
            "spec.method: full fine-tuning has no adapter to export; train writes model/merged"
        )
    if manifest.is_committed(layout.merged):
        return StageResult({"merged": layout.merged}, "merged model already committed")
    adapter_manifest = manifest.read_manifest(layout.adapter)
    if adapter_manifest is None:
        raise InvalidConfigError(f"{layout.adapter} is not committed: train has not finished")
    workdir = config.workdir / "export"
    adapter_dir = workdir / "adapter"
    manifest.download_committed(layout.adapter, adapter_dir)
    source = storage.fetch_model(
        spec.base_model.uri, revision=spec.base_model.revision, dest=workdir / "base"
    )
    device = modeling.detect_device()
    out = merge_adapter(source.path, adapter_dir, workdir / "merged", dtype=device.dtype)
    meta = manifest.metadata_from_config(
        config, base_model_revision=source.revision, dataset=adapter_manifest.dataset
    )
    try:
        manifest.commit_dir(out, layout.merged, kind="merged", step=adapter_manifest.step, **meta)
    except manifest.AlreadyCommitted:
        log.info("%s already committed", layout.merged)
    return StageResult({"merged": layout.merged}, f"merged adapter into {spec.base_model.uri}")
