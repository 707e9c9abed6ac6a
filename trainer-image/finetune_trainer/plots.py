"""PNG charts: the training loss curve and the base/tuned/reference comparison (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune_vocabulary.metrics import LOSS_METRICS


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(
    log_history: Sequence[Mapping[str, Any]], path: str | Path, title: str = "training loss"
) -> Path:
    """Plot train (and eval, when present) loss against the optimizer step."""
    plt = _pyplot()
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), marker="o", markersize=3, label="train")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="s", markersize=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def comparison_chart(
    scores: Mapping[str, Mapping[str, float]], metrics: Sequence[str], path: str | Path
) -> Path:
    """Grouped bars: one group per bounded metric (0..1), one bar per model (base, tuned, reference)."""
    plt = _pyplot()
    bounded = [m for m in metrics if m not in LOSS_METRICS]
    models = [name for name in scores if scores[name]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    width = 0.8 / max(len(models), 1)
    for i, name in enumerate(models):
        values = [scores[name].get(m, 0.0) for m in bounded]
        xs = [j + i * width for j in range(len(bounded))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(bounded))], bounded)
    ax.set_ylim(0, 1.1)
    ax.set_title("held-out evaluation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
