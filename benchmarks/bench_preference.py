"""bench-quality's preference task: the train stage with ``objective: dpo`` (LoRA) vs a plain DPO loop.

Task: the demo's toy task as preference pairs (``shout: 3 7 k 2``: chosen ``K``, the right answer;
rejected ``k``, the letter as the base's pre-training taught it to answer), 96 training pairs, 40 held out,
on the demo's toy Llama (finetune_demo.toymodel; nothing is downloaded).

Arms, same recipe (the demo's LoRA rank 8 / alpha 16 on all linear layers, lr 1e-3 with the cosine schedule
and warmup, batches of 8 pairs, 24 steps, seed 11, beta 0.1), in one process:

- ``ours``: ``train.run`` with ``objective: dpo`` (TRL's DPOTrainer, as the training Job runs it);
- ``reference``: the ~30-line loop below: the same shuffle as the HF Trainer's sampler, right-padded pairs,
  the DPO loss spelled out, ``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` with sequence
  log-probabilities summed over the completion tokens, the reference being the same model with its adapter
  disabled; AdamW (fused, no weight decay), gradient clipping at 1.0 (the HF defaults ours inherits).

Both are scored by the same code on the held-out pairs: ``preference_accuracy`` (the implicit reward prefers
chosen, ties 1/2) and the mean DPO loss. The line ``quality-vs-reference preference ...`` gives both arms'
figures; targets: accuracy within 0.02, held-out DPO loss within 2 %.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

BETA = 0.1
SEED = 11
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0}
HYPERPARAMETERS = {
    "epochs": 2,
    "batchSize": 8,
    "gradientAccumulationSteps": 1,
    "learningRate": 1e-3,
    "maxSeqLength": 64,
    "gradientCheckpointing": False,
    "warmupRatio": 0.05,
}
TRAIN_PAIRS, TEST_PAIRS = 96, 40  # 96 / 8 x 2 epochs = 24 steps
ACCURACY_TOLERANCE, LOSS_TOLERANCE = 0.02, 0.02


def preference_task() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) pairs in the canonical preference form validate writes."""
    from finetune_demo import toymodel

    def pair(row: dict[str, Any]) -> dict[str, Any]:
        right = row["messages"][-1]["content"]
        return {"prompt": row["messages"][:-1], "chosen": right, "rejected": right.lower()}

    train, test = toymodel.toy_task(
        toymodel.ToyTaskParams(train_examples=TRAIN_PAIRS, test_examples=TEST_PAIRS)
    )
    return [pair(r) for r in train], [pair(r) for r in test]


# --- the same tokenisation and scoring for both arms -----------------------------------------------------


def encode(tokenizer: Any, prompt: list[dict[str, Any]], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the completion starts where prompt and prompt + answer diverge."""
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=True
    )
    p, f = head["input_ids"], full["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(p, f, strict=False)) if a != b), min(len(p), len(f)))
    return f[:n], f[n:]


def sequence_logps(model: Any, sequences: list[tuple[list[int], list[int]]]) -> Any:
    """Sum of log p(completion token) per (prompt, completion), one right-padded batch."""
    import torch

    width = max(len(p) + len(c) for p, c in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask, completion = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, c) in enumerate(sequences):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = True
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion[:, 1:]).sum(-1)


def pair_margins(model: Any, pairs: list[tuple[Any, Any]]) -> Any:
    """beta * ((pi_c - ref_c) - (pi_r - ref_r)) per pair; the reference is the model with its adapter off."""
    import torch

    sequences = [c for c, _ in pairs] + [r for _, r in pairs]
    policy = sequence_logps(model, sequences)
    with torch.no_grad(), model.disable_adapter():
        reference = sequence_logps(model, sequences)
    n = len(pairs)
    return BETA * ((policy[:n] - reference[:n]) - (policy[n:] - reference[n:]))


def score(model: Any, tokenizer: Any, test: list[dict[str, Any]]) -> dict[str, float]:
    import torch

    pairs = [
        (encode(tokenizer, r["prompt"], r["chosen"]), encode(tokenizer, r["prompt"], r["rejected"]))
        for r in test
    ]
    model.eval()
    with torch.no_grad():
        margins = pair_margins(model, pairs)
    accuracy = statistics.fmean(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins.tolist())
    return {
        "preference_accuracy": accuracy,
        "dpo_loss": float(-torch.nn.functional.logsigmoid(margins).mean()),
    }


# --- arm 1: the train stage ------------------------------------------------------------------------------


def run_ours(base: Path, work: Path) -> dict[str, Any]:
    from bench_quality import stage_config
    from finetune_trainer import modeling, train
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train_rows, test_rows = preference_task()
    config, prefix = stage_config(
        base,
        work,
        train_rows,
        test_rows,
        objective="dpo",
        lora=LORA,
        hyperparameters={**HYPERPARAMETERS, "seed": SEED, "beta": BETA},
    )
    result = train.run(config)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(prefix / "model" / "adapter")
    )
    return {"steps": result.summary["step"], **score(model, modeling.load_tokenizer(base), test_rows)}


# --- arm 2: a plain DPO loop -----------------------------------------------------------------------------


def run_reference(base: Path) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup, set_seed

    hp = HYPERPARAMETERS
    set_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")
    lora = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(model, lora)
    train_rows, test_rows = preference_task()
    pairs = [
        (encode(tokenizer, r["prompt"], r["chosen"]), encode(tokenizer, r["prompt"], r["rejected"]))
        for r in train_rows
    ]
    batch_size, steps = hp["batchSize"], math.ceil(len(pairs) / hp["batchSize"]) * hp["epochs"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp["learningRate"], weight_decay=0.0, fused=True)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(hp["warmupRatio"] * steps), steps)
    model.train()
    for epoch in range(hp["epochs"]):  # the HF Trainer's sampler: a permutation per epoch, seed + epoch
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        for start in range(0, len(order), batch_size):
            margins = pair_margins(model, [pairs[i] for i in order[start : start + batch_size]])
            loss = -torch.nn.functional.logsigmoid(margins).mean()  # the DPO loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    return {"steps": steps, **score(model, tokenizer, test_rows)}


def run(base: Path) -> str:
    """Both arms; returns the ``quality-vs-reference preference`` line (asserts the targets)."""
    import tempfile

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-quality-preference-") as tmp:
        ours = run_ours(base, Path(tmp))
    reference = run_reference(base)
    for arm, r in (("this trainer (train stage, dpo)", ours), ("plain DPO loop", reference)):
        print(
            f"  preference {arm:31s}: {r['steps']} steps, held-out preference_accuracy "
            f"{r['preference_accuracy']:.3f}, held-out DPO loss {r['dpo_loss']:.4f}",
            flush=True,
        )
    delta = ours["preference_accuracy"] - reference["preference_accuracy"]
    ratio = ours["dpo_loss"] / reference["dpo_loss"]
    line = (
        f"quality-vs-reference preference preference_accuracy: {ours['preference_accuracy']:.3f} "
        f"vs {reference['preference_accuracy']:.3f} (delta {delta:+.3f}) dpo_loss: {ours['dpo_loss']:.4f} "
        f"vs {reference['dpo_loss']:.4f} (ratio {ratio:.4f}) steps: {ours['steps']} vs {reference['steps']} "
        f"({time.monotonic() - began:.0f} s)"
    )
    assert ours["steps"] == reference["steps"], line
    assert abs(delta) <= ACCURACY_TOLERANCE, line
    assert abs(ratio - 1) <= LOSS_TOLERANCE, line
    return line
