r"""Log-probabilities and entropies of sampled tokens without a float32 [B, T, V] intermediate.

The naive ``torch.log_softmax(logits.float(), -1).gather(-1, index)`` keeps a float32 copy of the
whole [B, T, V] tensor for the backward pass (and a few more in the backward itself): at
T = 2,048 and Qwen's V = 151,936 that is 1.2 GB per copy, against 0.6 GB for the bf16 logits.

:func:`selective_log_softmax` is a custom autograd function working on row chunks:

* forward: per chunk of ``chunk_size`` rows, upcast to float32, ``logsumexp`` and gather;
  it keeps only the logits (the caller's tensor, not a copy) and the [N] float32 logsumexp;
* backward: per chunk, recompute ``softmax = exp(x - lse)`` in float32 and write
  ``d logp / d x = onehot(index) - softmax`` (times the incoming gradient) into a gradient of the
  logits' own dtype. The only [B, T, V] tensor it allocates is that gradient, which any method
  must produce for the layer below.

With ``inplace_backward=True`` the backward writes that gradient into the logits' own storage
(the logits are dead by then in a plain training step: the lm_head backward needs its input and
weight, not its output), so not even the gradient is allocated. Opt-in, because the logits are
overwritten: any other autograd node that saved the same logits (an entropy bonus computed from
them, say) then fails loudly on its version counter, and code that reads the logits after the
backward reads the gradient.

The result is the float32 log-probability (float64 for float64 logits), equal to the naive
upcast computation to float32 rounding, and so are the gradients.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["selective_log_softmax", "entropy_from_logits", "naive_log_softmax_gather"]

DEFAULT_CHUNK_SIZE = 64


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, index: torch.Tensor, chunk_size: int, inplace: bool) -> torch.Tensor:  # type: ignore[override]
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)  # [N, V], a view when logits is contiguous
        idx = index.reshape(-1, 1)  # [N, 1]
        n = flat.shape[0]
        cdtype = _compute_dtype(logits.dtype)
        out = torch.empty(n, dtype=cdtype, device=logits.device)
        lse = torch.empty(n, dtype=cdtype, device=logits.device)
        for s in range(0, n, chunk_size):
            x = flat[s : s + chunk_size].to(cdtype)  # [c, V] float32
            chunk_lse = torch.logsumexp(x, dim=-1)
            out[s : s + chunk_size] = x.gather(-1, idx[s : s + chunk_size]).squeeze(-1) - chunk_lse
            lse[s : s + chunk_size] = chunk_lse
            del x
        ctx.save_for_backward(logits, index, lse)
        ctx.chunk_size = chunk_size
        ctx.inplace = inplace
        return out.reshape(index.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        logits, index, lse = ctx.saved_tensors
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)
        idx = index.reshape(-1, 1)
        g = grad_out.reshape(-1, 1).to(lse.dtype)  # [N, 1]
        grad = flat if ctx.inplace else torch.empty_like(flat)  # [N, V] in the logits' dtype
        cs = ctx.chunk_size
        for s in range(0, flat.shape[0], cs):
            x = flat[s : s + cs].to(lse.dtype, copy=True)  # a float32 copy, read before grad[s:] is written
            gs = g[s : s + cs]
            x.sub_(lse[s : s + cs].unsqueeze(-1)).exp_().mul_(-gs)  # -g * softmax
            x.scatter_add_(-1, idx[s : s + cs], gs)  # + g at the sampled token
            grad[s : s + cs] = x
            del x
        return grad.reshape(logits.shape), None, None, None


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Log-softmax of ``logits`` at ``index``: ``log_softmax(logits, -1).gather(-1, index)``.

    Args:
        logits: [B, T, V] (any leading shape [..., V]), float32 / bf16 / fp16 / float64.
        index: [B, T] (the leading shape of ``logits``) token ids in [0, V); positions that are
            not trained may hold any valid id (mask them afterwards).
        chunk_size: rows (tokens) processed at once; peak extra memory is about
            ``2 * chunk_size * V * 4`` bytes on top of the logits and their gradient.
        inplace_backward: write the gradient into the logits' storage (see the module docstring);
            needs contiguous logits.

    Returns:
        [B, T] log-probabilities in float32 (float64 for float64 logits), differentiable with
        respect to ``logits``.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"index shape {tuple(index.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if inplace_backward and not logits.is_contiguous():
        raise ValueError("inplace_backward needs contiguous logits")
    return _SelectiveLogSoftmax.apply(logits, index.to(torch.long), chunk_size, inplace_backward)


def naive_log_softmax_gather(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The reference: ``log_softmax(logits.float(), -1).gather(-1, index)``, [B, T, V] -> [B, T]."""
    x = logits.to(_compute_dtype(logits.dtype))
    return torch.log_softmax(x, dim=-1).gather(-1, index.unsqueeze(-1).to(torch.long)).squeeze(-1)


def _entropy_chunk(x: torch.Tensor) -> torch.Tensor:
    x = x.to(_compute_dtype(x.dtype))
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    p = torch.exp(x - lse)
    return lse.squeeze(-1) - (p * x).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Entropy of softmax(logits) per position: [..., V] -> [...] float32, computed per row chunk.

    ``H = logsumexp(x) - sum_v softmax(x)_v x_v``. Without gradients only one float32 chunk exists
    at a time; with gradients each chunk is recomputed in the backward (activation checkpointing),
    so the float32 [N, V] intermediates are never all alive at once either.
    """
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    parts = []
    for s in range(0, flat.shape[0], chunk_size):
        chunk = flat[s : s + chunk_size]
        if torch.is_grad_enabled() and chunk.requires_grad:
            parts.append(checkpoint(_entropy_chunk, chunk, use_reentrant=False))
        else:
            parts.append(_entropy_chunk(chunk))
    if not parts:
        return torch.empty(logits.shape[:-1], dtype=_compute_dtype(logits.dtype), device=logits.device)
    return torch.cat(parts).reshape(logits.shape[:-1])
