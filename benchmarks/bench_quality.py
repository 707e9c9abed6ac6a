"""Recipe fidelity: this trainer vs a plain PEFT loop with the same recipe, on toy tasks built in code.

Two tasks on a briefly pre-trained small Llama (finetune_demo.toymodel with ``bench_base_params``: 256 wide,
head_dim 32, pre-trained in code on the ``find:`` pretext; nothing is downloaded). It is wider than the
demo's 64-wide base so that a step's matmuls, not Python per-op overhead, decide the speed, as they do for
any real model. Inputs have long-tailed lengths (log-normal, median 7 words, up to 48), as real chat data
does: the longest example of a batch is several times the median, so a padded batch spends much of its
compute on padding, which padding-free batching does not.

- ``classify``: chat reviews (``review: 3 7 k 2 9``); the assistant answers ``positive`` or ``negative``,
  decided by the one sentiment letter hidden among neutral digits (6 letters per label). 700 examples,
  100 held out; the recipe of the issue that asked for this benchmark (LoRA rank 16 / alpha 32 on all
  linear layers, lr 3e-3, 4 epochs, batches of 16: 152 steps; maxSeqLength 128).
- ``shout``: the demo's task (``shout: 3 7 k 2`` -> ``K``) with the demo's LoRA (rank 8 / alpha 16) and
  the classify recipe's batches of 16 and lr 3e-3 for 6 epochs (114 steps); 300 examples, 40 held out. (With
  the demo's batches of 8 and lr 5e-3 the held-out loss falls to ~0.01 within 2 epochs and then drifts on
  floating-point noise, up to ±8% between arms on one seed, so a ratio of two such numbers measures noise.)

Arms, same recipe (LoRA rank/alpha/targets, learning rate and cosine schedule, examples per optimizer step,
epochs, seed), side by side in one process:

- ``ours``: finetune_trainer's train stage, the code the training Job runs (``train.run`` with its typed
  config, local storage instead of S3): TRL SFTTrainer, padding-free batches, assistant-only loss.
- ``reference``: a plain PEFT loop (~40 lines below): shuffle (a permutation per epoch seeded with
  ``seed + epoch``, as the HF Trainer's sampler does), pad each batch to its longest example, AdamW (fused,
  the HF Trainer's default; betas 0.9/0.999, eps 1e-8, no weight decay), cosine schedule with the same
  warmup, loss = mean over the micro-batch's assistant tokens, gradient clipping at 1.0 (the HF defaults
  ours inherits). Same seed, same LoRA initialisation: both arms' first steps have the same loss to 5
  digits; later the trajectories part only through floating-point differences (padded vs padding-free
  kernels), which the classify task amplifies once it starts to learn (~step 50: the held-out loss of one
  seed can then end up to ~10% apart either way), hence several seeds.

Both are scored by the same code: held-out loss on the assistant tokens (finetune_trainer.evaluate's
``reference_nll``), exact match of greedy answers, and real (non-padding) training tokens per second.
The last line is ``quality-vs-reference em_delta: <min over tasks of mean(ours - reference EM)>
loss_ratio: <max over tasks of mean ours/reference held-out loss> speed_ratio: <min over tasks of
mean ours/reference tokens/s>``; targets em_delta >= -0.02, loss_ratio <= 1.02, speed_ratio >= 1.3.

``preference`` (bench_preference.py): the train stage with ``objective: dpo`` vs a plain DPO loop with the
loss spelled out, on toy preference pairs; its own line
``quality-vs-reference preference preference_accuracy: ... dpo_loss: ...`` (targets: accuracy within
0.02, held-out DPO loss within 2 %).

``--quick``: one task (shout), one seed, on the demo's 64-wide base instead of the bench's (the e2e tests
build that base anyway; the bench's takes ~2 minutes of CPU to pre-train on a clean clone): a fidelity check
at an equal recipe, whose speed figure says little (per-op overhead dominates that narrow a model).
tests/trainer/test_bench_quality.py runs it in ``make test``, and ``--tasks preference``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SEEDS = (11, 12, 13)
MARKERS = 6  # sentiment letters per label (13 each: EM ~0.66 after 152 steps; 6: 1.0)
MAX_WORDS = 48  # longest input (words besides the hidden letter); maxSeqLength 128 covers it


def bench_base_params() -> Any:
    """The bench's base: the toy Llama, wide enough that a step's matmuls, not per-op overhead, dominate
    (256 wide, head_dim 32; per-op overhead grows with depth as compute does, so 2 layers suffice),
    pre-trained on pretext inputs as long as the tasks'. Its vocabulary has a token for every letter after a
    space and for the classify answers, so both tasks are learned in every seed (held-out exact match 1.0),
    whatever the floating-point details of the machine that pre-trains it."""
    from finetune_demo import toymodel

    return toymodel.ToyModelParams(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=8,
        vocab_size=384,
        vocabulary_words=("positive", "negative"),
        pretext_examples=3000,
        pretext_epochs=6,
        pretext_learning_rate=1e-3,
        pretext_max_digits=MAX_WORDS,
    )


def long_tailed_length(rng: random.Random) -> int:
    """Words in one input: log-normal (median 7, mean ~11, a few near MAX_WORDS), like real chat data,
    where the longest example of a batch is several times its median."""
    return min(max(int(rng.lognormvariate(2.0, 0.9)), 1), MAX_WORDS)


# --- tasks ------------------------------------------------------------------------------------------------


def review_task(train: int = 600, test: int = 100, seed: int = 5) -> tuple[list[dict], list[dict]]:
    """(train, test) chat examples: one sentiment letter among neutral digits decides the label.

    The sentiment markers are single tokens of the toy base's vocabulary (``Ġk``) that its pretext training
    taught it to find among digits (toymodel's ``find:``), so the task is learnable from its features:
    LoRA has to map 6 letters to ``positive`` and 6 others to ``negative`` (one token each in the bench
    base's vocabulary: spelled letter by letter, 152 steps gave "negtiive" in both arms).
    (Markers spelled over several byte-level tokens, e.g. pseudo-words, are beyond this 2-layer base in
    152 steps: neither a plain loop nor this trainer got past chance with them.)
    """
    import string

    rng = random.Random(seed)
    letters = list(string.ascii_lowercase)
    rng.shuffle(letters)
    positive, negative = letters[:MARKERS], letters[MARKERS : 2 * MARKERS]
    rows, seen = [], set()
    while len(rows) < train + test:
        n_filler = long_tailed_length(rng)
        words = [rng.choice(string.digits) for _ in range(n_filler)]
        label = rng.choice(["positive", "negative"])
        words.insert(rng.randint(0, n_filler), rng.choice(positive if label == "positive" else negative))
        text = " ".join(words)
        if text in seen:
            continue
        seen.add(text)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"review: {text}"},
                    {"role": "assistant", "content": label},
                ]
            }
        )
    return rows[:train], rows[train:]


def shout_task(train: int = 300, test: int = 40, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """The demo's task (``shout: 3 7 k 2`` -> ``K``), with long-tailed input lengths."""
    from finetune_demo import toymodel

    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < train + test:
        n_digits = long_tailed_length(rng)
        digits = [rng.choice("0123456789") for _ in range(n_digits)]
        digits.insert(rng.randint(0, n_digits), rng.choice("abcdefghijklmnopqrstuvwxyz"))
        text = " ".join(digits)
        if text in seen:
            continue
        seen.add(text)
        rows.append(toymodel.task_example(text))
    return rows[:train], rows[train:]


@dataclass(frozen=True)
class Task:
    name: str
    rows: Any  # () -> (train, test)
    lora: dict[str, Any]
    hyperparameters: dict[str, Any]
    max_new_tokens: int


def tasks() -> dict[str, Task]:
    from finetune_demo import toymodel

    return {
        "classify": Task(
            "classify",
            review_task,
            {"rank": 16, "alpha": 32, "dropout": 0.0},
            {
                "epochs": 4,
                "batchSize": 16,
                "gradientAccumulationSteps": 1,
                "learningRate": 3e-3,
                "maxSeqLength": 128,
                "warmupRatio": 0.03,
                "gradientCheckpointing": False,
            },
            max_new_tokens=12,  # "positive" is 8 tokens of the toy vocabulary, then the end of turn
        ),
        "shout": Task(
            "shout",
            shout_task,
            dict(toymodel.TOY_LORA),
            # the demo's recipe with classify's batches and learning rate, 6 epochs (114 steps)
            {k: v for k, v in toymodel.TOY_HYPERPARAMETERS.items() if k != "seed"}
            | {"epochs": 6, "batchSize": 16, "learningRate": 3e-3, "maxSeqLength": 128},
            max_new_tokens=4,
        ),
    }


# --- scoring (the same for both arms) ---------------------------------------------------------------------


def score(model: Any, tokenizer: Any, test: list[dict], max_new_tokens: int) -> dict[str, float]:
    from finetune_trainer.evaluate import examples_from_chat, generate, reference_nll
    from finetune_trainer.metrics import exact_match

    model.eval()
    examples = examples_from_chat(test)
    total, count = reference_nll(model, tokenizer, examples, batch_size=32)
    answers = generate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=50)
    em = statistics.fmean(exact_match(a, e.reference) for a, e in zip(answers, examples, strict=True))
    return {"loss": total / max(count, 1), "em": em}


# --- arm 1: this trainer, as the training Job runs it ---------------------------------------------------


class ProgressRecorder:
    """Receives the train stage's progress events (as the operator reads them) with their arrival time."""

    def __init__(self) -> None:
        import logging

        self.events: list[tuple[float, dict[str, Any]]] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.events.append(  # type: ignore[method-assign]
            (time.monotonic(), dict(getattr(record, "fields", {})))
        )

    def __enter__(self) -> ProgressRecorder:
        import logging

        events = logging.getLogger("finetune_trainer.events")
        events.addHandler(self.handler)
        events.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        import logging

        logging.getLogger("finetune_trainer.events").removeHandler(self.handler)

    def steady_tokens_per_second(self) -> float:
        """Real tokens/s from the end of step 1 to the last step's log line (both arms exclude the first
        step's warm-up; ours also excludes its end-of-training checkpoint commit, which the loop lacks)."""
        progress = [(t, e) for t, e in self.events if e.get("event") == "progress"]
        began = progress[0][0]  # on_train_begin
        tokens = [(t, e["step"], e["tokensPerSecond"] * (t - began)) for t, e in progress]
        first = next(x for x in tokens if x[1] >= 1)
        last = next(x for x in tokens if x[1] == progress[-1][1]["totalSteps"])
        return (last[2] - first[2]) / (last[0] - first[0])


def stage_config(
    base: Path, work: Path, train_rows: list[dict[str, Any]], test_rows: list[dict[str, Any]], **fields: Any
) -> tuple[Any, Path]:
    """The splits committed under a run prefix as validate commits them, and the train stage's config (LoRA
    on CPU, no checkpoints; ``fields`` add to the spec): what ``train.run`` reads in the training Job."""
    from finetune_trainer import manifest
    from finetune_trainer.config import parse_config

    data, prefix = work / "data", work / "run"
    data.mkdir(parents=True)
    for name, rows in (("train.jsonl", train_rows), ("test.jsonl", test_rows)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest.commit_dir(data, str(prefix / "data"), kind="dataset")
    os.environ["FTJ_WORKDIR"] = str(work / "scratch")
    spec = {
        "baseModel": {"uri": str(base)},
        "dataset": {"train": "bench://train.jsonl"},
        "method": "lora",
        "checkpoint": {"everySteps": 100000, "everyMinutes": 100000},
        "resources": {"gpus": 0},
        **fields,
    }
    return parse_config({"runPrefix": str(prefix), "spec": spec}), prefix


def run_ours(base: Path, task: Task, seed: int, work: Path) -> dict[str, Any]:
    from finetune_trainer import modeling, train
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train_rows, test_rows = task.rows()
    config, prefix = stage_config(
        base,
        work,
        train_rows,
        test_rows,
        lora=task.lora,
        hyperparameters={**task.hyperparameters, "seed": seed},
        evaluation={"maxNewTokens": task.max_new_tokens},
    )
    with ProgressRecorder() as recorder:
        result = train.run(config)
    metrics = json.loads((prefix / "train" / "metrics.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base)
    model = PeftModel.from_pretrained(model, str(prefix / "model" / "adapter"))
    scores = score(model, modeling.load_tokenizer(base), test_rows, task.max_new_tokens)
    return {
        "steps": result.summary["step"],
        "tokensPerSecond": recorder.steady_tokens_per_second(),
        "trainLoss": metrics["finalLoss"],  # what status.progress.loss shows: the same tokens as "loss"
        **scores,
    }


# --- arm 2: a plain PEFT loop -----------------------------------------------------------------------------


def run_reference(base: Path, task: Task, seed: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        get_cosine_schedule_with_warmup,
        set_seed,
    )

    hp, lora = task.hyperparameters, task.lora
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")
    peft_config = LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules="all-linear"
    )
    model = get_peft_model(model, peft_config)
    train_rows, test_rows = task.rows()
    encoded = []
    for row in train_rows:
        enc = tokenizer.apply_chat_template(
            row["messages"], return_dict=True, return_assistant_tokens_mask=True
        )
        ids = enc["input_ids"]
        encoded.append((ids, [t if m else -100 for t, m in zip(ids, enc["assistant_masks"], strict=True)]))
    batch_size = hp["batchSize"]
    steps = math.ceil(len(encoded) / batch_size) * hp["epochs"]
    if hp.get("maxSteps"):
        steps = hp["maxSteps"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp["learningRate"], weight_decay=0.0, fused=True)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(hp["warmupRatio"] * steps), steps)
    step, real_tokens, epoch = 0, 0, 0
    model.train()
    started = time.monotonic()  # reset after step 1: both arms measure from the end of the first step
    while step < steps:
        # the shuffle of the HF Trainer's sampler: a fresh permutation per epoch, seeded with seed + epoch
        order = torch.Generator().manual_seed(seed + epoch)
        permutation = torch.randperm(len(encoded), generator=order).tolist()
        epoch += 1
        for start in range(0, len(permutation), batch_size):
            batch = [encoded[i] for i in permutation[start : start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            real_tokens += int(mask.sum())
            step += 1
            if step == 1:
                started, real_tokens = time.monotonic(), 0
            if step == steps:
                break
    seconds = time.monotonic() - started
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    scores = score(model, tokenizer, test_rows, task.max_new_tokens)
    return {"steps": step, "tokensPerSecond": real_tokens / seconds, **scores}


# --- orchestration ----------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    task: str
    ours: list[dict[str, Any]] = field(default_factory=list)
    reference: list[dict[str, Any]] = field(default_factory=list)

    def mean(self, arm: str, key: str) -> float:
        return statistics.fmean(r[key] for r in getattr(self, arm))

    @property
    def em_delta(self) -> float:
        return self.mean("ours", "em") - self.mean("reference", "em")

    @property
    def loss_ratio(self) -> float:
        return self.mean("ours", "loss") / self.mean("reference", "loss")

    @property
    def speed_ratio(self) -> float:
        return self.mean("ours", "tokensPerSecond") / self.mean("reference", "tokensPerSecond")


def quiet() -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def run(task_names: list[str], seeds: tuple[int, ...], base: Path) -> list[TaskResult]:
    import torch

    torch.set_num_threads(1)  # both arms alike; on a shared machine two spinning OpenMP threads only lose
    quiet()
    results = []
    all_tasks = tasks()
    for name in task_names:
        task, result = all_tasks[name], TaskResult(name)
        for seed in seeds:
            with tempfile.TemporaryDirectory(prefix=f"bench-quality-{name}-") as tmp:
                # alternate which arm runs first, so neither always gets the warmer machine
                arms = [("ours", None), ("reference", None)]
                if seed % 2:
                    arms.reverse()
                for arm, _ in arms:
                    if arm == "ours":
                        result.ours.append(run_ours(base, task, seed, Path(tmp)))
                    else:
                        result.reference.append(run_reference(base, task, seed))
            for arm in ("ours", "reference"):
                r = getattr(result, arm)[-1]
                print(
                    f"  {name} seed {seed} {arm:9s}: {r['steps']} steps, held-out loss {r['loss']:.4f}, "
                    f"exact match {r['em']:.3f}, {r['tokensPerSecond']:.0f} real tokens/s"
                    + (
                        f" (final training loss {r['trainLoss']:.4f})"
                        if r.get("trainLoss") is not None
                        else ""
                    ),
                    flush=True,
                )
        results.append(result)
    return results


def report(results: list[TaskResult]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r.task} (mean of {len(r.ours)} seeds):")
        for arm, label in (("ours", "this trainer (train stage)"), ("reference", "plain PEFT loop")):
            lines.append(
                f"  {label:28s} optimizer steps {statistics.fmean(x['steps'] for x in getattr(r, arm)):.0f}, "
                f"held-out loss {r.mean(arm, 'loss'):.4f}, exact match {r.mean(arm, 'em'):.3f}, "
                f"{r.mean(arm, 'tokensPerSecond'):.0f} real tokens/s"
            )
    em_delta = min(r.em_delta for r in results)
    loss_ratio = max(r.loss_ratio for r in results)
    speed_ratio = min(r.speed_ratio for r in results)
    lines.append(
        f"quality-vs-reference em_delta: {em_delta:+.3f} loss_ratio: {loss_ratio:.3f} "
        f"speed_ratio: {speed_ratio:.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one task (shout), one seed, the demo's base")
    parser.add_argument("--tasks", nargs="*", default=None, choices=[*sorted(tasks()), "preference"])
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "dev" / "demo" / "src"))
    from finetune_demo import toymodel

    names = args.tasks or (["shout"] if args.quick else ["classify", "shout", "preference"])
    seeds = SEEDS[:1] if args.quick else SEEDS
    sft = [n for n in names if n != "preference"]
    if sft:
        base = toymodel.toy_base_model() if args.quick else toymodel.toy_base_model(bench_base_params())
        print(
            f"bench-quality: tasks {', '.join(sft)} x seeds {list(seeds)} on the toy Llama {base.name} "
            f"(load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        began = time.monotonic()
        results = run(sft, seeds, base)
        print(f"(took {time.monotonic() - began:.0f} s; load average {os.getloadavg()[0]:.1f} at the end)")
        print(report(results), flush=True)
    if "preference" in names:
        sys.path.insert(0, str(REPO / "benchmarks"))
        import bench_preference
        import torch

        torch.set_num_threads(1)
        quiet()
        print("bench-quality: preference (dpo) on the demo's toy Llama", flush=True)
        print(bench_preference.run(toymodel.toy_base_model()), flush=True)


if __name__ == "__main__":
    main()
