"""``evaluate``: score the tuned model against its base (and optionally a reference API model) on the
held-out set, on the same prompts.

For each test conversation the prompt is everything before the last assistant turn and the reference is
that turn. Each model answers with batched greedy generation (left padding); answers are scored with
exact_match, token_f1 and rouge_l (metrics.py), and the reference answers' teacher-forced loss gives
loss/perplexity. A LoRA adapter is evaluated on the base weights already loaded (the base is scored with the
adapter disabled), so one copy of the weights serves both.

Writes ``report.json``, ``report.md``, ``comparison.png`` and ``predictions.jsonl`` to
``<runPrefix>/evaluation/`` (committed). The operator applies the gate; this stage only reports.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_vocabulary.metrics import LOSS_METRICS

from . import egress, manifest, metrics, modeling, plots, storage, tracking
from .config import EvaluationSpec, ReferenceSpec, TrainerConfig
from .exitcodes import InvalidConfigError, InvalidDataError
from .logs import redact
from .termination import StageResult, raise_if_preempted

log = logging.getLogger(__name__)

REFERENCE_KEY_ENV = "FTJ_REFERENCE_API_KEY"


@dataclass(frozen=True)
class Example:
    prompt: list[dict[str, Any]]
    reference: str


def examples_from_chat(rows: Sequence[dict[str, Any]]) -> list[Example]:
    out = []
    for number, row in enumerate(rows, 1):
        messages = row.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise InvalidDataError(f"test.jsonl line {number}: no assistant turn to compare against")
        out.append(Example(messages[:last], str(messages[last].get("content", ""))))
    return out


def load_test_set(data_uri: str, dest: Path) -> list[Example]:
    if not manifest.is_committed(data_uri):
        raise InvalidDataError(f"{data_uri} is not committed: run validate first")
    manifest.download_committed(data_uri, dest)
    path = dest / "test.jsonl"
    if not path.is_file():
        raise InvalidDataError(f"{data_uri}/test.jsonl is missing: nothing held out to evaluate on")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise InvalidDataError(f"{data_uri}/test.jsonl has no examples")
    return examples_from_chat(rows)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- local models -------------------------------------------------------------------------------------------


def generate(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers, batched with left padding (so every prompt ends where generation starts)."""
    import torch

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    for batch in _batches(examples, batch_size):
        raise_if_preempted("evaluate")
        prompts = [
            tokenizer.apply_chat_template(e.prompt, add_generation_prompt=True, tokenize=False) for e in batch
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers


def reference_nll(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int
) -> tuple[float, int]:
    """Summed NLL of the reference answers given their prompts (answer tokens only), and the token count."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _batches(examples, batch_size):
        rows = []
        for e in batch:
            prompt_ids = tokenizer.apply_chat_template(
                e.prompt, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            full_ids = tokenizer.apply_chat_template(
                [*e.prompt, {"role": "assistant", "content": e.reference}], tokenize=True, return_dict=False
            )
            answer = list(full_ids[len(prompt_ids) :])
            # Score the answer up to and including its end-of-turn token, not the template's trailing text.
            if tokenizer.eos_token_id in answer:
                answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
            full_ids = list(prompt_ids) + answer
            labels = [-100] * len(prompt_ids) + answer
            rows.append((list(full_ids), labels))
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=device)
        attention = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], device=device
        )
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(nll)
        count += int((shift_labels != -100).sum())
    return total, count


def score_local(
    name: str, model: Any, tokenizer: Any, examples: Sequence[Example], ev: EvaluationSpec
) -> tuple[dict[str, float], list[str]]:
    model.eval()
    answers = generate(model, tokenizer, examples, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
    scores = metrics.score_text(answers, [e.reference for e in examples])
    if set(LOSS_METRICS) & set(ev.metrics):
        scores.update(
            metrics.loss_metrics(*reference_nll(model, tokenizer, examples, batch_size=ev.batch_size))
        )
    log.info(
        "%s scored",
        name,
        extra={"fields": {"event": "scored", "model": name, **metrics.select(scores, ev.metrics)}},
    )
    return metrics.select(scores, ev.metrics), answers


# --- reference API model ------------------------------------------------------------------------------------


def _chat_completion(
    ref: ReferenceSpec,
    messages: list[dict[str, Any]],
    max_tokens: int,
    timeout: float,
    allowance: egress.PlainHttpAllowance,
) -> str:
    body = {"model": ref.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    key = os.environ.get(REFERENCE_KEY_ENV)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = ref.endpoint.rstrip("/") + "/chat/completions"
    doc = egress.post_json(url, body, allowance=allowance, headers=headers, timeout=timeout)
    return str(doc["choices"][0]["message"].get("content") or "").strip()


def score_reference(
    ref: ReferenceSpec,
    examples: Sequence[Example],
    ev: EvaluationSpec,
    *,
    timeout: float = 60.0,
    allow_plain_http: Sequence[str] = (),
) -> tuple[dict[str, Any], list[str] | None]:
    """Scores of the reference model, or ``{"error": ...}`` (the comparison is optional, never fatal).

    The key goes only to the endpoint itself, over https unless the operator allows plain http for the host
    (``allow_plain_http``), never to a metadata address, and never across a redirect (egress.py)."""
    allowance = egress.PlainHttpAllowance.parse(allow_plain_http)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(
                pool.map(
                    lambda e: _chat_completion(ref, e.prompt, ev.max_new_tokens, timeout, allowance), examples
                )
            )
    except (http.client.HTTPException, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        message = redact(f"reference model {ref.model} at {ref.endpoint}: {exc}")
        log.warning(message)
        return {"error": message[:300]}, None
    scores = metrics.score_text(answers, [e.reference for e in examples])
    return metrics.select(scores, ev.metrics), answers


# --- reports ------------------------------------------------------------------------------------------------


def markdown_report(
    job: str, results: dict[str, dict[str, Any]], wanted: Sequence[str], n: int, samples: list[dict[str, Any]]
) -> str:
    models = [m for m, s in results.items() if s and "error" not in s]
    lines = [
        f"# Evaluation of {job}",
        "",
        f"{n} held-out examples, greedy decoding, same prompts for every model.",
        "",
        "| metric | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for metric in wanted:
        cells = [f"{results[m][metric]:.4f}" if metric in results[m] else "-" for m in models]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    for m, s in results.items():
        if s and "error" in s:
            lines += ["", f"**{m}**: {s['error']}"]
    lines += [
        "",
        "## Samples",
        "",
        "| prompt | expected | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")[:80]

    for row in samples[:10]:
        lines.append(
            f"| {cell(row['prompt'][-1]['content'] if row['prompt'] else '')} | {cell(row['expected'])} | "
            + " | ".join(cell(row.get(m, "")) for m in models)
            + " |"
        )
    return "\n".join(lines) + "\n"


def finished_result(layout_uri: str) -> StageResult | None:
    if not manifest.is_committed(layout_uri):
        return None
    report = json.loads(storage.read_text(storage.join(layout_uri, "report.json")))
    return StageResult(report["summary"], "evaluation already committed")


@contextlib.contextmanager
def _adapter_disabled(model: Any) -> Iterator[Any]:
    with model.disable_adapter():
        yield model


def score_champion(
    model: Any, tokenizer: Any, examples: Sequence[Example], ev: Any, adapter_uri: str, dest: Path
) -> tuple[dict[str, Any], list[str]]:
    """The serving champion's adapter on the same base weights and prompts (champion/challenger)."""
    manifest.download_committed(adapter_uri, dest)
    model.load_adapter(str(dest), adapter_name="champion")
    model.set_adapter("champion")
    try:
        return score_local("champion", model, tokenizer, examples, ev)
    finally:
        model.set_adapter("default")
        model.delete_adapter("champion")


def run(config: TrainerConfig) -> StageResult:
    from transformers import AutoModelForCausalLM

    spec, layout, ev = config.spec, config.layout, config.spec.evaluation
    done = finished_result(layout.evaluation)
    if done is not None:
        return done
    workdir = config.workdir / "evaluate"
    examples = load_test_set(layout.data, workdir / "data")
    device = modeling.detect_device()
    source = storage.fetch_model(
        spec.base_model.uri, revision=spec.base_model.revision, dest=workdir / "base"
    )
    raise_if_preempted("evaluate")

    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    if spec.method != "full" and manifest.is_committed(layout.adapter):
        from peft import PeftModel

        adapter_dir = workdir / "adapter"
        manifest.download_committed(layout.adapter, adapter_dir)
        tokenizer = modeling.load_tokenizer(adapter_dir)
        base = AutoModelForCausalLM.from_pretrained(source.path, dtype=device.dtype).to(
            "cuda" if device.cuda else "cpu"
        )
        tuned = PeftModel.from_pretrained(base, str(adapter_dir))
        results["tuned"], answers["tuned"] = score_local("tuned", tuned, tokenizer, examples, ev)
        if ev.compare_to_base:
            with _adapter_disabled(tuned) as plain:
                results["base"], answers["base"] = score_local("base", plain, tokenizer, examples, ev)
        if config.champion is not None:
            results["champion"], answers["champion"] = score_champion(
                tuned, tokenizer, examples, ev, config.champion.adapter, workdir / "champion"
            )
        del tuned, base
    elif manifest.is_committed(layout.merged):
        merged_dir = workdir / "merged"
        manifest.download_committed(layout.merged, merged_dir)
        tokenizer = modeling.load_tokenizer(merged_dir)
        dev = "cuda" if device.cuda else "cpu"
        tuned = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=device.dtype).to(dev)
        results["tuned"], answers["tuned"] = score_local("tuned", tuned, tokenizer, examples, ev)
        del tuned
        if ev.compare_to_base:
            base = AutoModelForCausalLM.from_pretrained(source.path, dtype=device.dtype).to(dev)
            results["base"], answers["base"] = score_local("base", base, tokenizer, examples, ev)
            del base
    else:
        raise InvalidConfigError(
            f"neither {layout.adapter} nor {layout.merged} is committed: train has not finished"
        )

    if ev.reference is not None:
        results["reference"], ref_answers = score_reference(
            ev.reference, examples, ev, allow_plain_http=config.reference_policy.allow_plain_http_hosts
        )
        if ref_answers is not None:
            answers["reference"] = ref_answers

    predictions = [
        {"prompt": e.prompt, "expected": e.reference, **{m: a[i] for m, a in answers.items()}}
        for i, e in enumerate(examples)
    ]
    summary = {
        "tuned": results["tuned"],
        "base": results.get("base"),
        "reference": results.get("reference"),
        "champion": results.get("champion"),
        "championName": config.champion.name if config.champion is not None else None,
        "n": len(examples),
    }
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "summary": summary,
        "metrics": list(ev.metrics),
        "primaryMetric": ev.deciding_metric,
        "maxNewTokens": ev.max_new_tokens,
        "baseModel": spec.base_model.uri,
        "method": spec.method,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "predictions.jsonl").write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    )
    (out / "report.md").write_text(
        markdown_report(config.job.name, results, ev.metrics, len(examples), predictions)
    )
    plots.comparison_chart(
        {m: s for m, s in results.items() if s and "error" not in s}, ev.metrics, out / "comparison.png"
    )
    meta = manifest.metadata_from_config(config, base_model_revision=source.revision)
    try:
        manifest.commit_dir(out, layout.evaluation, kind="evaluation", **meta)
    except manifest.AlreadyCommitted:
        log.info("%s already committed", layout.evaluation)
    primary = ev.deciding_metric
    base_value = (results.get("base") or {}).get(primary)
    message = f"{primary}: tuned {results['tuned'].get(primary)}" + (
        f" vs base {base_value}" if base_value is not None else ""
    )
    serves_merged = spec.method == "full" or not manifest.is_committed(layout.adapter)
    tracker = tracking.log_evaluation(
        config, results, out, layout.merged if serves_merged else layout.adapter
    )
    return StageResult(tracking.with_tracking(summary, tracker), message)
