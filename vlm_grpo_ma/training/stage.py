"""What both stages share: building the engine for a stage, resuming it, stepping it with
non-finite protection, and exporting its final model.

A stage (``sft`` or ``rl``) owns ``<run>/<stage>/``: ``checkpoints/step-N`` (resumable) and
``final/`` (the Hugging Face model, written when the stage completes).  Each stage builds its own
engine from a Hugging Face folder (the base model, or the SFT stage's ``final/``), so
``--stage rl --model <sft final>`` is exactly what ``--stage all`` does in its second half.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_grpo_ma.training import checkpoint as ckpt
from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.training.config import TrainConfig
from vlm_grpo_ma.training.engine import (
    LoadedPolicy,
    bf16_available,
    build_engine,
    gathered_parameters,
    load_for_training,
    resolve_ds_config,
)

log = logging.getLogger(__name__)

FINAL = "final"


def use_bf16(cfg: TrainConfig) -> bool:
    return bf16_available() if cfg.model.bf16 is None else bool(cfg.model.bf16)


def split_batch(global_batch: int, micro: int, what: str) -> tuple[int, int, int]:
    """(local batch, micro batch, gradient-accumulation steps) of a global batch over the ranks."""
    world = dist.world_size()
    if global_batch % world:
        raise ValueError(f"{what}={global_batch} must be divisible by the number of ranks ({world})")
    local = global_batch // world
    micro = micro or local
    if local % micro:
        raise ValueError(f"the local batch ({local} = {what} / {world} ranks) must be divisible by the micro batch {micro}")
    return local, micro, local // micro


@dataclass
class Stage:
    """One stage's engine and everything needed beside it."""

    name: str
    dir: Path
    engine: Any
    loaded: LoadedPolicy
    ds_config: dict
    local_batch: int
    micro_batch: int
    grad_accum: int
    skipped_steps: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def processor(self):
        return self.loaded.processor

    @property
    def family(self):
        return self.loaded.family

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def gather(self):
        """Context (factory) with full parameters for generation (ZeRO-3)."""
        return gathered_parameters(self.engine)

    def lora_scale(self, cfg: TrainConfig) -> float | None:
        return cfg.model.lora_alpha / cfg.model.lora_r if cfg.model.lora_r > 0 else None


def build_stage(
    cfg: TrainConfig, name: str, model_path: str, *, global_batch: int, micro: int, lr: float,
    warmup: int, total_optimizer_steps: int,
) -> Stage:
    """Load ``model_path`` (partitioned under ZeRO-3) and wrap it in a DeepSpeed engine whose
    batch geometry, clipping, precision, optimizer and schedule come from ``cfg``."""
    local, micro, gas = split_batch(global_batch, micro, "sft_batch_size" if name == "sft" else "prompts_per_step")
    ds_config = resolve_ds_config(
        cfg.run.deepspeed, micro_batch_size=micro, grad_accum_steps=gas, bf16=use_bf16(cfg),
        max_grad_norm=cfg.run.max_grad_norm, lr=lr, weight_decay=cfg.run.weight_decay,
    )
    loaded = load_for_training(cfg.model, model_path, ds_config)
    engine = build_engine(loaded, ds_config, lr=lr, warmup_steps=warmup, total_steps=total_optimizer_steps,
                          weight_decay=cfg.run.weight_decay, schedule=cfg.run.lr_schedule)
    stage_dir = Path(cfg.run.output_dir) / name
    if dist.is_main():
        stage_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    st = Stage(name, stage_dir, engine, loaded, ds_config, local, micro, gas)
    st.extra["model_path"] = model_path
    return st


def maybe_resume(stage: Stage, cfg: TrainConfig) -> dict | None:
    """Load the latest checkpoint of the stage when ``cfg.run.resume`` and one exists."""
    if not cfg.run.resume:
        return None
    path = ckpt.latest_checkpoint(stage.dir)
    if path is None:
        return None
    state = ckpt.load_checkpoint(stage.engine, path)
    stage.skipped_steps = int(state.get("skipped_steps", 0))
    if dist.is_main():
        log.info("resumed %s from %s (step %s)", stage.name, path, state["step"])
    return state


def optimizer_step(stage: Stage) -> tuple[bool, float]:
    """``engine.step()`` at a gradient-accumulation boundary.  Returns (applied, grad norm).

    DeepSpeed's ZeRO optimizers discard the update when the global gradient norm is not finite
    (a NaN/inf loss gives NaN gradients): the parameters, optimizer state and LR schedule stay
    as they were.  We count such steps (``train/skipped_steps``).  Without ZeRO (stage 0, e.g.
    ``configs/deepspeed/zero0.json``) DeepSpeed neither reports the norm nor skips: we compute
    the norm (before clipping) and drop non-finite gradients ourselves, so the parameters and
    optimizer state stay as they were (the LR schedule still advances one step)."""
    engine = stage.engine
    own_norm = None
    if engine.zero_optimization_stage() == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        own_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
    if own_norm is not None and not math.isfinite(own_norm):
        # the engine's step still runs (its micro-step counters and schedule), the update does not
        for g in grads:
            g.zero_()
        optimizer = engine.optimizer
        optimizer.step = lambda *args, **kwargs: None  # instance attribute: shadows the method once
        try:
            engine.step()
        finally:
            del optimizer.step
    else:
        engine.step()
    if own_norm is not None:
        applied, norm = math.isfinite(own_norm), own_norm
    else:
        applied = bool(engine.was_step_applied())
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
    if not applied:
        stage.skipped_steps += 1
        if dist.is_main():
            log.warning("%s: non-finite loss or gradient (norm %s): step skipped (%d so far)",
                        stage.name, norm, stage.skipped_steps)
    return applied, norm


def lr_of(stage: Stage) -> float:
    return float(stage.engine.get_lr()[0])


def save_final(stage: Stage, cfg: TrainConfig) -> Path:
    """The stage's model in Hugging Face format, with its processor, under ``<stage>/final``."""
    return ckpt.save_hf_model(stage.engine, stage.dir / FINAL, stage.processor, lora_scale=stage.lora_scale(cfg))


def final_exists(stage_dir: Path) -> bool:
    return (Path(stage_dir) / FINAL / "config.json").is_file()


def release(stage: Stage) -> None:
    """Free the engine (before the next stage builds its own)."""
    stage.engine.destroy() if hasattr(stage.engine, "destroy") else None
    stage.engine = None
    stage.loaded.model = None
    stage.loaded.hf_ds_config = None
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
