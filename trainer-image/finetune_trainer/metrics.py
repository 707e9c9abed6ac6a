"""Text metrics for evaluation: exact match, token F1 and ROUGE-L, averaged over the held-out set.

All three compare the generated answer with the reference after collapsing whitespace; they are
case-sensitive (for structured outputs the exact text is what users consume). ROUGE-L is computed with the
maintained ``rouge-score`` package, given a whitespace tokenizer so that it agrees with the other two.
Loss and perplexity come from the model (teacher-forced NLL of the reference answer), see evaluate.py.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from finetune_vocabulary.metrics import TEXT_METRICS

__all__ = ["TEXT_METRICS", "loss_metrics", "score_text", "select"]


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _WhitespaceTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return normalize(text).split()


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    if not normalize(prediction) and not normalize(reference):
        return 1.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score_text(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact_match, token_f1 and rouge_l over aligned predictions and references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {name: 0.0 for name in TEXT_METRICS}
    rows = [
        (exact_match(p, r), token_f1(p, r), rouge_l(p, r))
        for p, r in zip(predictions, references, strict=True)
    ]
    n = len(rows)
    return {name: sum(row[i] for row in rows) / n for i, name in enumerate(TEXT_METRICS)}


def loss_metrics(nll_sum: float, n_tokens: int) -> dict[str, float]:
    """Mean per-token loss and its perplexity from a summed NLL."""
    if n_tokens <= 0:
        return {}
    loss = nll_sum / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def select(scores: dict[str, float], wanted: Iterable[str]) -> dict[str, float]:
    wanted = set(wanted)
    return {k: round(v, 6) for k, v in scores.items() if k in wanted}
