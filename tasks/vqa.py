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

Reward (parts ``format``, ``accuracy``), option ``reward_match``:

- ``"lenient"`` (default; a reward is not a metric): multiple choice: 1 for the right option;
  open with at least ``soft_min_refs`` (3) references: VQAv2 soft accuracy over the lenient
  normalisation above (:func:`vqa_soft_accuracy`); with fewer: 1 when the answer matches any
  reference.  It forgives what the official script does not (``"eleven"`` = ``"11"``,
  ``"it's"`` = ``"its"``, ``"50%"`` = ``"50"``, ``"3.50"`` = ``"3.5"``).
- ``"official"``: the per-sample metric below.

Metrics (the official VQAv2 evaluation, GT-Vision-Lab/VQA
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, re-implemented in :func:`vqa_accuracy`):
``accuracy`` = the mean over samples of: open questions with several references: the official
VQAv2 accuracy (its normalisation, leave-one-out over the references); open questions with ONE
reference (where the official formula is always 0): exact match after the official
normalisation of both (a project convention, not VQAv2's); multiple choice: the right option.
For VQAv2 data, ``100 * accuracy`` rounded to 2 decimals is the official script's overall figure.
``accuracy/<answer_type>`` (VQAv2's ``answer_type`` field: ``yes/no``, ``number``, ``other``; or
inferred from the references; ``multiple_choice``) and ``accuracy/question_type/<question_type>``
(samples whose target has VQAv2's ``question_type``, e.g. ``what color is the``) are the same
mean over those samples (the official ``perAnswerType`` / ``perQuestionType``); ``parse_rate``.
An unparsable answer scores 0.
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
    "vqa_accuracy",
    "vqa_normalize_prediction",
    "vqa_process_digit_article",
    "vqa_process_punctuation",
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


# ----------------------------------------------------------------------------------------------
# The official VQAv2 evaluation, re-implemented: GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py (master, a013f00, 2021).  Its quirks are kept
# on purpose, so that a number reported here is the number that script prints (divided by 100,
# unrounded).
# ----------------------------------------------------------------------------------------------
#: contractions the official script restores, word by word, after stripping punctuation
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
#: number words the official script maps to digits (only up to ten)
VQA_DIGITS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
#: punctuation the official script deletes or turns into a space (master: no ':', no "'")
VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
             "?", "!")
# "(?!<=\d)" in the official pattern is a lookahead (a typo for a lookbehind) that always holds:
# every period not followed by a digit is deleted
_VQA_PERIOD = re.compile(r"\.(?!\d)")
_VQA_COMMA_IN_NUMBER = re.compile(r"\d,\d")


def vqa_process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each punctuation mark of :data:`VQA_PUNCT` is deleted
    when it touches a space somewhere in the text, or when the text has a comma between two
    digits (then EVERY mark is deleted: ``"1,000 red-blue"`` -> ``"1000 redblue"``), and
    otherwise becomes a space; then every period not followed by a digit is deleted.  Case,
    apostrophes and colons are kept."""
    out = text
    has_number_comma = _VQA_COMMA_IN_NUMBER.search(text) is not None
    for p in VQA_PUNCT:
        if p + " " in text or " " + p in text or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _VQA_PERIOD.sub("", out)


def vqa_process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, split on whitespace, number words
    ``none``/``zero``..``ten`` to digits, articles dropped, contractions restored
    (``dont`` -> ``don't``), joined by single spaces."""
    words = [VQA_DIGITS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize_prediction(text: str) -> str:
    """An answer as the official script normalises it (when the references differ): newlines
    and tabs to spaces, stripped, :func:`vqa_process_punctuation`,
    :func:`vqa_process_digit_article`."""
    t = str(text).replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(t))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 accuracy of one RAW predicted answer against the RAW human answers, exactly as the
    official script (master, "Fixed processing answers bug", 2021) computes it: newlines and
    tabs become spaces and both sides are stripped; then, ONLY when the references are not all
    identical, the references and the prediction are normalised
    (:func:`vqa_process_punctuation` then :func:`vqa_process_digit_article`; the official
    annotations are already normalised, so with ten identical references nothing is: ``"Yes."``
    against ten ``"yes"`` scores 0); then the mean over the references ``i`` of
    ``min(1, #(other references equal to the prediction) / 3)``.  With a single reference this
    is always 0 (no other reference is left), as in the official script.

    >>> vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7)
    0.9
    """
    def clean(t: str) -> str:
        return str(t).replace("\n", " ").replace("\t", " ").strip()

    pred, refs = clean(prediction), [clean(r) for r in references]
    if not refs:
        return 0.0
    if len(set(refs)) > 1:
        refs = [vqa_process_digit_article(vqa_process_punctuation(r)) for r in refs]
        pred = vqa_process_digit_article(vqa_process_punctuation(pred))
    hits = [r == pred for r in refs]
    k = sum(hits)
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

    Options: ``w_task`` (0.9), ``w_format`` (0.1), ``reward_match`` (``"lenient"`` or
    ``"official"``), ``rel_tol`` (0), ``abs_tol`` (0), ``soft_min_refs`` (3), ``soft_formula``
    (``"official"`` or ``"simple"``) (the last four: lenient reward only),
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
        self.reward_match = str(self.options.get("reward_match", "lenient"))
        if self.reward_match not in ("lenient", "official"):
            raise ValueError(f"vqa option reward_match must be 'lenient' or 'official', got {self.reward_match!r}")
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
        else:  # the reference the metric scores highest (the first of equals)
            refs = self.references(sample)
            scores = [self.metric_score(r, sample) for r in refs]
            answer = refs[scores.index(max(scores))]
        reasoning = sample.meta.get("reasoning") or "I look at the image and answer the question."
        return format_sft_target(reasoning, answer)

    # --- scoring -------------------------------------------------------------------------
    def parse(self, answer_text: str, sample: Sample, family) -> int | str:
        """Multiple choice: the option index; open: the answer text as written, stripped (the
        metric normalises it the official way, the lenient reward its own way; ParseError
        ``empty`` when nothing is left after either normalisation;
        ``too_long`` over ``max_answer_chars``)."""
        self.check_length(answer_text)
        text = answer_inner(answer_text) if isinstance(answer_text, str) else ""
        if self.is_mc(sample):
            return parse_choice(text, sample.prompt["choices"])
        if not normalize_answer(text) and not vqa_normalize_prediction(text):
            raise ParseError("empty", "empty answer after normalisation")
        return text.strip()

    def score(self, prediction: Any, sample: Sample) -> float:
        """The reward's task score (option ``reward_match``)."""
        if self.reward_match == "official" or self.is_mc(sample):
            return self.metric_score(prediction, sample)
        pred = normalize_answer(prediction)
        refs = [normalize_answer(r) for r in self.references(sample)]
        if len(refs) >= self.soft_min_refs:
            return vqa_soft_accuracy(pred, refs, self.match, self.soft_formula)
        return float(any(self.match(pred, r) for r in refs))

    def metric_score(self, prediction: Any, sample: Sample) -> float:
        """One sample's ``accuracy`` (module docstring): official VQAv2 accuracy with several
        references, official-normalised exact match with one, the right option for multiple
        choice; 0 for an unparsable answer (None)."""
        if prediction is None:
            return 0.0
        if self.is_mc(sample):
            return float(prediction == sample.target["choice"])
        refs = self.references(sample)
        if len(refs) == 1:
            return float(vqa_normalize_prediction(prediction) == vqa_normalize_prediction(refs[0]))
        return vqa_accuracy(prediction, refs)

    def answer_type(self, sample: Sample) -> str:
        if self.is_mc(sample):
            return "multiple_choice"
        t = sample.target.get("answer_type")
        if isinstance(t, str) and t:
            return t
        return _answer_type([normalize_answer(r) for r in self.references(sample)])

    def metrics(self, predictions: Sequence[Any], samples: Sequence[Sample]) -> dict[str, float]:
        """``accuracy``, ``accuracy/<answer_type>``, ``accuracy/question_type/<type>`` and
        ``parse_rate`` (module docstring)."""
        check_aligned(predictions, samples)
        if not samples:
            return {"accuracy": math.nan, "parse_rate": math.nan}
        acc = []
        groups: dict[str, list[float]] = {}
        for pred, s in zip(predictions, samples):
            a = self.metric_score(pred, s)
            acc.append(a)
            groups.setdefault(f"accuracy/{self.answer_type(s)}", []).append(a)
            qtype = s.target.get("question_type")
            if isinstance(qtype, str) and qtype:
                groups.setdefault(f"accuracy/question_type/{qtype}", []).append(a)
        out = {
            "accuracy": sum(acc) / len(acc),
            "parse_rate": sum(p is not None for p in predictions) / len(predictions),
        }
        for key, v in sorted(groups.items()):
            out[key] = sum(v) / len(v)
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
                syn.synthetic_sample(
                    self.name, seed, i, images=[syn.image_ref(img, self.cache_dir, self.name, seed, i)],
                    image_sizes=[(w, h)], prompt=prompt, target=target, reasoning=reasoning, kind=kind,
                )
            )
        return out
