"""DeepSpeed engine set-up: the config, partitioned loading, LoRA / frozen vision, optimizer,
scheduler, the frozen reference model, and generation on gathered ZeRO-3 parameters.

ZeRO-3 is the default (``configs/deepspeed/zero3.json``).  ``HfDeepSpeedConfig`` is created
BEFORE ``from_pretrained`` and kept alive so that transformers loads the weights already
partitioned (``deepspeed.zero.Init``), which is what lets a 3B model start on small GPUs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.resources import resolve_file
from vlm_grpo_ma.training.config import ModelArgs

log = logging.getLogger(__name__)


def bf16_available() -> bool:
    """bfloat16 training makes sense here: a CUDA device with native bf16."""
    return (not dist.on_cpu()) and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_ds_config(
    path: str | Path,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    bf16: bool,
    max_grad_norm: float,
    lr: float,
    weight_decay: float,
) -> dict:
    """The DeepSpeed JSON at ``path`` with every ``"auto"`` filled from the run's config.

    ``train_batch_size = micro_batch_size * grad_accum_steps * world_size`` (DeepSpeed checks it).
    """
    try:  # the user's own file first, else the shipped one (works from any working directory)
        path = resolve_file(path, "configs")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"DeepSpeed config: {e}") from None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    fills = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * dist.world_size(),
        "gradient_clipping": max_grad_norm,
    }
    for k, v in fills.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
    cfg.setdefault("bf16", {})
    if cfg["bf16"].get("enabled", "auto") == "auto":
        cfg["bf16"]["enabled"] = bool(bf16)
    if "optimizer" in cfg:
        params = cfg["optimizer"].setdefault("params", {})
        if params.get("lr", "auto") == "auto":
            params["lr"] = lr
        if params.get("weight_decay", "auto") == "auto":
            params["weight_decay"] = weight_decay
    for k, v in list(cfg.items()):
        if v == "auto":
            raise ValueError(f"{path}: field {k!r} is 'auto' and the trainer does not fill it")
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


@dataclass
class LoadedPolicy:
    """The policy ready for ``deepspeed.initialize``, with what the loops need beside it."""

    model: torch.nn.Module
    processor: Any
    tokenizer: Any
    family: Any
    #: kept alive: while it exists transformers loads (and re-loads) weights partitioned
    hf_ds_config: Any = None


def vision_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The vision tower's (and its merger's) parameters: names containing ``visual.``."""
    return [(n, p) for n, p in model.named_parameters() if ".visual." in f".{n}"]


def load_for_training(margs: ModelArgs, model_path: str, ds_config: dict) -> LoadedPolicy:
    """Load the policy through :func:`vlm_grpo_ma.models.load_policy`, partitioned under ZeRO-3,
    then freeze the vision tower and/or wrap in LoRA as configured."""
    from transformers.integrations import HfDeepSpeedConfig

    from vlm_grpo_ma.models import load_policy

    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    policy = load_policy(
        model_path,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        attn_implementation=margs.attn_implementation,
        gradient_checkpointing=margs.gradient_checkpointing,
        min_pixels=margs.min_pixels,
        max_pixels=margs.max_pixels,
    )
    model = policy.model
    if margs.freeze_vision:
        for _, p in vision_parameters(model):
            p.requires_grad_(False)
    if margs.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in margs.lora_target_modules.split(",") if t.strip()]
        # adapters on the language model only: the vision tower's modules share some names
        pattern = r"^(?!.*visual).*\.(" + "|".join(targets) + r")$"
        lcfg = LoraConfig(r=margs.lora_r, lora_alpha=margs.lora_alpha, lora_dropout=margs.lora_dropout,
                          target_modules=pattern, bias="none")
        if margs.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lcfg)
    return LoadedPolicy(model, policy.processor, policy.tokenizer, policy.family, hf_ds)


def build_engine(
    loaded: LoadedPolicy,
    ds_config: dict,
    *,
    lr: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float,
    schedule: str = "cosine",
):
    """``deepspeed.initialize`` with AdamW (the client's, or DeepSpeed's when the config names
    one, e.g. CPU Adam for offload) and a linear warm-up over ``warmup_steps``, then cosine decay
    to 0 at ``total_steps`` optimizer steps (``schedule="cosine"``) or a constant rate
    (``"constant"``).  Returns the engine."""
    import deepspeed
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    params = [p for p in loaded.model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters (check freeze_vision / lora_r)")
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)

    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be cosine or constant, got {schedule!r}")

    def scheduler(opt):
        if schedule == "constant":
            return get_constant_schedule_with_warmup(opt, num_warmup_steps=warmup_steps)
        return get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup_steps, num_training_steps=max(1, total_steps))

    engine, _, _, _ = deepspeed.initialize(
        model=loaded.model, model_parameters=params, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


class ReferencePolicy(NamedTuple):
    """The frozen reference of the KL term and the ``HfDeepSpeedConfig`` it was loaded under.

    transformers reads "is ZeRO-3 on" through a weak reference to the NEWEST ``HfDeepSpeedConfig``
    (``integrations.deepspeed.is_deepspeed_zero3_enabled``): the reference's is newer than the
    policy's, so it must live as long as the stage, or transformers would see ZeRO-3 as off."""

    engine: Any
    hf_ds_config: Any


def build_reference(margs: ModelArgs, model_path: str, ds_config: dict) -> ReferencePolicy:
    """A frozen copy of the starting policy for the KL term, wrapped by DeepSpeed for inference
    (partitioned like the policy under ZeRO-3, no optimizer)."""
    import deepspeed

    ref_cfg = copy.deepcopy(ds_config)
    ref_cfg.pop("optimizer", None)
    ref_cfg.pop("scheduler", None)
    stage = zero_stage(ref_cfg)
    if stage != 3:  # ZeRO-1/2 partition optimizer state only, meaningless without an optimizer
        ref_cfg["zero_optimization"] = {"stage": 0}
    ref_margs = copy.copy(margs)
    ref_margs.lora_r = 0
    ref_margs.gradient_checkpointing = False
    loaded = load_for_training(ref_margs, model_path, ref_cfg)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=loaded.model, config=ref_cfg)
    engine.eval()
    return ReferencePolicy(engine, loaded.hf_ds_config)


def _zero3_offload(engine) -> Any:
    """DeepSpeed's ZeRO-3 parameter-offload object that owns the module hooks, or None."""
    opt = getattr(engine, "optimizer", None)
    off = getattr(opt, "parameter_offload", None) if opt is not None else None
    if off is None or not hasattr(off, "forward_hooks") or not hasattr(off, "_register_deepspeed_module"):
        return None
    return off


@contextlib.contextmanager
def _plain_linear() -> Iterator[None]:
    """``torch.nn.functional.linear`` as torch ships it, for the duration.

    ``deepspeed.zero.Init`` (ZeRO-3 loading, ``memory_efficient_linear`` on by default) replaces
    it process-wide with an autograd Function that re-partitions weights after use.  With every
    parameter gathered and no gradient that is pure overhead: on the tiny CPU model it was a third
    of a rollout's time (879 linear calls, 0.33 s of 1.0 s, mostly the Function's argument
    binding).  Restored on exit; nothing to do where DeepSpeed did not patch it.
    """
    import torch.nn.functional as F

    try:
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as _Init
    except ImportError:  # pragma: no cover - DeepSpeed layout changed
        yield
        return
    original = getattr(_Init, "linear_bk", None)
    patched = F.linear
    if original is None or patched is original:
        yield
        return
    F.linear = original
    try:
        yield
    finally:
        F.linear = patched


@contextlib.contextmanager
def _without_zero3_hooks(engine) -> Iterator[None]:
    """Take ZeRO-3's per-module forward/backward hooks off while parameters are gathered anyway.

    Inside :func:`gathered_parameters` every parameter is already whole, so the hooks only add
    bookkeeping to each decoding forward (fetch/release checks on every module, every token).
    TRL's ``unwrap_model_for_generation`` removes them the same way; they are re-registered on
    exit (and the coordinator's trace invalidated, since generation forwards differ from training
    ones).  Relies on DeepSpeed internals: where they are missing the hooks are simply kept.
    """
    off = _zero3_offload(engine)
    if off is None:
        yield
        return
    for p in off.module.parameters(recurse=True):
        active = getattr(p, "ds_active_sub_modules", None)
        if active is not None:
            active.clear()
    for hook in list(off.forward_hooks) + list(off.backward_hooks):
        hook.remove()
    off.forward_hooks, off.backward_hooks = [], []
    try:
        yield
    finally:
        coordinator = getattr(off, "param_coordinator", None)
        if coordinator is not None and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()
        off._register_deepspeed_module(off.module)


@contextlib.contextmanager
def gathered_parameters(engine, remove_hooks: bool = True) -> Iterator[None]:
    """Full (un-partitioned) parameters on every rank for generation under ZeRO-3.

    Inside, each rank runs ``generate`` on its own prompts with no collective per forward, so
    ranks that stop at different lengths cannot deadlock.  With ``remove_hooks`` (default) the
    ZeRO-3 module hooks are also taken off for the duration (:func:`_without_zero3_hooks`): the
    rollout's many small forwards then cost what they cost on a plain model.  A no-op below ZeRO-3.
    """
    if engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    params = [p for p in engine.module.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if not remove_hooks:
            yield
            return
        with _without_zero3_hooks(engine), _plain_linear():
            yield


def unwrap(engine) -> torch.nn.Module:
    """The transformers model inside the engine (and inside peft, if any)."""
    model = engine.module
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model
