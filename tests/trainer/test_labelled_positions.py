"""The LM head runs only where the next token is labelled, and the loss and gradients stay what they were."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from finetune_trainer.sft import labelled_positions_only  # noqa: E402


def tiny_llama() -> object:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
    )
    return transformers.LlamaForCausalLM(config)


def chat_like_labels(input_ids: object, answers: list[tuple[int, int]]) -> object:
    """Labels -100 except the ``(start, end)`` answer spans of each row."""
    labels = torch.full_like(input_ids, -100)
    for row, (start, end) in enumerate(answers):
        labels[row, start:end] = input_ids[row, start:end]
    return labels


@pytest.mark.parametrize(
    "answers",
    [[(20, 24)], [(5, 7)], [(3, 6), (10, 30)]],
    ids=["one row", "answer at the start", "two rows, different spans"],
)
def test_loss_and_gradients_equal_the_full_lm_head(answers: list[tuple[int, int]]) -> None:
    model = tiny_llama()
    input_ids = torch.randint(0, 97, (len(answers), 32))
    labels = chat_like_labels(input_ids, answers)
    items = torch.tensor(int((labels[:, 1:] != -100).sum()))

    def loss_and_grads(**extra: object) -> tuple[float, list[object]]:
        model.zero_grad()
        loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=items, **extra).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full_loss, full_grads = loss_and_grads()
    kept = labelled_positions_only(labels)
    kept_loss, kept_grads = loss_and_grads(**kept)

    assert kept_loss == pytest.approx(full_loss, rel=1e-6)
    assert len(kept_grads) == len(full_grads)
    for a, b in zip(kept_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_only_positions_before_a_labelled_token_are_kept() -> None:
    input_ids = torch.arange(12).unsqueeze(0)
    labels = chat_like_labels(input_ids, [(8, 11)])

    kept = labelled_positions_only(labels)

    # position p predicts token p + 1: tokens 8, 9, 10 are labelled, so positions 7, 8, 9 need logits
    assert kept["logits_to_keep"].tolist() == [7, 8, 9]
    assert kept["shift_labels"].tolist() == [[8, 9, 10]]


def test_models_without_logits_to_keep_get_the_full_head() -> None:
    from finetune_trainer.sft import accepts_kept_logits
    from peft import LoraConfig, get_peft_model

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids: object, labels: object = None) -> None: ...

    assert accepts_kept_logits(tiny_llama())
    assert accepts_kept_logits(get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear")))
    assert not accepts_kept_logits(NoKeep())
