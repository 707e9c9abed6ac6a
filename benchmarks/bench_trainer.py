"""Trainer throughput at equal optimizer steps: this trainer (TRL SFTTrainer, padding-free batches) vs a plain
HF Trainer + PEFT baseline (each batch padded to its longest example).

Both arms get the same varied-length chat data, the same model, LoRA config, learning-rate schedule, seed,
the same examples per optimizer step (``--batch``) and the same number of optimizer steps (``--steps``), and
both put the loss on the answer tokens only: the only difference is how a batch is laid out (ours: the
batch's examples concatenated in one row with per-example position ids, no padding; baseline: padded
rows). Each run is a fresh subprocess; the arms are interleaved ``--repeats`` times (order alternating).
Reported per arm: real (non-padding) training tokens per second, peak RSS (and GPU memory), the optimizer
steps made and the held-out answer loss after training, computed the same way for both. The last line is
``trainer-vs-hf tokens/s ratio: <x> at equal optimizer steps (<steps> steps of <batch> examples, both arms)``
(median over repeats).

CPU (``make bench-trainer``): a small randomly initialised Llama (hidden 384, 4 layers, head_dim 64) with the
toy tokenizer from finetune_demo.toymodel; big enough that compute, not per-op overhead, dominates a step.
GPU (``make bench-gpu`` = ``--device cuda --shape llama-1b --method lora|full``): a randomly initialised
model of that shape (Llama-3.2-1B: 1.2B parameters; no download) in bf16, longer examples, and MFU (4N
FLOPs/token for LoRA, 6N for full; N = parameters without embeddings) against the GPU's dense bf16 peak;
sized to finish both methods in under 8 minutes on one H200. ``--dry-run`` runs the same code path at toy
scale (a tiny model of the shape's architecture, 2 steps, 1 repeat) on whatever device there is: the test
for machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Released models' shapes (config.json), used with random weights; "arch" picks the transformers class.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": {  # Llama-3.2-1B
        "arch": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "tiny": {  # --dry-run: the same code path at toy scale
        "arch": "llama",
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 1024,
        "tie_word_embeddings": True,
    },
    "qwen2.5-0.5b": {
        "arch": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "arch": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
}
CPU_SHAPE: dict[str, Any] = {
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "head_dim": 64,
    "tie_word_embeddings": False,
}
# Dense bf16 peak FLOP/s by GPU name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


# --- data -------------------------------------------------------------------------------------------------


def make_rows(n: int, seed: int, *, long: bool = False) -> list[dict[str, Any]]:
    """Chat examples with a long-tailed length distribution (most short, some long), like real SFT data.

    ``long``: GPU scale (median ~200 digits, up to 900) instead of CPU scale (median ~27, up to 220)."""
    rng = random.Random(seed)
    rows = []
    mu, cap = (5.3, 900) if long else (3.3, 220)
    for _ in range(n):
        length = min(int(rng.lognormvariate(mu, 0.9)) + 3, cap)
        digits = [rng.choice("0123456789") for _ in range(length)]
        letter_at = rng.randrange(length)
        digits[letter_at] = rng.choice("abcdefghijklmnopqrstuvwxyz")
        answer = digits[letter_at].upper() + " " + " ".join(digits[: rng.randint(1, 12)])
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "find: " + " ".join(digits)},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- the two arms (each runs in its own subprocess) -------------------------------------------------------


def _spec(args: argparse.Namespace, base_dir: str) -> dict[str, Any]:
    return {
        "baseModel": {"uri": base_dir},
        "dataset": {"train": "bench://train.jsonl"},
        "method": args.method,
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "hyperparameters": {
            "epochs": 1,
            "maxSteps": args.steps,
            "batchSize": args.batch,  # examples per optimizer step, as the baseline's
            "gradientAccumulationSteps": 1,
            "learningRate": args.lr,
            "maxSeqLength": args.max_len,
            "warmupRatio": 0.1,
            "gradientCheckpointing": False,
            "seed": 7,
        },
        "checkpoint": {"everySteps": 100000, "everyMinutes": 100000},
        "resources": {"gpus": int(args.device == "cuda")},
    }


def heldout_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> float:
    from finetune_trainer.evaluate import examples_from_chat, reference_nll

    total, count = reference_nll(model, tokenizer, examples_from_chat(rows), batch_size=16)
    return total / max(count, 1)


def run_trainer_arm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """This trainer, exactly as the train stage runs it (local run prefix instead of S3)."""
    from finetune_trainer import manifest, modeling, train
    from finetune_trainer.config import parse_config
    from finetune_trainer.logs import setup_logging

    setup_logging("WARNING")
    prefix = work / "run"
    data = work / "data"
    manifest.commit_dir(data, str(prefix / "data"), kind="dataset")
    os.environ["FTJ_WORKDIR"] = str(work / "scratch")
    config = parse_config({"runPrefix": str(prefix), "spec": _spec(args, args.base)})
    result = train.run(config)
    metrics = json.loads((prefix / "train" / "metrics.json").read_text())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = modeling.detect_device()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=device.dtype)
    if args.method != "full":
        model = PeftModel.from_pretrained(model, str(prefix / "model" / "adapter"))
    else:
        model = AutoModelForCausalLM.from_pretrained(prefix / "model" / "merged", dtype=device.dtype)
    model = model.to("cuda" if device.cuda else "cpu").eval()
    tokenizer = modeling.load_tokenizer(args.base)
    heldout = [json.loads(x) for x in (work / "heldout.jsonl").read_text().splitlines()]
    return {
        "tokens": metrics["tokens"],
        "seconds": metrics["runtimeSeconds"],
        "steps": result.summary["step"],
        "loss": heldout_loss(model, tokenizer, heldout),
        "trainLoss": metrics["finalLoss"],
    }


def run_hf_arm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Plain transformers Trainer + PEFT: tokenise, pad to the longest in the batch, no packing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(7)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype, attn_implementation="sdpa")
    if args.method != "full":
        model = get_peft_model(
            model,
            LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
            ),
        )
    rows = [json.loads(x) for x in (work / "data" / "train.jsonl").read_text().splitlines()]
    encoded = []
    for row in rows:
        enc = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = enc["input_ids"][: args.max_len]
        labels = [t if m else -100 for t, m in zip(ids, enc["assistant_masks"][: args.max_len], strict=True)]
        encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    real_tokens = [0]
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    class CountingTrainer(Trainer):  # type: ignore[misc]
        """Counts the real tokens of the batches it trains on (the data loader fetches one batch ahead)."""

        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            real_tokens[0] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    targs = TrainingArguments(
        output_dir=str(work / "hf-out"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        seed=7,
        data_seed=7,
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=False,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = CountingTrainer(model=model, args=targs, train_dataset=encoded, data_collator=collator)
    started = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - started
    heldout = [json.loads(x) for x in (work / "heldout.jsonl").read_text().splitlines()]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "tokens": real_tokens[0],
        "seconds": seconds,
        "steps": trainer.state.global_step,
        "loss": heldout_loss(model.eval(), tokenizer, heldout),
        "trainLoss": losses[-1] if losses else None,
    }


def worker(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    result = (run_trainer_arm if args.arm == "trainer" else run_hf_arm)(args, work)
    result["peakRssMiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        import torch

        result["peakGpuMiB"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


# --- models -----------------------------------------------------------------------------------------------


def build_gpu_shape(
    shape: str, out: Path, tokenizer_dir: Path, *, meta: bool = False, dtype: str = "bfloat16"
) -> tuple[int, Any]:
    """A random-weight model of ``shape`` saved to ``out``; returns (N non-embedding parameters, cfg)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = dict(SHAPES[shape])
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[fields.pop("arch")]
    torch.manual_seed(0)
    cfg = config_cls(
        **fields,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.device("meta" if meta else "cpu"):
        model = model_cls(cfg)
    n_embed = model.get_input_embeddings().weight.numel()
    if not cfg.tie_word_embeddings:
        n_embed += model.get_output_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - n_embed
    if not meta:
        model.to(getattr(torch, dtype)).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return n, cfg


def build_cpu_model(out: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        **CPU_SHAPE,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)


def peak_flops() -> tuple[str, float | None]:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


# --- orchestration ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b", help="GPU model shape")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps, both arms")
    parser.add_argument("--batch", type=int, default=None, help="examples per optimizer step, both arms")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same code path at toy scale: tiny model, 2 steps, 1 repeat",
    )
    # worker mode
    parser.add_argument("--arm", choices=["trainer", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        worker(args)
        return
    gpu = args.device == "cuda"
    if args.dry_run:
        import torch

        args.shape = "tiny" if gpu else args.shape
        args.steps, args.repeats, args.batch = 2, 1, args.batch or 4
        if gpu and not torch.cuda.is_available():
            print("dry run: no CUDA device here; running the GPU benchmark's code path on the CPU")
            args.device = "cpu"
    args.steps = args.steps or (40 if gpu else 24)
    args.repeats = args.repeats or (2 if gpu else 3)
    args.batch = args.batch or (16 if gpu else 8)
    args.examples = args.examples or (args.steps * args.batch + 64)
    args.lr = args.lr or (2e-4 if gpu else 2e-3)
    args.max_len = args.max_len or (2048 if gpu else 256)

    sys.path.insert(0, str(REPO / "dev" / "demo" / "src"))
    from finetune_demo import toymodel

    toy = toymodel.toy_base_model()
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        base = root / "base"
        n: int | None = None
        if gpu:
            n, _ = build_gpu_shape(
                args.shape, base, toy, dtype="bfloat16" if args.device == "cuda" else "float32"
            )
        else:
            build_cpu_model(base, toy)
        rows = make_rows(args.examples + 64, seed=3, long=gpu and not args.dry_run)
        (root / "data").mkdir()
        write_jsonl(root / "data" / "train.jsonl", rows[:-64])
        write_jsonl(root / "heldout.jsonl", rows[-64:])
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        lengths = [
            len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows
        ]
        print(
            f"{args.shape if gpu else 'cpu llama'} ({args.method}"
            + (f", N={n / 1e6:.1f}M non-embedding parameters" if n else "")
            + f"): {len(rows) - 64} examples, {min(lengths)}..{max(lengths)} tokens "
            f"(mean {statistics.mean(lengths):.0f}); both arms {args.steps} optimizer steps of {args.batch} "
            "examples (baseline pads each batch to its longest example, ours is padding-free)",
            flush=True,
        )
        results: dict[str, list[dict[str, Any]]] = {"trainer": [], "hf": []}
        for i in range(args.repeats):
            for arm in ("trainer", "hf") if i % 2 == 0 else ("hf", "trainer"):
                work = root / f"{arm}-{i}"
                work.mkdir()
                (work / "data").mkdir()
                (work / "data" / "train.jsonl").write_text((root / "data" / "train.jsonl").read_text())
                (work / "heldout.jsonl").write_text((root / "heldout.jsonl").read_text())
                cmd = [
                    sys.executable,
                    __file__,
                    "--arm",
                    arm,
                    "--work",
                    str(work),
                    "--base",
                    str(base),
                    "--device",
                    args.device,
                    "--method",
                    args.method,
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--lr",
                    str(args.lr),
                    "--max-len",
                    str(args.max_len),
                ]
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
                )
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
                    raise SystemExit(f"{arm} run {i} failed with exit code {proc.returncode}")
                res = json.loads(line[len("RESULT ") :])
                res["tokensPerSecond"] = res["tokens"] / res["seconds"]
                results[arm].append(res)
                print(
                    f"run {i} {arm:7s}: {res['tokensPerSecond']:9.1f} real tokens/s, "
                    f"{res['tokens']} tokens in "
                    f"{res['seconds']:.1f}s, {res['steps']} steps, held-out loss {res['loss']:.4f}, "
                    f"peak RSS {res['peakRssMiB']:.0f} MiB",
                    flush=True,
                )

    print()
    name, peak = peak_flops() if args.device == "cuda" else ("cpu", None)
    summary = {}
    for arm, label in (
        ("trainer", "this trainer (TRL SFT, padding-free)"),
        ("hf", "HF Trainer + PEFT (pad to longest)"),
    ):
        rs = results[arm]
        tps = statistics.median(r["tokensPerSecond"] for r in rs)
        loss = statistics.median(r["loss"] for r in rs)
        rss = max(r["peakRssMiB"] for r in rs)
        summary[arm] = (tps, loss)
        extra = ""
        if gpu:
            factor = 4 if args.method == "lora" else 6
            extra = f", MFU {tps * factor * n / peak:.1%} ({name})" if n and peak else f", MFU n/a ({name})"
        if args.device == "cuda":
            extra += f", peak GPU {max(r['peakGpuMiB'] for r in rs):.0f} MiB"
        print(
            f"{label:46s} {tps:9.1f} real tokens/s (median of {len(rs)}), peak RSS {rss:.0f} MiB, "
            f"final held-out loss {loss:.4f}{extra}"
        )
    loss_gap = abs(summary["trainer"][1] - summary["hf"][1]) / summary["hf"][1]
    print(f"final loss difference: {loss_gap:.2%} (target within 2%)")
    steps = {r["steps"] for arm in results.values() for r in arm}
    if steps != {args.steps}:
        raise SystemExit(f"the arms made different numbers of optimizer steps: {sorted(steps)}")
    print(
        f"trainer-vs-hf tokens/s ratio: {summary['trainer'][0] / summary['hf'][0]:.2f} "
        f"at equal optimizer steps ({args.steps} steps of {args.batch} examples, both arms)"
    )


if __name__ == "__main__":
    main()
