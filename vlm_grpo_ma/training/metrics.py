"""Metrics sinks: JSONL (always), TensorBoard and wandb (optional), on rank 0 only.

One record per step: ``{"stage": "rl", "step": 12, "reward/mean": 0.41, ...}`` in
``<run>/metrics.jsonl``; TensorBoard event files under ``<run>/tensorboard/<stage>``.  Names:
``reward/<task>/<part>``, ``reward/mean``, ``rollout/thought_len``, ``adv/thought_std``,
``loss/policy``, ``loss/kl``, ``clip/low|high``, ``grad/norm``, ``grad/gss``, ``time/*``,
``parse/<reason>``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from vlm_grpo_ma.training import distributed as dist

log = logging.getLogger(__name__)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no inf/nan; "inf"/"nan" strings keep the record readable
    return v


class MetricsLogger:
    """Writes step metrics of every stage of a run (no-op on ranks other than 0)."""

    def __init__(self, run_dir: str | Path, report_to: str = "tensorboard", config: Mapping | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = dist.is_main()
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._tb: dict[str, Any] = {}
        self._wandb = None
        sinks = {s.strip() for s in report_to.split(",") if s.strip()} - {"none"}
        self._use_tb = "tensorboard" in sinks
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if "wandb" in sinks:
            try:
                import wandb

                self._wandb = wandb.init(project="vlm-grpo-ma", dir=str(self.run_dir), config=dict(config or {}))
            except Exception as e:  # optional: a missing or offline wandb never stops training
                log.warning("wandb disabled: %s", e)

    def truncate_after(self, stage: str, step: int) -> None:
        """Drop JSONL records of ``stage`` past ``step`` (written after the checkpoint a run
        resumes from), so that the file reads as one uninterrupted run."""
        if not self.enabled or not self.jsonl_path.is_file():
            return
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if rec.get("stage") == stage and rec.get("step", -1) > step:
                continue
            kept.append(line)
        self.jsonl_path.write_text("".join(k + "\n" for k in kept))

    def log(self, stage: str, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"stage": stage, "step": step}
        rec.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._use_tb:
            w = self._tb.get(stage)
            if w is None:
                from torch.utils.tensorboard import SummaryWriter

                w = self._tb[stage] = SummaryWriter(str(self.run_dir / "tensorboard" / stage))
            for k, v in rec.items():
                if k not in ("stage", "step") and isinstance(v, (int, float)):
                    w.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))})

    def log_images(self, stage: str, step: int, tag: str, images) -> None:
        """PIL images as TensorBoard images ``<tag>/<i>`` of ``stage`` at ``step`` (TensorBoard only)."""
        if not self.enabled or not self._use_tb or not images:
            return
        import numpy as np

        w = self._tb.get(stage)
        if w is None:
            from torch.utils.tensorboard import SummaryWriter

            w = self._tb[stage] = SummaryWriter(str(self.run_dir / "tensorboard" / stage))
        for i, img in enumerate(images):
            w.add_image(f"{tag}/{i}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
        w.flush()

    def close(self) -> None:
        for w in self._tb.values():
            w.close()
        self._tb.clear()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path, stage: str | None = None) -> list[dict]:
    """The records of a metrics.jsonl (optionally of one stage)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if stage is None or rec.get("stage") == stage:
                out.append(rec)
    return out
