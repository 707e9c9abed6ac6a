"""``validate`` stage: check, clean and split the dataset on CPU, before any GPU is requested.

Cleaning policy (also written into report.json):
  * Unusable lines are dropped and count as errors: invalid JSON, non-UTF-8 bytes, a value that is not an
    object, missing/empty/wrongly typed fields, unknown roles, no assistant turn, bad turn order, a line
    in another format than the file, a preference pair whose chosen and rejected are identical, and
    examples longer than ``maxSeqLength`` tokens (rendered with the base model's chat template; truncating
    would cut the answer; dpo/kto: the prompt with the longer side; grpo: the prompt as served plus
    ``maxCompletionLength``, TRL's default when unset).
  * The records must be in a format of ``spec.objective`` (sft: chat/completion/instruction, dpo:
    preference, kto: unpaired-preference, grpo: prompt-only); when most lines are not, the stage fails
    naming both formats (a few stray lines are line errors). kto reports its label balance and warns
    when either label is under 10 % of the training examples.
  * Exact duplicates and normalised duplicates (case, Unicode form, punctuation, whitespace) are dropped,
    keeping the first occurrence. Train examples whose prompt is also in the test or validation set
    (leakage) are dropped from train; validation examples whose prompt is in the test set are dropped from
    validation. These are cleaning, not errors.
  * A UTF-8 byte order mark is removed and reported as a warning.
  * A line over ``dataset.maxLineBytes`` (default 1 MiB) is an error for that line; lines are read with at
    most that many bytes in memory, so one huge line cannot exhaust the pod's memory.
  * The stage fails with INVALID_DATA when errors exceed ``dataset.maxErrorRate`` of all non-blank lines
    (default 0: any invalid line fails, the first ones listed by line number), when fewer than
    ``dataset.minTrainExamples`` (default 20) training examples remain, or when no usable test example
    remains. Fewer than ``dataset.recommendedTrainExamples`` (default 500) is a warning.
  * A requested testSize above ``dataset.maxTestFraction`` (default 20%) of the valid examples is reduced to
    it, with a warning, so training never has fewer examples than the held-out set.
Without a test file, a held-out test set is split off deterministically: examples are ordered by a seeded
hash of their normalised prompt (so equal prompts stay on one side), stratified by ``category``.

Writes ``<runPrefix>/data/{train,validation,test}.jsonl`` (the objective's canonical form,
records.CANONICAL_FORMAT; read back with formats.read_canonical) and ``report.json``,
committed with a manifest recording each input's ETag/VersionId.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from finetune_vocabulary import steps as step_count
from finetune_vocabulary.objectives import formats_for
from finetune_vocabulary.records import (
    CLEANING_KINDS,
    ERROR_KINDS,
    WARNING_KINDS,
    DatasetError,
    Example,
    Findings,
    ParsedFile,
    parse_file,
    read_lines,
)

from . import manifest, storage, tracking
from .config import BaseModelSpec, FineTuneSpec, TrainerConfig
from .exitcodes import InvalidConfigError, InvalidDataError
from .formats import (
    GRPO_DEFAULT_MAX_COMPLETION_LENGTH,
    chat_views,
    exact_key,
    normalised_key,
    prompt_key,
)
from .termination import StageResult, raise_if_preempted

log = logging.getLogger(__name__)

# What the tokenizer needs (never the weights).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
)


# --- tokens -------------------------------------------------------------------------------------------------


class TokenCounter(Protocol):
    """Tokens per example (chat template applied); with `prompt`, of the prompt only: the turns before the
    last assistant turn plus the generation prompt, as a serving engine receives it."""

    def __call__(self, examples: list[dict[str, Any]], *, prompt: bool = False) -> list[int]: ...


def load_token_counter(
    spec: BaseModelSpec, workdir: Path, where: str = "spec.baseModel"
) -> tuple[TokenCounter, str | None]:
    """Token counts with the base model's tokenizer and chat template (default template when it has none);
    errors name ``where`` (the assemble stage passes its own config's)."""
    try:
        source = storage.fetch_model(
            spec.uri,
            revision=spec.revision,
            allow_patterns=TOKENIZER_FILES,
            dest=workdir / "tokenizer",
        )
    except storage.NotFound as exc:
        raise InvalidConfigError(f"{where}.uri: {exc}") from None
    from transformers import AutoTokenizer

    from .formats import ensure_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as exc:
        raise InvalidConfigError(f"{where}.uri: cannot load a tokenizer from {spec.uri}: {exc}") from None
    if ensure_chat_template(tokenizer):
        log.info("base model has no chat template: using the default one")

    def count(examples: list[dict[str, Any]], *, prompt: bool = False) -> list[int]:
        texts = [
            tokenizer.apply_chat_template(_prompt(e["messages"]), tokenize=False, add_generation_prompt=True)
            if prompt
            else tokenizer.apply_chat_template(e["messages"], tokenize=False)
            for e in examples
        ]
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    return count, source.revision


def _prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The turns before the last assistant turn (what evaluate and the serving check send)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


def check_max_model_len(config: TrainerConfig, examples: Sequence[Example], counter: TokenCounter) -> None:
    """deployment.maxModelLen must hold every prompt plus evaluation.maxNewTokens: a longer one would be
    refused by the serving engine (or truncated), so the served model could not answer what was evaluated.
    Refused here, before any GPU, naming the longest prompt's line."""
    deployment, new_tokens = config.spec.deployment, config.spec.evaluation.max_new_tokens
    limit = deployment.max_model_len
    if not deployment.enabled or limit is None or not examples:
        return
    longest, tokens = examples[0], -1
    for start in range(0, len(examples), 256):
        chunk = examples[start : start + 256]
        views = [chat_views(e.data)[0] for e in chunk]
        for example, n in zip(chunk, counter(views, prompt=True), strict=True):
            if n > tokens:
                longest, tokens = example, n
    if tokens + new_tokens > limit:
        raise InvalidConfigError(
            f"spec.deployment.maxModelLen: {limit} tokens cannot hold {longest.file} line {longest.line}: "
            f"its prompt is {tokens} tokens (chat template applied) + evaluation.maxNewTokens {new_tokens} = "
            f"{tokens + new_tokens}; the serving engine would refuse it. Raise maxModelLen to at least "
            f"{tokens + new_tokens}, or shorten the prompts"
        )


def count_tokens(
    examples: list[Example], counter: TokenCounter, batch: int = 256, *, completion_budget: int = 0
) -> None:
    """Tokens per example (chat template applied): a chat; a prompt with the longer of its sides (dpo, kto);
    with ``completion_budget`` (grpo) the prompt as served plus that many completion tokens."""
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        if completion_budget:
            prompts = [chat_views(e.data)[0] for e in chunk]
            for example, n in zip(chunk, counter(prompts, prompt=True), strict=True):
                example.tokens = n + completion_budget
            continue
        views = [chat_views(e.data) for e in chunk]
        counts = iter(counter([v for vs in views for v in vs]))
        for example, vs in zip(chunk, views, strict=True):
            example.tokens = max(next(counts) for _ in vs)


# --- cleaning -----------------------------------------------------------------------------------------------


def drop_overlong(
    examples: list[Example], max_tokens: int, findings: Findings, completion_budget: int = 0
) -> list[Example]:
    kept = []
    for e in examples:
        if e.tokens <= max_tokens:
            kept.append(e)
        elif completion_budget:
            findings.add(
                e.file,
                e.line,
                "overlong",
                f"prompt {e.tokens - completion_budget} tokens + maxCompletionLength {completion_budget} = "
                f"{e.tokens} tokens > maxSeqLength {max_tokens}",
            )
        else:
            findings.add(e.file, e.line, "overlong", f"{e.tokens} tokens > maxSeqLength {max_tokens}")
    return kept


def completion_budget(config: TrainerConfig) -> int:
    """grpo: the completion tokens each prompt must leave room for (0 for the other objectives)."""
    return objective_completion_budget(
        config.spec.objective, config.spec.hyperparameters.max_completion_length
    )


def objective_completion_budget(objective: str, max_completion_length: int | None) -> int:
    """The rule of completion_budget on plain values (the assemble stage has no job spec)."""
    if objective != "grpo":
        return 0
    return max_completion_length or GRPO_DEFAULT_MAX_COMPLETION_LENGTH


LABEL_MIN_SHARE = 0.1  # kto: a label side under this share of the training examples is a warning


def label_balance(train: Sequence[Example]) -> tuple[dict[str, int], str | None]:
    """kto: desirable / undesirable counts of the training examples, and a warning when a side is thin."""
    desirable = sum(1 for e in train if e.data["label"] is True)
    labels = {"desirable": desirable, "undesirable": len(train) - desirable}
    side, n = min(labels.items(), key=lambda item: item[1])
    if not train or n >= LABEL_MIN_SHARE * len(train):
        return labels, None
    return labels, (
        f"kto label balance: {n} of {len(train)} training examples ({n / len(train):.1%}) are {side}, under "
        f"{LABEL_MIN_SHARE:.0%}; KTO learns from both desirable and undesirable examples"
    )


def drop_duplicates(examples: list[Example], findings: Findings) -> list[Example]:
    """Keep the first of each exact, then normalised, duplicate group."""
    first_exact: dict[str, int] = {}
    first_norm: dict[str, int] = {}
    kept = []
    for e in examples:
        ek, nk = exact_key(e.data), normalised_key(e.data)
        if ek in first_exact:
            findings.add(e.file, e.line, "duplicate", f"exact duplicate of line {first_exact[ek]}")
        elif nk in first_norm:
            findings.add(
                e.file, e.line, "near_duplicate", f"duplicate of line {first_norm[nk]} after normalising"
            )
        else:
            first_exact[ek], first_norm[nk] = e.line, e.line
            kept.append(e)
    return kept


def drop_leakage(examples: list[Example], held_out: Sequence[Example], findings: Findings) -> list[Example]:
    held = {prompt_key(e.data): e for e in held_out}
    kept = []
    for e in examples:
        other = held.get(prompt_key(e.data))
        if other is not None:
            findings.add(e.file, e.line, "leakage", f"prompt also in {other.file} line {other.line}")
        else:
            kept.append(e)
    return kept


def held_out_count(n: int, test_size: int | float | None) -> int:
    if test_size is None:
        k = min(200, max(1, round(0.1 * n)))
    elif test_size < 1:
        k = max(1, round(test_size * n))
    else:
        k = int(test_size)
    return min(k, n - 1)


def cap_held_out(k: int, n: int, max_fraction: float) -> tuple[int, str | None]:
    """Hold out at most ``max_fraction`` of the ``n`` valid examples (at least 1); a warning when reduced."""
    limit = max(1, math.floor(max_fraction * n))
    if k <= limit:
        return k, None
    return limit, (
        f"testSize {k} reduced to {limit} (dataset.maxTestFraction {max_fraction:.0%} of {n} valid "
        "examples), so training keeps more examples than the held-out set"
    )


def train_size_gate(train: int, minimum: int, recommended: int) -> tuple[str | None, str | None]:
    """(failure, warning): below the floor fails, naming both numbers; below the recommended size warns."""
    if train < minimum:
        return (
            f"only {train} training examples remain after cleaning and the held-out split, "
            f"fewer than dataset.minTrainExamples {minimum}"
        ), None
    if recommended and train < recommended:
        return None, (
            f"only {train} training examples; at least {recommended} are recommended "
            "(dataset.recommendedTrainExamples)"
        )
    return None, None


def split_held_out(examples: list[Example], k: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic, order-independent held-out split, stratified by category (largest remainder)."""

    def rank(e: Example) -> str:
        return hashlib.sha256(f"{seed}:{prompt_key(e.data)}".encode()).hexdigest()

    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.data.get("category", ""), []).append(e)
    n = len(examples)
    quotas = {c: k * len(g) / n for c, g in groups.items()}
    take = {c: math.floor(q) for c, q in quotas.items()}
    for c in sorted(quotas, key=lambda c: (take[c] - quotas[c], c))[: k - sum(take.values())]:
        take[c] += 1
    test_ids: set[int] = set()
    for c, group in groups.items():
        ordered = sorted(group, key=rank)
        # Equal prompts share a rank prefix; keep them together by cutting only between different prompts.
        chosen = ordered[: take[c]]
        while (
            chosen
            and len(chosen) < len(ordered)
            and prompt_key(ordered[len(chosen)].data) == prompt_key(chosen[-1].data)
        ):
            chosen.append(ordered[len(chosen)])
        test_ids.update(id(e) for e in chosen)
    train = [e for e in examples if id(e) not in test_ids]
    test = [e for e in examples if id(e) in test_ids]
    return train, test


def category_report(splits: dict[str, list[Example]], findings: Findings, train_name: str) -> dict[str, Any]:
    counts = {
        name: dict(sorted(Counter(e.data["category"] for e in ex if "category" in e.data).items()))
        for name, ex in splits.items()
    }
    train_counts = counts.get("train", {})
    if not train_counts:
        return {}
    report: dict[str, Any] = {"counts": counts}
    if len(train_counts) > 1:
        ratio = max(train_counts.values()) / min(train_counts.values())
        report["imbalanceRatio"] = round(ratio, 2)
        if ratio > 10:
            largest = max(train_counts, key=lambda c: train_counts[c])
            smallest = min(train_counts, key=lambda c: train_counts[c])
            findings.add(
                train_name,
                0,
                "category_imbalance",
                f"category {largest!r} has {train_counts[largest]} examples, "
                f"{smallest!r} only {train_counts[smallest]}",
            )
    return report


def estimate_training(train: list[Example], config: TrainerConfig) -> dict[str, Any]:
    """Tokens the training run will process (for the operator's GPU-hour estimate)."""
    hp = config.spec.hyperparameters
    epoch_tokens = sum(e.tokens for e in train)
    sequences = math.ceil(epoch_tokens / hp.max_seq_length) if hp.packing else len(train)
    world, accumulation = max(1, config.spec.resources.gpus), hp.gradient_accumulation_steps
    steps_per_epoch = step_count.steps_per_epoch(sequences, hp.batch_size, accumulation, world)
    tokens_per_step = epoch_tokens / steps_per_epoch
    # With maxSteps the Trainer runs exactly that many steps, cycling through epochs as needed.
    steps = step_count.total_steps(sequences, hp.batch_size, hp.epochs, accumulation, world, hp.max_steps)
    return {
        "tokensPerEpoch": epoch_tokens,
        "epochs": hp.epochs,
        "maxSteps": hp.max_steps,
        "stepsPerEpoch": steps_per_epoch,
        "estimatedSteps": steps,
        "trainTokens": round(tokens_per_step * steps),
    }


def token_stats(examples: list[Example]) -> dict[str, Any]:
    if not examples:
        return {"n": 0}
    tokens = sorted(e.tokens for e in examples)
    return {
        "n": len(tokens),
        "min": tokens[0],
        "max": tokens[-1],
        "mean": round(sum(tokens) / len(tokens), 1),
        "p95": tokens[min(len(tokens) - 1, math.ceil(0.95 * len(tokens)) - 1)],
        "total": sum(tokens),
    }


# --- the stage ----------------------------------------------------------------------------------------------


@dataclass
class Input:
    role: str  # train | validation | test
    uri: str
    name: str  # file name used in messages


def _inputs(config: TrainerConfig) -> list[Input]:
    ds = config.spec.dataset
    out = []
    names: set[str] = set()
    for role, uri in (("train", ds.train), ("validation", ds.validation), ("test", ds.test)):
        if not uri:
            continue
        name = uri.rstrip("/").rsplit("/", 1)[-1] or role
        out.append(Input(role, uri, name if name not in names else f"{role}:{name}"))
        names.add(name)
    return out


def _fetch_inputs(config: TrainerConfig, inputs: list[Input], local_dir: Path) -> dict[str, dict[str, Any]]:
    provenance: dict[str, dict[str, Any]] = {}
    for item in inputs:
        field_name = f"spec.dataset.{item.role}"
        try:
            info = storage.stat(item.uri)
            storage.download_file(item.uri, local_dir / f"{item.role}.jsonl")
        except storage.NotFound:
            raise InvalidConfigError(f"{field_name}: {item.uri} not found") from None
        except ValueError as exc:
            raise InvalidConfigError(f"{field_name}: {exc}") from None
        provenance[item.role] = {
            "uri": item.uri,
            "etag": info.etag,
            "versionId": info.version_id,
            "size": info.size,
            "sha256": storage.sha256_file(local_dir / f"{item.role}.jsonl"),
        }
    return provenance


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for e in examples:
            fh.write(json.dumps(e.data, ensure_ascii=False) + "\n")


def check_format_fits_objective(fmt: str, objective: str) -> None:
    """An explicit dataset.format must be one the objective trains on (the operator refuses it first)."""
    fits = formats_for(objective)
    if fmt != "auto" and fmt not in fits:
        raise InvalidConfigError(
            f"spec.dataset.format: {fmt} does not fit spec.objective {objective}, which needs "
            f"{' or '.join(fits)} (or auto)"
        )


def _failure(message: str, findings: Findings, summary: dict[str, Any]) -> InvalidDataError:
    first = findings.first([*ERROR_KINDS, *CLEANING_KINDS], 10)
    details = "; ".join(f.render() for f in first)
    return InvalidDataError(f"{message}{': ' + details if details else ''}", summary=summary)


def check_error_rate(
    parsed: dict[str, ParsedFile], findings: Findings, max_error_rate: float
) -> dict[str, Any]:
    """Raise InvalidDataError when the train file is empty or errors exceed the policy; else a summary."""
    total_lines = sum(pf.lines for pf in parsed.values())
    errors = sum(findings.of(ERROR_KINDS).values())
    error_rate = errors / total_lines if total_lines else 1.0
    summary: dict[str, Any] = {
        "format": parsed["train"].fmt,
        "lines": total_lines,
        "errors": findings.of(ERROR_KINDS),
        "errorRate": round(error_rate, 4),
    }
    if parsed["train"].lines == 0:
        raise InvalidDataError(f"{parsed['train'].name}: no examples (the file is empty)", summary=summary)
    if error_rate > max_error_rate:
        raise _failure(
            f"{errors} of {total_lines} lines unusable ({error_rate:.1%} > dataset.maxErrorRate "
            f"{max_error_rate:.0%})",
            findings,
            summary,
        )
    return summary


def _upload_failure_report(data_uri: str, findings: Findings, exc: InvalidDataError) -> None:
    """Leave the full findings where the data would go (uncommitted: nothing reads it as data)."""
    report = {
        "failed": exc.message,
        "summary": exc.summary,
        "errors": findings.as_report(ERROR_KINDS),
        "removed": findings.as_report(CLEANING_KINDS),
        "warnings": findings.as_report(WARNING_KINDS),
    }
    try:
        storage.write_text(
            storage.join(data_uri, "report.json"), json.dumps(report, indent=2, ensure_ascii=False)
        )
    except Exception as err:  # the exit code matters more than the report
        log.warning("could not upload the failure report: %s", err)


def parse_inputs(
    inputs: list[Input], local_dir: Path, spec: FineTuneSpec, findings: Findings
) -> dict[str, ParsedFile]:
    """Each fetched input parsed by the shared record parser; a file-level problem is INVALID_DATA."""
    parsed: dict[str, ParsedFile] = {}
    for item in inputs:
        with (local_dir / f"{item.role}.jsonl").open("rb") as fh:
            lines = read_lines(fh, spec.dataset.max_line_bytes)
            try:
                parsed[item.role] = parse_file(
                    lines, item.name, spec.dataset.format, findings, objective=spec.objective, role=item.role
                )
            except DatasetError as exc:
                raise InvalidDataError(str(exc)) from None
    return parsed


def run(config: TrainerConfig) -> StageResult:
    data_uri = config.layout.data
    existing = manifest.read_manifest(data_uri)
    if existing is not None:
        log.info("dataset already validated and committed at %s: reusing it", data_uri)
        report = json.loads(storage.read_text(storage.join(data_uri, "report.json")))
        return StageResult(
            summary=report["summary"], message="dataset already validated; reusing " + data_uri
        )

    spec = config.spec
    check_format_fits_objective(spec.dataset.format, spec.objective)
    work = config.workdir / "validate"
    (work / "input").mkdir(parents=True, exist_ok=True)
    inputs = _inputs(config)
    provenance = _fetch_inputs(config, inputs, work / "input")
    raise_if_preempted("validate")

    findings = Findings()
    parsed = parse_inputs(inputs, work / "input", spec, findings)
    fmt = parsed["train"].fmt

    try:
        # Fail fast on broken files, before loading the tokenizer; then again once over-length counts.
        summary = check_error_rate(parsed, findings, spec.dataset.max_error_rate)
        counter, tokenizer_revision = load_token_counter(spec.base_model, config.workdir)
        budget = completion_budget(config)
        for pf in parsed.values():
            count_tokens(pf.examples, counter, completion_budget=budget)
            pf.examples = drop_overlong(pf.examples, spec.hyperparameters.max_seq_length, findings, budget)
            pf.examples = drop_duplicates(pf.examples, findings)
        raise_if_preempted("validate")
        summary = check_error_rate(parsed, findings, spec.dataset.max_error_rate)
        error_rate = summary["errorRate"]

        test = parsed["test"].examples if "test" in parsed else None
        validation = parsed["validation"].examples if "validation" in parsed else None
        train = parsed["train"].examples
        if validation is not None and test is not None:
            validation = drop_leakage(validation, test, findings)
        held_out = (test or []) + (validation or [])
        train = drop_leakage(train, held_out, findings) if held_out else train
        warnings: list[str] = []
        if test is None:
            if len(train) < 2:
                raise _failure(
                    f"need at least 2 usable train examples to hold out a test set, found {len(train)}",
                    findings,
                    summary,
                )
            k, reduced = cap_held_out(
                held_out_count(len(train), spec.dataset.test_size), len(train), spec.dataset.max_test_fraction
            )
            warnings += [reduced] if reduced else []
            train, test = split_held_out(train, k, spec.hyperparameters.seed)
        if not train:
            raise _failure(f"no usable train example remains in {parsed['train'].name}", findings, summary)
        if not test:
            raise _failure(f"no usable test example remains in {parsed['test'].name}", findings, summary)
        too_few, few = train_size_gate(
            len(train), spec.dataset.min_train_examples, spec.dataset.recommended_train_examples
        )
        if too_few:
            raise _failure(too_few, findings, {**summary, "train": len(train), "test": len(test)})
        warnings += [few] if few else []
        if "test" in parsed and len(test) > len(train):
            # A given test file is the user's choice and is kept whole; say what it costs.
            warnings.append(
                f"the test file has {len(test)} examples, more than the {len(train)} training examples"
            )

    except InvalidDataError as exc:
        _upload_failure_report(data_uri, findings, exc)
        raise
    check_max_model_len(config, [*train, *(validation or []), *test], counter)

    labels: dict[str, int] | None = None
    if spec.objective == "kto":
        labels, thin = label_balance(train)
        warnings += [thin] if thin else []
    splits = {"train": train, **({"validation": validation} if validation is not None else {}), "test": test}
    categories = category_report(splits, findings, parsed["train"].name)
    estimate = estimate_training(train, config)
    summary = {
        "format": fmt,
        "train": len(train),
        "validation": len(validation or []),
        "test": len(test),
        "removed": findings.of(CLEANING_KINDS),
        "trainTokens": estimate["trainTokens"],
        "estimatedSteps": estimate["estimatedSteps"],
        "errors": findings.of(ERROR_KINDS),
        "errorRate": round(error_rate, 4),
        **({"labels": labels} if labels is not None else {}),
        **({"warnings": warnings} if warnings else {}),
    }
    report = {
        **({"objective": spec.objective} if spec.objective != "sft" else {}),
        "summary": summary,
        "policy": {
            "maxErrorRate": spec.dataset.max_error_rate,
            "maxLineBytes": spec.dataset.max_line_bytes,
            "minTrainExamples": spec.dataset.min_train_examples,
            "recommendedTrainExamples": spec.dataset.recommended_train_examples,
            "maxTestFraction": spec.dataset.max_test_fraction,
            "maxSeqLength": spec.hyperparameters.max_seq_length,
            "errorKinds": ERROR_KINDS,
            "cleaningKinds": CLEANING_KINDS,
            "heldOut": "given test file"
            if "test" in parsed
            else f"split from train by seeded hash of the prompt (seed {spec.hyperparameters.seed})",
        },
        "inputs": provenance,
        "formats": {role: pf.fmt for role, pf in parsed.items()},
        "errors": findings.as_report(ERROR_KINDS),
        "removed": findings.as_report(CLEANING_KINDS),
        "warnings": findings.as_report(WARNING_KINDS),
        "categories": categories,
        "tokens": {name: token_stats(ex) for name, ex in splits.items()},
        "estimate": estimate,
        "baseModel": {"uri": spec.base_model.uri, "revision": tokenizer_revision},
    }
    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        _write_jsonl(out / f"{name}.jsonl", examples)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    raise_if_preempted("validate")
    manifest.commit_dir(
        out,
        data_uri,
        kind="dataset",
        **manifest.metadata_from_config(config, base_model_revision=tokenizer_revision, dataset=provenance),
    )
    notes = findings.first([*ERROR_KINDS, *CLEANING_KINDS, *WARNING_KINDS], 5)
    message = (
        f"{len(train)} train / {len(validation or [])} validation / {len(test)} test examples ({fmt}), "
        f"~{estimate['trainTokens']} training tokens"
    )
    if warnings:
        message += "; warning: " + "; warning: ".join(warnings)
    if notes:
        message += "; " + "; ".join(f.render() for f in notes)
    tracker = tracking.log_validation(config, provenance, out / "report.json")
    return StageResult(summary=tracking.with_tracking(summary, tracker), message=message)
