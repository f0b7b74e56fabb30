"""The benchmark runner: suites (YAML) -> predictions.jsonl, metrics.json and report.html.

Public API (imported lazily, so ``import vlm_grpo_ma.bench`` stays light):

- :func:`load_suite`, :class:`Suite` (``suite.py``): a suite by name or YAML file;
- :func:`run_suite` (``engine.py``): predict, score, write the outputs; resumable, data parallel;
- :func:`score_predictions` (``engine.py``): score outputs produced elsewhere, no model loaded;
- :func:`load_format`, :data:`FORMATS` (``formats.py``): the public dataset formats;
- :func:`compare_table` (``compare.py``): several results side by side;
- :func:`write_report` (``report.py``) and :func:`draw_thumbnail` (``draw.py``).

See docs/BENCHMARKS.md and ``cli.py`` (the ``vlm-grpo-ma bench`` command, ``scripts/benchmark.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Suite": "suite",
    "SuiteError": "suite",
    "load_suite": "suite",
    "list_suites": "suite",
    "run_suite": "engine",
    "score_predictions": "engine",
    "score_completions": "engine",
    "load_samples": "engine",
    "BenchError": "engine",
    "FORMATS": "formats",
    "FormatError": "formats",
    "load_format": "formats",
    "compare_table": "compare",
    "load_result": "compare",
    "write_report": "report",
    "draw_thumbnail": "draw",
    "load_backend": "backends",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vlm_grpo_ma.bench.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlm_grpo_ma.bench' has no attribute {name!r}")
