"""The project's cache of built artefacts (tiny models, the real Qwen tokenizers) and the one way
a build is published into it.

Builds are deterministic, so several processes (the ranks of a run, parallel tests) may race to
make the same folder: each builds in its own temporary folder beside the final one and renames it
into place; the first rename wins, a loser finds the winner's folder complete and deletes its copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["cache_root", "publish_once"]


def cache_root() -> Path:
    """``$VLM_GRPO_MA_CACHE`` or ``~/.cache/vlm_grpo_ma``."""
    return Path(os.environ.get("VLM_GRPO_MA_CACHE") or Path.home() / ".cache" / "vlm_grpo_ma")


def publish_once(final: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """``final``, built by ``build(tmp_folder)`` unless ``final / marker`` already exists.

    Args:
        final: the folder to publish.
        marker: a file the complete folder has (``config.json``, ``tokenizer_config.json``): its
            presence means a finished build (renames are atomic, so a half-written folder never
            has it under the final name).
        build: writes the folder's files into the temporary folder it is given.
    """
    final = Path(final)
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process published first
            if not (final / marker).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
