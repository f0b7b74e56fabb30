"""Errors and summaries of data loading.

Every problem found in a data file is a :class:`DataError` that names where it is and what is
wrong with it::

    data.jsonl:17: field 'target.boxes[0]': box is inverted (x1 > x2)
    instances.json:annotation 42: field 'bbox': non-numeric coordinate 'abc'

``line`` is the 1-based line of a JSONL file, or a locator such as ``"record 3"`` (JSON list,
Hugging Face dataset row) or ``"annotation 42"`` / ``"image 7"`` (COCO).  ``kind`` is a short,
stable key of the problem (see :data:`KINDS`) used to count skipped records.

Loaders either raise the first :class:`DataError` (``skip_invalid=False``, the default) or skip the
record and count it in a :class:`LoadSummary` (``skip_invalid=True``): nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Union

Locator = Union[int, str, None]

#: the ``kind`` keys a loader uses (others may be added; they are only counted)
KINDS = (
    "missing_file",  # the data file itself does not exist
    "bad_json",  # a line / file that is not valid JSON, or not an object
    "missing_field",  # a required field is absent
    "bad_value",  # a field of the wrong type or value
    "missing_image",  # an image file that does not exist
    "corrupt_image",  # an image that cannot be decoded
    "not_numeric",  # a coordinate that is not a finite number
    "bad_arity",  # a box without 4 numbers, a point without 2, ...
    "inverted_box",  # x1 > x2 or y1 > y2 (or negative COCO width / height)
    "out_of_image",  # geometry outside the image beyond the tolerance
    "duplicate_id",  # an id already used in the same source
)


class FieldError(ValueError):
    """A problem with one field, found by a validator that does not know the file or line.

    Loaders turn it into a :class:`DataError` with :meth:`DataError.from_field`.
    """

    def __init__(self, field: str, reason: str, kind: str = "bad_value"):
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason
        self.kind = kind


class DataError(ValueError):
    """A bad record in a data file.

    Attributes:
        file: the data file (or dataset) the record came from.
        line: 1-based line (JSONL), or a locator string (``"record 3"``, ``"annotation 42"``).
        field: dotted path of the offending field (``"target.boxes[0]"``); ``""`` for the
            record as a whole (a malformed JSON line).
        reason: what is wrong, in words.
        kind: short stable key of the problem (one of :data:`KINDS`), counted by summaries.
    """

    def __init__(self, file: str, line: Locator, field: str, reason: str, kind: str = "bad_value"):
        self.file = str(file)
        self.line = line
        self.field = field
        self.reason = reason
        self.kind = kind
        super().__init__(self.format())

    def format(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"field {self.field!r}: " if self.field else ""
        return f"{where}: {what}{self.reason}"

    @classmethod
    def from_field(cls, err: FieldError, file: str, line: Locator, prefix: str = "") -> "DataError":
        """Locate a :class:`FieldError`; ``prefix`` is prepended to its field path."""
        path = f"{prefix}.{err.field}" if prefix and err.field else (prefix or err.field)
        return cls(file, line, path, err.reason, err.kind)

    def __reduce__(self):  # picklable (datasets / multiprocessing)
        return (type(self), (self.file, self.line, self.field, self.reason, self.kind))


@dataclass
class LoadSummary:
    """What a loader did: how many samples it loaded; per problem kind, how many records it
    skipped, with the first few error messages as examples; and how many valid records an
    option filtered out on purpose (``filtered``, by reason, e.g. ``not_unique``).

    ``str(summary)`` prints a short report; :meth:`to_dict` is JSON-ready.
    """

    source: str = ""
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    filtered: Counter = field(default_factory=Counter)
    max_examples: int = 3

    @property
    def n_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    def add_loaded(self, n: int = 1) -> None:
        self.loaded += n

    def add_skipped(self, err: DataError) -> None:
        """Count one skipped record and keep its message if fewer than ``max_examples`` of its
        kind are kept."""
        self.skipped[err.kind] += 1
        ex = self.examples.setdefault(err.kind, [])
        if len(ex) < self.max_examples:
            ex.append(str(err))

    def merge(self, other: "LoadSummary") -> "LoadSummary":
        """Add another summary's counts into this one (for sources loaded in parts)."""
        self.loaded += other.loaded
        self.skipped.update(other.skipped)
        self.filtered.update(other.filtered)
        for kind, msgs in other.examples.items():
            ex = self.examples.setdefault(kind, [])
            ex.extend(msgs[: max(0, self.max_examples - len(ex))])
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": self.loaded,
            "skipped": dict(self.skipped),
            "n_skipped": self.n_skipped,
            "examples": {k: list(v) for k, v in self.examples.items()},
            "filtered": dict(self.filtered),
        }

    def __str__(self) -> str:
        head = f"{self.source or 'data'}: loaded {self.loaded} sample(s), skipped {self.n_skipped} invalid"
        if self.filtered:
            head += ", filtered " + ", ".join(f"{n} {why}" for why, n in self.filtered.most_common())
        if not self.n_skipped:
            return head
        lines = [head + ":"]
        for kind, n in self.skipped.most_common():
            lines.append(f"  {kind}: {n}")
            for msg in self.examples.get(kind, []):
                lines.append(f"      e.g. {msg}")
        return "\n".join(lines)
