"""Tree rollouts (K thoughts x M answers per prompt) and their training layout.

- :mod:`.types`: :class:`SamplingParams`, :class:`TreeRollout`, the :class:`RolloutBackend` protocol;
- :mod:`.hf`: :class:`HFRolloutBackend`, the transformers backend (prefill once, shared KV cache);
- :mod:`.layout`: the tree (default), packed and naive training layouts and ``score_tokens``.
"""

from vlm_grpo_ma.rollout.hf import HFRolloutBackend, RolloutTokenIds, sample_categorical, sample_next
from vlm_grpo_ma.rollout.types import RolloutBackend, SamplingParams, TreeRollout

__all__ = [
    "HFRolloutBackend",
    "RolloutBackend",
    "RolloutTokenIds",
    "SamplingParams",
    "TreeRollout",
    "sample_categorical",
    "sample_next",
]
