"""Trainer throughput: this trainer (TRL SFTTrainer, padding-free packing) vs a plain HF Trainer + PEFT
baseline (padding to the longest example in each batch, no packing).

Both arms get the same varied-length chat data, the same model, LoRA config, learning-rate schedule, seed and
number of optimizer steps (the baseline's batch holds as many examples as a packed row does on average), and
both put the loss on the answer tokens only. Each run is a fresh subprocess; the arms are interleaved
``--repeats`` times (order alternating). Reported per arm: real (non-padding) training tokens per second,
peak RSS, and the final loss (held-out answer loss after training, computed the same way for both). The last
line is ``trainer-vs-hf tokens/s ratio: <x>`` (median over repeats).

CPU (``make bench-trainer``): a small randomly initialised Llama (hidden 384, 4 layers, head_dim 64) with the
toy tokenizer from finetune_demo.toymodel; big enough that compute, not per-op overhead, dominates a step (on
the 64-wide toy model both arms measure Python overhead, which packing cannot remove).
GPU: ``--device cuda --shape qwen2.5-0.5b|qwen2.5-1.5b [--method lora|full]`` builds a randomly initialised
model of that shape in bf16 and also prints MFU (4N FLOPs/token for LoRA, 6N for full; N = parameters
without embeddings) against the GPU's dense bf16 peak. ``--dry-run`` only checks the setup (on CPU it builds
the GPU shape on the meta device and prints N and FLOPs/token).
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

# Qwen2.5 shapes (config.json of the released models), used with random weights.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
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


def make_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Chat examples with a long-tailed length distribution (most short, some long), like real SFT data."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = min(int(rng.lognormvariate(3.3, 0.9)) + 3, 220)
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


def _spec(args: argparse.Namespace, base_dir: str, batch: int) -> dict[str, Any]:
    return {
        "baseModel": {"uri": base_dir},
        "dataset": {"train": "bench://train.jsonl"},
        "method": args.method,
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "hyperparameters": {
            "epochs": 1,
            "maxSteps": args.steps,
            "batchSize": batch,
            "gradientAccumulationSteps": 1,
            "learningRate": args.lr,
            "maxSeqLength": args.pack_len,
            "warmupRatio": 0.1,
            "gradientCheckpointing": args.device == "cuda",
            "seed": 7,
            "packing": True,
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
    # one packed row holds as many tokens as the baseline's batch of `batch` examples does on average
    config = parse_config({"runPrefix": str(prefix), "spec": _spec(args, args.base, 1)})
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

    def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(features)
        real_tokens[0] += int(batch["attention_mask"].sum())
        return batch

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
        gradient_checkpointing=cuda,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=encoded, data_collator=counting_collator)
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


def build_gpu_shape(shape: str, out: Path, tokenizer_dir: Path, *, meta: bool = False) -> tuple[int, Any]:
    """A random-weight Qwen2 model of ``shape`` saved to ``out`` (bf16); returns (N non-embedding, cfg)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.device("meta" if meta else "cpu"):
        model = Qwen2ForCausalLM(cfg)
    n_embed = model.get_input_embeddings().weight.numel()
    if not cfg.tie_word_embeddings:
        n_embed += model.get_output_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - n_embed
    if not meta:
        model.to(torch.bfloat16).save_pretrained(out)
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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b", help="GPU model shape")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="baseline examples per step")
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-len", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="check the setup, train nothing")
    # worker mode
    parser.add_argument("--arm", choices=["trainer", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--pack-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.steps = args.steps or (60 if gpu else 24)
    args.batch = args.batch or 8
    args.examples = args.examples or (args.steps * args.batch + 64)
    args.lr = args.lr or (2e-4 if gpu else 2e-3)
    args.max_len = args.max_len or (2048 if gpu else 256)
    if args.arm:
        worker(args)
        return

    sys.path.insert(0, str(REPO / "dev" / "demo" / "src"))
    from finetune_demo import toymodel

    toy = toymodel.toy_base_model()
    if gpu and args.dry_run:
        n, _ = build_gpu_shape(args.shape, Path("unused"), toy, meta=True)
        factor = 4 if args.method == "lora" else 6
        name, peak = peak_flops()
        print(
            f"dry run: {args.shape} N={n / 1e6:.1f}M non-embedding parameters, {factor}N = "
            f"{factor * n / 1e9:.2f} GFLOPs/token ({args.method}); device {name}, peak bf16 {peak}"
        )
        return
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        if gpu:
            base = root / "base"
            n, _ = build_gpu_shape(args.shape, base, toy)
        else:
            base = root / "base"
            build_cpu_model(base, toy)
            n = None
        rows = make_rows(args.examples + 64, seed=3)
        (root / "data").mkdir()
        write_jsonl(root / "data" / "train.jsonl", rows[:-64])
        write_jsonl(root / "heldout.jsonl", rows[-64:])
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        lengths = [
            len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows
        ]
        # one packed row per step carries as many tokens as the baseline's batch does on average
        pack_len = round(args.batch * statistics.mean(lengths))
        print(
            f"{len(rows) - 64} examples, {min(lengths)}..{max(lengths)} tokens "
            f"(mean {statistics.mean(lengths):.0f}); "
            f"baseline batch {args.batch} examples padded to the longest, packed rows of {pack_len} tokens; "
            f"{args.steps} steps each",
            flush=True,
        )
        if args.dry_run:
            print(f"dry run: {len(rows) - 64} examples, base {base}; would run {args.repeats}x2 subprocesses")
            return
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
                    "--pack-len",
                    str(pack_len),
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
    name, peak = peak_flops() if gpu else ("cpu", None)
    summary = {}
    for arm, label in (
        ("trainer", "this trainer (TRL SFT, padding-free packing)"),
        ("hf", "HF Trainer + PEFT (pad to longest)"),
    ):
        rs = results[arm]
        tps = statistics.median(r["tokensPerSecond"] for r in rs)
        loss = statistics.median(r["loss"] for r in rs)
        rss = max(r["peakRssMiB"] for r in rs)
        summary[arm] = (tps, loss)
        extra = ""
        if gpu and n and peak:
            factor = 4 if args.method == "lora" else 6
            extra = f", MFU {tps * factor * n / peak:.1%} ({name})"
        if gpu:
            extra += f", peak GPU {max(r['peakGpuMiB'] for r in rs):.0f} MiB"
        print(
            f"{label:46s} {tps:9.1f} real tokens/s (median of {len(rs)}), peak RSS {rss:.0f} MiB, "
            f"final held-out loss {loss:.4f}{extra}"
        )
    loss_gap = abs(summary["trainer"][1] - summary["hf"][1]) / summary["hf"][1]
    print(f"final loss difference: {loss_gap:.2%} (target within 2%)")
    print(f"trainer-vs-hf tokens/s ratio: {summary['trainer'][0] / summary['hf'][0]:.2f}")


if __name__ == "__main__":
    main()
