"""``cross_rank_scale``: W ranks x G micro-batches, averaged the way DeepSpeed averages, give the
weights of the whole batch on one rank."""

import pytest
import torch

from vlm_grpo_ma.algorithms import AGGREGATION_MODES, aggregation_weights, cross_rank_scale


def test_hand_values():
    # rank 0 trains 30 tokens, rank 1 10; 2 ranks, 2 accumulation steps
    assert cross_rank_scale("token-mean", 30, 40, world_size=2, grad_accum=2) == pytest.approx(2 * 2 * 30 / 40)
    assert cross_rank_scale("token-mean", 10, 40, world_size=2, grad_accum=2) == pytest.approx(2 * 2 * 10 / 40)
    # a rank-0 token: 1/30 * 3.0, divided by G=2 and W=2 -> 1/40, the global token mean
    assert (1 / 30) * cross_rank_scale("token-mean", 30, 40, 2, 2) / (2 * 2) == pytest.approx(1 / 40)
    for mode in AGGREGATION_MODES[1:]:
        assert cross_rank_scale(mode, 30, 40, world_size=2, grad_accum=3) == 3.0
    assert cross_rank_scale("token-mean", 0, 0, world_size=2) == 0.0  # nothing trained anywhere
    assert cross_rank_scale("token-mean", 7, 7, world_size=1, grad_accum=1) == 1.0  # one rank: no-op


def test_errors():
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        cross_rank_scale("token_mean", 1, 1, 1)
    with pytest.raises(ValueError, match="world_size"):
        cross_rank_scale("token-mean", 1, 1, 0)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_ranks_and_micro_batches_equal_one_rank(mode):
    """Four prompts, K=2, M=3, split over W=2 ranks with G=2 micro-batches of one prompt each.
    The per-token weight DeepSpeed effectively applies, ``scale * w_local / (W G)``, equals the
    weight of the same token when one rank aggregates all four prompts."""
    g = torch.Generator().manual_seed(0)
    T = torch.randint(0, 9, (4, 2), generator=g)
    A = torch.randint(1, 6, (4, 2, 3), generator=g)
    budget = 20
    w_t_glob, w_a_glob = aggregation_weights(mode, T, A, max_len=budget, dtype=torch.float64)
    W, G = 2, 2
    shards = [slice(0, 2), slice(2, 4)]  # rank r holds prompts shards[r] (one per micro-batch)
    n_global = float(T.sum() + A.sum())
    for r, sl in enumerate(shards):
        Tr, Ar = T[sl], A[sl]
        w_t, w_a = aggregation_weights(mode, Tr, Ar, max_len=budget, dtype=torch.float64)
        s = cross_rank_scale(mode, float(Tr.sum() + Ar.sum()), n_global, world_size=W, grad_accum=G)
        torch.testing.assert_close(w_t * s / (W * G), w_t_glob[sl])
        torch.testing.assert_close(w_a * s / (W * G), w_a_glob[sl])
