"""Loading data files into :class:`~vlm_grpo_ma.data.sample.Sample` lists.

Every loader returns a :class:`LoadedSamples` (a ``list[Sample]`` with a ``.summary``, a
:class:`~vlm_grpo_ma.data.errors.LoadSummary`), with CANONICAL geometry (floats in [0, 1] of the
original image, converted here with the image's real size) and ``image_sizes`` filled.
Bad records raise a :class:`~vlm_grpo_ma.data.errors.DataError` naming file, line and field, or,
with ``skip_invalid=True``, are skipped and counted in the summary (which is also logged).

Formats
-------
**JSONL / JSON list, task fields** (one object per line, or a JSON list of objects)::

    {"id": "mug-1", "task": "detection", "image": "imgs/a.png",
     "prompt": {"object": "red mug"}, "target": {"boxes": [[10, 20, 110, 90]], "labels": ["mug"]},
     "coords": "pixel"}

- ``id`` (required, unique), ``task`` (optional; must agree with the loader's ``task``),
  ``image`` (one reference) or ``images`` (a list): local paths are relative to the data file's
  folder (or ``image_root``); ``file://`` URLs, ``data:image/...;base64`` URIs and http(s) URLs
  are kept as they are.
- ``prompt``: the task's prompt fields (a string is taken as ``{"text": ...}``); without it, the
  record's other top-level keys are the prompt fields.
- ``target``: the ground truth; geometry keys (``box``, ``boxes``, ``point``, ``points``,
  ``trajectory``, ``polygon``, ``region``, ``regions``; see :mod:`vlm_grpo_ma.data.validate`) are
  converted to canonical form, the rest pass through.  Target keys may instead be written at the
  top level (not both).  Required unless ``require_target=False``.
- ``coords``: ``"pixel"`` (default: the loader's ``coords``), ``"norm"`` or ``"rel1000"``.
  Geometry is relative to the FIRST image.
- ``meta``: merged into ``Sample.meta`` (which also gets ``source``, ``line`` and ``coords``).

**JSONL / JSON list, chat form** (LLaMA-Factory / Qwen style)::

    {"messages": [{"role": "user", "content": "<image>Where is the red mug?"},
                  {"role": "assistant", "content": "<think>...</think><answer>...</answer>"}],
     "images": ["imgs/a.png"], "target": {"box": [10, 20, 110, 90]}}

``conversations`` with ``from``/``value`` (``human``/``gpt``) is read the same way, and content
may be a list of Qwen parts (``{"type": "image", "image": ...}``, ``{"type": "text", ...}``).
The number of ``<image>`` placeholders must equal the number of images (none at all is allowed:
the images then precede the text).  The last assistant message is kept as
``meta["reference_text"]``, the normalised messages as ``meta["messages"]``, a system message as
``meta["system"]``; the prompt is ``{"text": <last user text without placeholders>}`` updated with
the record's ``prompt`` fields; the target comes from the record's target fields when present
(else ``{}``); ``id`` defaults to ``"<file stem>:<line>"``.

**COCO instances JSON** through pycocotools (:func:`vlm_grpo_ma.data.coco.load_coco`): one detection sample per image
(non-crowd boxes and their category names; crowd boxes kept apart as ``crowd_boxes``, the
ignore regions of COCO's evaluation), or one grounding sample per annotation
(``mode="annotation"``); COCO ids in ``meta`` and :func:`coco_results` to write predictions back
in COCO's results format.

**Hugging Face datasets** (saved with ``save_to_disk``, or local parquet / json / csv files): see
:func:`vlm_grpo_ma.data.hf.load_hf`; rows go through the same :func:`record_to_sample`.

:func:`vlm_grpo_ma.data.sources.load_samples` is the front door used by the trainer and the benchmark runner.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Callable, Iterable, Iterator, Optional

from PIL import Image

from vlm_grpo_ma.data.errors import DataError, FieldError, LoadSummary, Locator
from vlm_grpo_ma.data.images import ImageLoadError, image_size, load_image
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.data.validate import (
    DEFAULT_TOLERANCE,
    GEOMETRY_KEYS,
    check_coords,
    convert_target,
)

__all__ = [
    "LoadedSamples",
    "load_json",
    "load_jsonl",
    "load_records",
    "record_to_sample",
]

logger = logging.getLogger(__name__)

#: top-level keys of a task-field record that are not prompt fields
RESERVED_KEYS = frozenset({"id", "task", "image", "images", "prompt", "target", "coords", "meta", "messages", "conversations"})
#: keys that, written at the top level of a record, belong to the target
TARGET_KEYS = frozenset(GEOMETRY_KEYS) | {"labels", "label", "answer"}
IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_HF_EXTENSIONS = (".parquet", ".csv", ".arrow")


class LoadedSamples(list):
    """A ``list[Sample]`` with the :class:`LoadSummary` of how it was loaded (``.summary``)."""

    def __init__(self, samples: Iterable[Sample] = (), summary: Optional[LoadSummary] = None):
        super().__init__(samples)
        self.summary = summary if summary is not None else LoadSummary(loaded=len(self))


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
def _is_url(ref: str) -> bool:
    return ref.startswith(("data:", "http://", "https://", "file:"))


def resolve_image_ref(ref: Any, base_dir: str, field: str) -> Any:
    """A record's image reference made usable from anywhere: local relative paths joined to
    ``base_dir`` (absolute), URLs / data URIs / PIL images kept, a Hugging Face image dict
    (``{"bytes": ..., "path": ...}``) opened from its bytes or resolved from its path."""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):
        if ref.get("bytes"):
            try:
                return Image.open(io.BytesIO(ref["bytes"]))
            except Exception as e:
                raise FieldError(field, f"cannot decode image bytes ({type(e).__name__}: {e})", "corrupt_image") from None
        ref = ref.get("path")
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref:
        raise FieldError(field, f"an image reference must be a non-empty path or URL string, got {ref!r}", "bad_value")
    if _is_url(ref) or os.path.isabs(ref):
        return ref
    return os.path.abspath(os.path.join(base_dir, ref))


def check_image(ref: Any, field: str, cache: Optional[dict] = None, verify: bool = False) -> tuple[int, int]:
    """``(width, height)`` of an image reference, or a FieldError (``missing_image`` /
    ``corrupt_image``).  ``verify`` decodes the pixels too (catches truncated files)."""
    key = ref if isinstance(ref, str) else None
    if cache is not None and key is not None and key in cache:
        return cache[key]
    if isinstance(ref, str) and not _is_url(ref) and not os.path.exists(ref):
        raise FieldError(field, f"image file not found: {ref}", "missing_image")
    try:
        size = image_size(ref)
        if verify:
            load_image(ref)
    except ImageLoadError as e:
        kind = "missing_image" if "file not found" in str(e) else "corrupt_image"
        raise FieldError(field, f"cannot read image: {e}", kind) from None
    if cache is not None and key is not None:
        cache[key] = size
    return size


# ----------------------------------------------------------------------------------------------
# one record -> one Sample
# ----------------------------------------------------------------------------------------------
def _images_of(rec: dict) -> tuple[list, str]:
    if "image" in rec and "images" in rec:
        raise FieldError("images", "give either 'image' or 'images', not both", "bad_value")
    if "image" in rec:
        return ([] if rec["image"] is None else [rec["image"]]), "image"
    imgs = rec.get("images")
    if imgs is None:
        return [], "images"
    if not isinstance(imgs, (list, tuple)):
        raise FieldError("images", f"must be a list of image references, got {type(imgs).__name__}", "bad_value")
    return list(imgs), "images"


def _message_text(content: Any, field: str) -> tuple[str, list]:
    """(text, image refs found in parts) of one message's content."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise FieldError(field, f"content must be a string or a list of parts, got {type(content).__name__}", "bad_value")
    texts, imgs = [], []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        elif isinstance(part, dict) and part.get("type") == "image":
            texts.append(IMAGE_PLACEHOLDER)
            imgs.append(part.get("image"))
        else:
            raise FieldError(f"{field}[{j}]", f"unknown content part {part!r}", "bad_value")
    return "".join(texts), imgs


def _chat(rec: dict) -> dict:
    """Normalise a chat record: messages, user text, reference text, system, images from parts."""
    key = "messages" if "messages" in rec else "conversations"
    msgs = rec[key]
    if not isinstance(msgs, list) or not msgs:
        raise FieldError(key, "must be a non-empty list of messages", "bad_value")
    norm, part_images = [], []
    for i, m in enumerate(msgs):
        f = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise FieldError(f, f"a message must be an object, got {type(m).__name__}", "bad_value")
        role = m.get("role", m.get("from"))
        if role is None:
            raise FieldError(f"{f}.role", "missing message role ('role' or 'from')", "missing_field")
        if role not in _ROLES:
            raise FieldError(f"{f}.role", f"unknown role {role!r} (expected one of {sorted(_ROLES)})", "bad_value")
        if "content" not in m and "value" not in m:
            raise FieldError(f"{f}.content", "missing message content ('content' or 'value')", "missing_field")
        text, imgs = _message_text(m.get("content", m.get("value")), f"{f}.content")
        part_images.extend(imgs)
        norm.append({"role": _ROLES[role], "content": text})
    users = [m for m in norm if m["role"] == "user"]
    if not users:
        raise FieldError(key, "no user message", "missing_field")
    reference = norm[-1]["content"] if norm[-1]["role"] == "assistant" else None
    last_user = [m for m in (norm[:-1] if reference is not None else norm) if m["role"] == "user"][-1]
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in norm)
    system = next((m["content"] for m in norm if m["role"] == "system"), None)
    return {
        "messages": norm,
        "user_text": last_user["content"].replace(IMAGE_PLACEHOLDER, "").strip(),
        "reference_text": reference,
        "system": system,
        "n_placeholders": n_placeholders,
        "part_images": part_images,
        "key": key,
    }


def record_to_sample(
    rec: Any,
    task: Optional[str] = None,
    *,
    file: str = "<record>",
    line: Locator = None,
    base_dir: str = ".",
    coords: str = "pixel",
    tolerance: float = DEFAULT_TOLERANCE,
    verify_images: bool = True,
    require_target: bool = True,
    image_cache: Optional[dict] = None,
) -> Sample:
    """Convert one record (task-field or chat form, see the module docstring) into a Sample.

    Args:
        rec: the decoded JSON object (or a Hugging Face dataset row).
        task: the task the data is for; a record's own ``task`` must agree with it.
        file, line: where the record came from (used in error messages and ``meta``).
        base_dir: folder that relative image paths are relative to.
        coords: coordinate system of geometry when the record does not say (``"pixel"``,
            ``"norm"``, ``"rel1000"``).
        tolerance: how far (fraction of the side) geometry may stick out of the image before it
            is an error; within it, values are clamped.
        verify_images: decode every image fully once (default; catches a file truncated after
            its header at load, where ``skip_invalid`` can skip it); False reads headers only.
        require_target: task-field records must have a target (chat records never must).
        image_cache: dict shared across records to read each image's size once.

    Raises:
        DataError: naming ``file``, ``line`` and the field.
    """
    try:
        return _record_to_sample(rec, task, file, line, base_dir, coords, tolerance, verify_images, require_target, image_cache)
    except FieldError as e:
        raise DataError.from_field(e, file, line) from None


def _check_text(value: Any, field: str, depth: int = 0) -> None:
    """FieldError naming the field when a string anywhere in ``value`` is not valid Unicode
    text (a lone surrogate such as ``"\\ud800"`` decodes from JSON but no tokenizer takes it)."""
    if depth > 200:
        raise FieldError(field, "nested more than 200 levels deep", "bad_value")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise FieldError(field, f"not valid Unicode text (lone surrogate {value[e.start]!r} at character {e.start})",
                             "bad_value") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, field or "<key>", depth + 1)
            _check_text(v, f"{field}.{k}" if field else str(k), depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_text(v, f"{field}[{i}]", depth + 1)


def _record_to_sample(rec, task, file, line, base_dir, coords, tolerance, verify_images, require_target, image_cache):
    if not isinstance(rec, dict):
        raise FieldError("", f"a record must be a JSON object, got {type(rec).__name__}", "bad_json")
    _check_text(rec, "")
    is_chat = "messages" in rec or "conversations" in rec
    chat = _chat(rec) if is_chat else None

    # --- task ----------------------------------------------------------------------
    rec_task = rec.get("task")
    if rec_task is not None and not isinstance(rec_task, str):
        raise FieldError("task", f"must be a string, got {type(rec_task).__name__}", "bad_value")
    if task and rec_task and rec_task != task:
        raise FieldError("task", f"record is for task {rec_task!r} but the data is loaded for {task!r}", "bad_value")
    task_name = task or rec_task
    if not task_name:
        raise FieldError("task", "no task: give the loader a task or the record a 'task' field", "missing_field")

    # --- id ------------------------------------------------------------------------
    if "id" in rec and rec["id"] is not None:
        if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
            raise FieldError("id", f"must be a string or an integer, got {type(rec['id']).__name__}", "bad_value")
        sid = str(rec["id"])
    elif is_chat:
        sid = f"{os.path.splitext(os.path.basename(str(file)))[0]}:{line}"
    else:
        raise FieldError("id", "missing required field", "missing_field")

    # --- images ----------------------------------------------------------------------
    refs, img_key = _images_of(rec)
    if chat is not None:
        if not refs and chat["part_images"]:
            refs, img_key = list(chat["part_images"]), f"{chat['key']}[].content"
        if chat["n_placeholders"] and chat["n_placeholders"] != len(refs):
            raise FieldError(
                "images", f"{chat['n_placeholders']} {IMAGE_PLACEHOLDER} placeholder(s) in the messages but {len(refs)} image(s)", "bad_value"
            )
    images, sizes = [], []
    for i, ref in enumerate(refs):
        f = img_key if img_key == "image" else f"{img_key}[{i}]"
        resolved = resolve_image_ref(ref, base_dir, f)
        sizes.append(check_image(resolved, f, image_cache, verify_images))
        images.append(resolved)

    # --- coords / target ---------------------------------------------------------------
    rec_coords = check_coords(rec.get("coords", coords))
    top_target = {k: rec[k] for k in TARGET_KEYS if k in rec}
    if "target" in rec and top_target:
        raise FieldError("target", f"target fields given both in 'target' and at the top level ({sorted(top_target)})", "bad_value")
    raw_target = rec["target"] if "target" in rec else (top_target or None)
    if raw_target is None:
        if require_target and not is_chat:
            raise FieldError("target", "missing required field", "missing_field")
        raw_target = {}
    target = convert_target(raw_target, rec_coords, sizes[0] if sizes else None, tolerance)

    # --- prompt ------------------------------------------------------------------------
    prompt: dict[str, Any] = {"text": chat["user_text"]} if chat is not None else {}
    if "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, str):
            p = {"text": p}
        if not isinstance(p, dict):
            raise FieldError("prompt", f"must be an object of prompt fields or a string, got {type(p).__name__}", "bad_value")
        prompt.update(p)
    elif chat is None:
        prompt.update({k: v for k, v in rec.items() if k not in RESERVED_KEYS and k not in TARGET_KEYS})

    # --- meta --------------------------------------------------------------------------
    meta: dict[str, Any] = {"source": str(file), "line": line, "coords": rec_coords}
    if "meta" in rec:
        if not isinstance(rec["meta"], dict):
            raise FieldError("meta", f"must be an object, got {type(rec['meta']).__name__}", "bad_value")
        meta.update(rec["meta"])
    if chat is not None:
        meta["messages"] = chat["messages"]
        meta["reference_text"] = chat["reference_text"]
        if chat["system"] is not None:
            meta["system"] = chat["system"]
        extra = {k: v for k, v in rec.items() if k not in RESERVED_KEYS and k not in TARGET_KEYS}
        if extra:
            meta.setdefault("extra", extra)
    return Sample(id=sid, task=task_name, images=images, image_sizes=sizes, prompt=prompt, target=target, meta=meta)


# ----------------------------------------------------------------------------------------------
# many records
# ----------------------------------------------------------------------------------------------
def load_records(
    records: Iterable[tuple[Locator, Any]],
    task: Optional[str] = None,
    *,
    source: str,
    skip_invalid: bool = False,
    limit: Optional[int] = None,
    check_sample: Optional[Callable[[Sample], None]] = None,
    **record_opts: Any,
) -> LoadedSamples:
    """Convert ``(locator, record)`` pairs into samples (the loop every record-based loader shares).

    A record may be a :class:`DataError` already (a malformed line): it is raised or counted like
    any other.  Ids must be unique within a source.  ``check_sample`` (the task's own
    ``Task.check_sample``, built with the run's options: target keys of the task, code tests a
    list, a math answer present, a vqa choice in range, ...) is applied to every sample, so data
    that would fail during training fails here, where ``skip_invalid`` can skip and count it; the
    trainer passes it.  ``record_opts`` go to :func:`record_to_sample`; ``limit`` stops after
    that many loaded samples.
    """
    summary = LoadSummary(source=str(source))
    out = LoadedSamples(summary=summary)
    seen: dict[str, Locator] = {}
    cache = record_opts.pop("image_cache", None)
    cache = {} if cache is None else cache
    for loc, rec in records:
        if limit is not None and len(out) >= limit:
            break
        try:
            if isinstance(rec, DataError):
                raise rec
            s = record_to_sample(rec, task, file=source, line=loc, image_cache=cache, **record_opts)
            _check_for_task(check_sample, s, source, loc)
            if s.id in seen:
                raise DataError(source, loc, "id", f"duplicate id {s.id!r} (first seen at {seen[s.id]})", "duplicate_id")
            seen[s.id] = loc
            out.append(s)
            summary.add_loaded()
        except DataError as e:
            if not skip_invalid:
                raise
            summary.add_skipped(e)
    _log_summary(summary)
    return out


def _check_for_task(check: Optional[Callable[[Sample], None]], sample: Sample, source: str, loc: Locator) -> None:
    """DataError (field ``target``, or ``image`` for a missing image size) when the task's
    ``check_sample`` refuses the sample."""
    if check is None:
        return
    try:
        check(sample)
    except ValueError as e:
        field = "image" if "image_sizes" in str(e) else "target"
        raise DataError(source, loc, field, f"not usable by the {sample.task} task: {e}", "bad_value") from None


def _log_summary(summary: LoadSummary) -> None:
    if summary.n_skipped or summary.filtered:
        logger.warning("%s", summary)
    else:
        logger.info("%s", summary)


def iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    """``(1-based line, object)`` for each non-blank line; a line that is not valid JSON (or not
    UTF-8) yields a :class:`DataError` in place of the object."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # tolerate a byte-order mark
            except UnicodeDecodeError as e:
                yield n, DataError(path, n, "", f"not UTF-8 text ({e.reason} at byte {e.start})", "bad_json")
                continue
            if not text.strip():
                continue
            try:
                yield n, json.loads(text)
            except json.JSONDecodeError as e:
                yield n, DataError(path, n, "", f"malformed JSON ({e.msg} at column {e.colno})", "bad_json")
            except RecursionError:
                yield n, DataError(path, n, "", "JSON nested too deep to read", "bad_json")
            except ValueError as e:  # e.g. an integer over Python's 4300-digit conversion limit
                yield n, DataError(path, n, "", f"unreadable JSON value ({e})", "bad_json")


def _record_opts(path: str, image_root: Optional[str], opts: dict) -> dict:
    opts = dict(opts)
    opts.setdefault("base_dir", image_root or os.path.dirname(os.path.abspath(path)))
    return opts


def load_jsonl(
    path: str | os.PathLike,
    task: Optional[str] = None,
    *,
    skip_invalid: bool = False,
    image_root: Optional[str] = None,
    limit: Optional[int] = None,
    **record_opts: Any,
) -> LoadedSamples:
    """Samples from a JSONL file (task-field or chat records; see the module docstring).

    Args:
        path: the ``.jsonl`` file; errors name it as given, with the 1-based line.
        task: the task the data is for (else each record's ``task``).
        skip_invalid: skip and count bad records instead of raising at the first.
        image_root: folder relative image paths are relative to (default: the file's folder).
        limit: stop after this many samples.
        record_opts: ``coords``, ``tolerance``, ``verify_images``, ``require_target`` (see
            :func:`record_to_sample`), ``check_sample`` (see :func:`load_records`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, None, "", "data file not found", "missing_file")
    return load_records(
        iter_jsonl(path), task, source=path, skip_invalid=skip_invalid, limit=limit, **_record_opts(path, image_root, record_opts)
    )


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise DataError(path, None, "", "data file not found", "missing_file")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, "", f"malformed JSON ({e.msg} at column {e.colno})", "bad_json") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, "", f"not UTF-8 text ({e.reason} at byte {e.start})", "bad_json") from None
    except RecursionError:
        raise DataError(path, None, "", "JSON nested too deep to read", "bad_json") from None
    except ValueError as e:  # e.g. an integer over Python's 4300-digit conversion limit
        raise DataError(path, None, "", f"unreadable JSON value ({e})", "bad_json") from None


def load_json(
    path: str | os.PathLike,
    task: Optional[str] = None,
    *,
    skip_invalid: bool = False,
    image_root: Optional[str] = None,
    limit: Optional[int] = None,
    _data: Any = None,
    **record_opts: Any,
) -> LoadedSamples:
    """Samples from a JSON file holding a list of records (LLaMA-Factory's ``.json`` datasets);
    errors name ``record <i>`` (0-based index).  Same options as :func:`load_jsonl`."""
    path = os.fspath(path)
    data = _read_json(path) if _data is None else _data
    if not isinstance(data, list):
        raise DataError(path, None, "", f"expected a JSON list of records, got {type(data).__name__}", "bad_json")
    return load_records(
        ((f"record {i}", r) for i, r in enumerate(data)),
        task,
        source=path,
        skip_invalid=skip_invalid,
        limit=limit,
        **_record_opts(path, image_root, record_opts),
    )


# ----------------------------------------------------------------------------------------------
# the front door
# ----------------------------------------------------------------------------------------------
