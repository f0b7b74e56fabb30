#!/usr/bin/env python
"""Peak memory of the token log-probabilities: chunked ``selective_log_softmax`` against the naive
``log_softmax(logits.float(), -1).gather(...)``, forward + backward, at Qwen's vocabulary.

Setting (as in training): bf16 logits [B=1, T=2048, V=151936] produced by a bf16 lm_head
(``hidden [T, 64] @ W [64, V]``; a hidden size of 64 keeps the head's own tensors at 19 MiB so
they do not blur the figure), log-probs of the sampled tokens, ``(logp * mask).sum().backward()``
down to the head's weight gradient.

What is measured ("extra peak"): the highest memory in use during forward + backward minus the
memory in use just before it (the logits are already there, so both methods are charged only for
what they add; the bf16 gradient of the logits, 0.58 GiB, which every method but the in-place one
must allocate for the layer below, is inside the figure, as is the head's 19 MiB weight gradient).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (exact, allocator
  level).
* CPU: each method runs in a FRESH subprocess; the kernel's peak resident set (VmHWM in
  /proc/self/status) is reset through /proc/self/clear_refs right before the measured call and
  read after it, minus the resident set before it. glibc is told to serve every allocation over
  1 MiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and
  the figure follows torch's live tensors; pages of the interpreter and libraries are warmed up
  before the baseline. Falls back to ``ru_maxrss`` deltas where clear_refs is not permitted.

Usage:
    python benchmarks/logprob_memory.py                 # T=2048, V=151936, writes benchmarks/results/
    python benchmarks/logprob_memory.py --T 256 --V 32000 --out /tmp/x   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "naive_fp32": "log_softmax(logits.float()).gather  (the usual reference)",
    "naive_bf16": "log_softmax(logits).gather in bf16  (no upcast; imprecise)",
    "selective": "selective_log_softmax (chunked, custom backward)",
    "selective_inplace": "selective_log_softmax(inplace_backward=True)",
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_one(method: str, t: int, v: int, chunk_size: int, device: str) -> dict:
    """Measure one method in this process (called in a fresh subprocess on CPU)."""
    import torch

    from vlm_grpo_ma.algorithms import naive_log_softmax_gather, selective_log_softmax

    torch.manual_seed(0)

    def fn(logits, index):
        if method == "naive_fp32":
            return naive_log_softmax_gather(logits, index)
        if method == "naive_bf16":
            return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return selective_log_softmax(logits, index, chunk_size=chunk_size, inplace_backward=method == "selective_inplace")

    hidden_size = 64
    # warm up kernels and code pages on a small input
    w_small = torch.randn(hidden_size, 1000, device=device, dtype=torch.bfloat16, requires_grad=True)
    small = torch.randn(1, 8, hidden_size, device=device, dtype=torch.bfloat16) @ w_small
    fn(small, torch.randint(0, 1000, (1, 8), device=device)).sum().backward()

    # the lm_head: bf16 logits [1, T, V] = hidden @ W, no float32 [T, V] ever exists outside the measurement
    hidden = torch.randn(1, t, hidden_size, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(hidden_size, v, device=device) * 0.25).to(torch.bfloat16).requires_grad_()
    logits = hidden @ weight
    index = torch.randint(0, v, (1, t), device=device)
    mask = torch.ones(1, t, device=device)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        (fn(logits, index) * mask).sum().backward()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated()
        how = "torch.cuda.max_memory_allocated"
    else:
        exact = _reset_peak()
        before = _status_kib("VmRSS") * 1024
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        (fn(logits, index) * mask).sum().backward()
        seconds = time.perf_counter() - start
        if exact:
            peak = _status_kib("VmHWM") * 1024
            how = "VmHWM (reset via clear_refs) - VmRSS before"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            before = max(before, maxrss_before)
            how = "ru_maxrss delta (clear_refs not permitted: a lower bound)"
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16
    return {
        "method": method,
        "extra_peak_bytes": int(peak - before),
        "logits_bytes": logits.numel() * logits.element_size(),
        "head_weight_grad_bytes": weight.numel() * weight.element_size(),
        "seconds": seconds,
        "measured_by": how,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=2048, help="tokens (B = 1)")
    parser.add_argument("--V", type=int, default=151936, help="vocabulary size (Qwen2/2.5/3-VL: 151936)")
    parser.add_argument("--chunk-size", type=int, default=64, help="rows per chunk of selective_log_softmax")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--one", choices=sorted(METHODS), help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args()

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(run_one(args.one, args.T, args.V, args.chunk_size, device)))
        return

    rows = []
    for method in METHODS:
        if device == "cuda":
            row = run_one(method, args.T, args.V, args.chunk_size, device)
            torch.cuda.empty_cache()
        else:
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            cmd = [sys.executable, __file__, "--one", method, "--T", str(args.T), "--V", str(args.V), "--chunk-size", str(args.chunk_size)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)

    base = next(r for r in rows if r["method"] == "naive_fp32")
    gib = 1024**3
    print(f"\nLog-prob memory, forward + backward, bf16 logits [1, {args.T}, {args.V}] "
          f"({base['logits_bytes'] / gib:.2f} GiB) on {device} ({rows[0]['measured_by']})\n")
    print("| method | extra peak (GiB) | vs naive fp32 | with the logits (GiB) | vs naive fp32 | time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        r["ratio_vs_naive_fp32"] = r["extra_peak_bytes"] / base["extra_peak_bytes"]
        r["peak_with_logits_bytes"] = r["extra_peak_bytes"] + r["logits_bytes"]
        r["ratio_with_logits_vs_naive_fp32"] = r["peak_with_logits_bytes"] / (base["extra_peak_bytes"] + base["logits_bytes"])
        print(f"| {METHODS[r['method']]} | {r['extra_peak_bytes'] / gib:.2f} | {r['ratio_vs_naive_fp32']:.3f}x "
              f"| {r['peak_with_logits_bytes'] / gib:.2f} | {r['ratio_with_logits_vs_naive_fp32']:.3f}x | {r['seconds']:.2f} |")
    sel = next(r for r in rows if r["method"] == "selective")
    inp = next(r for r in rows if r["method"] == "selective_inplace")
    print(f"\nselective / naive fp32 extra peak: {sel['ratio_vs_naive_fp32']:.3f}x (target <= 0.25x); "
          f"counting the logits themselves: {sel['ratio_with_logits_vs_naive_fp32']:.3f}x")
    print(f"in-place backward: {inp['ratio_vs_naive_fp32']:.3f}x; counting the logits: {inp['ratio_with_logits_vs_naive_fp32']:.3f}x")
    print("(times are informative only: this machine's cores are shared)")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "logprob_memory",
        "command": "python benchmarks/logprob_memory.py " + " ".join(sys.argv[1:]),
        "T": args.T, "V": args.V, "B": 1, "dtype": "bfloat16", "chunk_size": args.chunk_size,
        "device": device, "torch": torch.__version__, "platform": platform.platform(),
        "rows": rows, "ratio_selective_vs_naive_fp32": sel["ratio_vs_naive_fp32"],
        "ratio_selective_inplace_vs_naive_fp32": inp["ratio_vs_naive_fp32"], "target_ratio": 0.25,
    }
    (args.out / "logprob_memory.json").write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    labels = ["naive fp32", "naive bf16", "selective", "selective, in-place bwd"]
    values = [r["extra_peak_bytes"] / gib for r in rows]
    bars = ax.barh(labels, values, color=["#999999", "#bbbbbb", "#1f77b4", "#2ca02c"])
    ax.axvline(base["logits_bytes"] / gib, color="k", ls=":", lw=1, label="size of the bf16 logits")
    for bar, r in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['ratio_vs_naive_fp32']:.2f}x", va="center")
    ax.set_xlabel("extra peak memory, forward + backward (GiB)")
    ax.set_title(f"log-probs of [1, {args.T}, {args.V}] bf16 logits ({device})")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, max(values) * 1.2)
    fig.tight_layout()
    fig.savefig(args.out / "logprob_memory.png", dpi=120)
    print(f"wrote {args.out / 'logprob_memory.json'} and {args.out / 'logprob_memory.png'}")


if __name__ == "__main__":
    main()
