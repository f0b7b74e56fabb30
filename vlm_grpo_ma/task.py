"""The Task plugin contract and its registry.

A task is a class registered under its name through the entry-point group
``vlm_grpo_ma.tasks`` (see pyproject.toml), so a third-party task plugs in the same way
as the six shipped ones.  ``get_task(name)`` returns an instance.

Format rule shared by all tasks: exactly one ``<think>...</think>`` followed by exactly one
``<answer>...</answer>``.  An empty answer scores 0; answers are never substring-matched.
Model output NEVER raises out of ``parse`` or ``reward``: malformed output scores 0 and the
reason is reported in ``Reward.reason`` so that callers can count it.  A task need not guard
against its own bugs: the trainer and the benchmark call rewards only through
:class:`vlm_grpo_ma.reward_guard.RewardGuard`, which scores any other exception (or a total
outside [0, 1]) 0 with the reason ``reward_error`` and counts it.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field
from importlib import metadata, resources
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from vlm_grpo_ma.data.sample import Sample
    from vlm_grpo_ma.models.family import ModelFamily

ENTRY_POINT_GROUP = "vlm_grpo_ma.tasks"


class ParseError(ValueError):
    """Raised by ``Task.parse`` when an answer cannot be read; ``reason`` is a short stable key
    (``"empty"``, ``"no_json"``, ``"bad_number"``, ...) that metrics count."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Reward:
    """A scalar reward in [0, 1] and its parts.

    ``parts`` has the task's fixed keys (always including ``"format"``) so that metrics are
    stable across steps; ``reason`` is None for a well-formed output, else the parse-failure key.
    """

    total: float
    parts: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


class _Options(dict):
    """A task's options, remembering which keys the task read (``get`` / ``[]``)."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


class Task(abc.ABC):
    """Base class of a task plugin.  Subclasses set ``name`` and ``reward_parts``."""

    name: str = ""
    #: fixed keys of ``Reward.parts`` for this task (``"format"`` first)
    reward_parts: tuple[str, ...] = ("format",)
    #: :func:`get_task` rejects an option the task did not read while it was built (a typo
    #: would otherwise be ignored silently); a task that reads options later sets this False
    strict_options: bool = True

    def __init__(self, **options: Any):
        self.options = _Options(options)

    # --- prompts -----------------------------------------------------------------
    @abc.abstractmethod
    def messages(self, sample: "Sample", family: "ModelFamily") -> list[dict]:
        """Chat messages (Qwen-VL format: content lists of ``{"type": "image", "image": ...}``
        and ``{"type": "text", "text": ...}``) built from ``prompts/<task>.txt``."""

    @abc.abstractmethod
    def sft_target(self, sample: "Sample", family: "ModelFamily") -> str:
        """The reference ``<think>...</think><answer>...</answer>`` text for SFT."""

    # --- scoring -----------------------------------------------------------------
    @abc.abstractmethod
    def parse(self, answer_text: str, sample: "Sample", family: "ModelFamily") -> Any:
        """The canonical prediction read from the text inside ``<answer>`` (or a ParseError)."""

    @abc.abstractmethod
    def reward(self, thought: str, answer: str, sample: "Sample", family: "ModelFamily") -> Reward:
        """Score one (thought, answer) pair; ``answer`` is the completion text after ``</think>``.
        Never raises on model output."""

    @abc.abstractmethod
    def metrics(self, predictions: Sequence[Any], samples: Sequence["Sample"]) -> dict[str, float]:
        """The task's benchmark metrics over parsed predictions (None for a parse failure)."""

    # --- data ----------------------------------------------------------------------
    @abc.abstractmethod
    def synthetic(self, n: int, seed: int = 0) -> list["Sample"]:
        """``n`` deterministic samples with PIL-drawn images and their ground truth."""


def load_prompt(task_name: str, variant: str | None = None) -> str:
    """The text of ``prompts/<task>[.<variant>].txt`` shipped inside the distribution."""
    fname = f"{task_name}.{variant}.txt" if variant else f"{task_name}.txt"
    return resources.files("vlm_grpo_ma.prompts").joinpath(fname).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _registry() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


_LOCAL: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator registering a task in-process (entry points are the packaged way)."""
    _LOCAL[cls.name] = cls
    return cls


def available_tasks() -> list[str]:
    return sorted(set(_registry()) | set(_LOCAL))


def get_task(name: str, **options: Any) -> Task:
    """An instance of the task registered as ``name``, built with ``options``.

    Raises:
        KeyError: no task of that name.
        ValueError: an option the task does not know (one it did not read while being built).
    """
    if name in _LOCAL:
        cls = _LOCAL[name]
    else:
        eps = _registry()
        if name not in eps:
            raise KeyError(
                f"unknown task {name!r}; registered: {available_tasks()} "
                f"(entry-point group {ENTRY_POINT_GROUP!r}; is the package installed?)"
            )
        cls = eps[name].load()
    task = cls(**options)
    read = getattr(task.options, "read", None)
    if options and task.strict_options and read is not None:
        unknown = sorted(set(options) - read)
        if unknown:
            raise ValueError(f"task {name!r} has no option(s) {unknown}; it reads: {sorted(read)}")
    return task
