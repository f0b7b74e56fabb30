"""Gradient Spike Score tracker: hand-computed scores, spike counts, exact resume."""

import math

import pytest
import torch

from vlm_grpo_ma.algorithms import GradientSpikeTracker, gradient_spike_scores


def test_cumulative_mean_hand_values():
    tr = GradientSpikeTracker(threshold=10.0)
    scores = [tr.update(g) for g in [1.0, 1.0, 1.0, 30.0, 1.0]]
    # first step 1.0; then |g| / mean of past norms: 1/1, 1/1, 30/1, 1/(33/4)
    assert scores == pytest.approx([1.0, 1.0, 1.0, 30.0, 4.0 / 33.0])
    assert tr.num_spikes == 1 and tr.num_steps == 5 and tr.spike_fraction == pytest.approx(0.2)
    assert tr.metrics()["grad/gss_max"] == pytest.approx(30.0)
    assert tr.metrics()["grad/gss_spikes"] == 1.0


def test_window_and_ema_hand_values():
    tr = GradientSpikeTracker(window=2)
    scores = [tr.update(g) for g in [1.0, 3.0, 2.0, 10.0]]
    # baselines: none, 1, (1+3)/2 = 2, (3+2)/2 = 2.5
    assert scores == pytest.approx([1.0, 3.0, 1.0, 4.0])
    tr = GradientSpikeTracker(ema=0.5)
    scores = [tr.update(g) for g in [2.0, 4.0, 6.0]]
    # ema: 2 -> 0.5*2 + 0.5*4 = 3
    assert scores == pytest.approx([1.0, 2.0, 2.0])
    with pytest.raises(ValueError):
        GradientSpikeTracker(window=3, ema=0.9)


def test_nonfinite_and_zero_baseline():
    tr = GradientSpikeTracker(threshold=10.0)
    assert tr.update(0.0) == 1.0
    assert tr.update(0.0) == 1.0  # 0 / 0 baseline
    assert math.isinf(tr.update(1.0))  # > 0 over a zero baseline
    assert math.isinf(tr.update(float("nan")))
    assert tr.num_nonfinite == 1 and tr.num_spikes == 2
    # the nan did not enter the history: baseline is mean(0, 0, 1) = 1/3
    assert tr.baseline() == pytest.approx(1 / 3)
    assert tr.update(torch.tensor(-2.0)) == pytest.approx(6.0)  # |g|, tensors accepted


@pytest.mark.parametrize("kwargs", [{}, {"window": 3}, {"ema": 0.9}])
def test_state_dict_resume_is_exact(kwargs):
    gen = torch.Generator().manual_seed(0)
    norms = (torch.rand(40, generator=gen) * 2).tolist()
    norms[25] = 50.0
    full = GradientSpikeTracker(threshold=5.0, **kwargs)
    expected = [full.update(g) for g in norms]
    first = GradientSpikeTracker(threshold=5.0, **kwargs)
    for g in norms[:20]:
        first.update(g)
    resumed = GradientSpikeTracker(threshold=5.0, **kwargs)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.update(g) for g in norms[20:]] == expected[20:]
    assert resumed.state_dict() == full.state_dict()
    with pytest.raises(ValueError, match="threshold"):
        GradientSpikeTracker(threshold=10.0, **kwargs).load_state_dict(first.state_dict())


def test_posthoc_spam_definition():
    scores = gradient_spike_scores([1.0, 1.0, 1.0, 37.0])
    torch.testing.assert_close(scores, torch.tensor([0.1, 0.1, 0.1, 3.7], dtype=torch.float64))
    scores = gradient_spike_scores([1.0, float("inf"), 3.0])
    assert scores[0].item() == pytest.approx(0.5) and math.isinf(scores[1].item())
    assert int((gradient_spike_scores([1.0] * 20 + [100.0]) > 10).sum()) == 1
