"""Loss parity with the peer: TRL's ``GRPOTrainer`` and our GRPO-MA loss on IDENTICAL samples (M = 1).

The same prompts (3 affordance samples with their images), the same completions (a tree rollout
of our sampler with K = 4 thoughts x M = 1 answer: each completion is thought + answer), the same
rewards (a hand-made table, one group with all rewards equal), the same old log-probs (the
sampling log-probs, perturbed so that ratios clip on both sides).  TRL gets them through its own
code path: its ``_generate_and_score_completions`` (prompt tokenisation by the processor, the
image inputs, the reward function call, its group advantages) with only the sampler replaced by
one that returns our completions, then its ``compute_loss`` (its forward with the fused LM head).
Ours: ``grpo_tree_advantages`` (with TRL's unbiased std) -> ``build_train_batch`` (packed layout) ->
``score_tokens`` -> the objective's ``segment_weights`` / ``token_terms`` / ``policy_loss``
(``algorithms/grpo_ma.py``): what ``training/rl.py`` calls.

TRL 1.16's definitions (``trl/trainer/grpo_trainer.py``, ``_compute_loss`` and
``_generate_and_score_completions``), for ``importance_sampling_level="token"``, beta = 0, one
process, no gradient accumulation, and how they map onto ours:

===========  ==========================================================  ==========================
TRL          aggregation of the per-token clipped loss ``l`` [G, T]      ours (``loss_agg_mode``)
===========  ==========================================================  ==========================
grpo         ``mean_i( sum_t l_it / |o_i| )``                            seq-mean-token-mean
bnpo         ``sum l / sum mask`` (local batch)                          token-mean
dapo         ``sum l / num_items_in_batch`` (global tokens)              token-mean
dr_grpo      ``sum l / (G * max_completion_length)``                     seq-mean-token-sum-norm,
                                                                         ``max_len`` = the budget
===========  ==========================================================  ==========================

Advantages: TRL ``(r - mean_g) / (std_g + 1e-4)`` with the UNBIASED std (``trl.trainer.utils.nanstd``)
for ``scale_rewards="group"``, ``r - mean_g`` for ``"none"``; ours with ``unbiased=True, eps=1e-4``
and ``scale_by_std`` accordingly.  Clipping: TRL ``-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)``
is our ``max(-A rho, -A clip(rho))``.

The 2025-26 variants (``test_variant_equals_trl``), each against TRL on the same samples:

=======================================================  ==========================================
TRL ``GRPOConfig``                                        ours (``RLArgs``)
=======================================================  ==========================================
``importance_sampling_level="sequence"``, ``grpo``        ``clipped`` + ``importance_sampling_level:
(GSPO)                                                   sequence`` + seq-mean-token-mean
``luspo`` (sequence level)                               the same + seq-mean-token-sum
``cispo``, ``epsilon_high`` = the cap (token level and    ``cispo``, ``cispo_cap`` + token-mean
sequence level)
``sapo`` (token and sequence level)                      ``sapo`` + seq-mean-token-mean
``vespo``                                                ``vespo`` (sequence ids) + token-mean
``scale_rewards="batch"``                                ``scale_rewards: batch``
``mask_truncated_completions=True``                      ``mask_truncated_completions: true``
=======================================================  ==========================================

With M = 1 the tree's "sequence" is the path (thought + answer), TRL's completion
(``algorithms/sequences.py``). For the mask case some completions are made to end in
``<|im_end|>`` (answer not truncated) and the others not (truncated), on both sides.

Not compared: ``dapo``/``bnpo`` under several processes or accumulation steps, where their
normalisers differ from each other (ours is the ``dapo`` one: 1 / the global number of trained
tokens).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import copy

import pytest
import torch

# the test drives TRL internals (_generate_single_turn, _generate_and_score_completions) as of 1.16
trl = pytest.importorskip("trl", minversion="1.16")

from vlm_grpo_ma import get_task  # noqa: E402
from vlm_grpo_ma.algorithms import aggregation_weights, grpo_tree_advantages  # noqa: E402
from vlm_grpo_ma.algorithms.grpo_ma import ObjectiveSettings, policy_loss, segment_weights, token_terms  # noqa: E402
from vlm_grpo_ma.data.collate import build_generation_inputs  # noqa: E402
from vlm_grpo_ma.models import load_policy  # noqa: E402
from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams  # noqa: E402
from vlm_grpo_ma.rollout.layout import build_train_batch, score_tokens  # noqa: E402

B, K = 3, 4  # prompts, completions per prompt (TRL's num_generations); M = 1
MAX_THOUGHT, MAX_ANSWER = 10, 6
BUDGET = MAX_THOUGHT + MAX_ANSWER  # TRL's max_completion_length (Dr.GRPO's constant L_max)
TEMPERATURE = 0.8  # both sides divide the logits by it when scoring
EPS_LOW, EPS_HIGH = 0.2, 0.28
#: hand-made rewards [B, K]; the last group has no spread (advantage exactly 0 on both sides)
REWARDS = torch.tensor([[0.0, 0.5, 1.0, 0.25], [0.9, 0.1, 0.1, 0.4], [0.7, 0.7, 0.7, 0.7]])

CASES = [  # (TRL loss_type, TRL scale_rewards, our loss_agg_mode, our scale_by_std)
    ("grpo", "group", "seq-mean-token-mean", True),
    ("bnpo", "group", "token-mean", True),
    ("dapo", "group", "token-mean", True),
    ("dr_grpo", "none", "seq-mean-token-sum-norm", False),
    ("grpo", "none", "seq-mean-token-mean", False),
]


@functools.lru_cache(maxsize=1)
def _vs_trl():
    """benchmarks/vs_trl.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py"
    spec = importlib.util.spec_from_file_location("_vs_trl", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def trl_prompt(messages):
    """Our chat messages as TRL's (prompt, image), with the benchmark's own row builder
    (``trl_row``), so the test and the benchmark feed TRL the same rows."""
    row = _vs_trl().trl_row(messages, "parity")
    return row["prompt"], row["image"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    policy = load_policy("tiny-qwen2.5-vl")
    task = get_task("affordance")
    samples = task.synthetic(B, seed=3)
    messages = [task.messages(s, policy.family) for s in samples]
    backend = HFRolloutBackend(policy.model, processor=policy.processor)
    sampling = SamplingParams(temperature=1.0, max_thought_tokens=MAX_THOUGHT, max_answer_tokens=MAX_ANSWER, seed=5)
    rollout = backend.generate_tree(build_generation_inputs(policy.processor, messages), K, 1, sampling)
    # old log-probs: the sampling ones, perturbed so that some ratios leave [1 - eps_low, 1 + eps_high]
    g = torch.Generator().manual_seed(1)
    old = [[torch.cat([rollout.thought_logprobs[b][k], rollout.answer_logprobs[b][k][0]])
            + 0.3 * torch.randn(len(rollout.thought_ids[b][k]) + len(rollout.answer_ids[b][k][0]), generator=g)
            for k in range(K)] for b in range(B)]
    return policy, messages, rollout, old


def trl_loss(policy, messages, rollout, old, loss_type, scale_rewards, **config):
    """TRL's loss (and its model, for the gradients) on our completions."""
    from trl import GRPOConfig, GRPOTrainer

    completions = [torch.cat([rollout.thought_ids[b][k], rollout.answer_ids[b][k][0]]).tolist()
                   for b in range(B) for k in range(K)]

    def table_reward(prompts, completions, completion_ids, row, **kwargs):
        return [float(REWARDS.view(-1)[r]) for r in row]

    rows = []
    for b, msgs in enumerate(messages):
        prompt, image = trl_prompt(msgs)
        rows += [{"prompt": prompt, "image": image, "row": b * K + k} for k in range(K)]
    args = GRPOConfig(**{**dict(
        output_dir="/tmp/trl-parity-unused", use_cpu=True, report_to="none", save_strategy="no",
        num_generations=K, per_device_train_batch_size=B * K, gradient_accumulation_steps=1,
        max_completion_length=BUDGET, temperature=TEMPERATURE, loss_type=loss_type, scale_rewards=scale_rewards,
        beta=0.0, epsilon=EPS_LOW, epsilon_high=EPS_HIGH, num_iterations=1, bf16=False,
    ), **config})
    model = copy.deepcopy(policy.model)  # TRL patches the forward of the model it gets
    # TRL left-pads prompt_ids itself but takes mm_token_type_ids from ``processor(..., padding=True)``,
    # which pads on the tokenizer's side: with a right-padding tokenizer (ours, and transformers'
    # default) every shorter prompt of the batch gets shifted image positions, and Qwen2.5-VL's
    # mRoPE positions with them (log-probs off by ~1e-3 here). TRL sets padding_side="left" when
    # it loads the processor itself and expects the same of one passed in (huggingface/trl#5785).
    processor = copy.deepcopy(policy.processor)
    processor.tokenizer.padding_side = "left"
    from datasets import Dataset

    trainer = GRPOTrainer(model=model, reward_funcs=table_reward, args=args, processing_class=processor,
                          train_dataset=Dataset.from_list(rows))  # required by the constructor; not iterated
    # the only replaced piece: the sampler returns our completions (one per row, in row order)
    trainer._generate_single_turn = lambda prompt_ids, images, fields, n, **kw: (completions, None)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
    inputs = trainer._generate_and_score_completions(rows)
    # identical samples: TRL's tokenised prompts are our rollout's prompts
    for i in range(B * K):
        keep = inputs["prompt_mask"][i].bool()
        assert torch.equal(inputs["prompt_ids"][i][keep].cpu(), rollout.prompt_ids[i // K])
    C = inputs["completion_ids"].shape[1]
    inputs["old_per_token_logps"] = torch.stack(
        [torch.nn.functional.pad(old[i // K][i % K], (0, C - len(old[i // K][i % K]))) for i in range(B * K)]
    )
    loss = trainer.compute_loss(trainer.model, inputs)
    return loss, inputs["advantages"], trainer.model


def our_loss(policy, rollout, old, mode, scale_by_std):
    """Our loss on the same samples: the trainer's own pieces."""
    t_adv, a_adv = grpo_tree_advantages(REWARDS.unsqueeze(-1), scale_by_std=scale_by_std, eps=1e-4, unbiased=True)
    s = ObjectiveSettings(loss_agg_mode=mode, max_thought_tokens=MAX_THOUGHT, max_answer_tokens=MAX_ANSWER,
                          loss_options=dict(clip_low=EPS_LOW, clip_high=EPS_HIGH))
    T, A = rollout.thought_lengths(), rollout.answer_lengths()
    w_t, w_a = segment_weights(s, T, A, rollout.thought_truncated, rollout.answer_truncated)
    torch.testing.assert_close((w_t, w_a), aggregation_weights(mode, T, A, max_len=BUDGET), rtol=0, atol=0)
    terms = token_terms(s, t_adv, a_adv, w_t, w_a, T, A)
    assert torch.allclose(terms.weights, torch.repeat_interleave(
        torch.stack([w_t, w_a[..., 0]], -1).reshape(-1), torch.stack([T, A[..., 0]], -1).reshape(-1)))
    batch = build_train_batch(policy.model, rollout, layout="packed")
    old_flat = torch.cat([o for per_prompt in old for o in per_prompt])  # canonical order (M = 1)
    logp = score_tokens(policy.model, batch, TEMPERATURE)
    loss, metrics = policy_loss(s, logp, terms, trainer_old_logp=old_flat)
    return loss, a_adv[..., 0], metrics


def assert_same_gradients(theirs, ours, their_model, our_model) -> None:
    """Back-propagate both losses and compare every parameter's gradient (relative to its largest
    entry); a parameter without our gradient has none, or a zero one, on TRL's side."""
    theirs.backward()
    ours.backward()
    their_grads = dict(their_model.named_parameters())
    for name, p in our_model.named_parameters():
        q = their_grads[name]
        if p.grad is None:
            assert q.grad is None or float(q.grad.abs().max()) == 0.0, name
            continue
        scale = float(p.grad.abs().max()) + 1e-8
        assert torch.allclose(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4), name
    our_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("loss_type,scale_rewards,mode,scale_by_std", CASES)
def test_loss_equals_trl(setup, loss_type, scale_rewards, mode, scale_by_std):
    policy, messages, rollout, old = setup
    theirs, their_adv, their_model = trl_loss(policy, messages, rollout, old, loss_type, scale_rewards)
    policy.model.zero_grad(set_to_none=True)
    ours, our_adv, metrics = our_loss(policy, rollout, old, mode, scale_by_std)

    assert torch.allclose(their_adv.cpu().float(), our_adv.reshape(-1), atol=1e-6, rtol=0)
    assert float(our_adv[-1].abs().max()) == 0.0  # the group without spread
    # the case is not trivial: some ratios are clipped, the loss is not 0
    assert float(metrics["clip/low"]) + float(metrics["clip/high"]) > 0
    assert abs(float(ours)) > 1e-3
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6, rel=1e-6)

    assert_same_gradients(theirs, ours, their_model, policy.model)  # and the gradients agree too



# ----------------------------------------------------------------------------- the 2025-26 variants
#: (id, TRL GRPOConfig fields, our loss name, its options, level, loss_agg_mode, scale_rewards, mask)
GSPO_EPS = dict(epsilon=0.03, epsilon_high=0.04)  # sequence ratios move less than token ratios
VARIANTS = [
    ("gspo", dict(loss_type="grpo", importance_sampling_level="sequence", **GSPO_EPS),
     "clipped", dict(clip_low=0.03, clip_high=0.04), "sequence", "seq-mean-token-mean", "group", False),
    ("luspo", dict(loss_type="luspo", importance_sampling_level="sequence", **GSPO_EPS),
     "clipped", dict(clip_low=0.03, clip_high=0.04), "sequence", "seq-mean-token-sum", "group", False),
    ("cispo", dict(loss_type="cispo", epsilon_high=1.15),
     "cispo", dict(cap=1.15), "token", "token-mean", "group", False),
    ("cispo-seq", dict(loss_type="cispo", epsilon_high=1.02, importance_sampling_level="sequence"),
     "cispo", dict(cap=1.02), "sequence", "token-mean", "group", False),
    ("sapo", dict(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05),
     "sapo", dict(tau_pos=1.0, tau_neg=1.05), "token", "seq-mean-token-mean", "group", False),
    ("sapo-seq", dict(loss_type="sapo", importance_sampling_level="sequence", sapo_temperature_pos=2.0,
                      sapo_temperature_neg=3.0),
     "sapo", dict(tau_pos=2.0, tau_neg=3.0), "sequence", "seq-mean-token-mean", "group", False),
    ("vespo", dict(loss_type="vespo"), "vespo", {}, "sequence", "token-mean", "group", False),
    ("batch-scale", dict(loss_type="grpo", scale_rewards="batch"),
     "clipped", dict(clip_low=EPS_LOW, clip_high=EPS_HIGH), "token", "seq-mean-token-mean", "batch", False),
    ("mask-truncated", dict(loss_type="dapo", mask_truncated_completions=True),
     "clipped", dict(clip_low=EPS_LOW, clip_high=EPS_HIGH), "token", "token-mean", "group", True),
    ("mask-truncated-grpo", dict(loss_type="grpo", mask_truncated_completions=True),
     "clipped", dict(clip_low=EPS_LOW, clip_high=EPS_HIGH), "token", "seq-mean-token-mean", "group", True),
]


def end_some_completions(policy, rollout):
    """A copy of the rollout where completions 0, 2, 5, 7, 9, 11 end in ``<|im_end|>`` (answer not
    truncated) and the others in another token (truncated); thoughts count as finished (TRL has
    no thought limit)."""
    rollout = copy.deepcopy(rollout)
    end = policy.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    other = policy.processor.tokenizer.convert_tokens_to_ids("a")
    ended = {0, 2, 5, 7, 9, 11}
    for b in range(B):
        for k in range(K):
            ids = rollout.answer_ids[b][k][0].clone()
            ids[-1] = end if b * K + k in ended else other
            rollout.answer_ids[b][k][0] = ids
            rollout.answer_truncated[b, k, 0] = b * K + k not in ended
    rollout.thought_truncated[:] = False
    return rollout


@pytest.mark.parametrize("case", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_equals_trl(setup, case):
    name, trl_config, loss_name, options, level, mode, scale, mask = case
    policy, messages, rollout, old = setup
    if mask:
        rollout = end_some_completions(policy, rollout)
    loss_type = trl_config.pop("loss_type")
    trl_scale = trl_config.pop("scale_rewards", "group")
    theirs, their_adv, their_model = trl_loss(policy, messages, rollout, old, loss_type, trl_scale, **trl_config)
    trl_config.update(loss_type=loss_type)  # the parametrised dict is shared between runs: restore it

    policy.model.zero_grad(set_to_none=True)
    t_adv, a_adv = grpo_tree_advantages(REWARDS.unsqueeze(-1), eps=1e-4, unbiased=True, scale_rewards=scale)
    # the trainer's objective (algorithms.grpo_ma) on the same samples, TRL's unbiased std aside
    s = ObjectiveSettings(loss_agg_mode=mode, max_thought_tokens=MAX_THOUGHT, max_answer_tokens=MAX_ANSWER,
                          mask_truncated=mask, policy_loss=loss_name, loss_options=options,
                          importance_sampling_level=level)
    T, A = rollout.thought_lengths(), rollout.answer_lengths()
    w_t, w_a = segment_weights(s, T, A, rollout.thought_truncated, rollout.answer_truncated)
    terms = token_terms(s, t_adv, a_adv, w_t, w_a, T, A)
    assert (terms.seq_ids is not None) == (level == "sequence")
    batch = build_train_batch(policy.model, rollout, layout="packed")
    old_flat = torch.cat([o for per_prompt in old for o in per_prompt])
    logp = score_tokens(policy.model, batch, TEMPERATURE)
    ours, metrics = policy_loss(s, logp, terms, trainer_old_logp=old_flat)

    assert torch.allclose(their_adv.cpu().float(), a_adv.reshape(-1), atol=1e-6, rtol=0)
    assert abs(float(ours)) > 1e-3
    if mask:  # the case is not trivial: some completions masked, some kept
        assert 0 < int((w_a == 0).sum()) < B * K
    if loss_name in ("clipped", "cispo"):  # and the clip (or cap) acts on some tokens
        assert float(metrics["clip/low"]) + float(metrics["clip/high"]) > 0
    if loss_name == "sapo" and level == "sequence":
        assert float(metrics["ratio/max"]) != float(metrics["ratio/min"])
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6, rel=1e-6)

    assert_same_gradients(theirs, ours, their_model, policy.model)
