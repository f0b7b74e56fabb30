"""What both stages share: building the engine for a stage, resuming it, the step loop
(:func:`run_steps`: progress bar, metrics, evaluation during training, checkpoints), stepping it
with non-finite protection, and exporting its final model.

A stage (``sft`` or ``rl``) owns ``<run>/<stage>/``: ``checkpoints/step-N`` (resumable) and
``final/`` (the Hugging Face model, written when the stage completes).  Each stage builds its own
engine from a Hugging Face folder (the base model, or the SFT stage's ``final/``), so
``--stage rl --model <sft final>`` is exactly what ``--stage all`` does in its second half.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from vlm_grpo_ma.training import checkpoint as ckpt
from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.training.config import TrainConfig
from vlm_grpo_ma.training.metrics import MetricsLogger
from vlm_grpo_ma.training.engine import (
    LoadedPolicy,
    ReferencePolicy,
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
    #: the Hugging Face folder the engine was built from (a colocated vLLM engine loads it)
    model_path: str = ""
    skipped_steps: int = 0
    #: RL with ``rollout_backend vllm``: the colocated engine, built on the first rollout
    vllm_backend: Any = None
    #: the last weight sync into that engine (``rollout.vllm_weights.SyncStats``)
    vllm_sync: Any = None
    #: RL with ``kl_coef > 0``: the frozen reference policy
    reference: ReferencePolicy | None = None

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
    return Stage(name, stage_dir, engine, loaded, ds_config, local, micro, gas, model_path=str(model_path))


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


@dataclass
class StepLoop:
    """How :func:`run_steps` shows and saves one stage's steps."""

    desc: str  #: the progress bar's label
    postfix: Callable[[dict], dict]  #: the bar's postfix from a step's metrics
    line: Callable[[int, dict], str]  #: the ``log_every`` line of a step (step number, metrics)
    checkpoint_state: Callable[[], dict] = dict  #: what the stage adds to a checkpoint's state
    before_eval: Callable[[], None] = lambda: None  #: called before an evaluation runs


def run_steps(stage: Stage, cfg: TrainConfig, logger: MetricsLogger, start_step: int, total: int,
              step_fn: Callable[[int], dict], loop: StepLoop, periodic: Optional[Callable] = None) -> dict:
    """Steps ``start_step .. total - 1`` of a stage: ``step_fn(step)`` returns the step's metrics
    (``lr`` and ``time/step`` are added), logged under the stage's name, shown on a progress bar
    (main rank), a line every ``log_every`` steps, the evaluation during training when it is due
    (``periodic_eval``), a checkpoint every ``save_every`` steps but the last (the caller exports
    the final model).  Returns the last step's metrics."""
    bar = tqdm(total=total, initial=start_step, desc=loop.desc, disable=not dist.is_main(), dynamic_ncols=True)
    stage.engine.train()
    last: dict = {}
    for step in range(start_step, total):
        t0 = time.perf_counter()
        lr = lr_of(stage)
        metrics = step_fn(step)
        metrics["lr"] = lr
        metrics["time/step"] = time.perf_counter() - t0
        logger.log(stage.name, step + 1, metrics)
        last = metrics
        bar.update(1)
        bar.set_postfix(**loop.postfix(metrics))
        if dist.is_main() and cfg.run.log_every and (step + 1) % cfg.run.log_every == 0:
            bar.write(loop.line(step + 1, metrics))
        if periodic is not None and periodic.due(step + 1, total):
            loop.before_eval()
            periodic(stage, step + 1, total)
        if cfg.run.save_every and (step + 1) % cfg.run.save_every == 0 and step + 1 < total:
            ckpt.save_checkpoint(stage.engine, stage.dir, step + 1,
                                 {"skipped_steps": stage.skipped_steps, **loop.checkpoint_state()}, cfg.run.keep_last)
    bar.close()
    return last


def lr_of(stage: Stage) -> float:
    return float(stage.engine.get_lr()[0])


def stage_steps(cfg: TrainConfig, name: str) -> int:
    """The step budget of stage ``name``: ``sft_steps`` or ``rl_steps``."""
    return cfg.sft.sft_steps if name == "sft" else cfg.rl.rl_steps


def save_final(stage: Stage, cfg: TrainConfig) -> Path:
    """The stage's model in Hugging Face format, with its processor, under ``<stage>/final``,
    and the number of steps it was trained for (``stage_record.json``)."""
    record = {"stage": stage.name, "steps": stage_steps(cfg, stage.name), "world_size": dist.world_size()}
    return ckpt.save_hf_model(stage.engine, stage.dir / FINAL, stage.processor, lora_scale=stage.lora_scale(cfg),
                              record=record)


def final_exists(stage_dir: Path) -> bool:
    return (Path(stage_dir) / FINAL / "config.json").is_file()


class BudgetChanged(ValueError):
    """A finished stage is asked for another number of steps."""


def completed_steps(stage_dir: Path) -> int | None:
    """The steps a finished stage was trained for (None: no record, e.g. an older run)."""
    import json

    path = Path(stage_dir) / FINAL / ckpt.STAGE_RECORD
    return int(json.loads(path.read_text())["steps"]) if path.is_file() else None


def check_finished_budget(stage_dir: Path, name: str, requested: int) -> int | None:
    """For a stage whose final model exists: its completed steps when they equal ``requested``
    (so skipping it is what was asked), else raise :class:`BudgetChanged` with the reason.

    A finished stage is not continued to a larger budget: its learning rate was scheduled to
    decay to 0 over the old budget, and no resumable checkpoint of its last step is kept."""
    done = completed_steps(stage_dir)
    flag = "--sft_steps" if name == "sft" else "--rl_steps"
    if done is not None and done != requested:
        raise BudgetChanged(
            f"{name.upper()} already complete in {Path(stage_dir) / FINAL} after {done} steps, and {flag} {requested} "
            f"asks for {'more' if requested > done else 'fewer'}: a finished stage is not continued (its learning "
            f"rate schedule ended at step {done}). Use a new --output_dir, pass {flag} {done} to reuse it"
            + (", or train RL from it: --stage rl --model " + str(Path(stage_dir) / FINAL) if name == "sft" else "")
            + ".")
    return done


def release(stage: Stage) -> None:
    """Free the engine, its optimizer and the model before the next stage builds its own.

    ``engine.destroy()`` alone does not free them: DeepSpeed ZeRO-3 appends the root module to
    the module-global ``FWD_MODULE_STACK`` of ``deepspeed.runtime.zero.parameter_offload`` when
    it wraps it and never pops it, and the module's forward/backward hooks are closures over the
    engine and the optimizer, so the whole SFT engine stayed reachable (about 10 GB resident at
    Qwen2.5-VL-3B widths; ``tests/test_stage_release.py``, ``benchmarks/stage_memory.py``).
    """
    engines = [stage.engine, stage.reference.engine if stage.reference is not None else None]
    for engine in engines:  # the policy's and the KL reference's (a ZeRO-3 inference engine too)
        module = getattr(engine, "module", None) if engine is not None else None
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        if module is not None:
            forget_module(module)
    stage.engine = None
    stage.reference = None
    stage.vllm_backend = None
    stage.loaded.model = None
    stage.loaded.hf_ds_config = None
    del engines, engine, module
    import gc

    gc.collect()
    _return_freed_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _return_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the OS (``malloc_trim(0)``), so that the
    resident set after a release shows what is still alive (CPU runs); a no-op elsewhere."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        pass


def forget_module(module: torch.nn.Module) -> None:
    """Drop DeepSpeed's process-global references to ``module`` and its submodules (the ZeRO-3
    forward module stack) and take every forward/backward hook off them (the hooks' closures
    hold the engine and its optimizer).  The module is not usable for training afterwards."""
    mods = list(module.modules())
    ids = {id(m) for m in mods}
    try:
        from deepspeed.runtime.zero import parameter_offload
    except ImportError:  # pragma: no cover - DeepSpeed is a dependency
        parameter_offload = None
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if id(m) not in ids]
    for m in mods:
        for name in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            hooks = getattr(m, name, None)
            if hasattr(hooks, "clear"):
                hooks.clear()
