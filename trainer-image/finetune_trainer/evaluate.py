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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_vocabulary.metrics import LOSS_METRICS, TEXT_METRICS
from finetune_vocabulary.objectives import REWARD_MARGIN, metrics_for

from . import (
    egress,
    formats,
    grading,
    manifest,
    metrics,
    modeling,
    plots,
    preference_eval,
    safety,
    storage,
    tracking,
)
from . import report as report_html
from .config import EvaluationSpec, ReferenceSpec, TrainerConfig
from .exitcodes import InvalidConfigError, InvalidDataError
from .generation import generate, reference_nll
from .logs import redact
from .termination import StageResult, raise_if_preempted

log = logging.getLogger(__name__)

REFERENCE_KEY_ENV = "FTJ_REFERENCE_API_KEY"


@dataclass(frozen=True)
class Example:
    prompt: list[dict[str, Any]]
    reference: str


def examples_from_chat(rows: Sequence[dict[str, Any]], source: str = "test.jsonl") -> list[Example]:
    out = []
    for number, row in enumerate(rows, 1):
        messages = row.get("messages") or []
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise InvalidDataError(f"{source} line {number}: no assistant turn to compare against")
        out.append(Example(messages[:last], str(messages[last].get("content", ""))))
    return out


def read_test_rows(data_uri: str, dest: Path, objective: str = "sft") -> list[dict[str, Any]]:
    """The committed held-out set, in its objective's canonical form (formats.read_canonical)."""
    if not manifest.is_committed(data_uri):
        raise InvalidDataError(f"{data_uri} is not committed: run validate first")
    manifest.download_committed(data_uri, dest)
    path = dest / "test.jsonl"
    if not path.is_file():
        raise InvalidDataError(f"{data_uri}/test.jsonl is missing: nothing held out to evaluate on")
    if objective == "sft":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = formats.read_canonical(path, objective)
    if not rows:
        raise InvalidDataError(f"{data_uri}/test.jsonl has no examples")
    return rows


def examples_for(rows: Sequence[dict[str, Any]], objective: str) -> list[Example]:
    """What every model answers: prompts and expected answers (preference_eval.generation_targets)."""
    if objective == "sft":
        return examples_from_chat(rows)
    examples = [
        Example(prompt, expected) for prompt, expected in preference_eval.generation_targets(rows, objective)
    ]
    if not examples:
        raise InvalidDataError("test.jsonl has no desirable (label true) example to compare answers with")
    return examples


def load_test_set(data_uri: str, dest: Path, objective: str = "sft") -> list[Example]:
    return examples_for(read_test_rows(data_uri, dest, objective), objective)


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
    model: Any, tokenizer: Any, work: Workload, ev: Any, adapter_uri: str, dest: Path, scored: Scored
) -> None:
    """The serving champion's adapter on the same base weights and prompts (champion/challenger)."""
    manifest.download_committed(adapter_uri, dest)
    model.load_adapter(str(dest), adapter_name="champion")
    model.set_adapter("champion")
    try:
        scored.local("champion", model, tokenizer, work, ev)
    finally:
        model.set_adapter("default")
        model.delete_adapter("champion")


@dataclass
class Workload:
    """What every local model answers: the held-out set, and the safety and retention sets when configured."""

    examples: list[Example]
    safety: list[Example] = field(default_factory=list)
    retention: list[Example] = field(default_factory=list)
    pairs: list[preference_eval.Pair] = field(default_factory=list)  # dpo/kto: scored by implicit reward


def load_workload(config: TrainerConfig, workdir: Path) -> Workload:
    ev, objective = config.spec.evaluation, config.spec.objective
    rows = read_test_rows(config.layout.data, workdir / "data", objective)
    work = Workload(examples_for(rows, objective), pairs=preference_eval.pairs_from_rows(rows, objective))
    if ev.safety is not None:
        prompts = safety.load_safety_prompts(ev.safety.prompts, workdir / "safety.jsonl")
        work.safety = [Example(p, "") for p in prompts]
    if ev.retention is not None:
        rows = safety.load_retention_rows(ev.retention.dataset, workdir / "retention.jsonl")
        work.retention = examples_from_chat(rows, "spec.evaluation.retention.dataset")
    return work


def score_extras(model: Any, tokenizer: Any, work: Workload, ev: EvaluationSpec) -> grading.Extras:
    """The safety answers and the retention figure (or answers, for a grader) of one loaded model."""
    extras = grading.Extras()
    size = {"max_new_tokens": ev.max_new_tokens, "batch_size": ev.batch_size}
    if work.safety:
        extras.safety = generate(model, tokenizer, work.safety, **size)
    if work.retention and ev.retention is not None:
        metric = ev.retention.metric
        if metric in LOSS_METRICS:
            nll = reference_nll(model, tokenizer, work.retention, batch_size=ev.batch_size)
            extras.retention_value = metrics.loss_metrics(*nll).get(metric, 0.0)
        else:
            extras.retention_answers = generate(model, tokenizer, work.retention, **size)
            if metric in TEXT_METRICS:
                expected = [e.reference for e in work.retention]
                extras.retention_value = metrics.score_text(extras.retention_answers, expected)[metric]
    return extras


@dataclass
class Scored:
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    answers: dict[str, list[str]] = field(default_factory=dict)
    extras: dict[str, grading.Extras] = field(default_factory=dict)
    logps: dict[str, preference_eval.Logps] = field(default_factory=dict)

    def local(self, name: str, model: Any, tokenizer: Any, work: Workload, ev: EvaluationSpec) -> None:
        """Score one loaded model: the held-out set (tuned, and base when compared), tuned/base extras, and
        the completions' log-probabilities of preference pairs (the base's are the reference's)."""
        if name != "base" or ev.compare_to_base:
            self.results[name], self.answers[name] = score_local(name, model, tokenizer, work.examples, ev)
        if name in ("tuned", "base"):
            self.extras[name] = score_extras(model, tokenizer, work, ev)
        if work.pairs:
            model.eval()
            self.logps[name] = preference_eval.completion_logps(
                model, tokenizer, work.pairs, batch_size=ev.batch_size
            )

    def add_preference(self, beta: float) -> list[dict[str, float]]:
        """preference_accuracy and reward_margin of every model with log-probabilities, against the base's
        (the reference); returns the tuned model's per-pair rewards (the report's)."""
        reference, tuned_rewards = self.logps.get("base"), []
        if reference is None:
            return []
        for name, logps in self.logps.items():
            per_pair = preference_eval.rewards(logps, reference, beta)
            tuned_rewards = per_pair if name == "tuned" else tuned_rewards
            if name in self.results and "error" not in self.results[name]:
                self.results[name].update(preference_eval.preference_metrics(per_pair))
        return tuned_rewards


def _needs_base(ev: EvaluationSpec, work: Workload) -> bool:
    # Safety and retention compare with the base model even when the held-out set does not; preference
    # pairs need it as the reference of the implicit reward.
    return ev.compare_to_base or ev.safety is not None or ev.retention is not None or bool(work.pairs)


def score_adapter(
    config: TrainerConfig, work: Workload, base_path: Path, workdir: Path, scored: Scored
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ev, device = config.spec.evaluation, modeling.detect_device()
    adapter_dir = workdir / "adapter"
    manifest.download_committed(config.layout.adapter, adapter_dir)
    tokenizer = modeling.load_tokenizer(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=device.dtype).to(
        "cuda" if device.cuda else "cpu"
    )
    tuned = PeftModel.from_pretrained(base, str(adapter_dir))
    scored.local("tuned", tuned, tokenizer, work, ev)
    if _needs_base(ev, work):
        with _adapter_disabled(tuned) as plain:
            scored.local("base", plain, tokenizer, work, ev)
    if config.champion is not None:
        score_champion(tuned, tokenizer, work, ev, config.champion.adapter, workdir / "champion", scored)


def score_merged(
    config: TrainerConfig, work: Workload, base_path: Path, workdir: Path, scored: Scored
) -> None:
    from transformers import AutoModelForCausalLM

    ev, device = config.spec.evaluation, modeling.detect_device()
    merged_dir = workdir / "merged"
    manifest.download_committed(config.layout.merged, merged_dir)
    tokenizer = modeling.load_tokenizer(merged_dir)
    dev = "cuda" if device.cuda else "cpu"
    tuned = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=device.dtype).to(dev)
    scored.local("tuned", tuned, tokenizer, work, ev)
    del tuned
    if _needs_base(ev, work):
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=device.dtype).to(dev)
        scored.local("base", base, tokenizer, work, ev)
        del base


def write_outputs(
    config: TrainerConfig,
    out: Path,
    work: Workload,
    scored: Scored,
    maps: dict[str, Any],
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
) -> None:
    ev, objective = config.spec.evaluation, config.spec.objective
    wanted = [*ev.metrics, *metrics_for(objective), *(g.name for g in ev.graders)]
    predictions = [
        {"prompt": e.prompt, "expected": e.reference, **{m: a[i] for m, a in scored.answers.items()}}
        for i, e in enumerate(work.examples)
    ]
    report = {
        "summary": summary,
        "metrics": list(ev.metrics),
        "graders": [g.name for g in ev.graders],
        "primaryMetric": config.spec.deciding_metric,
        "objective": objective,
        "maxNewTokens": ev.max_new_tokens,
        "baseModel": config.spec.base_model.uri,
        "method": config.spec.method,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "predictions.jsonl").write_text(
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    )
    (out / "report.md").write_text(
        markdown_report(config.job.name, maps, wanted, len(work.examples), predictions)
    )
    bounded = [*ev.metrics, *(m for m in metrics_for(objective) if m != REWARD_MARGIN)]  # in [0, 1]
    plots.comparison_chart(
        {m: s for m, s in maps.items() if s and "error" not in s}, bounded, out / "comparison.png"
    )
    report_html.write_reports(out, config.job.name, rows, summary)


def run(config: TrainerConfig) -> StageResult:
    spec, layout, ev = config.spec, config.layout, config.spec.evaluation
    done = finished_result(layout.evaluation)
    if done is not None:
        return done
    workdir = config.workdir / "evaluate"
    work = load_workload(config, workdir)
    source = storage.fetch_model(
        spec.base_model.uri, revision=spec.base_model.revision, dest=workdir / "base"
    )
    raise_if_preempted("evaluate")
    scored = Scored()
    if spec.method != "full" and manifest.is_committed(layout.adapter):
        score_adapter(config, work, source.path, workdir, scored)
    elif manifest.is_committed(layout.merged):
        score_merged(config, work, source.path, workdir, scored)
    else:
        raise InvalidConfigError(
            f"neither {layout.adapter} nor {layout.merged} is committed: train has not finished"
        )
    if ev.reference is not None:
        scored.results["reference"], ref_answers = score_reference(
            ev.reference, work.examples, ev, allow_plain_http=config.reference_policy.allow_plain_http_hosts
        )
        if ref_answers is not None:
            scored.answers["reference"] = ref_answers

    tuned_rewards = scored.add_preference(preference_eval.beta_of(spec.hyperparameters.beta))
    judged = grading.judge_all(
        config,
        work.examples,
        scored.answers,
        scored.extras,
        [e.prompt for e in work.safety],
        work.retention,
    )
    expected = [e.reference for e in work.examples]
    maps = grading.model_maps(config, scored.results, judged, scored.answers["tuned"], expected)
    summary = grading.summary(config, maps, judged, len(work.examples))
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = grading.report_rows(config, work.examples, scored.answers, judged)
    rows = grading.with_rewards(rows, work.pairs, tuned_rewards)
    write_outputs(config, out, work, scored, maps, summary, rows)
    meta = manifest.metadata_from_config(config, base_model_revision=source.revision)
    try:
        manifest.commit_dir(out, layout.evaluation, kind="evaluation", **meta)
    except manifest.AlreadyCommitted:
        log.info("%s already committed", layout.evaluation)
    primary = spec.deciding_metric
    base_value = (maps.get("base") or {}).get(primary)
    message = f"{primary}: tuned {maps['tuned'].get(primary)}" + (
        f" vs base {base_value}" if base_value is not None and ev.compare_to_base else ""
    )
    serves_merged = spec.method == "full" or not manifest.is_committed(layout.adapter)
    model_uri = layout.merged if serves_merged else layout.adapter
    tracker = tracking.log_evaluation(config, maps, out, model_uri, summary)
    return StageResult(tracking.with_tracking(summary, tracker), message)
