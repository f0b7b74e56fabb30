"""Resumable checkpoints (atomic, keep-last-N) and the final Hugging Face export.

A resumable checkpoint of a stage is a folder ``<stage_dir>/checkpoints/step-<N>`` holding
- ``ds/``: DeepSpeed's own checkpoint (model, optimizer and scheduler state, partitioned per rank),
- ``rng-rank<r>.pt``: each rank's Python, NumPy and torch RNG states,
- ``trainer_state.json``: the step, data position, counters and the gradient-spike tracker.
It is written under ``.tmp-step-<N>`` and renamed when every rank has finished: a crash during a
save leaves the previous checkpoint as it was, and a half-written folder is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_grpo_ma.models.processor import save_processor
from vlm_grpo_ma.training import distributed as dist

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d+)$")


def capture_rng() -> dict:
    """This process's Python, NumPy and torch (CPU and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints_dir(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / "checkpoints"


def list_checkpoints(stage_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a stage as (step, path), oldest first (temporary folders ignored)."""
    root = checkpoints_dir(stage_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(stage_dir)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(engine, stage_dir: str | Path, step: int, trainer_state: dict, keep_last: int = 2) -> Path:
    """Write a resumable checkpoint of ``step`` atomically and delete all but the last
    ``keep_last``.  Collective: every rank calls it."""
    root = checkpoints_dir(stage_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="ds", client_state={}, save_latest=False)
    torch.save(capture_rng(), tmp / f"rng-rank{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        state = dict(trainer_state, step=step, world_size=dist.world_size())
        with open(tmp / "trainer_state.json", "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(stage_dir)[: -max(1, keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def to_universal(ckpt: str | Path) -> Path:
    """``<ckpt>/universal``: the DeepSpeed checkpoint ``<ckpt>/ds`` converted to DeepSpeed's
    *universal checkpoint* format, which any number of ranks can load (one folder per parameter
    holding its full fp32 value and Adam moments; ``deepspeed/checkpoint/ds_to_universal.py``,
    https://www.deepspeed.ai/tutorials/universal-checkpointing/).

    Rank 0 converts once (in a subprocess, ``python -m deepspeed.checkpoint.ds_to_universal``)
    into a temporary folder renamed when complete; later resumes reuse it.  Collective; the
    folder must be shared by all ranks."""
    import subprocess
    import sys

    ckpt = Path(ckpt)
    out = ckpt / "universal"
    error = None
    if dist.is_main() and not (out / "zero").is_dir():
        tmp = ckpt / ".tmp-universal"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / "ds"),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
               # ZeRO-1/2: the converter wants a client-written ``universal_checkpoint_info`` record
               # (Megatron-DeepSpeed writes one); this flag adds the plain one, no tensor parallelism
               "--inject_missing_state"]
        log.info("converting %s to a universal checkpoint", ckpt / "ds")
        p = subprocess.run(cmd, capture_output=True, text=True)
        (ckpt / "latest_universal").unlink(missing_ok=True)  # the converter's pointer to its output: unused
        if p.returncode != 0:
            error = f"converting {ckpt / 'ds'} to a universal checkpoint failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
        else:
            os.replace(tmp, out)
    error = dist.broadcast_object(error)
    if error:
        raise RuntimeError(error)
    return out


def optimizer_is_whole(ckpt: str | Path) -> bool:
    """True when ``<ckpt>/ds`` holds no per-rank optimizer shards (``*_optim_states.pt``): without
    ZeRO (stage 0, fp32 or fp16) DeepSpeed saves the whole optimizer state inside the replicated
    ``mp_rank_00_model_states.pt``, which any number of ranks loads as it is."""
    return not any(Path(ckpt, "ds").glob("*_optim_states.pt"))


def load_checkpoint(engine, ckpt: str | Path) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``ckpt``; returns the
    trainer state saved with it.

    On another number of ranks than the checkpoint was written with, a checkpoint without ZeRO
    (stage 0: one replicated file with the whole optimizer, :func:`optimizer_is_whole`) loads
    as it is; a ZeRO-1/2/3 one (optimizer partitioned per rank) is first converted to DeepSpeed's universal format (:func:`to_universal`) and loaded from there: the
    fp32 weights, Adam moments and step, and the LR schedule are restored exactly, and the data
    position is the step (a step's global batch does not depend on the number of ranks,
    ``training/data.py``).  Only the per-rank RNG streams cannot carry over (ranks that had
    none keep their seeded ones), which changes RL sampling but not SFT."""
    ckpt = Path(ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    saved_world = int(state.get("world_size", dist.world_size()))
    if saved_world == dist.world_size() or optimizer_is_whole(ckpt):
        if saved_world != dist.world_size() and dist.is_main():
            log.warning("checkpoint %s was written by %d ranks, resuming on %d: its model and optimizer states "
                        "are whole (no ZeRO), loaded as they are (RL sampling streams will differ)", ckpt,
                        saved_world, dist.world_size())
        load_path, _ = engine.load_checkpoint(str(ckpt), tag="ds", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    else:
        if dist.is_main():
            log.warning("checkpoint %s was written by %d ranks, resuming on %d: loading it through DeepSpeed's "
                        "universal checkpoint (RL sampling streams will differ)", ckpt, saved_world, dist.world_size())
        universal = to_universal(ckpt)
        # the engine reads this switch from its config at load time; it is a load-only setting
        engine._config.load_universal_checkpoint = True
        try:
            load_path, _ = engine.load_checkpoint(str(ckpt), tag=universal.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt / 'ds'}")
    rng_file = ckpt / f"rng-rank{dist.rank()}.pt"
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=False))
    return state


# ---------------------------------------------------------------------------------------------
# Final model in Hugging Face format


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full state dict of the engine's module on rank 0 (None elsewhere).  Collective."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    return sd if dist.is_main() else None


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft LoRA state dict folded into plain weights: ``W + scale * B @ A`` under the base
    model's own parameter names (``base_model.model.`` and ``.base_layer`` removed)."""
    out: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"^(.*)\.lora_([AB])\.[^.]+\.weight$", k)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = v
            continue
        if ".lora_" in k:
            continue
        out[k] = v
    for prefix, ab in lora.items():
        wkey = f"{prefix}.base_layer.weight"
        w = out[wkey]
        out[wkey] = (w.float() + scale * (ab["B"].float() @ ab["A"].float())).to(w.dtype)
    clean = {}
    for k, v in out.items():
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        clean[k] = v
    return clean


#: written beside a stage's final model: what the stage completed (``{"stage", "steps", ...}``)
STAGE_RECORD = "stage_record.json"


def save_hf_model(engine, out_dir: str | Path, processor: Any, lora_scale: float | None = None,
                  record: dict | None = None) -> Path:
    """Save the trained policy in Hugging Face format (safetensors + config + processor),
    loadable by ``vlm_grpo_ma.models.load_policy`` and ``transformers``.  LoRA adapters are
    merged into the weights.  ``record`` (e.g. the number of steps trained) is written as
    ``stage_record.json`` in the same atomic rename.  Collective; rank 0 writes (atomically,
    like checkpoints)."""
    out_dir = Path(out_dir)
    sd = consolidated_state_dict(engine)
    if dist.is_main():
        model = engine.module
        if lora_scale is not None:
            sd = merge_lora_state_dict(sd, lora_scale)
            model = model.get_base_model()
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(str(tmp), state_dict=sd, safe_serialization=True)
        save_processor(processor, tmp)
        if record is not None:
            (tmp / STAGE_RECORD).write_text(json.dumps(record, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    dist.barrier()
    return out_dir
