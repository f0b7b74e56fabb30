"""What the three geometric tasks (detection, affordance, trajectory) share: prompt filling,
chat messages, and the reward skeleton (format check -> parse -> score -> weighted total).

Reward convention of these tasks: the ``format`` part is 1 when the completion obeys the format
rule (one ``<think>`` block, one ``<answer>`` block) AND its answer parses to the task's shape;
otherwise the whole reward is 0 and ``Reward.reason`` says why (``bad_think``, ``no_answer``,
``empty``, ``no_json``, ``bad_shape``, ``bad_number``, ...).  Then
``total = w_task * task + w_format * format`` (options ``w_task`` = 0.9, ``w_format`` = 0.1).
"""

from __future__ import annotations

import re
from typing import Any

from vlm_grpo_ma.tasks._parsing import MAX_TEXT
from vlm_grpo_ma.tasks.common import ANSWER_SLACK, check_format, combine
from vlm_grpo_ma.task import ParseError, Reward, Task, load_prompt


_FIELD_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ANSWER_INNER_RE = re.compile(r"<answer>(.*?)(?:</answer>|\Z)", re.DOTALL)


def fill_prompt(template: str, fields: dict[str, Any], where: str = "") -> str:
    """Substitute ``{name}`` fields of a prompt template.

    Only ``{identifier}`` is a field, so JSON examples such as ``{"bbox_2d": [...]}`` stay as
    they are (no brace doubling in the template files).  A missing field raises KeyError naming
    it and ``where`` (the sample).
    """

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in fields:
            raise KeyError(f"{where}: prompt field {{{name}}} missing (have {sorted(fields)})")
        return str(fields[name])

    return _FIELD_RE.sub(sub, template)


def answer_inner(text: str) -> str:
    """The text inside ``<answer>...</answer>`` if the tags are there, else ``text``."""
    if isinstance(text, str) and "<answer>" in text:
        m = _ANSWER_INNER_RE.search(text)
        if m:
            return m.group(1)
    return text


class GeometricTask(Task):
    """Base of the geometric tasks.  Options (all tasks): ``w_task`` (0.9), ``w_format`` (0.1),
    ``image_size`` ((112, 112), synthetic images), ``cache_dir`` (None: synthetic images stay
    PIL; else PNG files there), ``object_scale`` (the subclass's ``OBJECT_SCALE``: size factor of
    the objects its synthetic generator draws)."""

    #: prompt file variant (``prompts/<name>.<variant>.txt``), None for ``<name>.txt``
    prompt_variant: str | None = None
    #: default ``object_scale`` of the synthetic generator
    OBJECT_SCALE: float = 1.0

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.w_task = float(self.options.get("w_task", 0.9))
        self.w_format = float(self.options.get("w_format", 0.1))
        self.image_size = tuple(self.options.get("image_size", (112, 112)))
        self.cache_dir = self.options.get("cache_dir")
        self.object_scale = float(self.options.get("object_scale", self.OBJECT_SCALE))
        if self.object_scale <= 0:
            raise ValueError(f"{self.name} object_scale must be > 0, got {self.object_scale}")
        self._templates: dict[str | None, str] = {}
        #: a template text that replaces the prompt files for every sample (None: use the files);
        #: the benchmark engine sets it from a suite's ``prompt_file``
        self._template: str | None = None

    # --- prompts -------------------------------------------------------------------------
    def variant_for(self, sample) -> str | None:
        """The prompt file variant for ``sample`` (default: the task's ``prompt_variant``)."""
        return self.prompt_variant

    def template(self, variant: str | None = None) -> str:
        """The text of ``prompts/<name>[.<variant>].txt`` (read once)."""
        if variant not in self._templates:
            self._templates[variant] = load_prompt(self.name, variant)
        return self._templates[variant]

    def set_prompt_template(self, text: str | None) -> None:
        """Use ``text`` as the template for every sample (``None``: back to the prompt files)."""
        self._template = text

    def prompt_fields(self, sample, family) -> dict[str, Any]:
        """The template's fields: ``sample.prompt`` and ``coord_hint`` (the family's frame)."""
        return {**sample.prompt, "coord_hint": family.coord_hint(*sample.image_size)}

    def prompt_text(self, sample, family) -> str:
        """The instruction text for ``sample`` in ``family``'s coordinate frame."""
        template = self._template if self._template is not None else self.template(self.variant_for(sample))
        return fill_prompt(template, self.prompt_fields(sample, family), where=self.where(sample)).strip()

    def messages(self, sample, family) -> list[dict]:
        if not sample.images:
            raise ValueError(f"sample {sample.id!r}: the {self.name} task needs an image")
        return [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": sample.images[0]},
                    {"type": "text", "text": self.prompt_text(sample, family)},
                ],
            }
        ]

    # --- ground truth --------------------------------------------------------------------
    #: target keys of which the task needs at least one (checked before scoring)
    target_keys: tuple[str, ...] = ()

    def where(self, sample) -> str:
        """``sample 'id' (file:line)`` for error messages."""
        src, line = sample.meta.get("source"), sample.meta.get("line")
        loc = f" ({src}:{line})" if src is not None and line is not None else (f" ({src})" if src else "")
        return f"sample {sample.id!r}{loc}"

    def check_sample(self, sample) -> None:
        """Raise ValueError naming the sample and the field if its ground truth or image size is
        missing: bad DATA raises (only model output is forgiven)."""
        if not sample.image_sizes:
            raise ValueError(f"{self.where(sample)}: image_sizes is empty (the {self.name} task needs the image size)")
        if self.target_keys and not any(k in sample.target for k in self.target_keys):
            raise ValueError(
                f"{self.where(sample)}: the {self.name} task needs target field "
                f"{' or '.join(repr(k) for k in self.target_keys)}; target has {sorted(sample.target)}"
            )

    # --- scoring -------------------------------------------------------------------------
    def score(self, prediction: Any, sample) -> tuple[float, dict[str, float]]:
        """(task score in [0, 1], parts other than ``format``) of a parsed prediction."""
        raise NotImplementedError

    def zero_parts(self) -> dict[str, float]:
        return {k: 0.0 for k in self.reward_parts}

    def reward(self, thought: str, answer: str, sample, family) -> Reward:
        self.check_sample(sample)  # bad data raises here, before the model-output guard
        try:
            inner = check_format(thought, answer, max_chars=MAX_TEXT + ANSWER_SLACK)
            prediction = self.parse(inner, sample, family)
            task_score, parts = self.score(prediction, sample)
        except ParseError as e:
            return Reward(0.0, self.zero_parts(), reason=e.reason)
        # any other exception is a bug: vlm_grpo_ma.reward_guard.RewardGuard, through which the
        # trainer and the benchmark call every reward, scores it 0 and counts it
        parts = {"format": 1.0, **parts}
        total = combine(task_score, True, self.w_task, self.w_format)
        return Reward(total, {k: float(parts[k]) for k in self.reward_parts})
