"""Files that ship inside the distribution: prompt templates, task and DeepSpeed configs, suites.

In the source tree they live in the top-level folders ``prompts/``, ``configs/`` and
``benchmarks/suites/``; the distribution installs them as the data packages
``vlm_grpo_ma.prompts``, ``vlm_grpo_ma.configs`` and ``vlm_grpo_ma.suites`` (a package-dir
mapping in pyproject.toml), so a wheel claims no import name but ``vlm_grpo_ma`` and an
editable install reads the repository's own files.  Everything is read through
:mod:`importlib.resources`; a user's own file path always wins over a shipped one.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["PACKAGES", "shipped_dir", "shipped_file", "resolve_file"]

#: top-level folder of the source tree -> the data package it installs as
PACKAGES = {
    "prompts": "vlm_grpo_ma.prompts",
    "configs": "vlm_grpo_ma.configs",
    "suites": "vlm_grpo_ma.suites",
}
#: how a path into a shipped folder may be written by a user (``configs/deepspeed/zero3.json``)
_PREFIXES = {"configs": "configs", "suites": "benchmarks/suites", "prompts": "prompts"}


def shipped_dir(kind: str) -> Path:
    """The folder holding the shipped ``kind`` files (``"prompts"``, ``"configs"``, ``"suites"``)."""
    if kind not in PACKAGES:
        raise KeyError(f"no shipped folder {kind!r}; known: {sorted(PACKAGES)}")
    return Path(str(resources.files(PACKAGES[kind])))


def shipped_file(kind: str, name: str | os.PathLike) -> Path:
    """The shipped file ``name`` (relative, ``/``-separated) of ``kind``; FileNotFoundError if absent."""
    path = shipped_dir(kind).joinpath(*Path(name).parts)
    if not path.is_file():
        raise FileNotFoundError(f"{name} is not a shipped {kind} file (looked in {shipped_dir(kind)})")
    return path


def resolve_file(path: str | os.PathLike, kind: str) -> Path:
    """A user's file if it exists (relative to the working directory), else the shipped one.

    ``configs/deepspeed/zero3.json``, ``deepspeed/zero3.json`` and an absolute path all work for
    ``kind="configs"``; likewise ``benchmarks/suites/x.yaml`` or ``x.yaml`` for ``"suites"``.
    Raises FileNotFoundError naming both places looked at.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute():
        rel = p.as_posix()
        prefix = _PREFIXES[kind] + "/"
        if rel.startswith(prefix):
            rel = rel[len(prefix):]
        try:
            return shipped_file(kind, rel)
        except FileNotFoundError:
            pass
    raise FileNotFoundError(f"{path} not found (neither a file here nor a shipped {kind} file in {shipped_dir(kind)})")
