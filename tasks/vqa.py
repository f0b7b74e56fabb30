"""Visual question answering: open answers (VQAv2 style) and multiple choice.

Sample:
    open:  ``prompt = {"question": str}``; ``target = {"answers": [str, ...]}`` (one reference,
           or several such as VQAv2's ten human answers; ``{"answer": str}`` is accepted as one
           reference); optional ``target["answer_type"]`` (``"yes/no"``, ``"number"``,
           ``"other"``; inferred from the references when absent) for the per-type breakdown.
    multiple choice: ``prompt = {"question": str, "choices": [str, ...]}``;
           ``target = {"choice": int}`` (0-based index of the right option).

Answer (inside ``<answer>``): open: the short answer (``2``, ``red``, ``yes``); multiple choice:
the option's letter (``B``, ``(B)``, ``B.``), the option's text, or both (``B. red``).

Matching (:func:`normalize_answer`, :func:`answers_match`): VQAv2-style normalisation (lowercase,
punctuation removed, articles dropped, number words to digits) then exact equality of the whole
normalised strings; numbers also match within ``abs_tol + rel_tol * |ref|`` (options, both 0 by
default: ``"3.50"`` matches ``"3.5"``).  Never substring matching: ``"red ball"`` does not match
``"red"``.

Reward (parts ``format``, ``accuracy``): multiple choice: 1 for the right option; open with at
least ``soft_min_refs`` (3) references: VQAv2 soft accuracy (:func:`vqa_soft_accuracy`); with
fewer: 1 when the answer matches any reference.

Metrics: ``accuracy`` (the answer matches the primary reference: the most frequent normalised
reference, or the right option), ``soft_accuracy`` (the reward's task score), ``accuracy/<type>``
(soft accuracy per answer type: ``yes/no``, ``number``, ``other``, ``multiple_choice``) and
``parse_rate``.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from typing import Any, Callable, Sequence

from vlm_grpo_ma.tasks import _synthetic as syn
from vlm_grpo_ma.tasks._answer import AnswerTask, answer_inner
from vlm_grpo_ma.tasks.common import check_aligned, format_sft_target
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.task import ParseError

__all__ = [
    "VQATask",
    "answers_match",
    "normalize_answer",
    "parse_choice",
    "to_number",
    "vqa_soft_accuracy",
]

#: number words mapped to digits (VQAv2 maps "none" to "0" as well)
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_APOSTROPHES = "'\u2019\u2018`"


def normalize_answer(text: str) -> str:
    """VQAv2-style normalised answer.

    Steps: Unicode NFKC and lowercase; commas inside numbers removed (``1,000`` -> ``1000``);
    apostrophes removed (``don't`` -> ``dont``); periods removed except between digits
    (``U.S.A.`` -> ``usa``, ``3.5`` stays);
    a minus kept only in front of a number (``-3``; ``t-shirt`` -> ``t shirt``); every other
    punctuation or symbol character becomes a space; number words ``zero``..``twenty`` and
    ``none`` become digits; articles ``a``, ``an``, ``the`` are dropped; whitespace collapsed.

    >>> normalize_answer("Two.")
    '2'
    >>> normalize_answer("The Red-Ball!")
    'red ball'
    """
    s = unicodedata.normalize("NFKC", str(text)).lower()
    s = re.sub(r"(?<=\d),(?=\d)", "", s)
    for a in _APOSTROPHES:
        s = s.replace(a, "")
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", "", s)
    s = re.sub(r"(?<![\w-])-(?=\d)", "\x00", s)  # protect the sign of a number
    s = "".join(" " if unicodedata.category(ch)[0] in "PS" and ch != "." else ch for ch in s)
    s = s.replace("\x00", "-")
    words = [NUMBER_WORDS.get(w, w) for w in s.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def to_number(norm: str) -> float | None:
    """The value of a normalised answer that is one plain number, else None (also for values
    that overflow to inf)."""
    if not _NUMBER_RE.fullmatch(norm):
        return None
    try:
        v = float(norm)
    except (ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None


def answers_match(pred: str, ref: str, rel_tol: float = 0.0, abs_tol: float = 0.0) -> bool:
    """Whether two NORMALISED answers agree: equal strings, or both plain numbers with
    ``|pred - ref| <= abs_tol + rel_tol * |ref|``."""
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    p, r = to_number(pred), to_number(ref)
    if p is None or r is None:
        return False
    return abs(p - r) <= abs_tol + rel_tol * abs(r)


def vqa_soft_accuracy(
    pred: str, refs: Sequence[str], match: Callable[[str, str], bool] = answers_match, formula: str = "official"
) -> float:
    """VQAv2 soft accuracy of a normalised answer against normalised references.

    ``formula="simple"``: ``min(1, #matching refs / 3)``.
    ``formula="official"`` (the VQAv2 evaluation script): the mean, over the ``n`` subsets of
    ``n - 1`` references leaving one out, of ``min(1, #matching refs in the subset / 3)``.  With
    ten references and ``k`` matches this is ``min(1, k / 3)`` except ``k = 3`` -> 0.9 (and
    ``k = 1`` -> 0.3, ``k = 2`` -> 0.6: in the subsets without a matching reference one match
    fewer counts).
    """
    if not refs:
        return 0.0
    hits = [bool(match(pred, r)) for r in refs]
    k = sum(hits)
    if formula == "simple" or len(refs) == 1:
        return min(1.0, k / 3)
    if formula != "official":
        raise ValueError(f"formula must be 'official' or 'simple', got {formula!r}")
    return sum(min(1.0, (k - h) / 3) for h in hits) / len(refs)


_LETTER_RE = re.compile(r"^(?:option|answer|choice)?\s*[:\-]?\s*\(?([A-Za-z])\)?\s*[.):]?$", re.IGNORECASE)
_LETTER_TEXT_RE = re.compile(r"^\(?([A-Za-z])\)?\s*[.):]\s*(.+)$", re.DOTALL)


def parse_choice(text: str, choices: Sequence[str]) -> int:
    """The 0-based option index an answer names, or ParseError.

    Accepted: a letter (``B``, ``b``, ``(B)``, ``B.``, ``B)``, ``Option B``), the option's text
    (matched whole after :func:`normalize_answer`), or a letter followed by the option's text
    (``B. red``; the two must agree).  Reasons: ``empty``, ``bad_choice`` (letter out of range,
    or letter and text disagree), ``no_choice`` (nothing matches, or the text matches several
    options).
    """
    t = " ".join(str(text).split())
    if not t:
        raise ParseError("empty", "empty answer")
    n = len(choices)
    norm_choices = [normalize_answer(c) for c in choices]
    m = _LETTER_RE.match(t)
    if m:
        idx = ord(m.group(1).upper()) - ord("A")
        if 0 <= idx < n:
            return idx
        # a one-letter answer may still be an option's text (e.g. the option "x")
    m = _LETTER_TEXT_RE.match(t)
    if m:
        idx = ord(m.group(1).upper()) - ord("A")
        if 0 <= idx < n:
            if norm_choices[idx] == normalize_answer(m.group(2)):
                return idx
            if normalize_answer(m.group(2)) in norm_choices:
                raise ParseError("bad_choice", f"{t[:40]!r}: the letter and the option text disagree")
    norm = normalize_answer(t)
    hits = [i for i, c in enumerate(norm_choices) if c and c == norm]
    if len(hits) == 1:
        return hits[0]
    if m or _LETTER_RE.match(t):
        raise ParseError("bad_choice", f"{t[:40]!r} names no option of {n}")
    raise ParseError("no_choice", f"{t[:40]!r} is no option")


def _answer_type(refs_norm: Sequence[str]) -> str:
    top = Counter(refs_norm).most_common(1)[0][0] if refs_norm else ""
    if top in ("yes", "no"):
        return "yes/no"
    if to_number(top) is not None:
        return "number"
    return "other"


class VQATask(AnswerTask):
    """Open and multiple-choice VQA (see the module docstring).

    Options: ``w_task`` (0.9), ``w_format`` (0.1), ``rel_tol`` (0), ``abs_tol`` (0),
    ``soft_min_refs`` (3), ``soft_formula`` (``"official"`` or ``"simple"``),
    ``image_size`` ((112, 112), synthetic), ``cache_dir`` (None: synthetic images stay PIL),
    ``max_answer_chars`` (1000: a longer answer is ``too_long``, refused before parsing).
    """

    name = "vqa"
    reward_parts = ("format", "accuracy")

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.rel_tol = float(self.options.get("rel_tol", 0.0))
        self.abs_tol = float(self.options.get("abs_tol", 0.0))
        self.soft_min_refs = int(self.options.get("soft_min_refs", 3))
        self.soft_formula = str(self.options.get("soft_formula", "official"))
        if self.soft_formula not in ("official", "simple"):
            raise ValueError(f"vqa option soft_formula must be 'official' or 'simple', got {self.soft_formula!r}")
        self.image_size = tuple(self.options.get("image_size", (112, 112)))
        self.cache_dir = self.options.get("cache_dir")

    # --- sample access -------------------------------------------------------------------
    @staticmethod
    def is_mc(sample: Sample) -> bool:
        return "choices" in sample.prompt

    def references(self, sample: Sample) -> list[str]:
        """The sample's reference answers (raw), or ValueError naming the sample."""
        t = sample.target
        refs = t.get("answers", [t["answer"]] if "answer" in t else None)
        if isinstance(refs, str):
            refs = [refs]
        if not refs or not all(isinstance(r, (str, int, float)) for r in refs):
            raise ValueError(f"vqa sample {sample.id!r}: target needs 'answers' (list of str) or 'answer'")
        return [str(r) for r in refs]

    def check_sample(self, sample: Sample) -> None:
        if self.is_mc(sample):
            choices, c = sample.prompt.get("choices"), sample.target.get("choice")
            if not isinstance(choices, (list, tuple)) or len(choices) < 2 or len(choices) > 26:
                raise ValueError(f"vqa sample {sample.id!r}: prompt 'choices' must list 2..26 options")
            if not isinstance(c, int) or not 0 <= c < len(choices):
                raise ValueError(f"vqa sample {sample.id!r}: target 'choice' must be an index into choices")
        else:
            self.references(sample)

    def match(self, pred: str, ref: str) -> bool:
        return answers_match(pred, ref, self.rel_tol, self.abs_tol)

    # --- prompts -------------------------------------------------------------------------
    def prompt_variant(self, sample: Sample) -> str | None:
        return "mc" if self.is_mc(sample) else None

    def prompt_fields(self, sample: Sample, family) -> dict[str, Any]:
        fields = dict(sample.prompt)
        if self.is_mc(sample):
            fields["choices"] = "\n".join(
                f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(sample.prompt["choices"])
            )
        return fields

    def sft_target(self, sample: Sample, family) -> str:
        self.check_sample(sample)
        if self.is_mc(sample):
            answer = string.ascii_uppercase[sample.target["choice"]]
        else:
            refs = self.references(sample)
            norms = [normalize_answer(r) for r in refs]
            top = Counter(norms).most_common(1)[0][0]
            answer = refs[norms.index(top)]
        reasoning = sample.meta.get("reasoning") or "I look at the image and answer the question."
        return format_sft_target(reasoning, answer)

    # --- scoring -------------------------------------------------------------------------
    def parse(self, answer_text: str, sample: Sample, family) -> int | str:
        """Multiple choice: the option index; open: the normalised answer (ParseError
        ``empty`` when nothing is left after normalisation; ``too_long`` over ``max_answer_chars``)."""
        self.check_length(answer_text)
        text = answer_inner(answer_text) if isinstance(answer_text, str) else ""
        if self.is_mc(sample):
            return parse_choice(text, sample.prompt["choices"])
        norm = normalize_answer(text)
        if not norm:
            raise ParseError("empty", "empty answer after normalisation")
        return norm

    def score(self, prediction: Any, sample: Sample) -> float:
        if self.is_mc(sample):
            return float(prediction == sample.target["choice"])
        refs = [normalize_answer(r) for r in self.references(sample)]
        if len(refs) >= self.soft_min_refs:
            return vqa_soft_accuracy(prediction, refs, self.match, self.soft_formula)
        return float(any(self.match(prediction, r) for r in refs))

    def answer_type(self, sample: Sample) -> str:
        if self.is_mc(sample):
            return "multiple_choice"
        t = sample.target.get("answer_type")
        if isinstance(t, str) and t:
            return t
        return _answer_type([normalize_answer(r) for r in self.references(sample)])

    def metrics(self, predictions: Sequence[Any], samples: Sequence[Sample]) -> dict[str, float]:
        check_aligned(predictions, samples)
        if not samples:
            return {"accuracy": math.nan, "soft_accuracy": math.nan, "parse_rate": math.nan}
        acc, soft = [], []
        by_type: dict[str, list[float]] = {}
        for pred, s in zip(predictions, samples):
            if pred is None:
                a = sc = 0.0
            elif self.is_mc(s):
                a = sc = float(pred == s.target["choice"])
            else:
                norms = [normalize_answer(r) for r in self.references(s)]
                a = float(self.match(pred, Counter(norms).most_common(1)[0][0]))
                sc = self.score(pred, s)
            acc.append(a)
            soft.append(sc)
            by_type.setdefault(self.answer_type(s), []).append(sc)
        out = {
            "accuracy": sum(acc) / len(acc),
            "soft_accuracy": sum(soft) / len(soft),
            "parse_rate": sum(p is not None for p in predictions) / len(predictions),
        }
        for t, v in sorted(by_type.items()):
            out[f"accuracy/{t}"] = sum(v) / len(v)
        return out

    # --- data ----------------------------------------------------------------------------
    def synthetic(self, n: int, seed: int = 0) -> list[Sample]:
        """Images with 2..6 coloured shapes and three kinds of question, cycling with the index:
        ``count`` ("How many red circles are there?", 0..3), ``colour`` ("What colour is the
        square?", the only square) and ``mc`` (one of the two as multiple choice, 4 options)."""
        w, h = self.image_size
        colours = ["red", "green", "blue", "yellow", "orange", "white"]
        out = []
        for i in range(n):
            rng = syn.rng_for(self.name, seed, i)
            kind = ("count", "colour", "mc")[i % 3]
            sub = kind if kind != "mc" else rng.choice(["count", "colour"])
            objects: list[tuple[str, str]] = []
            if sub == "count":
                colour, shape = rng.choice(colours), rng.choice(syn.SHAPES)
                k = rng.randint(0, 3)
                objects += [(colour, shape)] * k
                others = [(c, s) for c in colours for s in syn.SHAPES if (c, s) != (colour, shape)]
                objects += [rng.choice(others) for _ in range(rng.randint(max(0, 2 - k), 3))]
                question = f"How many {colour} {shape}s are there?"
                answer = str(k)
            else:
                shape = rng.choice(syn.SHAPES)
                colour = rng.choice(colours)
                objects.append((colour, shape))
                rest = [s for s in syn.SHAPES if s != shape]
                objects += [(rng.choice(colours), rng.choice(rest)) for _ in range(rng.randint(1, 4))]
                question = f"What colour is the {shape}?"
                answer = colour
            rng.shuffle(objects)
            lo, hi = max(6, round(0.12 * min(w, h))), max(8, round(0.18 * min(w, h)))
            sizes = [(rng.randint(lo, hi),) * 2 for _ in objects]
            boxes = syn.place_boxes(rng, sizes, w, h, min_side=6)  # shrinks a box only if no room
            img, draw = syn.new_canvas((w, h))
            seen = []
            for (c, s), box in sorted(zip(objects, boxes), key=lambda ob: (ob[1][1], ob[1][0])):
                syn.draw_shape(draw, s, box, syn.COLOURS[c])
                cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
                seen.append(f"{syn.article(c)} {c} {s} at the {syn.location_words(cx, cy)}")
            listing = "; ".join(seen)
            if sub == "count":
                reasoning = f"The image shows {listing}. Counting the {colour} {shape}s: {answer}."
            else:
                reasoning = f"The image shows {listing}. The only {shape} is {colour}."
            prompt: dict[str, Any] = {"question": question}
            target: dict[str, Any]
            if kind == "mc":
                if sub == "count":
                    opts = sorted(rng.sample([str(v) for v in range(0, 7) if str(v) != answer], 3) + [answer], key=int)
                else:
                    opts = rng.sample([c for c in colours if c != answer], 3) + [answer]
                    rng.shuffle(opts)
                prompt["choices"] = opts
                target = {"choice": opts.index(answer)}
                reasoning += f" That is option {string.ascii_uppercase[opts.index(answer)]}."
            else:
                target = {"answers": [answer], "answer_type": "number" if sub == "count" else "other"}
            out.append(
                Sample(
                    id=f"vqa-synthetic-{seed}-{i}",
                    task=self.name,
                    images=[syn.image_ref(img, self.cache_dir, self.name, seed, i)],
                    image_sizes=[(w, h)],
                    prompt=prompt,
                    target=target,
                    meta={"reasoning": reasoning, "kind": kind, "source": "synthetic"},
                )
            )
        return out
