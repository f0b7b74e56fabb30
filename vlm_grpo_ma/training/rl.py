"""Stage 2, GRPO-MA: tree rollouts, task rewards, then the objective of ``algorithms/grpo_ma.py``.

One RL step on B prompts (each rank holds B / world of them), in four functions:

1. :func:`rollout_and_score`: K thoughts per prompt, M answers per thought (the backend's
   ``generate_tree_from_messages``) on gathered ZeRO-3 parameters, so ranks that stop at
   different lengths never wait on each other (no collective inside generation); the B*K*M
   (thought, answer) pairs scored in one ``task.reward_batch`` call through the core's
   :class:`~vlm_grpo_ma.reward_guard.RewardGuard` (a reward function that raises scores 0,
   counted in ``reward/errors``); the advantages (``grpo_ma.tree_advantages``, on every rank's
   rewards with ``scale_rewards: batch``);
2. :func:`micro_batches`: the segment weights of the whole local batch with the global token count
   (``grpo_ma.segment_weights``, one all-reduce), and the training layout
   (``rollout.layout.build_train_batch``, each thought's tokens once) of ``rl_micro_batch_size``
   prompts at a time;
3. :func:`update`: the trainer's own log-probs before the update when the objective needs them
   (``ppo_epochs > 1`` or TIS: one no-grad scoring pass, as verl recomputes them), the per-token
   terms of each micro-batch (``grpo_ma.token_terms``), then ``ppo_epochs`` passes of
   ``grpo_ma.policy_loss``, each ended by ``engine.step()`` (a non-finite loss or gradient skips
   the step and is counted).  After the update the vLLM engine gets the new weights;
4. :func:`step_metrics`: the step's metrics gathered over all ranks.

Every formula (advantages, aggregation, cross-rank scale, which token takes which advantage, TIS,
the old log-probs, the losses) is in ``vlm_grpo_ma.algorithms``; this module samples, scores,
gathers across ranks and runs the model.  The task logic is in the task plugins.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from vlm_grpo_ma.algorithms import GradientSpikeTracker, truncation_keep, zero_spread_fraction
from vlm_grpo_ma.algorithms import grpo_ma
from vlm_grpo_ma.algorithms.grpo_ma import ObjectiveSettings, TokenTerms, TreeAdvantages
from vlm_grpo_ma.reward_guard import RewardGuard
from vlm_grpo_ma.rollout.hf import HFRolloutBackend
from vlm_grpo_ma.rollout.layout import TrainBatch, build_train_batch, score_tokens
from vlm_grpo_ma.rollout.types import SamplingParams, TreeRollout
from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.training import dynamic_sampling
from vlm_grpo_ma.training.config import TrainConfig, objective_settings
from vlm_grpo_ma.training.data import SampleStream
from vlm_grpo_ma.training.metrics import MetricsLogger
from vlm_grpo_ma.training.stage import Stage, StepLoop, optimizer_step, run_steps


#: per-token metrics of every policy loss, averaged over the step's trained tokens
TOKEN_MEAN_METRICS = ("clip/low", "clip/high", "kl/mean", "ratio/mean")


class RLState:
    """What an RL run carries from step to step (and saves in its checkpoints)."""

    def __init__(self, task):
        self.reward_fn = RewardGuard(task)
        self.gss = GradientSpikeTracker(threshold=10.0)

    def state_dict(self) -> dict:
        return {"gss": self.gss.state_dict(), "reward_errors": self.reward_fn.errors}

    def load_state_dict(self, state: dict) -> None:
        self.gss.load_state_dict(state["gss"])
        self.reward_fn.errors = int(state.get("reward_errors", 0))


@dataclass
class ScoredRollout:
    """One rank's rollout with its rewards and advantages."""

    rollout: TreeRollout
    rewards: torch.Tensor  #: [B, K, M]
    adv: TreeAdvantages  #: thought [B, K], answer [B, K, M], the overlong punishment [B, K, M] or None
    part_sums: dict[str, float]  #: each reward part summed over the B*K*M pairs
    reasons: Counter  #: parse-failure (and ``reward_error``) reasons over the pairs
    seconds: dict[str, float] = field(default_factory=dict)  #: ``rollout`` and ``reward`` times
    dynamic: dict[str, float] = field(default_factory=dict)  #: dynamic sampling's counters (``dynamic/*``)


@dataclass
class UpdateStats:
    """What :func:`update` reports: loss terms summed over micro-batches and epochs, token-weighted
    sums of the per-token statistics, and each optimizer step's gradient norm and spike score."""

    sums: Counter
    norms: list[float]
    gss: list[float]


def score_rollout(state: RLState, rollout: TreeRollout, samples: Sequence, family) -> tuple[torch.Tensor, dict, Counter]:
    """Rewards [B, K, M], per-part sums and parse-failure reasons of a rollout, scored in one
    ``reward_batch`` call (the code task runs its sandboxes in parallel there) through the guard."""
    return summarise_rewards(state, score_pairs(state, rollout, samples, family), rollout.B, rollout.K, rollout.M)


def score_pairs(state: RLState, rollout: TreeRollout, samples: Sequence, family) -> list:
    """The guarded Reward of every (thought, answer) pair, flat order (b * K + k) * M + m."""
    B, K, M = rollout.B, rollout.K, rollout.M
    items = [(rollout.thought_texts[b][k], rollout.answer_texts[b][k][m], samples[b], family)
             for b in range(B) for k in range(K) for m in range(M)]
    return state.reward_fn.batch(items)


def summarise_rewards(state: RLState, scored: list, B: int, K: int, M: int) -> tuple[torch.Tensor, dict, Counter]:
    """Rewards [B, K, M], per-part sums and reasons of the flat Rewards of a tree."""
    rewards = torch.tensor([float(r.total) for r in scored], dtype=torch.float32).reshape(B, K, M)
    part_sums: dict[str, float] = {p: 0.0 for p in state.reward_fn.task.reward_parts}
    reasons: Counter = Counter()
    for r in scored:
        for p, v in r.parts.items():
            part_sums[p] = part_sums.get(p, 0.0) + float(v)
        if r.reason:
            reasons[r.reason] += 1
    return rewards, part_sums, reasons


def rollout_backend(stage: Stage, cfg: TrainConfig):
    """The rollout backend ``cfg.rl.rollout_backend`` names.

    ``hf`` samples with the training model itself on gathered ZeRO-3 parameters.  ``vllm`` builds a
    colocated engine once per stage (every rank its own), pushes the current weights into it, and
    keeps it in ``stage.vllm_backend``; :func:`update` syncs the weights again after every update.
    """
    if cfg.rl.rollout_backend == "hf":
        return HFRolloutBackend(stage.engine.module, processor=stage.processor, gather_context=stage.gather)
    if stage.vllm_backend is None:
        from vlm_grpo_ma.rollout.vllm import VLLMBackend

        kv = int(cfg.rl.vllm_kv_cache_gib * 2**30) or None
        backend = VLLMBackend(
            stage.model_path, processor=stage.processor, family=stage.family,
            gpu_memory_utilization=cfg.rl.vllm_gpu_memory_utilization, kv_cache_bytes=kv,
            enable_sleep_mode=cfg.rl.vllm_sleep_mode, enforce_eager=cfg.rl.vllm_enforce_eager,
            seed=cfg.run.seed + dist.rank(),
        )
        # the policy after SFT (or at a resumed step) is not the checkpoint vLLM loaded
        stage.vllm_sync = backend.sync_weights(stage.engine)
        stage.vllm_backend = backend
    return stage.vllm_backend


def rollout_and_score(stage: Stage, cfg: TrainConfig, task, state: RLState, samples: Sequence,
                      more: Callable[[int], Sequence] | None = None) -> ScoredRollout:
    """Sample the tree of this rank's ``samples``, score every pair, and compute the advantages
    (per prompt; ``scale_rewards: batch`` gathers over ranks). With ``dynamic_sampling`` full or
    pilot, prompts without spread are dropped and refilled from ``more(round)``
    (``training/dynamic_sampling.py``); ``time/reward`` is then inside ``time/rollout``."""
    rl = cfg.rl
    t0 = time.perf_counter()
    sampling = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                              max_thought_tokens=rl.max_thought_tokens, max_answer_tokens=rl.max_answer_tokens)
    backend = rollout_backend(stage, cfg)
    dyn: dict[str, float] = {}
    if rl.dynamic_sampling != "off":
        got = dynamic_sampling.run(cfg, backend, task, stage.family, samples, sampling, more or (lambda r: samples),
                                   score=lambda tree, ss: score_pairs(state, tree, ss, stage.family))
        rollout, samples, dyn = got.rollout, got.samples, got.stats
        t1 = time.perf_counter()
        rewards, part_sums, reasons = summarise_rewards(state, got.scored, rollout.B, rollout.K, rollout.M)
    else:
        messages = [task.messages(s, stage.family) for s in samples]
        rollout = backend.generate_tree_from_messages(messages, rl.num_thoughts, rl.answers_per_thought, sampling)
        t1 = time.perf_counter()
        rewards, part_sums, reasons = score_rollout(state, rollout, samples, stage.family)
    adv = advantages(objective_settings(rl), rollout, rewards)
    return ScoredRollout(rollout, rewards, adv, part_sums, reasons,
                         {"rollout": t1 - t0, "reward": time.perf_counter() - t1}, dyn)


def advantages(s: ObjectiveSettings, rollout: TreeRollout, rewards: torch.Tensor) -> TreeAdvantages:
    """``grpo_ma.tree_advantages`` of this rank's tree; with ``scale_rewards: batch`` on several
    ranks, of every rank's rows (one ``all_gather_objects``), this rank's taken back out."""
    T, A = rollout.thought_lengths(), rollout.answer_lengths()
    if s.scale_rewards != "batch" or dist.world_size() == 1:
        return grpo_ma.tree_advantages(s, rewards, T, A)
    parts = dist.all_gather_objects((rewards.cpu(), T.cpu(), A.cpu()))
    start = sum(p[0].shape[0] for p in parts[: dist.rank()])
    whole = grpo_ma.tree_advantages(s, *(torch.cat([p[i] for p in parts]) for i in range(3)))
    rows = slice(start, start + rewards.shape[0])
    return TreeAdvantages(whole.thought[rows], whole.answer[rows], None if whole.penalty is None else whole.penalty[rows])


@dataclass
class MicroBatch:
    """One training forward: its tokens (the layout) and the objective's per-segment rows for its prompts."""

    batch: TrainBatch
    thought_adv: torch.Tensor  #: [b, K]
    answer_adv: torch.Tensor  #: [b, K, M]
    thought_weights: torch.Tensor  #: [b, K]
    answer_weights: torch.Tensor  #: [b, K, M]

    def terms(self, s: ObjectiveSettings, trainer_old_logp: torch.Tensor | None) -> TokenTerms:
        """``grpo_ma.token_terms`` of this micro-batch, on the training device."""
        b = self.batch
        return grpo_ma.token_terms(s, self.thought_adv, self.answer_adv, self.thought_weights, self.answer_weights,
                                   b.thought_lens, b.answer_lens, trainer_old_logp=trainer_old_logp,
                                   rollout_logp=b.rollout_logp, device=b.targets.device)


def micro_batches(stage: Stage, cfg: TrainConfig, scored: ScoredRollout) -> list[MicroBatch]:
    """The training micro-batches of this rank, ``stage.micro_batch`` prompts each, on the device.

    The segment weights are those of the whole local batch (``grpo_ma.segment_weights``) with the
    data-parallel factor of the global token count (one all-reduce for ``token-mean``)."""
    s, rollout = objective_settings(cfg.rl), scored.rollout
    lens = (rollout.thought_lengths(), rollout.answer_lengths(), rollout.thought_truncated, rollout.answer_truncated)
    n_local = grpo_ma.trained_tokens(s, *lens)
    n_global = dist.all_reduce_sum(n_local) if s.loss_agg_mode == "token-mean" else n_local
    w_t, w_a = grpo_ma.segment_weights(s, *lens, global_tokens=n_global, world_size=dist.world_size(),
                                       grad_accum=stage.grad_accum)
    pad_id = stage.tokenizer.pad_token_id if stage.tokenizer.pad_token_id is not None else 0
    out = []
    for i in range(0, rollout.B, stage.micro_batch):
        idx = list(range(i, min(i + stage.micro_batch, rollout.B)))
        batch = build_train_batch(stage.engine.module, rollout.select(idx), layout=cfg.rl.train_layout, pad_id=pad_id)
        out.append(MicroBatch(batch.to(dist.device()), scored.adv.thought[idx], scored.adv.answer[idx], w_t[idx], w_a[idx]))
    return out


def update(stage: Stage, cfg: TrainConfig, state: RLState, micro: list[MicroBatch], ref_engine=None) -> UpdateStats:
    """``ppo_epochs`` optimizer steps on the micro-batches (gradient accumulation over them)."""
    rl, engine, gas = cfg.rl, stage.engine, stage.grad_accum
    s = objective_settings(rl)
    stats = UpdateStats(Counter(), [], [])
    with torch.no_grad():
        # the trainer's own log-probs before the update (grpo_ma, step 4), when the objective needs them
        old = [score_tokens(engine.module, m.batch, rl.temperature).detach() if s.needs_old_logp else None
               for m in micro]
        terms = [m.terms(s, o) for m, o in zip(micro, old)]
        for t in terms:  # TIS: token-weighted, averaged in step_metrics
            for key, v in t.tis.items():
                stats.sums[key] += v * t.weights.numel()
            if t.tis:
                stats.sums["tis_tokens"] += t.weights.numel()
        ref = [score_tokens(ref_engine.module, m.batch, rl.temperature) if ref_engine is not None else None
               for m in micro]

    for _ in range(rl.ppo_epochs):
        for i, m in enumerate(micro):
            logp = score_tokens(engine.module, m.batch, rl.temperature)
            loss, lm = grpo_ma.policy_loss(s, logp, terms[i], trainer_old_logp=old[i], ref_logp=ref[i])
            engine.backward(loss)
            for key in ("loss/policy", "loss/kl"):
                stats.sums[key] += float(lm[key]) / gas  # undo the gas factor in the weights
            n_tok = m.batch.num_tokens
            for key in TOKEN_MEAN_METRICS + tuple(k for k in lm if k.startswith(rl.policy_loss + "/")):
                stats.sums[key] += float(lm[key]) * n_tok
            stats.sums["tokens"] += n_tok
            if i < len(micro) - 1:
                engine.step()
        _, norm = optimizer_step(stage)
        stats.norms.append(norm)
        stats.gss.append(state.gss.update(norm))
    if rl.rollout_backend == "vllm":  # every rank: the ZeRO-3 gathers are collective
        stage.vllm_sync = rollout_backend(stage, cfg).sync_weights(engine)
    return stats


def step_metrics(stage: Stage, cfg: TrainConfig, task, state: RLState, scored: ScoredRollout,
                 upd: UpdateStats) -> dict[str, float]:
    """The step's metrics over all ranks (one ``all_gather_objects`` and one all-reduce)."""
    rl, rollout, world = cfg.rl, scored.rollout, dist.world_size()
    local = {
        "rewards": scored.rewards, "parts": scored.part_sums, "reasons": dict(scored.reasons), "sums": dict(upd.sums),
        "T": rollout.thought_lengths(), "A": rollout.answer_lengths(), "thought_adv": scored.adv.thought,
        "answer_adv": scored.adv.answer, "t_trunc": rollout.thought_truncated, "a_trunc": rollout.answer_truncated,
        "penalty": scored.adv.penalty, "dynamic": scored.dynamic,
    }
    parts = dist.all_gather_objects(local)
    cat = lambda key: torch.cat([p[key] for p in parts])  # noqa: E731
    R = cat("rewards")
    n_pairs = R.numel()
    out: dict[str, float] = {"reward/mean": float(R.mean()), "reward/std": float(R.std(correction=0))}
    for name in parts[0]["parts"]:
        out[f"reward/{task.name}/{name}"] = sum(p["parts"].get(name, 0.0) for p in parts) / n_pairs
    out["rollout/thought_len"] = float(cat("T").float().mean())
    out["rollout/answer_len"] = float(cat("A").float().mean())
    out["rollout/thought_truncated"] = float(cat("t_trunc").float().mean())
    out["rollout/answer_truncated"] = float(cat("a_trunc").float().mean())
    out["rollout/zero_spread_frac"] = float(zero_spread_fraction(R))
    out["adv/thought_std"] = float(cat("thought_adv").std(correction=0))
    out["adv/answer_std"] = float(cat("answer_adv").std(correction=0))
    tot: Counter = Counter()
    for p in parts:
        tot.update(p["sums"])
    out["loss/policy"] = tot["loss/policy"] / world / rl.ppo_epochs
    out["loss/kl"] = tot["loss/kl"] / world / rl.ppo_epochs
    for key in TOKEN_MEAN_METRICS + tuple(k for k in tot if k.startswith(rl.policy_loss + "/")):
        out[key] = tot[key] / max(tot["tokens"], 1)
    for key in parts[0]["dynamic"]:  # dynamic sampling: counts summed over ranks
        out[key] = sum(p["dynamic"][key] for p in parts)
    if scored.adv.penalty is not None:
        out["reward/overlong_penalty"] = float(cat("penalty").mean())
    if rl.mask_truncated_completions:
        keep_t, keep_a = truncation_keep(cat("t_trunc"), cat("a_trunc"))  # shares of segments out of the loss
        out["mask/thoughts"] = 1.0 - float(keep_t.float().mean())
        out["mask/answers"] = 1.0 - float(keep_a.float().mean())
    if rl.tis_cap > 0:  # tis/mean, tis/capped over every trained token of the step
        for key in ("tis/mean", "tis/capped"):
            out[key] = tot[key] / max(tot["tis_tokens"], 1)
    out["grad/norm"] = upd.norms[-1]
    out.update(state.gss.metrics())  # grad/gss (this step), grad/gss_max, grad/gss_spikes (GSS@10 so far)
    out["grad/gss"] = upd.gss[-1]
    out["train/skipped_steps"] = float(stage.skipped_steps)
    out["reward/errors"] = dist.all_reduce_sum(state.reward_fn.errors)
    reasons_all: Counter = Counter()
    for p in parts:
        reasons_all.update(p["reasons"])
    for r, c in sorted(reasons_all.items()):
        out[f"parse/{r}"] = float(c)
    out["rollout/tokens_decoded"] = float(rollout.stats.get("tokens_decoded", 0.0))
    if rl.rollout_backend == "vllm":  # this rank's engine: prefix-cache hits and the last weight sync
        out["rollout/tokens_prefix_cached"] = float(rollout.stats.get("tokens_prefix_cached", 0.0))
        out["rollout/tokens_prompt"] = float(rollout.stats.get("tokens_prompt", 0.0))
        if stage.vllm_sync is not None:
            out["time/weight_sync"] = float(stage.vllm_sync.seconds)
            out["sync/gib"] = float(stage.vllm_sync.bytes) / 2**30
    return out


def rl_step(stage: Stage, cfg: TrainConfig, task, state: RLState, samples: Sequence, ref_engine: Any = None,
            more: Callable[[int], Sequence] | None = None) -> dict:
    """One GRPO-MA step on this rank's ``samples``; returns the step's (global) metrics.

    ``ref_engine``: the frozen reference of the KL term (default ``stage.reference``'s engine);
    ``more(round)``: this rank's fresh prompts for dynamic sampling's extra rounds."""
    if ref_engine is None and stage.reference is not None:
        ref_engine = stage.reference.engine
    scored = rollout_and_score(stage, cfg, task, state, samples, more)
    t0 = time.perf_counter()
    upd = update(stage, cfg, state, micro_batches(stage, cfg, scored), ref_engine)
    t_update = time.perf_counter() - t0
    out = step_metrics(stage, cfg, task, state, scored, upd)
    out["time/rollout"] = scored.seconds["rollout"]
    out["time/reward"] = scored.seconds["reward"]
    out["time/update"] = t_update
    return out


def run_rl(stage: Stage, cfg: TrainConfig, task, logger: MetricsLogger, state: RLState, start_step: int = 0,
           train_samples=None, periodic=None) -> dict:
    """RL steps ``start_step .. rl_steps - 1`` with checkpoints; returns the last step's metrics.
    ``periodic(stage, step, last_step)``: the evaluation during training (``periodic_eval``)."""
    stream = SampleStream(task, cfg.rl.prompts_per_step, cfg.run.seed, "rl", train_samples)

    def step_fn(step: int) -> dict:
        return rl_step(stage, cfg, task, state, dist.shard(stream.batch(step)),
                       more=lambda r: dist.shard(stream.extra(step, r)))

    def line(step: int, m: dict) -> str:
        return (f"rl step {step}: reward {m['reward/mean']:.4f}  "
                f"thought/answer len {m['rollout/thought_len']:.1f}/{m['rollout/answer_len']:.1f}  "
                f"zero-spread {m['rollout/zero_spread_frac']:.2f}  loss {m['loss/policy']:+.4f}  "
                f"grad/norm {m['grad/norm']:.3f}  GSS {m['grad/gss']:.2f}  {m['time/step']:.2f} s/step")

    loop = StepLoop(desc=f"RL T{cfg.rl.num_thoughts}A{cfg.rl.answers_per_thought}", line=line,
                    postfix=lambda m: {"reward": f"{m['reward/mean']:.3f}", "gss": f"{m['grad/gss']:.2f}"},
                    checkpoint_state=lambda: {"rl": state.state_dict()})
    return run_steps(stage, cfg, logger, start_step, cfg.rl.rl_steps, step_fn, loop, periodic)
