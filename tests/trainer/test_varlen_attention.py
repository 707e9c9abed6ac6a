"""The CPU attention for padding-free rows: each example attends causally to itself only, whichever of its
two strategies (one padded SDPA call for short examples, one call per example otherwise) runs."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from finetune_trainer import modeling  # noqa: E402


def per_example(query, key, value, bounds):  # type: ignore[no-untyped-def]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    parts = [
        sdpa(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True)
        for s, e in itertools.pairwise(bounds)
        if e > s
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)


@pytest.mark.parametrize("lengths", [[5, 7, 1, 17], [3], [9, 9, 9], [2, 300], [2, 2, 300]])
def test_varlen_attention_matches_attention_per_example(lengths: list[int]) -> None:
    torch.manual_seed(0)
    bounds = [0, *itertools.accumulate(lengths)]
    total = bounds[-1]
    q, k, v = (torch.randn(1, 2, total, 32, requires_grad=True) for _ in range(3))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    module = SimpleNamespace(training=True)

    ours, _ = modeling.sdpa_varlen_attention(module, q, k, v, None, position_ids=position_ids)
    expected = per_example(q, k, v, bounds)

    assert ours.shape == (1, total, 2, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_example_never_sees_another() -> None:
    torch.manual_seed(0)
    lengths = [4, 6]
    q, k, v = (torch.randn(1, 2, 10, 32) for _ in range(3))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    module = SimpleNamespace(training=False)
    before, _ = modeling.sdpa_varlen_attention(module, q, k, v, None, position_ids=position_ids)
    v2 = v.clone()
    v2[:, :, :4] += 100.0  # change only the first example's values
    after, _ = modeling.sdpa_varlen_attention(module, q, k, v2, None, position_ids=position_ids)
    torch.testing.assert_close(after[:, 4:], before[:, 4:])
    assert not torch.allclose(after[:, :4], before[:, :4])
