"""Local Hugging Face datasets as Samples.

A dataset saved with ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (a folder), or a
local ``.parquet`` / ``.csv`` / ``.arrow`` / ``.json`` / ``.jsonl`` file read with
``datasets.load_dataset``.  Each row is a record of the same two forms as the JSONL loader
(task fields, or ``messages`` + ``images``) and goes through the same
:func:`~vlm_grpo_ma.data.loaders.record_to_sample`; errors name the source and ``row <i>``
(0-based).  Image columns may hold paths (relative to the dataset folder, or ``image_root``),
decoded PIL images (the ``datasets.Image`` feature) or undecoded ``{"bytes", "path"}`` dicts.
Nothing is downloaded: only local sources are accepted.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from vlm_grpo_ma.data.errors import DataError
from vlm_grpo_ma.data.loaders import LoadedSamples, load_records

_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".json": "json", ".jsonl": "json"}


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    )


def open_hf_dataset(path: str | os.PathLike, split: Optional[str] = None, cache_dir: Optional[str] = None) -> Any:
    """The ``datasets.Dataset`` at a local path (one split of a ``DatasetDict``).

    ``split`` may be omitted when there is only one; ``cache_dir`` is where ``load_dataset``
    keeps the Arrow copy of a data file (default: the ``datasets`` cache).  Raises DataError for a missing path, an
    unknown split or a file type ``datasets`` cannot read.
    """
    import datasets

    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(path, None, "", "dataset not found (only local datasets are read)", "missing_file")
    if os.path.isdir(path):
        if not _is_saved_dataset(path):
            raise DataError(path, None, "", "folder is not a dataset saved with save_to_disk (no dataset_dict.json / state.json)", "bad_value")
        ds = datasets.load_from_disk(path)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _BUILDERS:
            raise DataError(path, None, "", f"cannot read {ext or 'a file without extension'} with datasets (use {sorted(_BUILDERS)})", "bad_value")
        try:
            ds = datasets.load_dataset(_BUILDERS[ext], data_files=path, cache_dir=cache_dir)
        except Exception as e:  # a malformed file: datasets wraps the parser's error
            raise DataError(path, None, "", f"datasets could not read it ({type(e).__name__}: {e})", "bad_json") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None:
            if len(splits) != 1:
                raise DataError(path, None, "split", f"the dataset has splits {splits}: choose one with split=", "missing_field")
            split = splits[0]
        if split not in ds:
            raise DataError(path, None, "split", f"no split {split!r} (the dataset has {splits})", "bad_value")
        ds = ds[split]
    elif split is not None and split not in ("train", str(getattr(ds, "split", None))):
        raise DataError(path, None, "split", f"{path} holds a single dataset (split {ds.split}); cannot select {split!r}", "bad_value")
    return ds


def _drop_nulls(row: dict) -> dict:
    """Arrow gives every row every column (and every struct field), with None where a record had
    none; drop those so that a row reads like the record that was written.  One level deep:
    top-level columns and the fields of ``target`` / ``prompt`` / ``meta`` structs."""
    out = {}
    for k, v in row.items():
        if v is None:
            continue
        if k in ("target", "prompt", "meta") and isinstance(v, dict):
            v = {kk: vv for kk, vv in v.items() if vv is not None}
        out[k] = v
    return out


def load_hf(
    path: str | os.PathLike,
    task: Optional[str] = None,
    *,
    split: Optional[str] = None,
    skip_invalid: bool = False,
    image_root: Optional[str] = None,
    limit: Optional[int] = None,
    cache_dir: Optional[str] = None,
    **record_opts: Any,
) -> LoadedSamples:
    """Samples from a local Hugging Face dataset (see the module docstring).

    Args:
        path: a ``save_to_disk`` folder or a local data file.
        task: the task the data is for (else each row's ``task`` column).
        split: which split of a ``DatasetDict`` (optional when there is one).
        skip_invalid, limit, record_opts: as :func:`~vlm_grpo_ma.data.loaders.load_jsonl`.
        image_root: folder relative image paths are relative to (default: the dataset's folder,
            or the data file's folder).
        cache_dir: ``load_dataset``'s cache for data files (default: the ``datasets`` cache).
    """
    path = os.fspath(path)
    ds = open_hf_dataset(path, split, cache_dir)
    base = image_root or (os.path.abspath(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    record_opts.setdefault("base_dir", base)
    source = path if split is None else f"{path}[{split}]"
    rows = ((f"row {i}", _drop_nulls(row)) for i, row in enumerate(ds))
    return load_records(rows, task, source=source, skip_invalid=skip_invalid, limit=limit, **record_opts)
