"""Is the toy task learned by recipe, or by luck? The part of `make demo` and the serving tests that decides
the answer (toy base + toy data + TOY_HYPERPARAMETERS through the train stage, then greedy decoding), run
with several training seeds.

    .venv/bin/python -m finetune_demo.robustness --runs 10

Each run trains with the train stage (``finetune_trainer.train.run``, the code the training Job runs; local
storage instead of S3) on one of two splits of the toy data:

- ``e2e``: the 300 training / 40 held-out examples the e2e tests upload (228 steps);
- ``demo``: examples/demo.yaml's, 16 of the 300 held out (284 training examples, 216 steps), the 16 chosen
  by the seed;

then asks the tuned model (greedy, as the tests and the demo ask vLLM with temperature 0) the questions the
tests and the demo ask, and scores held-out exact match. It prints one line per run with the margin of the
demo question's answer (log-probability of ``Q`` minus that of the runner-up token: a flip needs a change of
that size, far beyond vLLM-vs-transformers float differences), and a tally. Exit status 1 if any run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import toymodel

QUESTIONS = {"shout: 4 9 q 1": "Q", "shout: 7 c 2": "C"}  # the demo's and test_serving's questions
MIN_EXACT_MATCH = 0.95


def train_toy(
    base: Path, train_rows: list[dict[str, Any]], seed: int, work: Path, overrides: dict[str, Any]
) -> Path:
    """Train with the toy recipe through the train stage; returns the adapter directory."""
    from finetune_trainer import manifest, train
    from finetune_trainer.config import parse_config

    data, prefix = work / "data", work / "run"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    manifest.commit_dir(data, str(prefix / "data"), kind="dataset")
    os.environ["FTJ_WORKDIR"] = str(work / "scratch")
    spec = {
        "baseModel": {"uri": str(base)},
        "dataset": {"train": "toy://train.jsonl"},
        "method": "lora",
        "lora": dict(toymodel.TOY_LORA),
        "hyperparameters": {**toymodel.TOY_HYPERPARAMETERS, **overrides, "seed": seed},
        "resources": {"gpus": 0},
    }
    train.run(parse_config({"runPrefix": str(prefix), "spec": spec}))
    return prefix / "model" / "adapter"


def answer_margin(model: Any, tokenizer: Any, question: str) -> tuple[str, float]:
    """Greedy answer to ``question`` and the log-probability gap between its first token and the runner-up."""
    import torch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        logprobs = model(**prompt).logits[0, -1].log_softmax(-1)
        top = logprobs.topk(2).values
        output = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer.strip(), float(top[0] - top[1])


def one_run(base: Path, split: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    from finetune_trainer import modeling
    from finetune_trainer.evaluate import examples_from_chat, generate
    from finetune_trainer.metrics import exact_match
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train_rows, test_rows = toymodel.toy_task()
    if split == "demo":  # examples/demo.yaml uploads the 300 rows and holds out testSize 16 of them
        rows = list(train_rows)
        random.Random(seed).shuffle(rows)
        train_rows, test_rows = rows[16:], rows[:16]
    with tempfile.TemporaryDirectory(prefix="toy-robustness-") as tmp:
        adapter = train_toy(base, train_rows, seed, Path(tmp), overrides)
        tokenizer = modeling.load_tokenizer(base)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
        examples = examples_from_chat(test_rows)
        answers = generate(model, tokenizer, examples, max_new_tokens=4, batch_size=50)
        em = statistics.fmean(exact_match(a, e.reference) for a, e in zip(answers, examples, strict=True))
        asked = {q: answer_margin(model, tokenizer, q) for q in QUESTIONS}
    right = all(asked[q][0] == expected for q, expected in QUESTIONS.items())
    return {"split": split, "seed": seed, "em": em, "asked": asked, "ok": right and em >= MIN_EXACT_MATCH}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="seeds per split")
    parser.add_argument("--splits", nargs="*", default=["e2e", "demo"], choices=["e2e", "demo"])
    parser.add_argument("--first-seed", type=int, default=11, help="TOY_HYPERPARAMETERS' seed is 11")
    parser.add_argument("--hyperparameters", default="{}", help="JSON overriding TOY_HYPERPARAMETERS")
    args = parser.parse_args(argv)
    overrides = json.loads(args.hyperparameters)
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    logging.getLogger().setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    base = toymodel.toy_base_model()
    results = []
    for split in args.splits:
        for seed in range(args.first_seed, args.first_seed + args.runs):
            began = time.monotonic()
            r = one_run(base, split, seed, overrides)
            results.append(r)
            asked = ", ".join(f"{q!r} -> {a!r} (margin {m:.2f})" for q, (a, m) in r["asked"].items())
            print(
                f"{split} seed {seed}: held-out exact match {r['em']:.3f}; {asked}; "
                f"{'ok' if r['ok'] else 'FAILED'} ({time.monotonic() - began:.0f}s)",
                flush=True,
            )
    passed = sum(r["ok"] for r in results)
    margins = [m for r in results for _, m in r["asked"].values()]
    print(
        f"toy-robustness: {passed}/{len(results)} runs passed (held-out exact match >= {MIN_EXACT_MATCH} and "
        f"every question answered right); lowest exact match {min(r['em'] for r in results):.3f}, "
        f"smallest answer margin {min(margins):.2f} nats",
        flush=True,
    )
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
