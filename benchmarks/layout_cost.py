#!/usr/bin/env python
"""The training forward + backward of one tree in each layout, at real prompt lengths.

A tree of ``--prompts`` prompts x K thoughts x M answers (one 448 x 448 image per prompt, resized
by the processor to ``--image_tokens`` visual tokens; thoughts of ``--thought`` and answers
of ``--answer`` tokens, random ids: the cost of a layout does not depend on what the tokens say) is
scored and back-propagated (``score_tokens`` + the clipped loss + ``backward``) in each layout:

- ``naive``: K*M rows prompt + thought + answer (the prompt and image K*M times);
- ``packed``: K rows prompt + thought + M answers (the prompt and image K times);
- ``tree``: one row per prompt (prompt and image once, every thought and answer once, 4D mask);
- ``tree_eager`` (only when asked for): the tree layout on eager attention, which takes the mask
  as an additive float tensor and materialises the [heads, L, L] scores;
- ``limit``: the unique-token limit: the tree's rows (each prompt, thought and answer once)
  with plain causal attention and no mask, the cheapest forward that computes every unique
  token once.

Each layout runs in its own process (so that its peak resident memory is its own): a warm-up
then ``--repeats`` timed passes, the medians of wall and process CPU time reported (the ratios
are of CPU time: on a machine shared with other work it moves less with the load), with the peak resident memory (``VmHWM``) above
what the process held before the first pass. The model is a random Qwen2.5-VL of the released
3B's shapes at ``--hidden`` / ``--vision_hidden`` width (``benchmarks/wide_model.py``), fp32, SDPA
attention, the vision tower trained; images of ``--image_tokens`` visual tokens.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/layout_cost.py                      # T16A1 and T4A4
    .venv/bin/python benchmarks/layout_cost.py --hidden 256 --image_tokens 64 --repeats 1  # quick

Prints a table and writes ``benchmarks/results/layout_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from wide_model import add_width_args, build_wide_model, width_label  # noqa: E402
LAYOUTS = ("tree", "limit", "packed", "naive")
#: also measurable (``--layouts``): the tree layout on eager attention (its additive mask, scores materialised)
EXTRA = ("tree_eager",)
SETTINGS = {"T16A1": (16, 1), "T4A4": (4, 4)}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def synthetic_tree(processor, prompts: int, K: int, M: int, thought: int, answer: int, seed: int, image_size: int = 448):
    """A TreeRollout with real prompts (chat template, one image each) and random generated ids."""
    import torch
    from PIL import Image

    from vlm_grpo_ma.data.collate import build_generation_inputs
    from vlm_grpo_ma.rollout.types import TreeRollout

    messages = [[{"role": "user", "content": [
        {"type": "image", "image": Image.new("RGB", (image_size, image_size), (40 + 20 * i, 90, 160))},
        {"type": "text", "text": "Locate the red box. Think step by step inside <think></think>, then give "
                                 "[x1, y1, x2, y2] inside <answer></answer>."}]}] for i in range(prompts)]
    inp = build_generation_inputs(processor, messages)
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(10, 1000, (n,), generator=g)  # noqa: E731 - ordinary text tokens
    zeros = lambda n: torch.zeros(n)  # noqa: E731
    keep = inp["attention_mask"].bool()
    patches = inp["image_grid_thw"].prod(-1)
    pix = torch.split(inp["pixel_values"], patches.tolist())
    return TreeRollout(
        prompt_ids=[inp["input_ids"][b][keep[b]] for b in range(prompts)],
        prompt_mm_token_type_ids=[inp["mm_token_type_ids"][b][keep[b]] for b in range(prompts)],
        pixel_values=list(pix), image_grid_thw=[inp["image_grid_thw"][b : b + 1] for b in range(prompts)],
        thought_ids=[[ids(thought) for _ in range(K)] for _ in range(prompts)],
        thought_logprobs=[[zeros(thought) for _ in range(K)] for _ in range(prompts)],
        thought_truncated=torch.zeros(prompts, K, dtype=torch.bool),
        answer_ids=[[[ids(answer) for _ in range(M)] for _ in range(K)] for _ in range(prompts)],
        answer_logprobs=[[[zeros(answer) for _ in range(M)] for _ in range(K)] for _ in range(prompts)],
        answer_truncated=torch.zeros(prompts, K, M, dtype=torch.bool),
    )


def worker(a) -> None:
    import torch

    from vlm_grpo_ma.algorithms import aggregation_weights, clipped_policy_loss
    from vlm_grpo_ma.algorithms.grpo_ma import ObjectiveSettings, token_terms
    from vlm_grpo_ma.models import load_policy
    from vlm_grpo_ma.rollout.layout import build_train_batch, score_tokens

    torch.manual_seed(0)
    attn = "eager" if a.layout.endswith("_eager") else "sdpa"
    policy = load_policy(a.model, dtype=torch.float32, attn_implementation=attn)
    model = policy.model.train()
    tree = synthetic_tree(policy.processor, a.prompts, a.K, a.M, a.thought, a.answer, seed=1)
    T, A = tree.thought_lengths(), tree.answer_lengths()
    w_t, w_a = aggregation_weights("token-mean", T, A)
    adv_t, adv_a = torch.randn(a.prompts, a.K), torch.randn(a.prompts, a.K, a.M)
    layout = {"limit": "tree", "tree_eager": "tree"}.get(a.layout, a.layout)
    terms = token_terms(ObjectiveSettings(), adv_t, adv_a, w_t, w_a, T, A)
    batch = build_train_batch(model, tree, layout=layout, pad_id=policy.tokenizer.pad_token_id or 0)
    if a.layout == "limit":
        batch.attention_mask = None  # plain causal attention over the same unique tokens

    def one_pass() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)
        if batch.attention_mask is None:
            from vlm_grpo_ma.rollout import layout as lay

            kw = dict(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      mm_token_type_ids=batch.mm_token_type_ids, pixel_values=batch.pixel_values,
                      image_grid_thw=batch.image_grid_thw, use_cache=False)
            h = model.model(**kw).last_hidden_state[batch.logit_rows, batch.logit_cols]
            logp = lay.selective_log_softmax(model.lm_head(h), batch.targets)
        else:
            logp = score_tokens(model, batch)
        loss, _ = clipped_policy_loss(logp, batch.rollout_logp, terms.advantages, terms.weights, clip_low=0.2, clip_high=0.2)
        loss.backward()
        return time.perf_counter() - t0, time.process_time() - c0

    rss0 = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    passes = [one_pass() for _ in range(1 + a.repeats)][1:]
    times, cpu = [t for t, _ in passes], [c for _, c in passes]
    peak = _status_kib("VmHWM")
    Path(a.out).write_text(json.dumps({
        "layout": a.layout, "K": a.K, "M": a.M, "rows": int(batch.input_ids.shape[0]), "row_len": int(batch.input_ids.shape[1]),
        "positions": batch.num_positions, "trained_tokens": batch.num_tokens,
        "image_patches_per_forward": int(batch.pixel_values.shape[0]),
        "times": times, "median_s": statistics.median(times), "cpu_times": cpu, "cpu_median_s": statistics.median(cpu), "peak_above_start_gib": (peak - rss0) / 2**20,
        "threads": torch.get_num_threads(),
    }))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_width_args(p)
    p.set_defaults(hidden=1024)
    p.add_argument("--thought", type=int, default=100, help="tokens per thought")
    p.add_argument("--answer", type=int, default=20, help="tokens per answer")
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--settings", default="T16A1,T4A4")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--K", type=int, help=argparse.SUPPRESS)
    p.add_argument("--M", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "layout_cost.json"))
    a = p.parse_args(argv)
    if a.layout:
        return worker(a)

    work = Path(tempfile.mkdtemp(prefix="layout_cost-"))
    model_dir = build_wide_model(work / "model", hidden=a.hidden, layers=a.layers, vision_hidden=a.vision_hidden,
                                 vision_layers=a.vision_layers, image_tokens=a.image_tokens)
    rows = []
    for name in a.settings.split(","):
        K, M = SETTINGS[name]
        for layout in a.layouts.split(","):
            out = work / f"{name}-{layout}.json"
            cmd = [sys.executable, __file__, "--model", str(model_dir), "--layout", layout, "--K", str(K), "--M", str(M),
                   "--prompts", str(a.prompts), "--thought", str(a.thought),
                   "--answer", str(a.answer), "--repeats", str(a.repeats), "--out", str(out)]
            print(f"[{time.strftime('%H:%M:%S')}] {name} {layout}", flush=True)
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} {layout} failed:\n" + "\n".join(proc.stderr.splitlines()[-30:]))
            r = json.loads(out.read_text())
            r["setting"] = name
            rows.append(r)
            print(f"    {r['median_s']:.2f} s (CPU {r['cpu_median_s']:.2f} s), peak +{r['peak_above_start_gib']:.2f} GiB, {r['rows']} rows x {r['row_len']}",
                  flush=True)
    lines = [f"{'setting':<8}{'layout':<8}{'rows x len':>12}{'positions':>10}{'patches':>9}{'wall s':>8}"
             f"{'CPU s':>8}{'x limit':>9}{'x tree':>8}{'peak GiB':>10}{'x tree':>8}"]
    for name in a.settings.split(","):
        by = {r["layout"]: r for r in rows if r["setting"] == name}
        for lay, r in by.items():
            # ratios of CPU time (on a machine shared with other work it moves less with the load)
            lim = by.get("limit", {}).get("cpu_median_s", float("nan"))
            tr = by.get("tree", {})
            r["x_limit"] = r["cpu_median_s"] / lim
            r["time_x_tree"] = r["cpu_median_s"] / tr.get("cpu_median_s", float("nan"))
            r["peak_x_tree"] = r["peak_above_start_gib"] / tr.get("peak_above_start_gib", float("nan"))
            lines.append(f"{name:<8}{lay:<8}{str(r['rows']) + ' x ' + str(r['row_len']):>12}{r['positions']:>10}"
                         f"{r['image_patches_per_forward']:>9}{r['median_s']:>8.2f}{r['cpu_median_s']:>8.2f}{r['x_limit']:>8.2f}x"
                         f"{r['time_x_tree']:>7.2f}x{r['peak_above_start_gib']:>10.2f}{r['peak_x_tree']:>7.2f}x")
    text = "\n".join(lines)
    print(text)
    import torch
    import transformers

    print(f"model: {width_label(a)}")
    report = {"model": width_label(a), "command": " ".join([sys.executable, *sys.argv]), "args": {k: v for k, v in vars(a).items() if v is not None},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "omp_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows, "table": text}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(report, indent=1))
    Path(a.output).with_suffix(".txt").write_text(f"{report['command']}\n\n{text}\n")
    print(f"written {a.output}")
    return report


if __name__ == "__main__":
    main()
