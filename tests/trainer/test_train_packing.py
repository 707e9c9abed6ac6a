"""Batches are padding-free (the default: the batchSize examples of a micro-batch share one row) or packed
(opt-in: rows of maxSeqLength tokens); either way examples never attend to each other, and the loss covers
assistant tokens only."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from finetune_demo import toymodel
from finetune_trainer import modeling, sft
from finetune_trainer.config import parse_config

from .toy_fixtures import toy_base_dir, toy_config

__all__ = ["toy_base_dir"]


@pytest.fixture(scope="module", params=["padding-free", "packed"])
def packed(  # type: ignore[no-untyped-def]
    request: pytest.FixtureRequest, toy_base_dir: Path, tmp_path_factory: pytest.TempPathFactory
):
    from datasets import Dataset
    from trl import SFTTrainer

    hyperparameters: dict[str, object] = {"batchSize": 2, "maxSeqLength": 64}
    if request.param == "packed":
        hyperparameters.update(packing=True, maxSeqLength=128)  # rows of 128 tokens: 3-4 toy examples each
    else:
        hyperparameters["batchSize"] = 5
    cfg = parse_config(
        toy_config("/tmp/unused", str(toy_base_dir), method="full", hyperparameters=hyperparameters)
    )
    assert cfg.spec.hyperparameters.packing == (request.param == "packed"), "packing is opt-in"
    device = modeling.detect_device()
    tokenizer = modeling.load_tokenizer(toy_base_dir)
    model = modeling.load_model(toy_base_dir, cfg.spec, device)
    rows, _ = toymodel.toy_task(toymodel.ToyTaskParams(train_examples=12, test_examples=1))
    args = sft.sft_config(cfg, device, tmp_path_factory.mktemp("packing"), assistant_only=True)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    return model.eval(), tokenizer, batch


def _segments(position_ids):  # type: ignore[no-untyped-def]
    starts = [i for i, p in enumerate(position_ids.tolist()) if p == 0] + [len(position_ids)]
    return list(itertools.pairwise(starts))


def test_batch_is_one_row_without_padding(packed, request: pytest.FixtureRequest) -> None:  # type: ignore[no-untyped-def]
    _, _, batch = packed
    assert "attention_mask" not in batch, "padding-free: no padding, boundaries come from position_ids"
    assert batch["input_ids"].shape[0] == 1
    segments = len(_segments(batch["position_ids"][0]))
    if request.node.callspec.params["packed"] == "packed":
        assert segments >= 4, "several examples share each packed row, two rows a batch"
    else:
        assert segments == 5, "padding-free: exactly batchSize examples per micro-batch"


def test_loss_only_on_assistant_tokens(packed) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer, batch = packed
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    for start, end in _segments(batch["position_ids"][0]):
        trained = [int(t) for t, lab in zip(ids[start:end], labels[start:end], strict=True) if lab != -100]
        text = tokenizer.decode(trained)
        assert text.endswith("<|im_end|>") and len(text) == len("X<|im_end|>"), (
            text
        )  # the answer, and the stop


def test_packed_examples_do_not_attend_to_each_other(packed) -> None:  # type: ignore[no-untyped-def]
    import torch

    model, _, batch = packed
    assert model.config._attn_implementation == modeling.VARLEN_SDPA  # CPU: per-example causal SDPA
    ids, pos = batch["input_ids"], batch["position_ids"]
    as_trained = {k: v for k, v in batch.items() if k != "labels"}  # incl. TRL's cu_seq_lens
    with torch.inference_mode():
        together = model(**as_trained).logits[0]
        from_positions = model(input_ids=ids, position_ids=pos).logits[
            0
        ]  # boundaries from position_ids alone
        plain_causal = model(input_ids=ids).logits[0]  # what attending across examples would give
        segments = _segments(pos[0])
        for start, end in segments:
            alone = model(input_ids=ids[:, start:end]).logits[0]
            torch.testing.assert_close(together[start:end], alone, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(from_positions[start:end], alone, atol=1e-4, rtol=1e-4)
        start, end = segments[1]
        assert not torch.allclose(plain_causal[start:end], together[start:end], atol=1e-3)


def test_transformers_sdpa_with_packed_positions_agrees(packed, toy_base_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The stock SDPA path (dense block-diagonal mask) gives the same logits as the per-example one."""
    import torch
    from transformers import AutoModelForCausalLM

    model, _, batch = packed
    stock = AutoModelForCausalLM.from_pretrained(toy_base_dir, attn_implementation="sdpa").eval()
    stock.config.use_cache = False  # a cache disables transformers' packed-sequence detection
    with torch.inference_mode():
        ours = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        theirs = stock(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
