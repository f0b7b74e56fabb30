"""Several benchmark results side by side: one table, one column per run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["load_result", "compare_table", "format_markdown"]


def load_result(path: str | os.PathLike) -> dict:
    """metrics.json of a run folder (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no metrics.json (is it a benchmark output folder?)")
    data = json.loads(p.read_text(encoding="utf-8"))
    data.setdefault("_path", str(p.parent))
    return data


def compare_table(results: Sequence[dict]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows): a row per metric (suite and model on top), a column per result.

    Metrics keep the order of the first result that has them; a run without a metric shows
    an empty cell."""
    header = ["", *[Path(r.get("_path", f"run{i}")).name or f"run{i}" for i, r in enumerate(results)]]
    rows: list[list[Any]] = [
        ["suite", *[r.get("suite", "") for r in results]],
        ["model", *[r.get("model", "") for r in results]],
        ["samples", *[r.get("n_samples", "") for r in results]],
    ]
    names: list[str] = []
    for r in results:
        for k, v in (r.get("metrics") or {}).items():
            if k not in names and k != "n_samples" and not isinstance(v, dict):
                names.append(k)
    for k in names:
        rows.append([k, *[(r.get("metrics") or {}).get(k, "") for r in results]])
    return header, rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v).replace("|", "\\|")


def format_markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    cells = [[_cell(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])
