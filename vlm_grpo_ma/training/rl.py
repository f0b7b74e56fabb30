"""Stage 2, GRPO-MA: tree rollouts, task rewards, thought/answer advantages, the clipped loss.

One RL step on B prompts (each rank holds B / world of them):

1. rollout: K thoughts per prompt, M answers per thought (``HFRolloutBackend.generate_tree``)
   on gathered ZeRO-3 parameters, so ranks that stop at different lengths never wait on each
   other (no collective inside generation);
2. reward: ``Task.reward(thought, answer, sample, family)`` for each of the B*K*M pairs; a reward
   function that raises scores 0 (logged once per exception type, counted in ``reward/errors``);
3. advantages: ``grpo_ma_advantages(rewards [B, K, M])`` -> thought [B, K], answer [B, K, M]
   (T16A1, i.e. M = 1, is plain GRPO);
4. update: the training layout (``rollout.layout.build_train_batch``, each thought's tokens once),
   ``ppo_epochs`` iterations of ``clipped_policy_loss`` against the old log-probs, each followed
   by ``engine.step()`` (a non-finite loss or gradient skips the step and is counted).  Old
   log-probs: with ``ppo_epochs = 1`` the current ones, detached (ratio 1: the exact on-policy
   gradient, no extra forward); with more epochs one no-grad scoring pass in the training layout
   before the first update (as verl recomputes them), so every epoch's ratio is against the
   policy that sampled.

Only plumbing lives here: the math is in ``vlm_grpo_ma.algorithms``, the task logic in ``tasks/``.

Distributed exactness: the loss weights of ``token-mean`` are 1/N over the GLOBAL number of
trained tokens (an all-reduce), times ``world * grad_accum`` to undo DeepSpeed's averaging, so
N ranks take the same step as 1 rank on the same rollouts.  The path-mean modes need no
correction (every rank holds the same number of paths); ``seq-mean-token-sum-norm`` uses the
constant generation budget ``max_thought_tokens + max_answer_tokens`` as L_max (Dr.GRPO).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import replace
from typing import Sequence

import torch
from tqdm.auto import tqdm

from vlm_grpo_ma.algorithms import (
    GradientSpikeTracker,
    aggregation_weights,
    clipped_policy_loss,
    get_adv_est,
    zero_spread_fraction,
)
from vlm_grpo_ma.task import Reward
from vlm_grpo_ma.training import checkpoint as ckpt
from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.training.config import TrainConfig
from vlm_grpo_ma.training.data import SampleStream
from vlm_grpo_ma.training.metrics import MetricsLogger
from vlm_grpo_ma.training.stage import Stage, lr_of, optimizer_step

log = logging.getLogger(__name__)


class SafeReward:
    """``task.reward`` that never raises: an exception scores 0 (all parts 0, reason
    ``reward_error``), is logged once per exception type, and is counted."""

    def __init__(self, task):
        self.task = task
        self.errors = 0
        self._logged: set[str] = set()

    def __call__(self, thought: str, answer: str, sample, family) -> Reward:
        try:
            r = self.task.reward(thought, answer, sample, family)
            total = float(r.total)
            if not (0.0 <= total <= 1.0):  # NaN fails both comparisons
                raise ValueError(f"reward total {r.total!r} outside [0, 1]")
            return r
        except Exception as e:
            self.errors += 1
            key = type(e).__name__
            if key not in self._logged:
                self._logged.add(key)
                log.warning("task %r: reward raised %s: %s (scored 0; logged once per exception type)",
                            self.task.name, key, e)
            return Reward(0.0, {p: 0.0 for p in self.task.reward_parts}, reason="reward_error")


def select_prompts(rollout, idx: Sequence[int]):
    """The sub-tree of prompts ``idx`` of a TreeRollout (for micro-batching the update)."""
    idx = list(idx)
    pick = lambda xs: [xs[i] for i in idx] if xs else xs  # noqa: E731
    return replace(
        rollout,
        prompt_ids=pick(rollout.prompt_ids),
        prompt_mm_token_type_ids=pick(rollout.prompt_mm_token_type_ids),
        pixel_values=pick(rollout.pixel_values),
        image_grid_thw=pick(rollout.image_grid_thw),
        thought_ids=pick(rollout.thought_ids),
        thought_logprobs=pick(rollout.thought_logprobs),
        thought_truncated=rollout.thought_truncated[idx],
        answer_ids=pick(rollout.answer_ids),
        answer_logprobs=pick(rollout.answer_logprobs),
        answer_truncated=rollout.answer_truncated[idx],
        thought_texts=pick(rollout.thought_texts),
        answer_texts=pick(rollout.answer_texts),
        stats=dict(rollout.stats),
    )


class RLState:
    """What an RL run carries from step to step (and saves in its checkpoints)."""

    def __init__(self, task):
        self.reward_fn = SafeReward(task)
        self.gss = GradientSpikeTracker(threshold=10.0)

    def state_dict(self) -> dict:
        return {"gss": self.gss.state_dict(), "reward_errors": self.reward_fn.errors}

    def load_state_dict(self, state: dict) -> None:
        self.gss.load_state_dict(state["gss"])
        self.reward_fn.errors = int(state.get("reward_errors", 0))


def score_rollout(state: RLState, rollout, samples: Sequence, family) -> tuple[torch.Tensor, dict, Counter]:
    """Rewards [B, K, M], per-part sums and parse-failure reasons of a rollout."""
    B, K, M = rollout.B, rollout.K, rollout.M
    rewards = torch.zeros(B, K, M, dtype=torch.float32)
    part_sums: dict[str, float] = {p: 0.0 for p in state.reward_fn.task.reward_parts}
    reasons: Counter = Counter()
    for b in range(B):
        for k in range(K):
            for m in range(M):
                r = state.reward_fn(rollout.thought_texts[b][k], rollout.answer_texts[b][k][m], samples[b], family)
                rewards[b, k, m] = float(r.total)
                for p, v in r.parts.items():
                    part_sums[p] = part_sums.get(p, 0.0) + float(v)
                if r.reason:
                    reasons[r.reason] += 1
    return rewards, part_sums, reasons


def rollout_backend(stage: Stage, cfg: TrainConfig):
    """The rollout backend ``cfg.rl.rollout_backend`` names.

    ``hf`` samples with the training model itself on gathered ZeRO-3 parameters.  ``vllm`` builds a
    colocated engine once per stage (every rank its own), pushes the current weights into it, and
    keeps it in ``stage.extra``; :func:`rl_step` syncs the weights again after every update.
    """
    from vlm_grpo_ma.rollout import HFRolloutBackend

    if cfg.rl.rollout_backend == "hf":
        return HFRolloutBackend(stage.engine.module, processor=stage.processor, gather_context=stage.gather)
    backend = stage.extra.get("vllm_backend")
    if backend is None:
        from vlm_grpo_ma.rollout.vllm import VLLMBackend

        backend = VLLMBackend(
            str(stage.extra["model_path"]), processor=stage.processor, family=stage.family,
            gpu_memory_utilization=cfg.rl.vllm_gpu_memory_utilization, enable_sleep_mode=cfg.rl.vllm_sleep_mode,
            seed=cfg.run.seed + dist.rank(),
        )
        backend.sync_weights(stage.engine)  # the policy after SFT is not the checkpoint vLLM loaded
        stage.extra["vllm_backend"] = backend
    return backend


def rl_step(stage: Stage, cfg: TrainConfig, task, state: RLState, samples: Sequence, ref_engine=None) -> dict:
    """One GRPO-MA step on this rank's ``samples``; returns the step's (global) metrics."""
    from vlm_grpo_ma.algorithms.tis import tis_weights
    from vlm_grpo_ma.rollout import SamplingParams
    from vlm_grpo_ma.rollout.layout import build_train_batch, score_tokens, tree_token_values

    rl = cfg.rl
    engine, family = stage.engine, stage.family
    K, M = rl.num_thoughts, rl.answers_per_thought
    world = dist.world_size()

    # 1. rollout on gathered parameters
    t0 = time.perf_counter()
    backend = rollout_backend(stage, cfg)
    sampling = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                              max_thought_tokens=rl.max_thought_tokens, max_answer_tokens=rl.max_answer_tokens)
    rollout = backend.generate_tree_from_messages([task.messages(s, family) for s in samples], K, M, sampling)
    t1 = time.perf_counter()

    # 2. rewards
    rewards, part_sums, reasons = score_rollout(state, rollout, samples, family)
    t2 = time.perf_counter()

    # 3. advantages (per prompt: rank-local)
    thought_adv, answer_adv = get_adv_est("grpo_ma")(rewards, scale_by_std=rl.scale_adv_by_std, eps=rl.adv_eps)

    # 4. update
    T_lens, A_lens = rollout.thought_lengths(), rollout.answer_lengths()
    budget = rl.max_thought_tokens + rl.max_answer_tokens
    w_t, w_a = aggregation_weights(rl.loss_agg_mode, T_lens, A_lens, max_len=budget)
    dist_scale = 1.0
    if rl.loss_agg_mode == "token-mean":
        n_local = float(T_lens.sum() + A_lens.sum())
        n_global = dist.all_reduce_sum(n_local)
        dist_scale = world * n_local / n_global if n_global > 0 else 0.0
    gas = stage.grad_accum
    pad_id = stage.tokenizer.pad_token_id if stage.tokenizer.pad_token_id is not None else 0
    dev = dist.device()
    micro = []
    for i in range(0, rollout.B, stage.micro_batch):
        idx = list(range(i, min(i + stage.micro_batch, rollout.B)))
        sub = select_prompts(rollout, idx)
        batch = build_train_batch(engine.module, sub, thought_adv[idx], answer_adv[idx], layout=rl.train_layout,
                                  loss_agg_mode=rl.loss_agg_mode, max_len=budget, pad_id=pad_id)
        batch.weights = tree_token_values(sub, w_t[idx], w_a[idx]).float() * (dist_scale * gas)
        micro.append(batch.to(dev))
    with torch.no_grad():
        # old log-probs from the trainer itself: needed for several epochs, and with vLLM rollouts
        # (whose sampling log-probs come from other kernels, TIS below)
        need_old = rl.ppo_epochs > 1 or rl.tis_cap > 0
        old = [score_tokens(engine.module, b, rl.temperature).detach() for b in micro] if need_old else None
        if rl.tis_cap > 0:
            for b, o in zip(micro, old):
                b.weights = b.weights * tis_weights(o, b.old_logp, rl.tis_cap).to(b.weights.device)
        ref = [score_tokens(ref_engine.module, b, rl.temperature) for b in micro] if ref_engine is not None else None

    sums = Counter()
    norms, gss_values = [], []
    for epoch in range(rl.ppo_epochs):
        for i, b in enumerate(micro):
            logp = score_tokens(engine.module, b, rl.temperature)
            old_logp = old[i] if old is not None else logp.detach()
            loss, lm = clipped_policy_loss(
                logp, old_logp, b.advantages, b.weights, clip_low=rl.clip_low, clip_high=rl.clip_high,
                ref_logp=ref[i] if ref is not None else None, kl_coef=rl.kl_coef,
            )
            engine.backward(loss)
            for key in ("loss/policy", "loss/kl"):
                sums[key] += float(lm[key]) / gas  # undo the gas factor in the weights
            n_tok = b.num_tokens
            for key in ("clip/low", "clip/high", "kl/mean", "ratio/mean"):
                sums[key] += float(lm[key]) * n_tok
            sums["tokens"] += n_tok
            if i < len(micro) - 1:
                engine.step()
        _, norm = optimizer_step(stage)
        norms.append(norm)
        gss_values.append(state.gss.update(norm))
    if rl.rollout_backend == "vllm":
        backend.sync_weights(engine)  # every rank: the ZeRO-3 gathers are collective
    t3 = time.perf_counter()

    # metrics over all ranks
    local = {
        "rewards": rewards, "parts": part_sums, "reasons": dict(reasons), "sums": dict(sums),
        "T": T_lens, "A": A_lens, "ta": thought_adv, "aa": answer_adv,
        "t_trunc": rollout.thought_truncated, "a_trunc": rollout.answer_truncated,
    }
    parts = dist.all_gather_objects(local)
    R = torch.cat([p["rewards"] for p in parts])
    n_pairs = R.numel()
    out: dict[str, float] = {"reward/mean": float(R.mean()), "reward/std": float(R.std(correction=0))}
    for name in parts[0]["parts"]:
        out[f"reward/{task.name}/{name}"] = sum(p["parts"].get(name, 0.0) for p in parts) / n_pairs
    T = torch.cat([p["T"] for p in parts]).float()
    A = torch.cat([p["A"] for p in parts]).float()
    out["rollout/thought_len"] = float(T.mean())
    out["rollout/answer_len"] = float(A.mean())
    out["rollout/thought_truncated"] = float(torch.cat([p["t_trunc"] for p in parts]).float().mean())
    out["rollout/answer_truncated"] = float(torch.cat([p["a_trunc"] for p in parts]).float().mean())
    out["rollout/zero_spread_frac"] = float(zero_spread_fraction(R))
    out["adv/thought_std"] = float(torch.cat([p["ta"] for p in parts]).std(correction=0))
    out["adv/answer_std"] = float(torch.cat([p["aa"] for p in parts]).std(correction=0))
    tot = Counter()
    for p in parts:
        tot.update(p["sums"])
    epochs = rl.ppo_epochs
    out["loss/policy"] = tot["loss/policy"] / world / epochs
    out["loss/kl"] = tot["loss/kl"] / world / epochs
    for key in ("clip/low", "clip/high", "kl/mean", "ratio/mean"):
        out[key] = tot[key] / max(tot["tokens"], 1)
    out["grad/norm"] = norms[-1]
    out.update(state.gss.metrics())  # grad/gss (this step), grad/gss_max, grad/gss_spikes (GSS@10 so far)
    out["grad/gss"] = gss_values[-1]
    out["train/skipped_steps"] = float(stage.skipped_steps)
    out["reward/errors"] = dist.all_reduce_sum(state.reward_fn.errors)
    reasons_all = Counter()
    for p in parts:
        reasons_all.update(p["reasons"])
    for r, c in sorted(reasons_all.items()):
        out[f"parse/{r}"] = float(c)
    out["time/rollout"] = t1 - t0
    out["time/reward"] = t2 - t1
    out["time/update"] = t3 - t2
    out["rollout/tokens_decoded"] = float(rollout.stats.get("tokens_decoded", 0.0))
    return out


def run_rl(stage: Stage, cfg: TrainConfig, task, logger: MetricsLogger, state: RLState, start_step: int = 0,
           ref_engine=None, train_samples=None) -> dict:
    """RL steps ``start_step .. rl_steps - 1`` with checkpoints; returns the last step's metrics."""
    stream = SampleStream(task, cfg.rl.prompts_per_step, cfg.run.seed, "rl", train_samples)
    bar = tqdm(total=cfg.rl.rl_steps, initial=start_step, desc=f"RL T{cfg.rl.num_thoughts}A{cfg.rl.answers_per_thought}",
               disable=not dist.is_main(), dynamic_ncols=True)
    stage.engine.train()
    last: dict = {}
    for step in range(start_step, cfg.rl.rl_steps):
        t0 = time.perf_counter()
        local = dist.shard(stream.batch(step))
        lr = lr_of(stage)
        metrics = rl_step(stage, cfg, task, state, local, ref_engine)
        metrics["lr"] = lr
        metrics["time/step"] = time.perf_counter() - t0
        logger.log("rl", step + 1, metrics)
        last = metrics
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", gss=f"{metrics['grad/gss']:.2f}")
        if dist.is_main() and cfg.run.log_every and (step + 1) % cfg.run.log_every == 0:
            bar.write(f"rl step {step + 1}: reward {metrics['reward/mean']:.4f}  "
                      f"thought/answer len {metrics['rollout/thought_len']:.1f}/{metrics['rollout/answer_len']:.1f}  "
                      f"zero-spread {metrics['rollout/zero_spread_frac']:.2f}  loss {metrics['loss/policy']:+.4f}  "
                      f"grad/norm {metrics['grad/norm']:.3f}  GSS {metrics['grad/gss']:.2f}  {metrics['time/step']:.2f} s/step")
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < cfg.rl.rl_steps:
            ckpt.save_checkpoint(stage.engine, stage.dir, step + 1,
                                 {"skipped_steps": stage.skipped_steps, "rl": state.state_dict()}, cfg.run.keep_last)
    bar.close()
    return last
