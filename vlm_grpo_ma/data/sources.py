"""The front door of the data layer: :func:`load_samples` picks the loader of a source by its
format or extension (JSONL / JSON records, COCO instances, local Hugging Face datasets, synthetic).

It sits above the loaders it dispatches to (:mod:`.loaders`, :mod:`.coco`, :mod:`.hf`), which
share the record helpers of :mod:`.loaders`: imports run downward only, also inside this folder.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from vlm_grpo_ma.data.coco import is_coco, load_coco
from vlm_grpo_ma.data.errors import LoadSummary
from vlm_grpo_ma.data.hf import load_hf
from vlm_grpo_ma.data.loaders import _HF_EXTENSIONS, LoadedSamples, _read_json, load_json, load_jsonl
from vlm_grpo_ma.data.sample import Sample

__all__ = ["load_samples"]


def load_samples(source: str | os.PathLike | dict, task: Optional[str] = None, *,
                 synthesize: Optional[Callable[..., list[Sample]]] = None, **opts: Any) -> LoadedSamples:
    """Load samples from any supported source, chosen by format or extension.

    ``source`` is one of:

    - a path: ``.jsonl`` -> :func:`load_jsonl`; ``.json`` -> :func:`~vlm_grpo_ma.data.coco.load_coco` if it is a COCO
      instances file (an object with ``images`` and ``annotations``), else :func:`load_json`;
      ``.parquet`` / ``.csv`` / ``.arrow`` or a folder saved with ``save_to_disk`` ->
      :func:`vlm_grpo_ma.data.hf.load_hf`;
    - ``"synthetic:N"``: ``synthesize(N, seed=opts.get("seed", 0))``, the task's ``synthetic``
      passed in by the caller (the data layer does not look tasks up);
    - a dict (from a config or a benchmark suite): ``{"path": ..., "format": "jsonl" | "json" |
      "coco" | "hf" | "synthetic", "n": ..., <options>}``; keyword ``opts`` override its options.

    ``opts`` are the chosen loader's keyword options (``skip_invalid``, ``image_root``,
    ``coords``, ``tolerance``, ``limit``, ``image_dir``, ``mode``, ``split``, ``check_sample``,
    ...).  Synthetic samples are made by the task itself and are not checked again.
    """
    fmt: Optional[str] = None
    if isinstance(source, dict):
        spec = dict(source)
        fmt = spec.pop("format", None)
        path = spec.pop("path", None)
        task = task or spec.pop("task", None)
        if fmt == "synthetic":
            path = f"synthetic:{spec.pop('n', 0)}"
        opts = {**spec, **opts}
        if path is None:
            raise ValueError(f"a data source dict needs a 'path' (got keys {sorted(source)})")
        source = path
    source = os.fspath(source)
    if fmt == "synthetic" or (fmt is None and source.startswith("synthetic:")):
        return _load_synthetic(source, task, synthesize, **opts)
    ext = os.path.splitext(source)[1].lower()
    if fmt is None:
        if os.path.isdir(source) or ext in _HF_EXTENSIONS:
            fmt = "hf"
        elif ext == ".jsonl":
            fmt = "jsonl"
        elif ext == ".json":
            data = _read_json(source)
            if is_coco(data):
                return load_coco(source, task or "detection", _data=data, **opts)
            return load_json(source, task, _data=data, **opts)
        else:
            raise ValueError(
                f"cannot tell the format of data source {source!r}: use a .jsonl / .json / .parquet / .csv / .arrow "
                "file, a save_to_disk folder, 'synthetic:N', or a dict with 'format'"
            )
    loaders: dict[str, Callable[..., LoadedSamples]] = {"jsonl": load_jsonl, "json": load_json}
    if fmt in loaders:
        return loaders[fmt](source, task, **opts)
    if fmt == "coco":
        return load_coco(source, task or "detection", **opts)
    if fmt == "hf":
        return load_hf(source, task, **opts)
    raise ValueError(f"unknown data format {fmt!r} (expected jsonl, json, coco, hf or synthetic)")


def _load_synthetic(source: str, task: Optional[str], synthesize: Optional[Callable[..., list[Sample]]],
                    seed: int = 0, check_sample: Any = None, **opts: Any) -> LoadedSamples:
    if synthesize is None:
        raise ValueError(f"{source!r}: synthetic data needs the task's generator (load_samples(..., synthesize=task.synthetic))")
    try:
        n = int(source.split(":", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"synthetic source must be 'synthetic:N' with N an integer, got {source!r}") from None
    samples = synthesize(n, seed=seed)
    return LoadedSamples(samples, LoadSummary(source=f"synthetic {task} (seed {seed})", loaded=len(samples)))
