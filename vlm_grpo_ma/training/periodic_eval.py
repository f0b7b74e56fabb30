"""Evaluation during training: the held-out set every ``eval_every`` steps of SFT and of RL.

Every peer evaluates as it trains (TRL ``eval_steps``, verl ``test_freq``, EasyR1 ``val_freq``).
At step s (s a multiple of ``eval_every``, and the stage's last step) of SFT (optimizer steps) or
RL (rollout batches), :class:`PeriodicEval`:

- decodes the run's held-out samples (or, with ``eval_suite``, a benchmark suite's task, task
  options, samples and ``max_new_tokens``: ``bench``'s suite loader) greedily and scores them with
  :func:`vlm_grpo_ma.training.evaluate.evaluate`: the strict format rule and the task's parser
  (``vlm_grpo_ma.format.parse_completion``), the task's reward through the reward guard, and
  ``task.metrics`` over the whole set: the pieces ``bench run`` scores with;
- logs the metrics as ``heldout/<metric>`` at step s under the stage ``<stage>_eval``
  (``metrics.jsonl`` records ``{"stage": "sft_eval", "step": s, ...}``; TensorBoard run
  ``tensorboard/<stage>_eval``: the held-out curve), with ``time/eval`` (seconds);
- logs ``eval_images`` drawn predictions (the sample's image with the reference and the
  prediction written under it) as TensorBoard images ``heldout/predictions/<i>``;
- with ``keep_best_metric``, saves the policy (Hugging Face folder, as ``final``) to
  ``<stage>/best`` when that held-out metric improves (``keep_best_mode`` max or min), with
  ``stage_record.json`` naming the metric, its value and the step; a resumed run reads it back.

It runs between two steps and touches nothing the steps use (the generation restores the
model's train mode), so the steps between evaluations cost what they cost without it; its own
cost is ``time/eval`` per evaluation and ``summary.json``'s ``periodic_eval`` totals.
Collective under several ranks: every rank calls it at the same steps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vlm_grpo_ma.training import checkpoint as ckpt
from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.training.evaluate import evaluate

log = logging.getLogger(__name__)

BEST = "best"

_suite_resolver: Optional[Callable] = None


def set_suite_resolver(fn: Optional[Callable]) -> None:
    """Install ``fn(name) -> (task, samples, max_new_tokens, batch_size)``, the resolution of
    ``--eval_suite`` (a benchmark suite by name). The command line (``vlm_grpo_ma.cli``,
    ``scripts/train.py``) installs ``bench``'s; ``training`` cannot import ``bench`` (a peer)."""
    global _suite_resolver
    _suite_resolver = fn


def resolve_suite(name: str):
    """``(task, samples, max_new_tokens, batch_size)`` of the benchmark suite ``name``."""
    if _suite_resolver is None:
        raise ValueError(f"eval_suite {name!r}: no suite resolver installed; run the trainer as `vlm-grpo-ma train` "
                         "or scripts/train.py (or call vlm_grpo_ma.cli.register_training_hooks() first)")
    return _suite_resolver(name)


def _shapes(obj: Any, depth: int = 0) -> tuple[list, list]:
    """Boxes ``[x1, y1, x2, y2]`` and points ``[x, y]`` (canonical floats in [0, 1]) found in a target
    or prediction (nested lists / dicts; polygons are point lists). Returns (boxes, points)."""
    boxes: list = []
    points: list = []
    if depth > 6 or obj is None:
        return boxes, points
    if isinstance(obj, dict):
        for v in obj.values():
            b, p = _shapes(v, depth + 1)
            boxes += b
            points += p
    elif isinstance(obj, (list, tuple)):
        nums = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj)
        if nums and len(obj) in (2, 4) and all(0.0 <= float(v) <= 1.0 for v in obj):
            (boxes if len(obj) == 4 else points).append([float(v) for v in obj])
        elif not nums:
            for v in obj:
                b, p = _shapes(v, depth + 1)
                boxes += b
                points += p
    return boxes, points


def draw_prediction(sample, completion: str, prediction: Any, reason: Optional[str], width: int = 320):
    """A PIL image: the sample's first image (if any) with the reference's geometry in green and the
    prediction's in red (boxes and points in canonical [0, 1] coordinates), above both as text."""
    from PIL import Image, ImageDraw

    img = None
    if getattr(sample, "images", None):
        first = sample.images[0]
        try:
            img = first.convert("RGB") if hasattr(first, "convert") else Image.open(first).convert("RGB")
        except Exception:  # an unreadable image must not stop training
            img = None
    if img is not None:
        img = img.resize((width, max(1, round(img.height * width / max(img.width, 1)))))
        pen = ImageDraw.Draw(img)
        for obj, colour in ((sample.target, (0, 220, 0)), (prediction, (255, 40, 40))):
            boxes, points = _shapes(obj)
            for x1, y1, x2, y2 in boxes[:20]:
                if x2 >= x1 and y2 >= y1:
                    pen.rectangle([x1 * img.width, y1 * img.height, x2 * img.width, y2 * img.height], outline=colour, width=2)
            for x, y in points[:40]:
                cx, cy = x * img.width, y * img.height
                pen.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], outline=colour, width=2)
    lines = [f"id {sample.id}", f"target: {json.dumps(sample.target, default=str)[:200]}",
             f"prediction: {json.dumps(prediction, default=str)[:200]}" if reason is None else f"parse error: {reason}",
             f"raw: {completion[-160:]!r}"]
    wrapped = []
    for line in lines:
        while len(line) > 52:
            wrapped.append(line[:52])
            line = "  " + line[52:]
        wrapped.append(line)
    text_h = 12 * len(wrapped) + 6
    top = img.height if img is not None else 0
    canvas = Image.new("RGB", (width, top + text_h), "white")
    if img is not None:
        canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrapped):
        draw.text((3, top + 3 + 12 * i), line, fill=(0, 0, 0))
    return canvas


class PeriodicEval:
    """Held-out evaluation every ``every`` steps of a stage (module docstring).

    Args:
        task, samples: the task and its held-out samples (empty: never evaluates).
        logger: the run's :class:`~vlm_grpo_ma.training.metrics.MetricsLogger`.
        every: evaluate at steps ``every, 2 every, ...`` and at the stage's last step; 0: never.
        batch_size, max_new_tokens: of the greedy decoding.
        images: predictions drawn into TensorBoard per evaluation.
        keep_best_metric, keep_best_mode: the held-out metric whose best value keeps a copy of the
            policy in ``<stage dir>/best`` (None: none kept), ``max`` or ``min``.
        save_model: ``(stage, out_dir, record) -> None``, collective (``stage.save_final``'s saver).
    """

    def __init__(self, task, samples: Sequence, logger, *, every: int, batch_size: int = 16,
                 max_new_tokens: int = 96, images: int = 4, keep_best_metric: Optional[str] = None,
                 keep_best_mode: str = "max", save_model: Optional[Callable] = None):
        if keep_best_mode not in ("max", "min"):
            raise ValueError(f"keep_best_mode must be max or min, got {keep_best_mode!r}")
        self.task, self.samples, self.logger = task, list(samples), logger
        self.every, self.batch_size, self.max_new_tokens = int(every), batch_size, max_new_tokens
        self.images, self.metric, self.mode = int(images), keep_best_metric, keep_best_mode
        self.save_model = save_model
        self.seconds = 0.0
        self.count = 0
        self.best: dict[str, float] = {}

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.samples) and self.every > 0 and (step % self.every == 0 or step == last_step)

    def _best_so_far(self, stage) -> Optional[float]:
        if stage.name not in self.best:
            rec = Path(stage.dir) / BEST / ckpt.STAGE_RECORD
            if rec.is_file():
                self.best[stage.name] = float(json.loads(rec.read_text()).get("value", math.nan))
        return self.best.get(stage.name)

    def __call__(self, stage, step: int, last_step: int) -> Optional[dict]:
        """Evaluate when ``step`` is due; returns the logged metrics (None when not due)."""
        if not self.due(step, last_step):
            return None
        t0 = time.perf_counter()
        completions: dict = {}
        m = evaluate(stage.engine.module, stage.processor, stage.family, self.task, self.samples,
                     batch_size=self.batch_size, max_new_tokens=self.max_new_tokens, gather_context=stage.gather,
                     completions_out=completions)
        out = {f"heldout/{k.removeprefix('eval/')}": v for k, v in m.items()}
        kept = False
        if self.metric is not None:
            if self.metric not in m and f"eval/{self.metric}" not in m:
                raise KeyError(f"keep_best_metric {self.metric!r} is not a held-out metric of task "
                               f"{self.task.name!r}; it has: {', '.join(sorted(m))}")
            value = m.get(self.metric, m.get(f"eval/{self.metric}"))
            best = self._best_so_far(stage)
            better = math.isfinite(value) and (best is None or not math.isfinite(best)
                                               or (value > best if self.mode == "max" else value < best))
            if better and self.save_model is not None:
                self.save_model(stage, Path(stage.dir) / BEST,
                                {"stage": stage.name, "step": step, "metric": self.metric, "value": value})
                self.best[stage.name] = value
                kept = True
            out["heldout/best"] = self.best.get(stage.name, value)
        seconds = time.perf_counter() - t0
        out["time/eval"] = seconds
        out["heldout/kept_best"] = float(kept)
        self.seconds += seconds
        self.count += 1
        self.logger.log(f"{stage.name}_eval", step, out)
        if self.images and dist.is_main():
            pics = [draw_prediction(self.samples[i], *completions[i]) for i in sorted(completions)[: self.images]]
            self.logger.log_images(f"{stage.name}_eval", step, "heldout/predictions", pics)
        if dist.is_main():
            log.info("%s step %d held-out (%d samples, %.1f s): %s", stage.name, step, len(self.samples), seconds,
                     ", ".join(f"{k}={v:.4f}" for k, v in out.items() if not k.startswith("heldout/parse")))
        return out

    def totals(self) -> dict:
        """``{"evaluations", "seconds", "best"}`` for the run's summary."""
        return {"evaluations": self.count, "seconds": self.seconds, "best": dict(self.best)}
