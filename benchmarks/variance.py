#!/usr/bin/env python
r"""Monte-Carlo check of GRPO-MA's variance argument (GRPO-MA, arXiv 2509.24494, its variance analysis).

Model: a prompt's K thoughts have success probabilities p_k ~ Beta(2, 2); an answer to thought k
succeeds with probability p_k, so r_km ~ Bernoulli(p_k) and the thought value estimate is
V_hat_k = mean_m r_km ~ Binomial(M, p_k) / M (sampled as a binomial: only the mean matters).
The thought advantage estimated from the samples is A_hat_k = standardise(V_hat)_k (population
std, eps 1e-6, 0 for a constant group, exactly as ``grpo_ma_advantages``); its target is
A_k = standardise(p)_k.

For each (K, M) we draw ``--sets`` thought sets p, and for each set ``--resamples`` fresh sets of
answers with the thoughts held fixed. Reported, averaged over thoughts and sets:

* ``var``: Var over resamplings of A_hat_k (the estimation variance of the paper's argument);
* ``mse``: E (A_hat_k - A_k)^2 (variance plus the bias of the standardisation);
* ``delta``: the delta-method prediction
  Var(A_hat_k) ~ (1/(M s^2)) sum_j sigma_j^2 (delta_kj - 1/K - z_k z_j / K)^2
  with sigma_j^2 = p_j (1 - p_j), s = std_j p_j, z = standardise(p). Its mean over sets is
  dominated by the rare sets whose p_k nearly coincide (s -> 0), where the true variance is
  bounded; so the table gives the MEDIAN over sets of both the Monte-Carlo variance and the
  prediction as well as their means;
* ``limit``: the K -> infinity value E[sigma^2] / (M Var[p]) = 0.2 / (0.05 M) = 4 / M.

What the delta method cannot see: a standardised vector has mean square 1 over its K entries
(when not constant), so the per-thought variance averages at most about 1 whatever M is. The
first-order prediction holds when the answer noise is small against the spread of the thoughts,
4/M << 1 (M >= 16 here); for M <= 4 the Monte-Carlo variance saturates below 1 while the
prediction goes on to 4/M. The shape the paper argues for holds throughout: flat in K, falling
with M, T4A4 below T16A1 at the same 16 rewards.

For K = 2 the standardised values are always +-1 (or 0): the prediction is 0 (the variance comes
only from sign flips, which a first-order expansion cannot see), so the K sweep starts at 3.

Usage:
    python benchmarks/variance.py                      # writes benchmarks/results/variance.{json,png}
    python benchmarks/variance.py --sets 200 --resamples 100 --out /tmp/v   # quicker
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

EPS = 1e-6
ALPHA = BETA = 2.0
LIMIT_NUMERATOR = 4.0  # E[p(1-p)] / Var[p] for Beta(2, 2): 0.2 / 0.05


def standardise(v: np.ndarray) -> np.ndarray:
    """[..., K] -> (v - mean) / (population std + eps) over the last axis, 0 for a constant group."""
    centred = v - v.mean(axis=-1, keepdims=True)
    out = centred / (v.std(axis=-1, keepdims=True) + EPS)
    constant = v.max(axis=-1, keepdims=True) == v.min(axis=-1, keepdims=True)
    return np.where(constant, 0.0, out)


def delta_prediction(p: np.ndarray, m: int) -> np.ndarray:
    """[S, K] success probabilities -> [S, K] delta-method Var(A_hat_k) with M answers per thought."""
    k = p.shape[-1]
    sigma2 = p * (1.0 - p)  # [S, K]
    s = p.std(axis=-1, keepdims=True)  # [S, 1]
    z = (p - p.mean(axis=-1, keepdims=True)) / s  # [S, K]
    jac = np.eye(k)[None] - 1.0 / k - z[:, :, None] * z[:, None, :] / k  # [S, K(k), K(j)]
    return (jac**2 * sigma2[:, None, :]).sum(-1) / (m * s**2)


def simulate(k: int, m: int, sets: int, resamples: int, rng: np.random.Generator, batch: int = 100) -> dict:
    """Monte-Carlo and delta-method variance of the thought advantage for one (K, M)."""
    var_sets, mse_sets, pred_sets = [], [], []
    for start in range(0, sets, batch):
        n = min(batch, sets - start)
        p = rng.beta(ALPHA, BETA, size=(n, k))  # [n, K] thoughts, held fixed below
        target = standardise(p)  # [n, K]
        v_hat = rng.binomial(m, p[:, None, :], size=(n, resamples, k)) / m  # [n, R, K]
        a_hat = standardise(v_hat)  # [n, R, K]
        var_sets.append(a_hat.var(axis=1).mean(-1))  # [n]: mean over thoughts of Var over resamplings
        mse_sets.append(((a_hat - target[:, None, :]) ** 2).mean(axis=(1, 2)))
        pred_sets.append(delta_prediction(p, m).mean(-1))
    var, mse, pred = (np.concatenate(x) for x in (var_sets, mse_sets, pred_sets))
    return {
        "K": k, "M": m, "rewards": k * m,
        "var_mean": float(var.mean()), "var_median": float(np.median(var)),
        "var_sem": float(var.std(ddof=1) / np.sqrt(len(var))),
        "mse_mean": float(mse.mean()),
        "delta_mean": float(pred.mean()), "delta_median": float(np.median(pred)),
        "limit": LIMIT_NUMERATOR / m,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=500, help="thought sets (p_1..p_K) per configuration")
    parser.add_argument("--resamples", type=int, default=200, help="answer resamplings per thought set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()

    k_sweep = [3, 4, 6, 8, 12, 16, 24, 32, 64]
    k_sweep_m = [1, 4, 16]
    m_sweep = [1, 2, 4, 8, 16, 32, 64]
    m_sweep_k = [4, 16]
    budget = [(2, 8), (4, 4), (8, 2), (16, 1)]

    by_k = [simulate(k, m, args.sets, args.resamples, rng) for m in k_sweep_m for k in k_sweep]
    by_m = [simulate(k, m, args.sets, args.resamples, rng) for k in m_sweep_k for m in m_sweep]
    equal_budget = [simulate(k, m, args.sets, args.resamples, rng) for k, m in budget]
    seconds = time.perf_counter() - t0

    def table(title: str, rows: list[dict]) -> None:
        print(f"\n{title}\n")
        print("| K | M | MC var (mean) | delta (mean) | MC var (median) | delta (median) | MSE vs true A | 4/M |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['K']} | {r['M']} | {r['var_mean']:.4f} | {r['delta_mean']:.4f} | {r['var_median']:.4f} "
                  f"| {r['delta_median']:.4f} | {r['mse_mean']:.4f} | {r['limit']:.4f} |")

    print(f"Thought-advantage estimation variance, p ~ Beta(2,2), r ~ Bernoulli(p); "
          f"{args.sets} thought sets x {args.resamples} resamplings per row")
    table("Against K (plateau at about 4/M)", by_k)
    table("Against M (falls like 1/M)", by_m)
    table("Equal budget of 16 rewards per prompt", equal_budget)
    t4a4 = next(r for r in equal_budget if (r["K"], r["M"]) == (4, 4))
    t16a1 = next(r for r in equal_budget if (r["K"], r["M"]) == (16, 1))
    ratio = t4a4["var_mean"] / t16a1["var_mean"]
    print(f"\nT4A4 / T16A1 estimation variance: {t4a4['var_mean']:.4f} / {t16a1['var_mean']:.4f} = {ratio:.3f}x"
          f"  (MSE: {t4a4['mse_mean']:.4f} / {t16a1['mse_mean']:.4f}); {seconds:.1f} s")
    print("Note: the delta method is first order; it holds where 4/M << 1 (M >= 16). For small M the variance "
          "saturates below 1, the mean square of any standardised vector.")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "variance",
        "command": "python benchmarks/variance.py " + " ".join(sys.argv[1:]),
        "model": "p_k ~ Beta(2,2), r_km ~ Bernoulli(p_k), population std, eps 1e-6",
        "sets": args.sets, "resamples": args.resamples, "seed": args.seed,
        "by_K": by_k, "by_M": by_m, "equal_budget_16": equal_budget,
        "t4a4_over_t16a1_var": ratio, "seconds": seconds,
        "numpy": np.__version__, "platform": platform.platform(),
    }
    (args.out / "variance.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(by_k, k_sweep_m, by_m, m_sweep_k, equal_budget, args.out / "variance.png")
    print(f"wrote {args.out / 'variance.json'} and {args.out / 'variance.png'}")


def plot(by_k, k_sweep_m, by_m, m_sweep_k, equal_budget, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    ax = axes[0]
    for i, m in enumerate(k_sweep_m):
        rows = [r for r in by_k if r["M"] == m]
        ks = [r["K"] for r in rows]
        ax.plot(ks, [r["var_median"] for r in rows], "o-", color=colors[i], label=f"M={m}: Monte Carlo")
        ax.plot(ks, [r["delta_median"] for r in rows], "--", color=colors[i], label=f"M={m}: delta method")
        ax.axhline(4.0 / m, color=colors[i], ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("thoughts K")
    ax.set_ylabel("Var(A_hat_k), median over thought sets")
    ax.set_title("(a) against K: a floor at 4/M (dotted)")
    ax.legend(fontsize=7)

    ax = axes[1]
    for i, k in enumerate(m_sweep_k):
        rows = [r for r in by_m if r["K"] == k]
        ms = [r["M"] for r in rows]
        ax.plot(ms, [r["var_median"] for r in rows], "o-", color=colors[i], label=f"K={k}: Monte Carlo")
        ax.plot(ms, [r["delta_median"] for r in rows], "--", color=colors[i], label=f"K={k}: delta method")
    ms = [r["M"] for r in by_m if r["K"] == m_sweep_k[0]]
    ax.plot(ms, [4.0 / m for m in ms], ":", color="k", lw=1, label="4/M")
    ax.axhline(1.0, color="grey", lw=1, label="ceiling: mean of A_hat^2 is 1")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("answers per thought M")
    ax.set_title("(b) against M: falls like 1/M")
    ax.legend(fontsize=7)

    ax = axes[2]
    labels = [f"T{r['K']}A{r['M']}" for r in equal_budget]
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [r["var_mean"] for r in equal_budget], 0.4, label="Var(A_hat) (mean)")
    ax.bar(x + 0.2, [r["mse_mean"] for r in equal_budget], 0.4, label="MSE vs true A (mean)")
    ax.set_xticks(x, labels)
    ax.set_ylabel("mean over thoughts and thought sets")
    ax.set_title("(c) equal budget: 16 rewards per prompt")
    ax.legend(fontsize=8)
    fig.suptitle("GRPO-MA thought-advantage estimation, p ~ Beta(2,2), r ~ Bernoulli(p)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
