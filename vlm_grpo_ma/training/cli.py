"""The two-stage trainer, top to bottom: ``deepspeed scripts/train.py --task affordance``.

    config -> distributed -> task and data -> [SFT: evaluate, train, save, evaluate]
           -> [RL from the SFT model: train, save, evaluate] -> summary

Every run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` and
``tensorboard/``, ``<stage>/checkpoints/step-N`` (resumable) and ``<stage>/final`` (Hugging Face
model + processor), and ``summary.json`` (held-out metrics before SFT, after SFT, after RL).
Running the same command again with the same ``--output_dir`` resumes where it stopped.
"""

from __future__ import annotations

import importlib

import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from vlm_grpo_ma.training import distributed as dist

if TYPE_CHECKING:
    from vlm_grpo_ma.training.config import TrainConfig
    from vlm_grpo_ma.training.metrics import MetricsLogger
    from vlm_grpo_ma.training.periodic_eval import PeriodicEval

log = logging.getLogger("vlm_grpo_ma.train")


def parse_train_config(argv: Sequence[str] | None = None):
    """TrainConfig from ``--config FILE.yaml`` files and ``--key value`` overrides.

    Without any ``--config`` the task's CPU demo config ``configs/<task>.tiny.yaml`` is read first
    (so ``--task detection`` alone gets detection's token budgets); command-line values win.
    A ``--config`` path that is not a file here names a shipped config
    (``configs/affordance.qwen2_5_vl_3b.yaml`` or ``affordance.qwen2_5_vl_3b.yaml``)."""
    from vlm_grpo_ma.config import parse_config
    from vlm_grpo_ma.resources import resolve_file, shipped_dir
    from vlm_grpo_ma.training.config import ALL_ARGS, TrainConfig

    def shipped_or_own(path: str) -> str:
        try:
            return str(resolve_file(path, "configs"))
        except FileNotFoundError:
            return path  # parse_config reports the missing file

    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            argv[i + 1] = shipped_or_own(argv[i + 1])
        elif a.startswith("--config="):
            argv[i] = "--config=" + shipped_or_own(a.split("=", 1)[1])
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        # no --config: start from the task's shipped CPU demo (configs/<task>.tiny.yaml)
        task = "affordance"
        for i, a in enumerate(argv):
            if a == "--task" and i + 1 < len(argv):
                task = argv[i + 1]
            elif a.startswith("--task="):
                task = a.split("=", 1)[1]
        demo = shipped_dir("configs") / f"{task}.tiny.yaml"
        if demo.is_file():
            argv = ["--config", str(demo)] + argv
    parts = parse_config(ALL_ARGS, argv, description="Two-stage trainer: SFT warm-start, then GRPO-MA, on DeepSpeed.")
    cfg = TrainConfig(*parts)
    cfg.validate()
    return cfg


def _setup_logging() -> None:
    level = logging.INFO if dist.is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    s = seed * 1000 + dist.rank()  # each rank samples its own rollouts
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the trainer; returns the summary (rank 0 prints it).

    A rank that raises announces its exception to the others (``distributed.announce_failure``),
    whose watcher threads then stop them with that cause in their log: no rank waits forever in
    a collective for a rank that is gone."""
    from vlm_grpo_ma.training import lock as run_lock

    try:
        return _run(argv)
    except BaseException as e:
        dist.announce_failure(e)
        raise
    finally:
        dist.stop_failure_watch()
        run_lock.release_all()  # also after an error: a later run from this process (a notebook) may proceed


#: every module the run's steps import (inside the steps: DeepSpeed must not load before
#: ``dist.prepare_environment``), imported by :func:`_run` before the first step
STEP_MODULES = (
    "vlm_grpo_ma.config", "vlm_grpo_ma.training.lock", "vlm_grpo_ma.training.memory_plan",
    "vlm_grpo_ma.training.stage", "vlm_grpo_ma.training.engine", "vlm_grpo_ma.training.evaluate",
    "vlm_grpo_ma.training.metrics", "vlm_grpo_ma.training.sft", "vlm_grpo_ma.training.rl",
    "vlm_grpo_ma.training.periodic_eval",
)


def _run(argv: Sequence[str] | None = None) -> dict:
    """:func:`main` without its failure handling: the run's steps, top to bottom."""
    dist.prepare_environment()  # DS_ACCELERATOR=cpu without CUDA, before DeepSpeed is imported
    for name in STEP_MODULES:  # a broken install stops the run before SFT, not after it
        importlib.import_module(name)
    from vlm_grpo_ma.task import get_task
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.data import heldout_samples
    from vlm_grpo_ma.training.metrics import MetricsLogger

    cfg, out = _start(argv)
    task = get_task(cfg.data.task, **cfg.data.task_kwargs())
    train_samples, eval_samples = _load_data(cfg, task)
    heldout = heldout_samples(task, cfg.data.eval_samples, cfg.run.seed, eval_samples) if cfg.data.eval_samples else []
    logger = MetricsLogger(out, cfg.run.report_to, cfg.flat())
    ctx = _RunContext(cfg, task, logger, out / "summary.json", heldout, train_samples)
    periodic = _periodic_eval(cfg, task, heldout, logger, ctx.max_new)

    model_path = cfg.model.model
    sft_dir, rl_dir = out / "sft", out / "rl"
    if cfg.run.stage in ("sft", "all"):
        _sft_stage(ctx, periodic, model_path, sft_dir)
        model_path = str(sft_dir / stg.FINAL)
    elif stg.final_exists(sft_dir):
        model_path = str(sft_dir / stg.FINAL)  # --stage rl after an SFT run in the same output_dir
    if cfg.run.stage in ("rl", "all") and cfg.rl.rl_steps > 0:
        _rl_stage(ctx, periodic, model_path, rl_dir)
    return _finish(ctx, periodic, out, sft_dir, rl_dir)


def _start(argv: Sequence[str] | None) -> tuple[TrainConfig, Path]:
    """``(cfg, run directory)``: the config parsed, the processes joined (failure watch,
    logging), the run directory made and locked, ``config.yaml`` written, the memory plan
    checked and the seeds set."""
    from vlm_grpo_ma.config import save_config
    from vlm_grpo_ma.training import lock as run_lock
    from vlm_grpo_ma.training import memory_plan

    cfg = parse_train_config(argv)
    dist.init_distributed()
    dist.start_failure_watch()
    _setup_logging()
    if cfg.run.output_dir is None:
        stamp = dist.broadcast_object(time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        cfg.run.output_dir = f"runs/{cfg.data.task}-{stamp}"
    out = Path(cfg.run.output_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    run_lock.acquire(out)  # one live run per folder: refuses, naming the holder's pid
    if dist.is_main():
        save_config((cfg.model, cfg.data, cfg.sft, cfg.rl, cfg.run), out / "config.yaml")
        log.info("run directory: %s (%d rank%s)", out.resolve(), dist.world_size(), "s" if dist.world_size() > 1 else "")
    memory_plan.check_run(cfg)  # printed before anything is loaded; refuses a run that cannot fit
    _seed_everything(cfg.run.seed)
    return cfg, out


def _load_data(cfg: TrainConfig, task: Any) -> tuple[Any, Any]:
    """``(train samples, eval samples)`` from ``--train_data`` / ``--eval_data`` (each None when
    not given: the task's synthetic stream, and held-out set, are used instead)."""
    train_samples = eval_samples = None
    if cfg.data.train_data or cfg.data.eval_data:
        from vlm_grpo_ma.data.sources import load_samples

        if cfg.data.train_data:
            train_samples = load_samples(cfg.data.train_data, task.name, synthesize=task.synthetic,
                                         skip_invalid=cfg.data.skip_invalid,
                                         check_sample=getattr(task, "check_sample", None))
            if dist.is_main() and getattr(train_samples, "summary", None) is not None:
                log.info("train data %s: %s", cfg.data.train_data, train_samples.summary)
        if cfg.data.eval_data:
            eval_samples = load_samples(cfg.data.eval_data, task.name, synthesize=task.synthetic,
                                        skip_invalid=cfg.data.skip_invalid,
                                        check_sample=getattr(task, "check_sample", None))
    return train_samples, eval_samples


class _RunContext:
    """What the two stages share: the config, the task, the training samples (None: the task's
    synthetic stream), the held-out samples, the metrics logger, and the run's summary
    (``summary.json``: read back on ``--resume``, written after every held-out evaluation)."""

    def __init__(self, cfg: TrainConfig, task: Any, logger: MetricsLogger, summary_path: Path, heldout: list,
                 train_samples: Any) -> None:
        from vlm_grpo_ma.rollout import SamplingParams

        self.cfg, self.task, self.logger, self.heldout, self.train_samples = cfg, task, logger, heldout, train_samples
        self.summary_path = summary_path
        self.summary = json.loads(summary_path.read_text()) if (cfg.run.resume and summary_path.is_file()) else {}
        self.summary.setdefault("evals", {})
        self.max_new = cfg.rl.max_thought_tokens + cfg.rl.max_answer_tokens
        self.rl_sampling = SamplingParams(temperature=cfg.rl.temperature, top_p=cfg.rl.top_p, top_k=cfg.rl.top_k)

    def held_out_eval(self, stage, label: str) -> None:
        """Evaluate ``stage``'s model on the held-out samples (greedy; after SFT and RL also one
        sample per prompt at the RL temperature), as ``summary["evals"][label]``: logged, and
        written to ``summary.json`` on rank 0.  Nothing without held-out samples."""
        cfg, task, heldout = self.cfg, self.task, self.heldout
        if not heldout:
            return
        from vlm_grpo_ma.training.evaluate import evaluate

        t0 = time.perf_counter()
        m = evaluate(stage.engine.module, stage.processor, stage.family, task, heldout,
                     batch_size=cfg.data.eval_batch_size, max_new_tokens=self.max_new, gather_context=stage.gather)
        if label != "before_sft" and cfg.rl.rl_steps > 0:
            # what RL optimises: the reward of one sample per held-out prompt at the RL temperature
            sampled = evaluate(stage.engine.module, stage.processor, stage.family, task, heldout,
                               batch_size=cfg.data.eval_batch_size, max_new_tokens=self.max_new,
                               gather_context=stage.gather, sampling=self.rl_sampling)
            m[f"sampled@T={cfg.rl.temperature:g}/reward"] = sampled["eval/reward"]
        self.summary["evals"][label] = m
        self.logger.log("eval", {"before_sft": 0, "after_sft": 1, "before_rl": 1, "after_rl": 2}[label],
                        {f"{label}/{k}": v for k, v in m.items()})
        if dist.is_main():
            log.info("held-out %s (%d samples, %.0f s): %s", label, len(heldout), time.perf_counter() - t0,
                     ", ".join(f"{k}={v:.4f}" for k, v in m.items() if not k.startswith("eval/parse")))
            _write_json(self.summary_path, self.summary)

    def check_length_caps(self, stage) -> None:
        """Warn (once) when SFT targets do not fit the RL length caps: a config error that would
        otherwise only show as a lower reward (see data.length_cap_report)."""
        cfg, task, summary = self.cfg, self.task, self.summary
        if "length_caps" in summary or cfg.rl.rl_steps <= 0:
            return
        from vlm_grpo_ma.models.chat_templates import generation_prefix
        from vlm_grpo_ma.training.data import length_cap_report, stage_seed_base, synthetic_batch, target_token_lengths

        probe = list(self.train_samples)[:256] if self.train_samples is not None else synthetic_batch(
            task, 256, stage_seed_base(cfg.run.seed, "rl"))
        try:
            lengths = target_token_lengths(task, stage.family, stage.tokenizer, probe,
                                           generation_prefix(stage.processor))
        except Exception as e:  # a sample without an SFT target (RL-only data): nothing to compare
            log.info("length caps not checked (%s: %s)", type(e).__name__, e)
            return
        rep = length_cap_report(lengths, cfg.rl.max_thought_tokens, cfg.rl.max_answer_tokens)
        summary["length_caps"] = rep
        for part, cap in (("thought", cfg.rl.max_thought_tokens), ("answer", cfg.rl.max_answer_tokens)):
            if rep[f"{part}_over"] > 0 and dist.is_main():
                log.warning("%.1f%% of %d SFT targets have a %s longer than --max_%s_tokens %d (longest %d tokens): "
                            "RL cuts them there; raise the limit", 100 * rep[f"{part}_over"], rep["n"], part, part, cap,
                            rep[f"{part}_max"])


def _periodic_eval(cfg: TrainConfig, task: Any, heldout: list, logger: MetricsLogger, max_new: int) -> PeriodicEval | None:
    """The evaluation during training (``--eval_every``; None without it): on the held-out
    samples, or on the benchmark suite ``--eval_suite`` names, resolved by the command line
    (bench's loader); it keeps the best model by ``--keep_best_metric``."""
    from vlm_grpo_ma.training import checkpoint as ckpt
    from vlm_grpo_ma.training.periodic_eval import PeriodicEval

    p_task, p_samples, p_max_new, p_batch = task, heldout, max_new, cfg.data.eval_batch_size
    if cfg.data.eval_suite:
        from vlm_grpo_ma.training.periodic_eval import resolve_suite

        p_task, p_samples, p_max_new, p_batch = resolve_suite(cfg.data.eval_suite)
    return PeriodicEval(
        p_task, p_samples, logger, every=cfg.data.eval_every, batch_size=p_batch, max_new_tokens=p_max_new,
        images=cfg.data.eval_images, keep_best_metric=cfg.data.keep_best_metric, keep_best_mode=cfg.data.keep_best_mode,
        save_model=lambda st, path, record: ckpt.save_hf_model(st.engine, path, st.processor,
                                                              lora_scale=st.lora_scale(cfg), record=record),
    ) if cfg.data.eval_every > 0 else None


def _sft_stage(ctx: _RunContext, periodic: PeriodicEval | None, model_path: str, sft_dir: Path) -> None:
    """Stage 1, SFT from ``model_path`` into ``sft_dir``: evaluate (at the start of a run), train
    (resuming from a checkpoint), save the final model, evaluate, release.  A finished stage is
    skipped on ``--resume`` (refused if its budget differs)."""
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.sft import run_sft

    cfg = ctx.cfg
    if cfg.run.resume and stg.final_exists(sft_dir):
        stg.check_finished_budget(sft_dir, "sft", cfg.sft.sft_steps)  # refuses another budget, naming why
        log.info("SFT already complete in %s: skipped", sft_dir / stg.FINAL)
        return
    st = stg.build_stage(cfg, "sft", model_path, global_batch=cfg.sft.sft_batch_size,
                         micro=cfg.sft.sft_micro_batch_size, lr=cfg.sft.sft_lr,
                         warmup=cfg.sft.sft_warmup_steps, total_optimizer_steps=cfg.sft.sft_steps)
    ctx.check_length_caps(st)
    resumed = stg.maybe_resume(st, cfg)
    start = resumed["step"] if resumed else 0
    ctx.logger.truncate_after("sft", start)
    if start == 0 and "before_sft" not in ctx.summary["evals"]:
        ctx.held_out_eval(st, "before_sft")
    t0 = time.perf_counter()
    last = run_sft(st, cfg, ctx.task, ctx.logger, start, ctx.train_samples, periodic=periodic)
    ctx.summary["sft"] = {"steps": cfg.sft.sft_steps, "last": last, "seconds": time.perf_counter() - t0,
                          "skipped_steps": st.skipped_steps}
    stg.save_final(st, cfg)
    ctx.held_out_eval(st, "after_sft")
    stg.release(st)


def _rl_stage(ctx: _RunContext, periodic: PeriodicEval | None, model_path: str, rl_dir: Path) -> None:
    """Stage 2, RL (GRPO-MA) from ``model_path`` into ``rl_dir``: the KL reference if asked for,
    evaluate (at the start of an RL-only run), train (resuming from a checkpoint), save the final
    model, evaluate, release.  A finished stage is skipped on ``--resume`` (refused if its
    budget differs)."""
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.engine import build_reference
    from vlm_grpo_ma.training.rl import RLState, run_rl

    cfg = ctx.cfg
    if cfg.run.resume and stg.final_exists(rl_dir):
        stg.check_finished_budget(rl_dir, "rl", cfg.rl.rl_steps)
        log.info("RL already complete in %s: skipped", rl_dir / stg.FINAL)
        return
    st = stg.build_stage(cfg, "rl", model_path, global_batch=cfg.rl.prompts_per_step,
                         micro=cfg.rl.rl_micro_batch_size, lr=cfg.rl.rl_lr, warmup=cfg.rl.rl_warmup_steps,
                         total_optimizer_steps=cfg.rl.rl_steps * cfg.rl.ppo_epochs)
    if cfg.rl.kl_coef > 0:
        st.reference = build_reference(cfg.model, model_path, st.ds_config)
    ctx.check_length_caps(st)
    state = RLState(ctx.task)
    resumed = stg.maybe_resume(st, cfg)
    start = resumed["step"] if resumed else 0
    if resumed:
        state.load_state_dict(resumed["rl"])
    ctx.logger.truncate_after("rl", start)
    if start == 0 and cfg.run.stage == "rl" and "before_rl" not in ctx.summary["evals"]:
        ctx.held_out_eval(st, "before_rl")
    t0 = time.perf_counter()
    last = run_rl(st, cfg, ctx.task, ctx.logger, state, start, ctx.train_samples, periodic=periodic)
    ctx.summary["rl"] = {"steps": cfg.rl.rl_steps, "tree": f"T{cfg.rl.num_thoughts}A{cfg.rl.answers_per_thought}",
                         "last": last, "seconds": time.perf_counter() - t0, "skipped_steps": st.skipped_steps}
    stg.save_final(st, cfg)
    ctx.held_out_eval(st, "after_rl")
    stg.release(st)


def _finish(ctx: _RunContext, periodic: PeriodicEval | None, out: Path, sft_dir: Path, rl_dir: Path) -> dict:
    """The summary completed (periodic evaluation cost, where things were written), the metrics
    logger closed, ``summary.json`` written and the end-of-run table printed on rank 0; returns
    the summary."""
    from vlm_grpo_ma.training import stage as stg

    summary = ctx.summary
    if periodic is not None:
        summary["periodic_eval"] = periodic.totals()  # its cost: evaluations and their seconds
    summary["paths"] = {
        "run_dir": str(out.resolve()),
        "config": str((out / "config.yaml").resolve()),
        "metrics": str(ctx.logger.jsonl_path.resolve()),
        "tensorboard": str((out / "tensorboard").resolve()),
        "sft_model": str((sft_dir / stg.FINAL).resolve()) if stg.final_exists(sft_dir) else None,
        "rl_model": str((rl_dir / stg.FINAL).resolve()) if stg.final_exists(rl_dir) else None,
    }
    ctx.logger.close()
    if dist.is_main():
        _write_json(ctx.summary_path, summary)
        print(format_summary(ctx.task.name, summary), flush=True)
    dist.barrier()
    return summary


def format_summary(task_name: str, summary: dict) -> str:
    """The end-of-run table: held-out metrics per evaluation point, and where things were written."""
    evals = summary.get("evals", {})
    order = [k for k in ("before_sft", "after_sft", "before_rl", "after_rl") if k in evals]
    lines = ["", f"== {task_name}: held-out metrics (greedy decoding) =="]
    if order:
        keys = [k for k in evals[order[0]] if not k.startswith("eval/parse")]
        for o in order[1:]:
            keys += [k for k in evals[o] if k not in keys and not k.startswith("eval/parse")]
        width = max(len(k) for k in keys)
        lines.append(" " * width + "".join(f"{o:>13}" for o in order))
        for k in keys:
            lines.append(k.ljust(width) + "".join(
                f"{evals[o][k]:>13.4f}" if k in evals[o] else f"{'-':>13}" for o in order))
    else:
        lines.append("(no evaluation: eval_samples = 0)")
    for st in ("sft", "rl"):
        if st in summary:
            s = summary[st]
            lines.append(f"{st.upper()}: {s['steps']} steps in {s['seconds']:.0f} s"
                         + (f" ({s['tree']})" if "tree" in s else "")
                         + (f", {s['skipped_steps']} skipped (non-finite)" if s.get("skipped_steps") else ""))
    lines.append("written:")
    for k, v in summary.get("paths", {}).items():
        if v:
            lines.append(f"  {k:<12} {v}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
