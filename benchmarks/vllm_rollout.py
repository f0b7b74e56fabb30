"""vLLM against the transformers backend on the same GRPO-MA trees, in one run (issue 21).

Run it in the vLLM environment (``bash scripts/setup_vllm.sh`` prints its python):

    OMP_NUM_THREADS=2 ~/.cache/vlm_grpo_ma/venv-vllm/bin/python benchmarks/vllm_rollout.py

One random Qwen2.5-VL (``--hidden`` / ``--layers``, head_dim 64: a size vLLM's CPU attention
supports) is saved once and loaded by both backends (float32).  For T4A4 and T16A1 (16 rewards a
prompt each) on the same B prompts, ``--repeats`` times, alternating which backend goes first:

- wall seconds and generated tokens per second of each backend, and vLLM / transformers in the
  same run; vLLM's prefix-cache hits (stage 2 continues prompt + thought) and T4A4 / T16A1 decoded
  tokens on vLLM;
- weight sync (vLLM's in-place reload of every weight, then the prefix-cache reset): seconds
  against the bytes sent, for this model and for ``--sync-hidden`` (a wider one);
- the engine's sampled log-probs against the trainer's recomputed ones on the same tokens, float32
  and bfloat16 engines (a second engine), and what truncated importance sampling (TIS, cap 2) does
  with the bfloat16 mismatch.

A random model rarely samples ``</think>`` or an end token, so thoughts and answers run to their
limits (``--thought-tokens``, ``--answer-tokens``), the same for both backends.  Prints a table
and writes ``benchmarks/results/vllm_rollout.json``.  On a shared machine read the ratios, not
the seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

SETTINGS = {"T4A4": (4, 4), "T16A1": (16, 1)}


def save_model(family: str, hidden: int, layers: int, seed: int, out: Path) -> Path:
    """A random Qwen-VL of the requested width (rollout_cost.build_model) saved with the tiny
    model's processor, so vLLM can load it."""
    from rollout_cost import build_model

    from vlm_grpo_ma.models.processor import save_processor

    policy, _ = build_model(family, hidden, layers, seed)
    policy.model.save_pretrained(out, safe_serialization=True)
    save_processor(policy.processor, out)
    return out


def logprob_mismatch(policy, backend, messages, sampling, cap: float = 2.0) -> dict:
    """Engine vs trainer log-probs on one sampled T2A2 tree: max / mean |diff| and TIS weights."""
    from vlm_grpo_ma.algorithms.tis import tis_metrics, tis_weights
    from vlm_grpo_ma.rollout.layout import build_train_batch, score_tokens

    tree = backend.generate_tree_from_messages(messages, 2, 2, sampling)
    batch = build_train_batch(policy.model, tree, layout="packed", pad_id=policy.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        mine = score_tokens(policy.model, batch, sampling.temperature).float().cpu()
    theirs = batch.rollout_logp.float().cpu()
    ok = torch.isfinite(theirs)
    d = (mine[ok] - theirs[ok]).abs()
    w = tis_weights(mine, theirs, cap)
    return {"tokens": int(ok.sum()), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "ratio_mean": float(torch.exp(mine[ok] - theirs[ok]).mean()), **tis_metrics(w, cap)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="tiny-qwen2.5-vl")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sync-hidden", type=int, default=1024, help="a second, wider model for the sync timing")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--thought-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-gib", type=float, default=0.5, help="vLLM KV cache (host RAM on the CPU platform)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vllm_rollout.json"))
    args = ap.parse_args(argv)

    import vllm

    from rollout_cost import make_messages

    from vlm_grpo_ma.models import load_policy
    from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams
    from vlm_grpo_ma.rollout.vllm import VLLMBackend

    tmp = Path(tempfile.mkdtemp(prefix="vllm_rollout_"))
    path = save_model(args.family, args.hidden, args.layers, args.seed, tmp / "model")
    policy = load_policy(str(path), dtype="float32")
    n_params = sum(p.numel() for p in policy.model.parameters())
    kv = int(args.kv_gib * 2**30)
    t0 = time.perf_counter()
    engine = VLLMBackend(str(path), processor=policy.processor, family=policy.family, dtype="float32",
                         kv_cache_bytes=kv, seed=args.seed)
    engine_start = time.perf_counter() - t0
    hf = HFRolloutBackend(policy.model, processor=policy.processor)
    backends = {"vllm": engine, "hf": hf}
    messages = make_messages(args.prompts, args.seed)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_thought_tokens=args.thought_tokens,
                              max_answer_tokens=args.answer_tokens, seed=args.seed)
    for be in backends.values():  # warm-up
        be.generate_tree_from_messages(messages[:2], 2, 2, dataclasses.replace(sampling, max_thought_tokens=4, max_answer_tokens=2))

    walls = {(b, s): [] for b in backends for s in SETTINGS}
    trees = {}
    for r in range(args.repeats):
        for bname in (list(backends) if r % 2 == 0 else list(backends)[::-1]):
            for sname, (K, M) in SETTINGS.items():
                t = time.perf_counter()
                tree = backends[bname].generate_tree_from_messages(messages, K, M, dataclasses.replace(sampling, seed=args.seed + r))
                walls[(bname, sname)].append(time.perf_counter() - t)
                trees[(bname, sname)] = tree
                print(f"  repeat {r}: {bname} {sname} {walls[(bname, sname)][-1]:.2f} s", flush=True)

    rows = {}
    for (bname, sname), w in walls.items():
        tree = trees[(bname, sname)]
        gen = float(tree.stats["tokens_generated"])
        rows[f"{bname} {sname}"] = {
            "wall_s_median": statistics.median(w), "wall_s_all": w, "tokens_generated": gen,
            "tokens_per_s": gen / statistics.median(w),
            "tokens_prompt": float(tree.stats.get("tokens_prompt", 0.0)),
            "tokens_prefix_cached": float(tree.stats.get("tokens_prefix_cached", 0.0)),
            "mean_prompt_len": float(statistics.mean(len(p) for p in tree.prompt_ids)),
        }
    ratios = {s: rows[f"vllm {s}"]["wall_s_median"] / rows[f"hf {s}"]["wall_s_median"] for s in SETTINGS}

    # weight sync: this model, then a wider one loaded into a second engine
    sync = []
    for rnd in range(3):
        st = engine.sync_weights(policy.model)
        sync.append({"model_params": n_params, "bytes": st.bytes, "seconds": st.seconds, "tensors": st.tensors})
    # log-prob mismatch, float32 engine
    lp_sampling = dataclasses.replace(sampling, max_thought_tokens=32, max_answer_tokens=8)
    mismatch = {"float32": logprob_mismatch(policy, engine, messages[:4], lp_sampling)}
    del engine
    import gc

    gc.collect()
    # bfloat16 engine on the same weights (the trainer stays float32: the usual mixed set-up)
    engine16 = VLLMBackend(str(path), processor=policy.processor, family=policy.family, dtype="bfloat16",
                           kv_cache_bytes=kv, seed=args.seed)
    engine16.sync_weights(policy.model)
    mismatch["bfloat16"] = logprob_mismatch(policy, engine16, messages[:4], lp_sampling)
    del engine16
    gc.collect()
    if args.sync_hidden:
        wide_path = save_model(args.family, args.sync_hidden, args.layers, args.seed, tmp / "wide")
        wide = load_policy(str(wide_path), dtype="float32")
        wide_engine = VLLMBackend(str(wide_path), processor=wide.processor, family=wide.family, dtype="float32",
                                  kv_cache_bytes=kv, seed=args.seed)
        n_wide = sum(p.numel() for p in wide.model.parameters())
        for rnd in range(3):
            st = wide_engine.sync_weights(wide.model)
            sync.append({"model_params": n_wide, "bytes": st.bytes, "seconds": st.seconds, "tensors": st.tensors})
        del wide_engine
    for s in sync:
        s["gib_per_s"] = s["bytes"] / 2**30 / s["seconds"]

    result = {
        "benchmark": "vllm_rollout",
        "command": "benchmarks/vllm_rollout.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "vllm": vllm.__version__, "torch": torch.__version__, "platform": platform.platform(),
        "threads": torch.get_num_threads(), "load_average_1min_end": os.getloadavg()[0],
        "model": {"family": args.family, "hidden": args.hidden, "layers": args.layers, "params": n_params},
        "prompts": args.prompts, "thought_tokens": args.thought_tokens, "answer_tokens": args.answer_tokens,
        "engine_start_s": engine_start, "rows": rows,
        "wall_ratio_vllm_over_hf": ratios,
        "vllm_decoded_ratio_T4A4_over_T16A1": rows["vllm T4A4"]["tokens_generated"] / rows["vllm T16A1"]["tokens_generated"],
        "vllm_wall_ratio_T4A4_over_T16A1": rows["vllm T4A4"]["wall_s_median"] / rows["vllm T16A1"]["wall_s_median"],
        "weight_sync": sync, "logprob_mismatch": mismatch,
    }
    print(f"model {args.family} hidden={args.hidden} layers={args.layers} params={n_params / 1e6:.1f}M, B={args.prompts}, "
          f"thought<={args.thought_tokens}, answer<={args.answer_tokens}; vLLM {vllm.__version__}, engine start {engine_start:.0f} s")
    print(f"{'backend setting':16} {'wall s':>8} {'tok/s':>8} {'prompt tok':>11} {'prefix-cached':>14}")
    for name, r in rows.items():
        print(f"{name:16} {r['wall_s_median']:8.2f} {r['tokens_per_s']:8.0f} {r['tokens_prompt']:11.0f} {r['tokens_prefix_cached']:14.0f}")
    for s, x in ratios.items():
        print(f"{s}: vLLM / transformers wall time {x:.2f}")
    print(f"vLLM T4A4 / T16A1: generated tokens {result['vllm_decoded_ratio_T4A4_over_T16A1']:.2f}, "
          f"wall time {result['vllm_wall_ratio_T4A4_over_T16A1']:.2f}")
    for s in sync:
        print(f"sync {s['model_params'] / 1e6:.1f}M params, {s['bytes'] / 2**20:.0f} MiB: {s['seconds']:.3f} s ({s['gib_per_s']:.2f} GiB/s)")
    for k, m in mismatch.items():
        print(f"log-prob mismatch, {k} engine vs float32 trainer ({m['tokens']} tokens): max {m['max_abs']:.2e}, "
              f"mean {m['mean_abs']:.2e}; TIS(2) mean weight {m['tis/mean']:.4f}, capped {m['tis/capped']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
