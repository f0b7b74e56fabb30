"""Benchmark runner: run a suite with a model, score predictions made elsewhere, compare runs.

    vlm-grpo-ma bench run --suite synthetic-detection --model tiny-qwen2.5-vl
    vlm-grpo-ma bench run --suite my-suite.yaml --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --output runs/bench/base --batch-size 16
    torchrun --standalone --nproc_per_node 4 -m vlm_grpo_ma bench run --suite ... --model ...
    vlm-grpo-ma bench score --suite where2place --predictions api_outputs.jsonl
    vlm-grpo-ma bench compare runs/bench/base runs/bench/grpo-ma
    vlm-grpo-ma bench list

(``python scripts/benchmark.py ...`` in a clone is the same command.)

Outputs (``--output``, default ``runs/bench/<suite>/<model>``): predictions.jsonl, metrics.json,
report.html.  See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path


def _default_output(suite: str, label: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label.strip("/").replace("/", "--"))[-80:]
    return str(Path("runs") / "bench" / suite / safe)


def _print_summary(result: dict | None, out: str) -> None:
    if result is None:
        return
    print(f"\n{result['suite']} on {result.get('model')}: {result['n_samples']} samples")
    for k, v in result["metrics"].items():
        print(f"  {k:24s} {v:.4f}" if isinstance(v, float) else f"  {k:24s} {v}")
    if result.get("parse_failures"):
        print("  parse failures:", ", ".join(f"{k}={v}" for k, v in result["parse_failures"].items()))
    print(f"\nreport: {Path(out) / 'report.html'}")


def cmd_run(args: argparse.Namespace) -> int:
    from vlm_grpo_ma.bench.backends import BackendUnavailable
    from vlm_grpo_ma.bench.engine import run_suite
    from vlm_grpo_ma.bench.suite import load_suite

    overrides = {}
    if args.max_new_tokens:
        overrides["generation"] = {"max_new_tokens": args.max_new_tokens}
    suite = load_suite(args.suite, **overrides)
    out = args.output or _default_output(suite.name, args.model)
    try:
        result = run_suite(suite, args.model, out, backend=args.backend, limit=args.limit,
                           batch_size=args.batch_size, fresh=args.fresh, report=not args.no_report,
                           strict=not args.lenient)
    except BackendUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        _print_summary(result, out)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from vlm_grpo_ma.bench.engine import score_predictions
    from vlm_grpo_ma.bench.suite import load_suite

    suite = load_suite(args.suite)
    out = args.output or str(Path(args.predictions).resolve().parent / f"scored-{suite.name}")
    result = score_predictions(suite, args.predictions, out, family=args.family, limit=args.limit,
                               strict=not args.lenient, report=not args.no_report, model_label=args.label)
    _print_summary(result, out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vlm_grpo_ma.bench.compare import compare_table, format_markdown, load_result

    header, rows = compare_table([load_result(d) for d in args.dirs])
    text = format_markdown(header, rows)
    print(text)
    if args.output:
        p = Path(args.output)
        if p.suffix == ".json":
            p.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
        else:
            p.write_text(text + "\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    import yaml

    from vlm_grpo_ma.bench.suite import list_suites

    for name, path in list_suites().items():
        desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{name:28s} {desc.splitlines()[0] if desc else ''}")
    return 0


def build_parser(prog: str | None = "vlm-grpo-ma bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a suite with a model")
    r.add_argument("--suite", required=True, help="a bundled suite name (see `list`) or a YAML file")
    r.add_argument("--model", required=True, help="tiny model name, checkpoint folder or hub id")
    r.add_argument("--backend", choices=("hf", "vllm", "reference"), default="hf",
                   help="hf (transformers), vllm, or reference (no model: the task's reference answers, "
                        "a sanity check of the suite; --model then names the family, e.g. qwen2_5_vl)")
    r.add_argument("--output", help="output folder (default runs/bench/<suite>/<model>)")
    r.add_argument("--limit", type=int, help="only the first N samples")
    r.add_argument("--batch-size", type=int, help="prompts per generation call (default: the suite's)")
    r.add_argument("--max-new-tokens", type=int, help="override the suite's completion length")
    r.add_argument("--fresh", action="store_true", help="discard earlier predictions in --output instead of resuming")
    r.add_argument("--lenient", action="store_true", help="parse answers without the think/answer format rule")
    r.add_argument("--no-report", action="store_true", help="skip report.html")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("score", help="score raw outputs produced elsewhere (no model loaded)")
    s.add_argument("--suite", required=True)
    s.add_argument("--predictions", required=True, help='JSONL rows {"id": ..., "raw": "..."}')
    s.add_argument("--output", help="output folder (default: scored-<suite> beside the predictions)")
    s.add_argument("--family", help="coordinate family of the outputs: qwen2_vl, qwen2_5_vl or qwen3_vl")
    s.add_argument("--label", help="name of the system that produced the outputs (for the report)")
    s.add_argument("--limit", type=int)
    s.add_argument("--lenient", action="store_true", help="accept answers without <think>/<answer> tags")
    s.add_argument("--no-report", action="store_true")
    s.set_defaults(func=cmd_score)

    c = sub.add_parser("compare", help="one table of several results side by side")
    c.add_argument("dirs", nargs="+", help="benchmark output folders (or metrics.json files)")
    c.add_argument("--output", help="also write the table to this .md or .json file")
    c.set_defaults(func=cmd_compare)

    ls = sub.add_parser("list", help="bundled suites")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None, prog: str | None = "vlm-grpo-ma bench") -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
