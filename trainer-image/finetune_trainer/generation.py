"""Local generation and teacher-forced loss for the evaluate stage (and safety and retention sets): greedy,
batched with left padding, the same code for every model so comparisons are fair."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from .termination import raise_if_preempted


class Example(Protocol):
    @property
    def prompt(self) -> list[dict[str, Any]]: ...

    @property
    def reference(self) -> str: ...


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
