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


def _answer_row(tokenizer: Any, prompt: list[dict[str, Any]], answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer by the chat template, and labels marking the answer's tokens only."""
    prompt_ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    full_ids = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False
    )
    scored = list(full_ids[len(prompt_ids) :])
    # Score the answer up to and including its end-of-turn token, not the template's trailing text.
    if tokenizer.eos_token_id in scored:
        scored = scored[: scored.index(tokenizer.eos_token_id) + 1]
    return list(prompt_ids) + scored, [-100] * len(prompt_ids) + scored


def answer_logps(
    model: Any, tokenizer: Any, items: Sequence[tuple[list[dict[str, Any]], str]], *, batch_size: int
) -> list[tuple[float, int]]:
    """Per (prompt, answer): the summed log-probability of the answer's tokens given the prompt (teacher
    forced, the same tokens reference_nll scores), and how many tokens that is."""
    import torch

    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    for batch in _batches(items, batch_size):
        raise_if_preempted("evaluate")
        rows = [_answer_row(tokenizer, prompt, answer) for prompt, answer in batch]
        width, pad = max(len(ids) for ids, _ in rows), tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=device)
        attention = torch.tensor(
            [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows], device=device
        )
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows], device=device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        logps = torch.log_softmax(shift_logits, dim=-1)
        picked = logps.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        out.extend((float(s), int(n)) for s, n in zip(picked.sum(-1), mask.sum(-1), strict=True))
    return out


def reference_nll(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int
) -> tuple[float, int]:
    """Summed NLL of the reference answers given their prompts (answer tokens only), and the token count."""
    scored = answer_logps(
        model, tokenizer, [(e.prompt, e.reference) for e in examples], batch_size=batch_size
    )
    return -sum(logp for logp, _ in scored), sum(n for _, n in scored)
