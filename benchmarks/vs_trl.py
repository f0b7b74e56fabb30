"""Side by side with the peer: TRL's ``GRPOTrainer`` and our trainer's RL step, time per RL step.

Both sides train the same tiny Qwen2.5-VL (built by our loader; TRL gets its folder), on the same
synthetic affordance prompts (our task's ``messages``: image + text, the same samples at the same
step), with the same reward (our task's ``reward`` behind a TRL reward function), G = 16 samples
per prompt, the same token budget (TRL ``max_completion_length`` = our ``max_thought_tokens +
max_answer_tokens``), plain sampling at temperature 1 (top-k 0, top-p 1, vision tokens
suppressed on both sides), fp32, no gradient checkpointing, beta = 0, one optimisation pass per
rollout batch, token-mean loss (TRL ``dapo``), AdamW at the same learning rate, grad-norm clip 1.

Rows of the table (one RL step = rollout + rewards + advantages + loss + backward + optimizer):

- ``trl``: TRL's GRPOTrainer (G = 16 completions per prompt);
- ``ours T16A1``: our trainer's ``rl_step`` with K = 16 thoughts x M = 1 answer (plain GRPO);
- ``ours T4A4``: K = 4 thoughts x M = 4 answers (the same 16 rewards per prompt).

Our rollouts run on gathered ZeRO-3 parameters with DeepSpeed's module hooks and its
memory-efficient ``F.linear`` taken off for the duration (``vlm_grpo_ma.training.engine.
gathered_parameters``), as the trainer ships.

each in one process (TRL without DeepSpeed, as a single process runs it; ours on its default
DeepSpeed ZeRO-3 engine, one rank) and on 2 ranks under ZeRO-3 (TRL through ``accelerate launch
--num_processes 2`` with a ZeRO-3 DeepSpeed config; ours through the DeepSpeed launcher), with
``DS_ACCELERATOR=cpu`` and the shared-memory allreduce op build skipped (``vlm_grpo_ma.training.distributed``).  The ZeRO-3
settings are the same file for both sides (``configs/deepspeed/zero3.json``).

Time per step is wall time between the ends of consecutive optimizer steps (TRL: a
``TrainerCallback``; ours: around ``rl_step``), after ``--warmup`` steps, averaged over
``--steps`` steps.  Beside it, the CPU time of rank 0's process over the same steps: on a machine
shared with other work it moves less with the load than wall time does.  Runs are separate processes, one at a time, in the order of the table; with
``--rounds 2`` the order is reversed in the second round and the figures are averaged per round
then over rounds (the machine is shared: the load average is recorded before and after).

    .venv/bin/python benchmarks/vs_trl.py                     # everything: table + benchmarks/results/vs_trl.json
    .venv/bin/python benchmarks/vs_trl.py --worlds 1 --steps 3  # one process only, shorter

At real prompt lengths: ``--hidden`` builds a random Qwen2.5-VL of the released 3B's shapes at that
width (``benchmarks/wide_model.py``: ``--layers`` / ``--vision_hidden`` / ``--vision_layers``; the
tiny model's tokenizer) whose processor turns every image into ``--image_tokens`` visual tokens
(or a few more), and ``--thought_tokens`` / ``--answer_tokens`` set the length limits (TRL's
``max_completion_length`` is their sum)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vs_trl.py --worlds 1 --prompts 1 --steps 2 --warmup 1 \
        --hidden 1024 --image_tokens 256 --thought_tokens 100 --answer_tokens 20

Beside each row: the tokens its training forward computed per step (``fwd positions``, padding
included: TRL's prompt + completion rows; ours the layout's rows) and the unique-token limit of
our tree (each prompt once, each thought once, each answer once), as a ratio.

The random tiny model almost never closes ``</think>`` or ends its answer, so completions run to
the length limits on both sides and rewards are mostly 0: every step still does all the work
(neither side skips zero-advantage groups), which is what a step-time comparison needs.

TRL is a benchmark-only dependency (``pip install -e .[bench]``); nothing in ``vlm_grpo_ma``
imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, pstdev

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from wide_model import add_width_args, build_wide_model, width_label  # noqa: E402
RESULTS = REPO / "benchmarks" / "results"
DS_ZERO3 = REPO / "configs" / "deepspeed" / "zero3.json"

#: the shared settings of both sides
MODEL = "tiny-qwen2.5-vl"
TASK = "affordance"
G = 16  # samples (rewards) per prompt
MAX_THOUGHT, MAX_ANSWER = 32, 24  # configs/affordance.tiny.yaml; TRL max_completion_length = 56 (the defaults)
LR = 1e-4
SEED = 0

#: (label, side, K, M)
VARIANTS = [
    ("trl", "trl", G, 1),
    ("ours T16A1", "ours", 16, 1),
    ("ours T4A4", "ours", 4, 4),
]


# ----------------------------------------------------------------------------- workers
def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("DeepSpeed", "deepspeed", "transformers", "accelerate", "torch.distributed", "trl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _skip_shm_op() -> None:
    """DeepSpeed's CPU shared-memory allreduce is a ~40 s JIT build on first use: skip it (gloo)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def trl_ds_config(tmp: Path, prompts: int, world: int) -> Path:
    """configs/deepspeed/zero3.json for TRL, its ``auto`` batch fields filled (DeepSpeed checks them
    already when transformers loads the model under ``zero.Init``, before the Trainer fills them)."""
    cfg = {k: v for k, v in json.loads(DS_ZERO3.read_text()).items() if not k.startswith("_")}
    micro = prompts * G // world
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
               train_batch_size=micro * world, gradient_clipping=1.0, bf16={"enabled": False})
    path = tmp / f"trl_zero3_w{world}.json"
    path.write_text(json.dumps(cfg))
    return path


def step_samples(task, prompts: int, steps: int) -> list:
    """The samples of steps 0..steps-1, in order: exactly what our trainer's SampleStream gives."""
    from vlm_grpo_ma.training.data import SampleStream

    stream = SampleStream(task, prompts, SEED, "rl")
    return [s for step in range(steps) for s in stream.batch(step)]


def trl_row(messages: list[dict], sample_id: str) -> dict:
    """One TRL dataset row from our task's chat messages: image placeholders in the prompt, the
    image in the ``image`` column (TRL re-inserts it with ``prepare_multimodal_messages``)."""
    images, prompt = [], []
    for m in messages:
        content = []
        for item in m["content"]:
            if item.get("type") == "image":
                images.append(item["image"])
                content.append({"type": "image"})
            else:
                content.append(dict(item))
        prompt.append({"role": m["role"], "content": content})
    if len(images) != 1:
        raise ValueError(f"sample {sample_id}: expected one image, got {len(images)}")
    return {"prompt": prompt, "image": images[0], "sample_id": sample_id}


def make_trl_reward(task, family, tokenizer, samples: list):
    """Our task's reward as a TRL reward function.  The completion is decoded WITH special tokens
    (TRL's own ``completions`` drop them, and with them ``<think>``/``</think>``), split after the
    first ``</think>`` into (thought, answer) as our sampler splits it; a reward that raises scores
    0, as in our trainer."""
    by_id = {s.id: s for s in samples}
    stops = ("<|im_end|>", "<|endoftext|>")

    def affordance_reward(prompts, completions, completion_ids, sample_id, **kwargs):
        out = []
        for ids, sid in zip(completion_ids, sample_id):
            text = tokenizer.decode(ids, skip_special_tokens=False)
            thought, sep, answer = text.partition("</think>")
            for s in stops:
                answer = answer.split(s)[0]
            try:
                out.append(float(task.reward(thought + sep, answer, by_id[sid], family).total))
            except Exception:  # noqa: BLE001 - model output never crashes a run
                out.append(0.0)
        return out

    return affordance_reward


def run_trl(a) -> None:
    """One TRL GRPOTrainer run (one process, or one rank under ``accelerate launch``)."""
    _quiet()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _skip_shm_op()
    import copy

    import deepspeed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        # before TRL loads the model under zero.Init (which reads the world size from the process
        # group); accelerate would only create the group later, in the Trainer's constructor
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from vlm_grpo_ma import get_task
    from vlm_grpo_ma.models import ensure_tiny, load_policy, vision_token_ids

    path = a.model_dir or str(ensure_tiny(MODEL))
    policy = load_policy(path)
    task = get_task(TASK)
    total = a.warmup + a.steps
    samples = step_samples(task, a.prompts, total)
    ds = Dataset.from_list([trl_row(task.messages(s, policy.family), s.id) for s in samples])
    # TRL left-pads prompt_ids but takes mm_token_type_ids from processor(padding=True): a processor
    # passed in must pad on the left too, or shorter prompts get shifted mRoPE image positions
    # (TRL sets it when it loads the processor itself; huggingface/trl#5785). Ours pads right.
    processor = copy.deepcopy(policy.processor)
    processor.tokenizer.padding_side = "left"
    tmp = Path(tempfile.mkdtemp(prefix="vs_trl_trl_"))
    # use_cpu: without it transformers counts one process on a machine without GPUs (world_size 1)
    kw = {"use_cpu": True}
    if world > 1:
        kw["deepspeed"] = a.ds
    args = GRPOConfig(
        output_dir=str(tmp / "out"), report_to="none", save_strategy="no", logging_steps=10**6,
        log_completions=False, disable_tqdm=True, seed=SEED, data_seed=SEED, shuffle_dataset=False,
        max_steps=total, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        num_generations=G, per_device_train_batch_size=a.prompts * G // world, gradient_accumulation_steps=1,
        max_completion_length=a.thought_tokens + a.answer_tokens, temperature=1.0, top_k=0, top_p=1.0,
        generation_kwargs={"suppress_tokens": list(vision_token_ids(policy.tokenizer))},
        loss_type="dapo", beta=0.0, epsilon=0.2, num_iterations=1, scale_rewards="group",
        bf16=False, gradient_checkpointing=False, dataloader_num_workers=0, **kw,
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.cpu: list[float] = []
            self.lengths: list[float] = []
            self.rewards: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends = [time.perf_counter()]
            self.cpu = [time.process_time()]

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.cpu.append(time.process_time())
            m = trainer._metrics["train"]
            if m.get("completions/mean_length"):
                self.lengths.append(m["completions/mean_length"][-1])
            if m.get("reward"):
                self.rewards.append(m["reward"][-1])

    clock = Clock()
    reward = make_trl_reward(task, policy.family, policy.tokenizer, samples)
    trainer = GRPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=processor, callbacks=[clock])
    # the rollout phase (prompt tokenisation, generate, decode), timed like our ``time/rollout``
    rollout_times: list[float] = []
    generate = trainer._generate

    def timed_generate(prompts):
        t0 = time.perf_counter()
        out = generate(prompts)
        rollout_times.append(time.perf_counter() - t0)
        return out

    trainer._generate = timed_generate
    # the positions of the training forward (the one with gradients; prompt + completion rows)
    positions: list[int] = []
    per_token = trainer._get_per_token_logps_and_entropies

    def counted(model, input_ids, *args, **kw):
        if torch.is_grad_enabled():
            positions.append(int(input_ids.numel()))
        return per_token(model, input_ids, *args, **kw)

    trainer._get_per_token_logps_and_entropies = counted
    trainer.train()
    engine = type(trainer.model_wrapped).__name__
    if world > 1 and engine != "DeepSpeedEngine":
        raise RuntimeError(f"TRL did not run on DeepSpeed (model wrapped as {engine})")
    times = [b - e for e, b in zip(clock.ends, clock.ends[1:])]
    cpu = [b - e for e, b in zip(clock.cpu, clock.cpu[1:])]
    if trainer.accelerator.is_main_process:
        _write_result(a.out, {
            "side": "trl", "K": G, "M": 1, "world": world, "step_times": times, "cpu_times": cpu, "warmup": a.warmup,
            "completion_len": mean(clock.lengths[a.warmup:]) if len(clock.lengths) > a.warmup else None,
            "reward_mean": mean(clock.rewards) if clock.rewards else None,
            "phases": {"time/rollout": mean(rollout_times[a.warmup:]),
                       "time/rest": mean(times[a.warmup:]) - mean(rollout_times[a.warmup:])},
            "torch_threads": torch.get_num_threads(), "engine": engine,
            "fwd_positions": mean(positions[a.warmup:]) * world if len(positions) > a.warmup else None,
            "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if world > 1 else None,
        })


def run_ours(a) -> None:
    """Our trainer's RL step (``vlm_grpo_ma.training.rl.rl_step``) on its DeepSpeed engine."""
    _quiet()
    from vlm_grpo_ma.training import distributed as dist

    dist.prepare_environment()
    import torch

    from vlm_grpo_ma import get_task
    from vlm_grpo_ma.models import ensure_tiny
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.cli import parse_train_config
    from vlm_grpo_ma.training.data import SampleStream
    from vlm_grpo_ma.training.rl import RLState, rl_step

    from vlm_grpo_ma.training import rl as rl_mod

    path = a.model_dir or str(ensure_tiny(MODEL))
    total = a.warmup + a.steps
    tmp = Path(tempfile.mkdtemp(prefix="vs_trl_ours_"))
    # the positions of the training forward and the tree's unique tokens, per step
    counts = {"positions": 0, "unique": 0}
    build = rl_mod.build_train_batch

    def counted(model, rollout, *args, **kw):
        batch = build(model, rollout, *args, **kw)
        counts["positions"] += batch.num_positions
        counts["unique"] += sum(len(p) for p in rollout.prompt_ids) + batch.num_tokens
        return batch

    rl_mod.build_train_batch = counted
    cfg = parse_train_config([
        "--task", TASK, "--model", path, "--stage", "rl", "--output_dir", str(tmp), "--seed", str(SEED),
        "--num_thoughts", str(a.K), "--answers_per_thought", str(a.M), "--prompts_per_step", str(a.prompts),
        "--max_thought_tokens", str(a.thought_tokens), "--max_answer_tokens", str(a.answer_tokens),
        "--train_layout", a.layout,
        "--temperature", "1.0", "--top_k", "0", "--top_p", "1.0", "--rl_lr", str(LR), "--rl_warmup_steps", "0",
        "--rl_steps", str(total), "--ppo_epochs", "1", "--kl_coef", "0", "--loss_agg_mode", "token-mean",
        "--clip_low", "0.2", "--clip_high", "0.2", "--max_grad_norm", "1.0", "--weight_decay", "0",
        "--eval_samples", "0", "--report_to", "none", "--deepspeed", str(DS_ZERO3), "--bf16", "false",
    ])
    dist.init_distributed()
    torch.manual_seed(SEED * 1000 + dist.rank())
    task = get_task(TASK)
    st = stg.build_stage(cfg, "rl", path, global_batch=a.prompts, micro=0, lr=LR, warmup=0,
                         total_optimizer_steps=total)
    state = RLState(task)
    stream = SampleStream(task, a.prompts, SEED, "rl")
    st.engine.train()
    times, cpu, metrics, positions, unique = [], [], [], [], []
    for step in range(total):
        counts.update(positions=0, unique=0)
        t0, c0 = time.perf_counter(), time.process_time()
        m = rl_step(st, cfg, task, state, dist.shard(stream.batch(step)))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        metrics.append(m)
        positions.append(dist.all_reduce_sum(float(counts["positions"])))
        unique.append(dist.all_reduce_sum(float(counts["unique"])))
    if dist.is_main():
        kept = metrics[a.warmup:]
        _write_result(a.out, {
            "side": "ours", "K": a.K, "M": a.M, "world": dist.world_size(), "step_times": times, "cpu_times": cpu,
            "warmup": a.warmup,
            "completion_len": mean(m["rollout/thought_len"] + m["rollout/answer_len"] for m in kept),
            "reward_mean": mean(m["reward/mean"] for m in metrics),
            "phases": {k: mean(m[k] for m in kept) for k in ("time/rollout", "time/reward", "time/update")},
            "tokens_decoded": mean(m["rollout/tokens_decoded"] for m in kept),
            "fwd_positions": mean(positions[a.warmup:]), "unique_tokens": mean(unique[a.warmup:]),
            "layout": a.layout, "torch_threads": torch.get_num_threads(),
        })
    dist.barrier()


def _write_result(path: str, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=1))


# ----------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def command(side: str, K: int, M: int, world: int, a, out: Path) -> list[str]:
    """The exact command line of one run."""
    worker = [str(Path(__file__).resolve()), "--worker", side, "--K", str(K), "--M", str(M),
              "--prompts", str(a.prompts), "--steps", str(a.steps), "--warmup", str(a.warmup), "--out", str(out),
              "--thought_tokens", str(a.thought_tokens), "--answer_tokens", str(a.answer_tokens), "--layout", a.layout]
    if a.model_dir:
        worker += ["--model_dir", a.model_dir]
    if world == 1:
        return [sys.executable] + worker
    if side == "trl":
        ds = trl_ds_config(out.parent, a.prompts, world)
        return [_bin("accelerate"), "launch", "--use_deepspeed", "--deepspeed_config_file", str(ds),
                "--num_processes", str(world), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(_free_port())] + worker + ["--ds", str(ds)]
    return [_bin("deepspeed"), "--num_accelerators", str(world), "--master_port", str(_free_port())] + worker


def launch(label: str, side: str, K: int, M: int, world: int, a, tmp: Path) -> dict:
    out = tmp / f"{side}-K{K}M{M}-w{world}-{time.monotonic_ns()}.json"
    cmd = command(side, K, M, world, a, out)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    print(f"[{time.strftime('%H:%M:%S')}] {label} on {world} rank(s): {' '.join(cmd)}", flush=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"{label} (world {world}) failed with exit code {proc.returncode}:\n{tail}")
    r = json.loads(out.read_text())
    kept = r["step_times"][r["warmup"]:]
    kept_cpu = r["cpu_times"][r["warmup"]:]
    r.update(label=label, command=" ".join(cmd), wall_s=wall, load_before=load0, load_after=os.getloadavg()[0],
             step_mean=mean(kept), step_std=pstdev(kept) if len(kept) > 1 else 0.0, cpu_mean=mean(kept_cpu))
    print(f"    {r['step_mean']:.2f} s/step (+-{r['step_std']:.2f}, {len(kept)} steps), rank-0 CPU "
          f"{r['cpu_mean']:.2f} s/step, completion "
          f"{r['completion_len']:.1f} tokens, load {load0:.1f} -> {r['load_after']:.1f}", flush=True)
    return r


#: targets of the step-time ratio to TRL: the tiny model (issue 4), real prompt lengths (issue 22)
TARGETS_TINY = {"ours T16A1": "<= 1.0x", "ours T4A4": "<= 0.5x"}
TARGETS_REAL = {"ours T16A1": "<= 0.45x", "ours T4A4": "<= 0.25x"}


def table(results: dict, real: bool = False) -> str:
    """Rows per world size: step time, ratio to TRL, the targets."""
    lines = [f"{'world':>5}  {'run':<12}{'s/step':>9}{'+-':>7}{'x TRL':>8}{'CPU s/step':>12}{'x TRL':>8}"
             f"{'rollout s':>11}{'tokens/path':>13}{'fwd positions':>15}{'x unique':>10}   target (wall)"]
    targets = TARGETS_REAL if real else TARGETS_TINY
    for world, rows in results.items():
        trl = rows.get("trl")
        for label, *_ in VARIANTS:
            if label not in rows:
                continue
            r = rows[label]
            ratio = r["step_mean"] / trl["step_mean"] if trl else float("nan")
            cpu_ratio = r["cpu_mean"] / trl["cpu_mean"] if trl else float("nan")
            r["ratio_to_trl"], r["cpu_ratio_to_trl"] = ratio, cpu_ratio
            tgt = ""
            if label in targets:
                ok = ratio <= float(targets[label].split()[1].rstrip("x"))
                tgt = f"{targets[label]} {'met' if ok else 'NOT met'}"
            # unique-token limit: each prompt, thought and answer once (ours; TRL beside the same
            # prompts' T16A1 tree, whose unique tokens are its prompts and completions once)
            uniq = r.get("unique_tokens") or rows.get("ours T16A1", {}).get("unique_tokens")
            pos = r.get("fwd_positions")
            xu = f"{pos / uniq:>9.2f}x" if pos and uniq else f"{'-':>10}"
            lines.append(f"{world:>5}  {label:<12}{r['step_mean']:>9.2f}{r['step_std']:>7.2f}{ratio:>7.2f}x"
                         f"{r['cpu_mean']:>12.2f}{cpu_ratio:>7.2f}x{r['rollout_mean']:>11.2f}"
                         f"{r['completion_len']:>13.1f}{(pos or 0):>15.0f}{xu}   {tgt}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["trl", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--K", type=int, default=G, help=argparse.SUPPRESS)
    p.add_argument("--M", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--ds", help=argparse.SUPPRESS)  # TRL's DeepSpeed config under accelerate
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("--prompts", type=int, default=4, help="prompts per RL step (x16 samples each)")
    p.add_argument("--steps", type=int, default=5, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps run first and not measured")
    p.add_argument("--worlds", default="1,2", help="comma-separated process counts (1: one process, 2: 2-rank ZeRO-3)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the runs, reversing the order every other round")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (same for both sides)")
    p.add_argument("--only", default="", help="comma-separated row labels to run (default: all rows)")
    p.add_argument("--thought_tokens", type=int, default=MAX_THOUGHT, help="thought length limit (random models run to it)")
    p.add_argument("--answer_tokens", type=int, default=MAX_ANSWER, help="answer length limit")
    p.add_argument("--layout", default="tree", choices=("tree", "packed", "naive"), help="our training layout")
    add_width_args(p)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)  # the wide model's folder, built by the driver
    p.add_argument("--output", default=str(RESULTS / "vs_trl.json"))
    a = p.parse_args(argv)
    if a.worker == "trl":
        return run_trl(a)
    if a.worker == "ours":
        return run_ours(a)

    import trl
    import torch
    import transformers
    import deepspeed

    worlds = [int(w) for w in a.worlds.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    if a.hidden:
        a.model_dir = str(build_wide_model(tmp / "model", hidden=a.hidden, layers=a.layers,
                                           vision_hidden=a.vision_hidden, vision_layers=a.vision_layers,
                                           image_tokens=a.image_tokens, seed=SEED))
    runs: dict[int, dict[str, list[dict]]] = {w: {} for w in worlds}
    t_start = time.time()
    for rnd in range(a.rounds):
        order = [(w, v) for w in worlds for v in VARIANTS]
        if rnd % 2:
            order = order[::-1]
        for world, (label, side, K, M) in order:
            if a.only and label not in a.only.split(","):
                continue
            runs[world].setdefault(label, []).append(launch(label, side, K, M, world, a, tmp))
    results: dict[int, dict[str, dict]] = {}
    for world, by_label in runs.items():
        results[world] = {}
        for label, rs in by_label.items():
            results[world][label] = {
                **{k: rs[0][k] for k in ("side", "K", "M", "world", "command")},
                "step_mean": mean(r["step_mean"] for r in rs),
                "step_std": mean(r["step_std"] for r in rs),
                "cpu_mean": mean(r["cpu_mean"] for r in rs),
                "rollout_mean": mean(r["phases"]["time/rollout"] for r in rs),
                "completion_len": mean(r["completion_len"] for r in rs),
                "fwd_positions": mean(r["fwd_positions"] for r in rs) if rs[0].get("fwd_positions") else None,
                "unique_tokens": mean(r["unique_tokens"] for r in rs) if rs[0].get("unique_tokens") else None,
                "runs": rs,
            }
    text = table(results, real=bool(a.hidden))
    print(f"\nTime per RL step ({width_label(a)}, {a.prompts} prompts x {G} samples; lower is better; x TRL = run / TRL "
          "on the same number of ranks; CPU = process CPU time of rank 0; rollout = wall time of the sampling phase; "
          "fwd positions = tokens of the training forward per step, x unique = / the tree's unique tokens)")
    print(text)
    report = {
        "settings": {"model": width_label(a), "task": TASK, "prompts_per_step": a.prompts, "samples_per_prompt": G,
                     "max_thought_tokens": a.thought_tokens, "max_answer_tokens": a.answer_tokens,
                     "trl_max_completion_length": a.thought_tokens + a.answer_tokens, "our_layout": a.layout, "temperature": 1.0, "lr": LR,
                     "loss": "token-mean (TRL dapo)", "precision": "fp32", "warmup_steps": a.warmup,
                     "measured_steps": a.steps, "rounds": a.rounds, "omp_threads_per_process": a.threads,
                     "ds_config": str(DS_ZERO3.relative_to(REPO))},
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "deepspeed": deepspeed.__version__},
        "machine": {"cpus": os.cpu_count(), "note": "CPU shared with other work; see load_before/after per run"},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "command": " ".join([sys.executable, *sys.argv]),
        "results": {str(w): v for w, v in results.items()},
        "table": text,
    }
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".txt").write_text(
        f"{report['command']}\nstarted {report['started_utc']}, versions {report['versions']}\n\n{text}\n")
    print(f"\nwritten: {out} and {out.with_suffix('.txt')}")
    return report


if __name__ == "__main__":
    main()
