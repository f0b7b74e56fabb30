"""Benchmark suites: a YAML file -> :class:`Suite`.

A suite names everything that decides a benchmark number, so that two runs of the same suite
are comparable:

.. code-block:: yaml

    name: sharerobot-trajectory
    task: trajectory                # a registered task (vlm_grpo_ma.get_task)
    task_options: {}                # passed to the task's constructor
    data:
      format: sharerobot_trajectory # see vlm_grpo_ma.bench.formats.FORMATS
      path: ${SHAREROBOT_ROOT}/trajectory/test.json
      image_root: ${SHAREROBOT_ROOT}/images
      split: test
    prompt_variant: null            # prompts/<task>.<variant>.txt instead of prompts/<task>.txt
    family: null                    # coordinate-frame override: qwen2_vl | qwen2_5_vl | qwen3_vl
    generation:
      do_sample: false              # greedy by default
      max_new_tokens: 512
    metrics: []                     # the task metrics shown first in the report (empty: all)
    limit: null                     # evaluate only the first N samples

Paths may use ``${ENV_VAR}`` and ``~``; relative paths are resolved against the suite file's
folder.  A suite is found by name in ``benchmarks/suites/`` (of the working directory, then of the
source checkout) or given as a path to a YAML file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm_grpo_ma.resources import shipped_dir

__all__ = ["DataSpec", "GenerationSpec", "Suite", "SuiteError", "find_suite", "list_suites", "load_suite"]


class SuiteError(ValueError):
    """A suite file is missing, malformed, or names something that does not exist."""


@dataclass
class DataSpec:
    """Where a suite's samples come from."""

    #: loader name: ``synthetic`` (the task's own generator) or a public format of
    #: :data:`vlm_grpo_ma.bench.formats.FORMATS` (``coco``, ``refcoco``, ``sharerobot_trajectory``,
    #: ``sharerobot_affordance``, ``where2place``, ``roborefit``, ``jsonl``)
    format: str = "synthetic"
    #: the annotation file (JSON / JSONL) or dataset folder; unused for ``synthetic``
    path: str | None = None
    #: folder that image paths in the annotations are relative to (default: the annotation's folder)
    image_root: str | None = None
    #: split name recorded in the results (and used by loaders that hold several splits)
    split: str = "test"
    #: number of synthetic samples
    n: int = 32
    #: seed of the synthetic generator
    seed: int = 0
    #: extra keyword arguments for the loader
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationSpec:
    """How completions are produced.  Greedy decoding unless ``do_sample``."""

    #: sample (True) or greedy-decode (False)
    do_sample: bool = False
    #: sampling temperature (ignored when greedy)
    temperature: float = 1.0
    #: nucleus sampling mass (1.0 = off)
    top_p: float = 1.0
    #: top-k sampling (0 = off; transformers' default of 50 is NOT plain sampling)
    top_k: int = 0
    #: maximum completion length in tokens
    max_new_tokens: int = 512
    #: best-of-K x M: K thoughts (independent completions) ...
    num_thoughts: int = 1
    #: ... times M answers per thought; with K*M > 1 every completion is scored and the report
    #: gives the first one's metrics plus ``best_of_n`` / ``mean_of_n`` reward.  The HF backend
    #: samples K*M independent completions (a tree sampler may share thought prefixes).
    num_answers: int = 1
    #: prompts per forward pass
    batch_size: int = 8
    #: seed for sampling (greedy decoding is deterministic regardless)
    seed: int = 0

    @property
    def num_samples(self) -> int:
        """Completions per prompt (K * M)."""
        return max(1, int(self.num_thoughts)) * max(1, int(self.num_answers))


@dataclass
class Suite:
    """One benchmark: a task, its data, and how to generate and score."""

    name: str
    task: str
    data: DataSpec = field(default_factory=DataSpec)
    task_options: dict[str, Any] = field(default_factory=dict)
    #: prompt template variant (``prompts/<task>.<variant>.txt``); passed to the task as the
    #: ``prompt_variant`` option
    prompt_variant: str | None = None
    #: a prompt template file used instead of ``prompts/<task>.txt`` (relative to the suite
    #: file); public datasets phrase their instructions differently from the synthetic
    #: templates.  ``{field}`` placeholders are the sample's prompt fields and ``{coord_hint}``.
    prompt_file: str | None = None
    #: coordinate frame override: read and write coordinates as this family does
    #: (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``) whatever the checkpoint's model_type
    family: str | None = None
    #: processor pixel bounds (they decide Qwen2.5-VL's absolute frame); None = the processor's
    min_pixels: int | None = None
    max_pixels: int | None = None
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    #: metrics shown first in the summary (all the task's metrics are always recorded)
    metrics: list[str] = field(default_factory=list)
    #: evaluate only the first N samples (None = all)
    limit: int | None = None
    description: str = ""
    #: the file this suite was read from (None when built in code)
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def task_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``get_task``."""
        kw = dict(self.task_options)
        if self.prompt_variant:
            kw.setdefault("prompt_variant", self.prompt_variant)
        return kw


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: str, base: Path | None, where: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise SuiteError(f"{where}: environment variable ${{{name}}} is not set")
        return os.environ[name]

    out = os.path.expanduser(_ENV_RE.sub(sub, value))
    if base is not None and not os.path.isabs(out) and "://" not in out:
        out = str((base / out).resolve())
    return out


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SuiteError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**raw)


def suite_from_dict(raw: dict[str, Any], source: str | None = None) -> Suite:
    """Build a Suite from a parsed YAML mapping (errors name the file and field)."""
    where = source or "<suite>"
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: a suite must be a mapping")
    raw = dict(raw)
    for key in ("name", "task"):
        if not raw.get(key):
            raise SuiteError(f"{where}: missing required field {key!r}")
    data = _build(DataSpec, raw.pop("data", None), f"{where}: data")
    gen = _build(GenerationSpec, raw.pop("generation", None), f"{where}: generation")
    names = {f.name for f in dataclasses.fields(Suite)} - {"data", "generation", "source"}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise SuiteError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    base = Path(source).resolve().parent if source else None
    for attr in ("path", "image_root"):
        val = getattr(data, attr)
        if val is not None:
            setattr(data, attr, _expand(str(val), base, f"{where}: data.{attr}"))
    if raw.get("prompt_file"):
        raw["prompt_file"] = _expand(str(raw["prompt_file"]), base, f"{where}: prompt_file")
        if not Path(raw["prompt_file"]).is_file():
            raise SuiteError(f"{where}: prompt_file {raw['prompt_file']} does not exist")
    if gen.num_thoughts < 1 or gen.num_answers < 1 or gen.batch_size < 1 or gen.max_new_tokens < 1:
        raise SuiteError(f"{where}: generation: num_thoughts, num_answers, batch_size, max_new_tokens must be >= 1")
    if gen.num_samples > 1 and not gen.do_sample:
        raise SuiteError(f"{where}: generation: best-of-K x M needs do_sample: true (greedy repeats one answer)")
    suite = Suite(data=data, generation=gen, source=source, **raw)
    if suite.limit is not None and int(suite.limit) < 1:
        raise SuiteError(f"{where}: limit must be >= 1 or null")
    return suite


def suite_dirs() -> list[Path]:
    """Folders searched for suites by name: ./benchmarks/suites, then the shipped ones."""
    dirs = [Path.cwd() / "benchmarks" / "suites", shipped_dir("suites")]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def list_suites() -> dict[str, Path]:
    """Bundled suite names -> files."""
    found: dict[str, Path] = {}
    for d in suite_dirs():
        for p in sorted(d.glob("*.yaml")):
            found.setdefault(p.stem, p)
    return found


def find_suite(name_or_file: str | os.PathLike) -> Path:
    """The YAML file of a suite given by name or path."""
    p = Path(name_or_file)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise SuiteError(f"suite file {p} does not exist")
        return p
    suites = list_suites()
    if str(name_or_file) not in suites:
        raise SuiteError(f"unknown suite {str(name_or_file)!r}; bundled suites: {sorted(suites)}")
    return suites[str(name_or_file)]


def load_suite(name_or_file: str | os.PathLike, **overrides: Any) -> Suite:
    """Read a suite by name or path.  ``overrides`` set top-level fields (``limit=...``) or
    generation fields given as ``generation={"batch_size": 4}``."""
    path = find_suite(name_or_file)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: a suite must be a YAML mapping")
    for key, val in overrides.items():
        if val is None:
            continue
        if isinstance(val, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **val}
        else:
            raw[key] = val
    return suite_from_dict(raw, source=str(path))
