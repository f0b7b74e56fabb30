"""Loaders for the public benchmark formats of the field -> canonical :class:`Sample` lists.

Every loader converts pixels to canonical floats in [0, 1] of the ORIGINAL image here, at the
edge, and every error names the file, the record (line or list index) and the field.

=========================  ===============  ==================================================
format                     task             what the files look like
=========================  ===============  ==================================================
``coco``                   detection        COCO instances JSON (``images``, ``annotations``,
                                            ``categories``; boxes ``[x, y, w, h]`` pixels)
``refcoco``                detection        RefCOCO-style grounding, JSONL (or a JSON list):
                                            one referring expression and one box per record
``sharerobot_trajectory``  trajectory       ShareRobot trajectory JSON list: ``id`` (image
                                            path), ``meta_data.original_width/height``,
                                            ``instruction``, ``points`` ``[[x, y], ...]`` pixels
``sharerobot_affordance``  affordance       ShareRobot affordance JSON list: ``affordance``
                                            ``{x, y, width, height}`` pixels
``where2place``            affordance       Where2Place (RoboPoint): ``point_questions.jsonl``
                                            (``question_id``, ``image``, ``text``,
                                            ``category``) and ``masks/<line:02d>.jpg``
``roborefit``              affordance       RoboRefIt (VL-Grasp): JSON list with ``text``,
                                            ``rgb_path``, ``mask_path``, ``bbox`` xyxy pixels
``vqav2``                  vqa              VQAv2 questions + annotations JSON (ten human
                                            answers, ``answer_type``, ``question_type``)
=========================  ===============  ==================================================

Canonical targets (the keys the task plugins read):

- detection:           ``{"boxes": [[x1, y1, x2, y2], ...], "labels": [str, ...]}``; grounding (one
  referred object): ``{"box": [...], "boxes": [[...]]}`` without labels, so only the box is scored
- affordance (box):    ``{"box": [x1, y1, x2, y2]}``
- affordance (points): ``{"region": {"rle": <COCO RLE, counts as str>, "size": [h, w]}}``
  (plus ``"box"`` where the format gives one)
- trajectory:          ``{"trajectory": [[x, y], ...]}``
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from vlm_grpo_ma.data.errors import DataError
from vlm_grpo_ma.data.images import ImageLoadError, image_size
from vlm_grpo_ma.data.sample import Sample

__all__ = ["FORMATS", "FormatError", "load_format", "mask_to_rle", "rle_to_mask"]

class FormatError(DataError):
    """Bad benchmark data (a :class:`~vlm_grpo_ma.data.errors.DataError`): the message names the
    file, the record (``line N`` of a JSONL file, ``[i]`` of a JSON list) and the field."""

    def __init__(self, file: str | os.PathLike, line: str | None, field: str | None, reason: str,
                 kind: str = "bad_value"):
        super().__init__(str(file), line or None, field or "", reason, kind)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(location, record) from a JSON list or a JSONL file; location is ``line N`` or ``[i]``."""
    if not path.is_file():
        raise FormatError(path, "", None, "file does not exist")
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(path, f"line {e.lineno}", None, f"invalid JSON: {e.msg}") from e
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise FormatError(path, f"[{i}]", None, f"expected an object, got {type(rec).__name__}")
            yield f"[{i}]", rec
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(path, f"line {lineno}", None, f"invalid JSON: {e.msg}") from e
        if not isinstance(rec, dict):
            raise FormatError(path, f"line {lineno}", None, f"expected an object, got {type(rec).__name__}")
        yield f"line {lineno}", rec


def _field(rec: dict, names: tuple[str, ...], path: Path, where: str) -> Any:
    for n in names:
        if n in rec and rec[n] is not None:
            return rec[n]
    raise FormatError(path, where, names[0], f"missing (looked for {list(names)})")


def _numbers(value: Any, n: int | None, path: Path, where: str, field: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
        want = f"a list of {n} numbers" if n else "a list of numbers"
        raise FormatError(path, where, field, f"expected {want}, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise FormatError(path, where, field, f"not a finite number: {v!r}")
        out.append(float(v))
    return out


def _resolve_image(ref: str, image_root: Path, path: Path, where: str, field: str) -> tuple[str, tuple[int, int]]:
    p = Path(os.path.expanduser(str(ref)))
    if not p.is_absolute():
        p = image_root / p
    try:
        size = image_size(str(p))
    except ImageLoadError as e:
        raise FormatError(path, where, field, f"cannot read image {p}: {e}") from e
    return str(p), size


def _check_box01(box: list[float], path: Path, where: str, field: str, tol: float = 1e-6) -> list[float]:
    x1, y1, x2, y2 = box
    if not (x1 <= x2 and y1 <= y2):
        raise FormatError(path, where, field, f"inverted box {box} (need x1 <= x2, y1 <= y2)")
    if min(box) < -tol or max(box) > 1 + tol:
        raise FormatError(path, where, field, f"box {box} lies outside the image")
    return [min(1.0, max(0.0, v)) for v in box]


def mask_to_rle(mask: np.ndarray) -> dict:
    """A binary (H, W) mask -> COCO RLE with ``counts`` as str (JSON-serialisable)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"rle": rle, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def rle_to_mask(region: dict) -> np.ndarray:
    """Canonical region ``{"rle": ..., "size": [h, w]}`` -> (H, W) uint8 mask."""
    from pycocotools import mask as mask_utils

    rle = dict(region["rle"])
    if isinstance(rle.get("counts"), str):
        rle["counts"] = rle["counts"].encode("ascii")
    if "size" not in rle:
        rle["size"] = list(region["size"])
    if isinstance(rle["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    return mask_utils.decode(rle)


def _read_mask(mask_path: Path, size: tuple[int, int], path: Path, where: str, field: str, threshold: int = 128) -> dict:
    """A mask image (white = inside; JPEG noise removed by thresholding) -> canonical region."""
    try:
        with Image.open(mask_path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise FormatError(path, where, field, f"cannot read mask {mask_path}: {e}") from e
    if (arr.shape[1], arr.shape[0]) != tuple(size):
        raise FormatError(
            path, where, field, f"mask {mask_path} is {arr.shape[1]}x{arr.shape[0]} but the image is {size[0]}x{size[1]}"
        )
    return mask_to_rle(arr >= threshold)


def _limit(samples: list[Sample], limit: int | None) -> list[Sample]:
    return samples if limit is None else samples[: int(limit)]


# ---------------------------------------------------------------------------------------------
# RefCOCO-style grounding
# ---------------------------------------------------------------------------------------------
_EXPR_KEYS = ("expression", "sent", "sentence", "referring_expression", "normal_caption", "caption", "text", "problem")


def load_refcoco(path: str | os.PathLike, image_root: str | None = None, split: str = "test",
                 bbox_format: str = "xyxy", limit: int | None = None, **_: Any) -> list[Sample]:
    """RefCOCO / RefCOCO+ / RefCOCOg grounding records (JSONL, or a JSON list as VLM-R1 ships):

    ``{"id": ..., "image": "COCO_train2014_000000000001.jpg", "expression": "man in red",
    "bbox": [x1, y1, x2, y2]}`` with the box in pixels of the original image.  Also accepted:
    ``file_name`` / ``image_path`` for the image, ``sent`` / ``sentence`` / ``normal_caption`` /
    ``problem`` for the text, ``solution`` for the box, ``bbox_format: xywh`` for COCO-style boxes.
    One grounding sample (``target = {"box", "boxes"}``, no label) per record; the expression is
    ``prompt["object"]``.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[Sample] = []
    for i, (where, rec) in enumerate(_read_records(path)):
        img_ref = _field(rec, ("image", "file_name", "image_path", "img_path"), path, where)
        expr = _field(rec, _EXPR_KEYS, path, where)
        if not isinstance(expr, str) or not expr.strip():
            raise FormatError(path, where, "expression", f"expected a non-empty string, got {expr!r}")
        box_field = "bbox" if "bbox" in rec else "solution"
        raw = _numbers(_field(rec, ("bbox", "solution", "box"), path, where), 4, path, where, box_field)
        fmt = str(rec.get("bbox_format", bbox_format)).lower()
        if fmt == "xywh":
            raw = [raw[0], raw[1], raw[0] + raw[2], raw[1] + raw[3]]
        elif fmt != "xyxy":
            raise FormatError(path, where, "bbox_format", f"unknown box format {fmt!r} (xyxy or xywh)")
        img, (w, h) = _resolve_image(str(img_ref), root, path, where, "image")
        box = _check_box01([raw[0] / w, raw[1] / h, raw[2] / w, raw[3] / h], path, where, box_field)
        expr = expr.strip()
        out.append(
            Sample(
                id=str(rec.get("id", rec.get("ref_id", f"{path.stem}-{i}"))),
                task="detection",
                images=[img],
                image_sizes=[(w, h)],
                prompt={"object": expr},
                target={"box": box, "boxes": [box]},
                meta={"source": str(path), "record": where, "split": split, "format": "refcoco"},
            )
        )
    return _limit(out, limit)


# ---------------------------------------------------------------------------------------------
# ShareRobot
# ---------------------------------------------------------------------------------------------
def _sharerobot_common(rec: dict, path: Path, root: Path, where: str) -> tuple[str, str, tuple[int, int], tuple[float, float]]:
    """(image path, instruction, actual image size, annotation frame size) of a ShareRobot record.

    Pixel coordinates are given for ``meta_data.original_width x original_height``; where the image
    on disk has another size, the annotation frame still is the declared one.
    """
    img_ref = _field(rec, ("image", "image_path", "id"), path, where)
    instruction = _field(rec, ("instruction",), path, where)
    if not isinstance(instruction, str) or not instruction.strip():
        raise FormatError(path, where, "instruction", f"expected a non-empty string, got {instruction!r}")
    img, size = _resolve_image(str(img_ref), root, path, where, "id")
    meta = rec.get("meta_data") or {}
    if not isinstance(meta, dict):
        raise FormatError(path, where, "meta_data", "expected an object")
    fw = meta.get("original_width", size[0])
    fh = meta.get("original_height", size[1])
    for name, v in (("meta_data.original_width", fw), ("meta_data.original_height", fh)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise FormatError(path, where, name, f"expected a positive number, got {v!r}")
    return img, instruction.strip(), size, (float(fw), float(fh))


def load_sharerobot_trajectory(path: str | os.PathLike, image_root: str | None = None, split: str = "test",
                               limit: int | None = None, **_: Any) -> list[Sample]:
    """ShareRobot trajectory annotations (a JSON list; see FlagOpen/ShareRobot's README):
    ``{"id": "<image path>", "meta_data": {"original_dataset": ..., "original_width": 640,
    "original_height": 480}, "instruction": "reach for the carrot", "points": [[x, y], ...]}``,
    points in pixels of the original frame, at least 2 of them (ShareRobot has >= 3)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[Sample] = []
    for i, (where, rec) in enumerate(_read_records(path)):
        img, instruction, size, (fw, fh) = _sharerobot_common(rec, path, root, where)
        pts = _field(rec, ("points", "trajectory"), path, where)
        if not isinstance(pts, list) or len(pts) < 2:
            raise FormatError(path, where, "points", f"expected a list of >= 2 [x, y] points, got {pts!r}")
        traj = []
        for j, p in enumerate(pts):
            x, y = _numbers(p, 2, path, where, f"points[{j}]")
            traj.append([x / fw, y / fh])
        out.append(
            Sample(
                id=f"{rec.get('id', i)}#{i}" if not isinstance(rec.get("id"), (int,)) else str(rec["id"]),
                task="trajectory",
                images=[img],
                image_sizes=[size],
                prompt={"instruction": instruction, "object": instruction},
                target={"trajectory": traj},
                meta={"source": str(path), "record": where, "split": split, "format": "sharerobot_trajectory",
                      "original_dataset": (rec.get("meta_data") or {}).get("original_dataset")},
            )
        )
    return _limit(out, limit)


def load_sharerobot_affordance(path: str | os.PathLike, image_root: str | None = None, split: str = "test",
                               limit: int | None = None, **_: Any) -> list[Sample]:
    """ShareRobot affordance annotations (a JSON list): ``{"id": "<image path>", "meta_data":
    {...}, "instruction": "...", "affordance": {"x": 352.9, "y": 186.5, "width": 19.3,
    "height": 14.5}}`` -- a box as top-left corner and size, in pixels of the original frame."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[Sample] = []
    for i, (where, rec) in enumerate(_read_records(path)):
        img, instruction, size, (fw, fh) = _sharerobot_common(rec, path, root, where)
        aff = _field(rec, ("affordance",), path, where)
        if not isinstance(aff, dict):
            raise FormatError(path, where, "affordance", f"expected {{x, y, width, height}}, got {aff!r}")
        vals = []
        for k in ("x", "y", "width", "height"):
            if k not in aff:
                raise FormatError(path, where, f"affordance.{k}", "missing")
            vals += _numbers([aff[k]], 1, path, where, f"affordance.{k}")
        x, y, bw, bh = vals
        if bw < 0 or bh < 0:
            raise FormatError(path, where, "affordance", f"negative width or height: {aff}")
        box = _check_box01([x / fw, y / fh, (x + bw) / fw, (y + bh) / fh], path, where, "affordance")
        out.append(
            Sample(
                id=f"{rec.get('id', i)}#{i}" if not isinstance(rec.get("id"), (int,)) else str(rec["id"]),
                task="affordance",
                images=[img],
                image_sizes=[size],
                prompt={"instruction": instruction, "object": instruction},
                target={"box": box},
                meta={"source": str(path), "record": where, "split": split, "format": "sharerobot_affordance",
                      "original_dataset": (rec.get("meta_data") or {}).get("original_dataset")},
            )
        )
    return _limit(out, limit)


# ---------------------------------------------------------------------------------------------
# Where2Place and RoboRefIt (points scored against masks)
# ---------------------------------------------------------------------------------------------
_FORMAT_SENTENCE = re.compile(r"\s*Your answer should be formatted.*$", re.DOTALL | re.IGNORECASE)


def load_where2place(path: str | os.PathLike, image_root: str | None = None, split: str = "test",
                     question_file: str = "point_questions.jsonl", mask_dir: str = "masks",
                     limit: int | None = None, **_: Any) -> list[Sample]:
    """Where2Place (RoboPoint's placement benchmark).  ``path`` is the dataset folder (or its
    question file).  Each line of ``point_questions.jsonl`` is ``{"question_id": 0, "image":
    "images/00.jpg", "text": "Please point out the free space ...", "category": "seen"}``;
    the mask of line ``i`` (0-based) is ``masks/<i:02d>.jpg`` (white = a correct place), as
    RoboPoint's ``summarize_vqa.py`` reads it.  The target region is the mask thresholded at
    128 (for the reward and the drawings); the metrics read the mask file itself
    (``meta["mask"]``), grey level / 255, as RoboPoint does.  The answer-format sentence RoboPoint appends
    to ``text`` is dropped: the task's prompt says how to answer."""
    path = Path(path)
    qfile = path / question_file if path.is_dir() else path
    root = Path(image_root) if image_root else qfile.parent
    out: list[Sample] = []
    for i, (where, rec) in enumerate(_read_records(qfile)):
        img, size = _resolve_image(str(_field(rec, ("image",), qfile, where)), root, qfile, where, "image")
        text = _field(rec, ("text", "question"), qfile, where)
        if not isinstance(text, str) or not text.strip():
            raise FormatError(qfile, where, "text", f"expected a non-empty string, got {text!r}")
        text = _FORMAT_SENTENCE.sub("", text.replace("<image>", "")).strip()
        mask_path = qfile.parent / mask_dir / f"{i:02d}.jpg"
        if not mask_path.is_file():
            alt = mask_path.with_suffix(".png")
            if not alt.is_file():
                raise FormatError(qfile, where, "mask", f"mask file {mask_path} does not exist")
            mask_path = alt
        region = _read_mask(mask_path, size, qfile, where, "mask")
        qid = rec.get("question_id", i)
        out.append(
            Sample(
                id=f"where2place-{qid}",
                task="affordance",
                images=[img],
                image_sizes=[size],
                prompt={"instruction": text, "object": text},
                target={"region": region},
                meta={"source": str(qfile), "record": where, "split": split, "format": "where2place",
                      "category": rec.get("category"), "mask": str(mask_path)},
            )
        )
    return _limit(out, limit)


def load_roborefit(path: str | os.PathLike, image_root: str | None = None, split: str = "testA",
                   limit: int | None = None, **_: Any) -> list[Sample]:
    """RoboRefIt (VL-Grasp) referring annotations: a JSON list of ``{"num": 0, "text": "the
    blue cup", "rgb_path": "final_dataset/testA/image/image_00000.png", "depth_path": ...,
    "mask_path": "final_dataset/testA/mask/image_00000.png", "bbox": [x1, y1, x2, y2],
    "class": "cup"}``.  Paths are relative to ``image_root`` (default: the JSON's folder).
    The target is the object's mask (points are scored by the share inside it) and its box."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[Sample] = []
    for i, (where, rec) in enumerate(_read_records(path)):
        img, (w, h) = _resolve_image(str(_field(rec, ("rgb_path", "image"), path, where)), root, path, where, "rgb_path")
        text = _field(rec, ("text", "expression", "sentence"), path, where)
        if not isinstance(text, str) or not text.strip():
            raise FormatError(path, where, "text", f"expected a non-empty string, got {text!r}")
        mref = Path(str(_field(rec, ("mask_path",), path, where)))
        mask_path = mref if mref.is_absolute() else root / mref
        if not mask_path.is_file():
            raise FormatError(path, where, "mask_path", f"mask file {mask_path} does not exist")
        target: dict[str, Any] = {"region": _read_mask(mask_path, (w, h), path, where, "mask_path")}
        if rec.get("bbox") is not None:
            x1, y1, x2, y2 = _numbers(rec["bbox"], 4, path, where, "bbox")
            target["box"] = _check_box01([x1 / w, y1 / h, x2 / w, y2 / h], path, where, "bbox")
        out.append(
            Sample(
                id=f"roborefit-{split}-{rec.get('num', i)}",
                task="affordance",
                images=[img],
                image_sizes=[(w, h)],
                prompt={"instruction": text.strip(), "object": text.strip()},
                target=target,
                meta={"source": str(path), "record": where, "split": split, "format": "roborefit",
                      "class": rec.get("class"), "mask": str(mask_path)},
            )
        )
    return _limit(out, limit)


# ---------------------------------------------------------------------------------------------
# VQAv2 (questions + annotations JSON, as GT-Vision-Lab/VQA ships them)
# ---------------------------------------------------------------------------------------------
def _read_json_object(path: Path, key: str) -> tuple[list, str | None]:
    """(the ``key`` list, ``data_subtype``) of a VQAv2 JSON file."""
    if not path.is_file():
        raise FormatError(path, "", None, "file does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise FormatError(path, f"line {e.lineno}", None, f"invalid JSON: {e.msg}") from e
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise FormatError(path, "", key, f"expected an object with a {key!r} list")
    subtype = data.get("data_subtype")
    return data[key], subtype if isinstance(subtype, str) else None


def load_vqav2(path: str | os.PathLike, image_root: str | None = None, split: str = "val",
               questions: str | None = None, limit: int | None = None, **_: Any) -> list[Sample]:
    """VQAv2 in its official files (GT-Vision-Lab/VQA): ``path`` is the annotations JSON
    (``{"annotations": [{"question_id", "image_id", "question_type", "answer_type",
    "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}, ...]}]}``)
    and ``questions`` the questions JSON (``{"data_subtype": "val2014", "questions":
    [{"question_id", "image_id", "question"}]}``; default: the file next to ``path`` whose name
    has ``questions`` in place of ``annotations``).  Images are ``COCO_<data_subtype>_<image_id
    as 12 digits>.jpg`` under ``image_root``.  The target keeps the ten answers as written (the
    official evaluation compares against them), the answer type and the question type."""
    path = Path(path)
    if questions:
        qpath = Path(questions)
    else:  # v2_mscoco_val2014_annotations.json -> v2_OpenEnded_mscoco_val2014_questions.json
        stem = path.name.replace("annotations", "questions")
        found = [p for p in path.parent.glob("*questions*.json") if p.name.endswith(stem.split("mscoco")[-1])]
        if len(found) != 1:
            raise FormatError(path, "", "questions", "cannot tell which questions JSON goes with it: set data.options.questions")
        qpath = found[0]
    qs, subtype = _read_json_object(qpath, "questions")
    subtype = subtype or split
    by_qid: dict[Any, tuple[str, dict]] = {}
    for i, q in enumerate(qs):
        where = f"questions[{i}]"
        if not isinstance(q, dict):
            raise FormatError(qpath, where, None, f"expected an object, got {type(q).__name__}")
        by_qid[_field(q, ("question_id",), qpath, where)] = (where, q)
    root = Path(image_root) if image_root else path.parent
    out: list[Sample] = []
    for i, ann in enumerate(_read_json_object(path, "annotations")[0]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise FormatError(path, where, None, f"expected an object, got {type(ann).__name__}")
        qid = _field(ann, ("question_id",), path, where)
        if qid not in by_qid:
            raise FormatError(path, where, "question_id", f"{qid!r} is not in {qpath}")
        qwhere, q = by_qid[qid]
        question = _field(q, ("question",), qpath, qwhere)
        answers = _field(ann, ("answers",), path, where)
        if not isinstance(answers, list) or not answers or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise FormatError(path, where, "answers", "expected a non-empty list of {'answer': str, ...}")
        image_id = _field(ann, ("image_id",), path, where)
        img, size = _resolve_image(f"COCO_{subtype}_{int(image_id):012d}.jpg", root, path, where, "image_id")
        target = {"answers": [a["answer"] for a in answers]}
        for key in ("answer_type", "question_type"):
            if isinstance(ann.get(key), str):
                target[key] = ann[key]
        out.append(
            Sample(
                id=f"vqav2-{qid}",
                task="vqa",
                images=[img],
                image_sizes=[size],
                prompt={"question": str(question)},
                target=target,
                meta={"source": str(path), "record": where, "split": split, "format": "vqav2"},
            )
        )
    return _limit(out, limit)


# ---------------------------------------------------------------------------------------------
# COCO instances and plain JSONL: through the data package's loaders
# ---------------------------------------------------------------------------------------------
def load_coco(path: str | os.PathLike, image_root: str | None = None, split: str = "val",
              limit: int | None = None, **options: Any) -> list[Sample]:
    """COCO instances JSON through :func:`vlm_grpo_ma.data.coco.load_coco` (pycocotools):
    one sample per image, all its boxes labelled with their category names, crowd boxes kept
    as ignore regions.  ``options`` go to that loader (``mode="annotation"`` for one grounding
    sample per object, ``skip_invalid``, ...)."""
    from vlm_grpo_ma.data import coco

    kw = {"image_dir": image_root, **options}
    samples = list(coco.load_coco(path, "detection", limit=limit, **kw))
    names = sorted({lab for s in samples for lab in s.target.get("labels", [])})
    for s in samples:  # image mode has no prompt fields: "find every object" of these categories
        s.prompt.setdefault("object", "object")
        s.prompt.setdefault("categories", ", ".join(names))
    return _limit(samples, limit)


def load_jsonl(path: str | os.PathLike, image_root: str | None = None, split: str = "test",
               limit: int | None = None, task: str | None = None, **options: Any) -> list[Sample]:
    """The project's own JSONL sample format through :mod:`vlm_grpo_ma.data.loaders`."""
    from vlm_grpo_ma.data import loaders

    samples = loaders.load_jsonl(path, task, image_root=image_root, limit=limit, **options)
    return _limit(list(samples), limit)


#: format name -> (loader, the task it feeds)
FORMATS: dict[str, tuple[Callable[..., list[Sample]], str | None]] = {
    "coco": (load_coco, "detection"),
    "refcoco": (load_refcoco, "detection"),
    "sharerobot_trajectory": (load_sharerobot_trajectory, "trajectory"),
    "sharerobot_affordance": (load_sharerobot_affordance, "affordance"),
    "where2place": (load_where2place, "affordance"),
    "roborefit": (load_roborefit, "affordance"),
    "vqav2": (load_vqav2, "vqa"),
    "jsonl": (load_jsonl, None),
}


def load_format(fmt: str, path: str | os.PathLike, **kwargs: Any) -> list[Sample]:
    """Load ``path`` in the named public format (see :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; known: {sorted(FORMATS)} (or 'synthetic')")
    if path is None:
        raise ValueError(f"data format {fmt!r} needs data.path")
    loader, _task = FORMATS[fmt]
    return loader(path, **kwargs)
