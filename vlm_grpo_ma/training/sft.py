"""Stage 1, supervised warm-start: cross-entropy on the assistant's tokens only.

Per optimizer step: the step's global batch (``data.SampleStream``), this rank's slice, the
task's messages and reference completion (``Task.sft_target``), collated by
``vlm_grpo_ma.data.collate.build_sft_batch`` (labels -100 on the prompt and image tokens;
over-long samples dropped and counted, never truncated).

The loss is the mean negative log-likelihood over all assistant tokens of the GLOBAL batch:
each micro-batch's token sum is divided by the global token count (an all-reduce) and multiplied
by ``world * grad_accum`` to undo DeepSpeed's averaging over ranks and accumulation steps, so 1
rank and N ranks compute the same gradient for the same global batch.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from vlm_grpo_ma.algorithms import selective_log_softmax
from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.training.config import TrainConfig
from vlm_grpo_ma.training.data import SampleStream
from vlm_grpo_ma.training.metrics import MetricsLogger
from vlm_grpo_ma.training.stage import Stage, StepLoop, optimizer_step, run_steps

log = logging.getLogger(__name__)


def assistant_token_nll(model, batch) -> tuple[torch.Tensor, int]:
    """(sum of -log p over the assistant's tokens, their number) for one SFT micro-batch.

    The LM head runs only at the positions that predict a label (hidden state at t-1 predicts
    token t), and the log-softmax never materialises float32 [B, T, V] (selective_log_softmax).
    """
    core = getattr(model, "get_base_model", lambda: model)()
    inputs = batch.model_inputs()
    hidden = core.model(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
    labels = batch.labels[:, 1:]  # [B, T-1]
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    h = hidden[rows, cols]  # [N, H]: position t-1 predicts label t
    logits = core.lm_head(h)  # [N, V]
    logp = selective_log_softmax(logits, labels[rows, cols])  # [N]
    return -logp.sum(), int(rows.numel())


def collate_micro_batches(stage: Stage, cfg: TrainConfig, task, samples: list) -> tuple[list, int]:
    """This rank's ``samples`` as SFT micro-batches (CPU tensors) and the number dropped as too
    long.  Pure CPU work: ``run_sft`` prepares the next step's batches in a background thread."""
    from vlm_grpo_ma.data.collate import build_sft_batch
    from vlm_grpo_ma.format import completion_after_prefix
    from vlm_grpo_ma.models.chat_templates import generation_prefix

    family = stage.family
    # a thinking template's prompt already opened the thought: teach only what follows it
    prefix = generation_prefix(stage.processor)
    batches, dropped = [], 0
    for i in range(0, len(samples), stage.micro_batch):
        chunk = samples[i : i + stage.micro_batch]
        b = build_sft_batch(
            stage.processor,
            [task.messages(s, family) for s in chunk],
            [completion_after_prefix(task.sft_target(s, family), prefix) for s in chunk],
            cfg.data.max_length,
        )
        dropped += len(b.dropped)
        if len(b) == 0:
            raise ValueError(
                f"every sample of a micro batch is longer than max_length={cfg.data.max_length} "
                f"(lengths {[d.length for d in b.dropped]}): raise --max_length"
            )
        batches.append(b)
    return batches, dropped


def sft_step(stage: Stage, batches: list, dropped: int = 0) -> dict:
    """One optimizer step of SFT on this rank's micro-batches (its slice of the global batch)."""
    engine = stage.engine
    dev = dist.device()
    n_local = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    n_global = dist.all_reduce_sum(n_local)
    scale = dist.world_size() * stage.grad_accum / max(n_global, 1.0)
    nll_sum = 0.0
    for i, b in enumerate(batches):
        nll, _ = assistant_token_nll(engine.module, b.to(dev))
        engine.backward(nll * scale)
        nll_sum += float(nll.detach())
        if i < len(batches) - 1:
            engine.step()  # inside the accumulation window DeepSpeed only counts the micro step
    applied, norm = optimizer_step(stage)
    loss = dist.all_reduce_sum(nll_sum) / max(n_global, 1.0)
    return {
        "loss/sft": loss,
        "grad/norm": norm,
        "train/step_applied": float(applied),
        "train/skipped_steps": float(stage.skipped_steps),
        "data/dropped_too_long": dist.all_reduce_sum(dropped),
        "data/tokens": n_global,
    }


def run_sft(stage: Stage, cfg: TrainConfig, task, logger: MetricsLogger, start_step: int = 0, train_samples=None,
            periodic=None) -> dict:
    """SFT steps ``start_step .. sft_steps - 1`` with checkpoints; returns the last step's metrics.
    ``periodic(stage, step, last_step)``: the evaluation during training (``periodic_eval``).
    The next step's micro-batches are collated in a background thread while a step trains."""
    stream = SampleStream(task, cfg.sft.sft_batch_size, cfg.run.seed, "sft", train_samples)
    total = cfg.sft.sft_steps

    def prepare(step: int):
        return collate_micro_batches(stage, cfg, task, dist.shard(stream.batch(step)))

    with ThreadPoolExecutor(max_workers=1) as pool:  # collates step s+1 while step s trains
        pending = [pool.submit(prepare, start_step) if start_step < total else None]

        def step_fn(step: int) -> dict:
            batches, dropped = pending[0].result()
            pending[0] = pool.submit(prepare, step + 1) if step + 1 < total else None
            return sft_step(stage, batches, dropped)

        def before_eval() -> None:  # the collate thread shares the processor's tokenizer (its padding
            if pending[0] is not None:  # state is not thread-safe): let it finish before evaluating
                pending[0].result()

        loop = StepLoop(desc="SFT", postfix=lambda m: {"loss": f"{m['loss/sft']:.3f}", "lr": f"{m['lr']:.1e}"},
                        line=lambda step, m: (f"sft step {step}: loss {m['loss/sft']:.4f}  grad/norm {m['grad/norm']:.3f}  "
                                              f"lr {m['lr']:.2e}  {m['time/step']:.2f} s/step"),
                        before_eval=before_eval)
        return run_steps(stage, cfg, logger, start_step, total, step_fn, loop, periodic)
