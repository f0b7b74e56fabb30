"""Chunked selective log-softmax and entropy against the naive float32 computation."""

import math

import pytest
import torch

from vlm_grpo_ma.algorithms import entropy_from_logits, naive_log_softmax_gather, selective_log_softmax


def test_hand_values():
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])
    index = torch.tensor([[1, 0]])
    out = selective_log_softmax(logits, index, chunk_size=1)
    torch.testing.assert_close(out, torch.tensor([[math.log(0.75), math.log(0.5)]]))
    assert out.dtype == torch.float32
    # entropy of [1/4, 3/4] and of a uniform pair
    h = entropy_from_logits(logits)
    torch.testing.assert_close(h, torch.tensor([[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)]]))
    torch.testing.assert_close(entropy_from_logits(torch.zeros(3, 7)), torch.full((3,), math.log(7.0)))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_float32_matches_naive_values_and_grads(chunk_size):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=gen) * 3).requires_grad_()
    index = torch.randint(0, 50, (2, 7), generator=gen)
    upstream = torch.randn(2, 7, generator=gen)
    ours = selective_log_softmax(logits, index, chunk_size=chunk_size)
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), logits)
    ref = naive_log_softmax_gather(logits, index)
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), logits)
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-6)


def test_bfloat16_matches_naive_upcast():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 5, 1000, generator=gen) * 4).to(torch.bfloat16).requires_grad_()
    index = torch.randint(0, 1000, (3, 5), generator=gen)
    upstream = torch.randn(3, 5, generator=gen)
    ours = selective_log_softmax(logits, index, chunk_size=4)
    assert ours.dtype == torch.float32
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), logits)
    ref = naive_log_softmax_gather(logits, index)  # log_softmax(logits.float()).gather
    (g_ref,) = torch.autograd.grad((ref * upstream).sum(), logits)
    assert g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    # both compute the gradient in float32 and round it to bf16: equal up to one bf16 rounding step
    torch.testing.assert_close(g_ours.float(), g_ref.float(), rtol=1e-2, atol=1e-6)
    # and both are far more precise than a log-softmax done in bf16 itself
    bf16_naive = torch.log_softmax(logits.detach(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1).float()
    assert (ours - ref).abs().max() < (bf16_naive - ref).abs().max()


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 6, (2, 3), generator=gen)
    assert selective_log_softmax(logits, index).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: selective_log_softmax(x, index, chunk_size=4), (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, chunk_size=4), (logits,))


def test_inputs_not_modified_and_shape_errors():
    logits = torch.randn(4, 9, requires_grad=True)
    before = logits.detach().clone()
    index = torch.tensor([0, 3, 8, 2])
    selective_log_softmax(logits, index, chunk_size=3).sum().backward()
    assert torch.equal(logits.detach(), before)
    with pytest.raises(ValueError):
        selective_log_softmax(logits, index[:3])
    with pytest.raises(ValueError):
        selective_log_softmax(logits, index, chunk_size=0)


def test_entropy_bf16_and_grads_match_naive():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 5, 300, generator=gen) * 2).to(torch.bfloat16).requires_grad_()
    h = entropy_from_logits(logits, chunk_size=3)
    x = logits.float()
    p = torch.softmax(x, -1)
    h_ref = -(p * torch.log_softmax(x, -1)).sum(-1)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-5)
    (g,) = torch.autograd.grad(h.sum(), logits)
    (g_ref,) = torch.autograd.grad(h_ref.sum(), logits)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=1e-2, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), h_ref, rtol=0, atol=1e-5)


def test_inplace_backward_gradient_and_guard():
    gen = torch.Generator().manual_seed(4)
    base = (torch.randn(2, 5, 40, generator=gen) * 2).to(torch.bfloat16)
    index = torch.randint(0, 40, (2, 5), generator=gen)
    upstream = torch.randn(2, 5, generator=gen)
    w = torch.randn(40, 40, generator=gen).to(torch.bfloat16).requires_grad_()

    def step(inplace):
        logits = base @ w  # a non-leaf, as the lm_head output is
        logp = selective_log_softmax(logits, index, chunk_size=3, inplace_backward=inplace)
        return torch.autograd.grad((logp * upstream).sum(), w)[0]

    torch.testing.assert_close(step(True), step(False), rtol=0, atol=0)
    # another node that saved the same logits fails loudly instead of reading the gradient
    logits = base @ w
    ent = entropy_from_logits(logits)  # its backward runs after ours and needs the logits
    logp = selective_log_softmax(logits, index, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (logp.sum() + ent.sum()).backward()
