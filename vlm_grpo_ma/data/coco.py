"""COCO instances JSON into :class:`~vlm_grpo_ma.data.sample.Sample` lists, through pycocotools.

One detection sample per image (non-crowd boxes and their category names; crowd boxes kept apart
as ``crowd_boxes``, the ignore regions of COCO's evaluation), or one grounding sample per
annotation (``mode="annotation"``); COCO ids in ``meta``, and :func:`coco_results` to write
predictions back in COCO's results format.  Every annotation's ``bbox`` and ``segmentation``
(flat polygons, or an RLE whose size is the image's and whose runs cover it) is checked at load,
masks asked for or not.  Errors name the file and a COCO locator
(``image <id>``, ``annotation <id>``) and the field, like every loader of
:mod:`vlm_grpo_ma.data.loaders` (whose record helpers this module shares).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from vlm_grpo_ma.data.errors import DataError, FieldError, LoadSummary
from vlm_grpo_ma.data.loaders import (
    LoadedSamples,
    _check_for_task,
    _check_text,
    _log_summary,
    _read_json,
    check_image,
    resolve_image_ref,
)
from vlm_grpo_ma.data.sample import Sample
from vlm_grpo_ma.data.validate import DEFAULT_TOLERANCE, canonical_rle, convert_box, convert_polygon, number

__all__ = ["coco_results", "is_coco", "load_coco"]


def _short(value: Any, limit: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _coco_id(entry: Any, i: int) -> str:
    """How an image / annotation is named in errors: ``<id>`` when it is an integer, else
    ``#<index>`` (a list or dict id would make an unreadable locator)."""
    if isinstance(entry, dict) and isinstance(entry.get("id"), int) and not isinstance(entry.get("id"), bool):
        return str(entry["id"])
    return f"#{i}"


def is_coco(data: Any) -> bool:
    return isinstance(data, dict) and "images" in data and "annotations" in data


def _coco_bbox(ann: dict, size: tuple[int, int], tolerance: float) -> list[float]:
    """COCO ``[x, y, w, h]`` pixels -> canonical xyxy (FieldError on a bad box)."""
    b = ann.get("bbox")
    if b is None:
        raise FieldError("bbox", "missing required field", "missing_field")
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        raise FieldError("bbox", f"a COCO bbox must be [x, y, width, height], got {b!r}", "bad_arity")
    x, y, w, h = (number(v, f"bbox[{i}]") for i, v in enumerate(b))
    if w < 0 or h < 0:
        raise FieldError("bbox", f"box is inverted (negative width or height: {w:g} x {h:g})", "inverted_box")
    return convert_box([x, y, x + w, y + h], "bbox", "pixel", size, tolerance)


def _no_segmentation(seg: Any) -> bool:
    """A box-only annotation: ``segmentation`` absent, null or an empty list of polygons."""
    return seg is None or (isinstance(seg, list) and not seg)


def _check_coco_polygon(part: Any, field: str, size: tuple[int, int], tolerance: float) -> None:
    """One COCO polygon: a flat ``[x1, y1, x2, y2, ...]`` list of >= 3 finite points inside the
    image (up to ``tolerance``).  The common case is checked in one pass; anything else goes to
    :func:`convert_polygon` for its precise error."""
    if isinstance(part, list) and len(part) >= 6 and not len(part) % 2 and all(type(v) in (int, float) for v in part):
        w, h = size
        xs, ys = part[0::2], part[1::2]
        try:
            if (math.isfinite(sum(part)) and min(xs) >= -tolerance * w and max(xs) <= (1 + tolerance) * w
                    and min(ys) >= -tolerance * h and max(ys) <= (1 + tolerance) * h):
                return
        except OverflowError:  # an integer too large for a float
            raise FieldError(field, "a coordinate is too large to be a number", "not_numeric") from None
    if isinstance(part, list) and part and isinstance(part[0], (list, tuple)):
        raise FieldError(field, "a COCO polygon is a flat list [x1, y1, x2, y2, ...], got a list of lists", "bad_value")
    convert_polygon(part, field, "pixel", size, tolerance)  # raises, naming the problem
    raise FieldError(field, f"not a valid COCO polygon: {_short(part)}", "bad_value")  # pragma: no cover


def _check_segmentation(ann: dict, size: tuple[int, int], tolerance: float) -> None:
    """An annotation's ``segmentation`` (FieldError if it is not one): a list of flat polygons
    (one object in parts), or an RLE ``{"size": [h, w], "counts": ...}`` (compressed string or
    uncompressed list) whose size is the image's and whose runs cover it exactly."""
    seg = ann.get("segmentation")
    if _no_segmentation(seg):
        return
    if isinstance(seg, list):
        for i, part in enumerate(seg):
            _check_coco_polygon(part, f"segmentation[{i}]", size, tolerance)
    elif isinstance(seg, dict):
        canonical_rle(seg, "segmentation", size)
    else:
        raise FieldError("segmentation", "must be a list of polygons [[x1, y1, x2, y2, ...], ...] or an RLE "
                         f"{{'size': [h, w], 'counts': ...}}, got {type(seg).__name__} {_short(seg)}", "bad_value")


def _coco_region(coco: Any, ann: dict, size: tuple[int, int], tolerance: float) -> Optional[dict]:
    """An annotation's segmentation as a canonical region: one polygon -> ``{"polygon": ...}``;
    several polygons (one object in parts) or an RLE -> ``{"rle": ..., "size": [h, w]}`` merged
    the way pycocotools' ``annToRLE`` does.  ``None`` if the annotation has no segmentation
    (already checked by :func:`_check_segmentation`)."""
    seg = ann.get("segmentation")
    if _no_segmentation(seg):
        return None
    if isinstance(seg, list):
        if len(seg) == 1:
            return {"polygon": convert_polygon(seg[0], "segmentation[0]", "pixel", size, tolerance)}
        for i, part in enumerate(seg):  # validate every part before pycocotools rasterises them
            convert_polygon(part, f"segmentation[{i}]", "pixel", size, tolerance)
        rle = coco.annToRLE(ann)
        return canonical_rle(rle, "segmentation", size)
    return canonical_rle(seg, "segmentation", size)


@dataclass
class _Load:
    """One :func:`load_coco` call: its options, and the samples and summary it is filling."""

    path: str
    image_dir: str
    check_images: bool
    verify_images: bool
    task: str
    mode: str
    skip_invalid: bool
    tolerance: float
    with_masks: bool
    unique_only: bool
    include_empty: bool
    limit: Optional[int]
    check_sample: Optional[Callable[[Sample], None]]
    out: LoadedSamples

    @property
    def summary(self) -> LoadSummary:
        return self.out.summary

    def full(self) -> bool:
        """Whether ``limit`` samples are loaded."""
        return self.limit is not None and len(self.out) >= self.limit

    def fail(self, err: DataError) -> None:
        """Raise ``err``, or with ``skip_invalid`` count its record as skipped."""
        if not self.skip_invalid:
            raise err
        self.summary.add_skipped(err)

    def keep(self, sample: Sample, loc: str) -> None:
        """Add ``sample`` (named ``loc`` in errors) if the task's ``check_sample`` takes it, else
        :meth:`fail` with the task's reason."""
        try:
            _check_for_task(self.check_sample, sample, self.path, loc)
        except DataError as err:
            self.fail(err)
            return
        self.out.append(sample)
        self.summary.add_loaded()


def load_coco(
    ann_file: str | os.PathLike,
    task: str = "detection",
    *,
    image_dir: Optional[str] = None,
    mode: str = "image",
    skip_invalid: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    check_images: bool = True,
    verify_images: bool = True,
    include_empty: bool = True,
    with_masks: bool = False,
    unique_only: bool = False,
    limit: Optional[int] = None,
    check_sample: Optional[Callable[[Sample], None]] = None,
    _data: Any = None,
) -> LoadedSamples:
    """Samples from a COCO instances JSON, read through pycocotools.

    ``mode="image"``: one sample per image, ``target = {"boxes", "labels", "crowd_boxes",
    "crowd_labels"}`` (+ ``"regions"`` aligned with ``boxes`` if ``with_masks``), boxes canonical
    xyxy from COCO's ``[x, y, w, h]`` pixels, labels the category names.  Crowd annotations
    (``iscrowd=1``) are not targets: as in COCO's evaluation they are ignore regions, kept as
    ``crowd_boxes``.

    ``mode="annotation"``: one grounding sample per non-crowd annotation, ``prompt =
    {"object": <category name>}``, ``target = {"box", "label", "boxes"}`` where ``boxes`` are
    all non-crowd boxes of that category in the image (any of them is a correct answer) (+
    ``"region"`` if ``with_masks``).  ``unique_only`` keeps only annotations whose category occurs
    once in their image (filtered ones are counted in ``summary.filtered``).

    ``meta`` holds ``coco_image_id``, ``coco_ann_ids`` / ``coco_ann_id``, ``coco_category_ids``,
    ``file_name`` and ``coco_category_by_name`` (name -> category id, shared), which
    :func:`coco_results` uses to write predictions back.

    Args:
        ann_file: the instances JSON; errors name it with ``image <id>`` / ``annotation <id>``.
        image_dir: folder of the images (default: the JSON's folder).
        skip_invalid: skip an image (``mode="image"``: an image with any bad annotation, so no
            target is silently incomplete) or an annotation (``mode="annotation"``) and count it.
        check_images: read each image file's real size and require it to match the JSON's
            ``width`` / ``height`` (COCO's pixel boxes are relative to them).
        include_empty: keep images without annotations (``mode="image"``; they count in COCO AP).
    """
    from pycocotools.coco import COCO

    path = os.fspath(ann_file)
    if mode not in ("image", "annotation"):
        raise ValueError(f"mode must be 'image' or 'annotation', got {mode!r}")
    data = _read_json(path) if _data is None else _data
    _check_top_level(data, path)
    ld = _Load(path=path, image_dir=image_dir or os.path.dirname(os.path.abspath(path)), check_images=check_images,
               verify_images=verify_images, task=task, mode=mode, skip_invalid=skip_invalid, tolerance=tolerance,
               with_masks=with_masks, unique_only=unique_only, include_empty=include_empty, limit=limit,
               check_sample=check_sample, out=LoadedSamples(summary=LoadSummary(source=path)))

    # structure first (categories, images, annotations), so that pycocotools' index can be built
    cats = _read_categories(data["categories"], path)
    by_name = {name: cid for cid, name in cats.items()}
    images, sizes, bad_images = _read_images(data["images"], ld)
    good_anns, ann_errors = _read_annotations(data["annotations"], ld, cats, sizes, bad_images)
    coco = _coco_index(COCO, data, images, good_anns)

    for img_id in sorted(images):
        if ld.full():
            break
        if img_id in ann_errors:  # an image whose target would be incomplete
            ld.summary.add_skipped(ann_errors[img_id])
            continue
        _add_image(ld, coco, cats, by_name, images[img_id], sizes[img_id])
    _log_summary(ld.summary)
    return ld.out


def _check_top_level(data: Any, path: str) -> None:
    """DataError unless ``data`` is a JSON object with ``images``, ``annotations`` and
    ``categories`` lists."""
    if not isinstance(data, dict):
        raise DataError(path, None, "", f"a COCO file must be a JSON object, got {type(data).__name__}", "bad_json")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(path, None, key, "missing required field (a list)" if key not in data else "must be a list", "missing_field")


def _read_categories(entries: list, path: str) -> dict[int, str]:
    """Category id -> name of the file's ``categories``; a bad category is a DataError (never
    skipped: every annotation of it would be lost)."""
    cats: dict[int, str] = {}
    for i, c in enumerate(entries):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DataError(path, f"category {i}", "categories", "a category needs an integer 'id' and a string 'name'", "bad_value")
        try:
            _check_text(c["name"], "name")
        except FieldError as e:
            raise DataError.from_field(e, path, f"category {i}") from None
        cats[c["id"]] = c["name"]
    return cats


def _read_images(entries: list, ld: _Load) -> tuple[dict[int, dict], dict[int, tuple[int, int]], set[int]]:
    """The file's valid ``images``: ``(id -> entry, id -> (width, height), ids of the bad ones)``.
    A bad image fails (``ld.fail``: raised, or skipped and counted)."""
    images: dict[int, dict] = {}
    sizes: dict[int, tuple[int, int]] = {}
    bad_images: set[int] = set()
    for i, im in enumerate(entries):
        try:
            size = _check_image_entry(im, ld, images, bad_images)
            images[im["id"]] = im
            sizes[im["id"]] = size
        except FieldError as e:
            if isinstance(im, dict) and isinstance(im.get("id"), int):
                bad_images.add(im["id"])
            ld.fail(DataError.from_field(e, ld.path, f"image {_coco_id(im, i)}"))
    return images, sizes, bad_images


def _check_image_entry(im: Any, ld: _Load, images: dict[int, dict], bad_images: set[int]) -> tuple[int, int]:
    """One ``images`` entry's ``(width, height)``, or a FieldError: its fields, an id not yet in
    ``images`` or ``bad_images``, and (``ld.check_images``) the image file's real size."""
    if not isinstance(im, dict):
        raise FieldError("", "an image entry must be an object", "bad_value")
    for key in ("id", "file_name", "width", "height"):
        if key not in im:
            raise FieldError(key, "missing required field", "missing_field")
    if not isinstance(im["id"], int) or isinstance(im["id"], bool):
        raise FieldError("id", f"must be an integer, got {_short(im['id'])}", "bad_value")
    if not isinstance(im["file_name"], str):
        raise FieldError("file_name", f"must be a string, got {_short(im['file_name'])}", "bad_value")
    _check_text(im["file_name"], "file_name")
    if im["id"] in images or im["id"] in bad_images:
        raise FieldError("id", f"duplicate image id {im['id']}", "duplicate_id")
    for key in ("width", "height"):
        if not isinstance(im[key], int) or isinstance(im[key], bool) or im[key] <= 0:
            raise FieldError(key, f"must be a positive integer, got {im[key]!r}", "bad_value")
    size = (im["width"], im["height"])
    if ld.check_images:
        ref = resolve_image_ref(im["file_name"], ld.image_dir, "file_name")
        real = check_image(ref, "file_name", None, ld.verify_images)
        if real != size:
            raise FieldError(
                "width/height", f"the JSON says {size[0]}x{size[1]} but {ref} is {real[0]}x{real[1]}", "bad_value"
            )
    return size


def _read_annotations(
    entries: list, ld: _Load, cats: dict[int, str], sizes: dict[int, tuple[int, int]], bad_images: set[int]
) -> tuple[list[dict], dict[int, DataError]]:
    """The file's valid ``annotations`` (those of a bad image left out, as it is already
    reported), and image id -> the first error of its annotations.

    A bad annotation of a valid image in ``mode="image"`` is raised, or (``skip_invalid``) kept
    in that map so that the whole image is skipped; any other bad annotation fails (``ld.fail``).
    """
    good_anns: list[dict] = []
    ann_errors: dict[int, DataError] = {}
    seen_ann: set = set()
    for i, ann in enumerate(entries):
        try:
            if _check_annotation(ann, seen_ann, cats, sizes, bad_images, ld.tolerance):
                good_anns.append(ann)
        except FieldError as e:
            err = DataError.from_field(e, ld.path, f"annotation {_coco_id(ann, i)}")
            img_id = ann.get("image_id") if isinstance(ann, dict) else None
            if ld.mode == "image" and isinstance(img_id, int) and img_id in sizes:
                if not ld.skip_invalid:
                    raise err
                ann_errors.setdefault(img_id, err)
            else:
                ld.fail(err)
    return good_anns, ann_errors


def _check_annotation(ann: Any, seen: set, cats: dict[int, str], sizes: dict[int, tuple[int, int]],
                      bad_images: set[int], tolerance: float) -> bool:
    """Check one ``annotations`` entry (FieldError if bad) and add its id to ``seen``; returns
    False for an annotation of an image in ``bad_images`` (left out, its image is reported).

    Its ``bbox`` and ``segmentation`` are checked always, masks asked for or not: a file with
    garbage masks fails here, not when someone later scores masks from it (or pycocotools
    decodes a malformed RLE)."""
    if not isinstance(ann, dict):
        raise FieldError("", "an annotation must be an object", "bad_value")
    for key in ("id", "image_id", "category_id", "bbox"):
        if key not in ann:
            raise FieldError(key, "missing required field", "missing_field")
    for key in ("id", "image_id", "category_id"):
        if not isinstance(ann[key], int) or isinstance(ann[key], bool):
            raise FieldError(key, f"must be an integer, got {type(ann[key]).__name__} {_short(ann[key])}", "bad_value")
    if ann["id"] in seen:
        raise FieldError("id", f"duplicate annotation id {ann['id']}", "duplicate_id")
    seen.add(ann["id"])
    if ann["image_id"] in bad_images:
        return False
    if ann["image_id"] not in sizes:
        raise FieldError("image_id", f"no image with id {ann['image_id']!r}", "bad_value")
    if ann["category_id"] not in cats:
        raise FieldError("category_id", f"no category with id {ann['category_id']!r}", "bad_value")
    _coco_bbox(ann, sizes[ann["image_id"]], tolerance)  # validate; converted again when the sample is built
    _check_segmentation(ann, sizes[ann["image_id"]], tolerance)
    return True


def _coco_index(coco_cls: type, data: dict, images: dict[int, dict], anns: list[dict]) -> Any:
    """A pycocotools ``COCO`` (``coco_cls``) indexing ``data`` with only the valid ``images``
    and ``anns``; its progress prints silenced."""
    coco = coco_cls()
    coco.dataset = dict(data, images=list(images.values()), annotations=anns)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _add_image(ld: _Load, coco: Any, cats: dict[int, str], by_name: dict[str, int], im: dict,
               size: tuple[int, int]) -> None:
    """The samples of image ``im`` (its sample, or one per annotation), added to ``ld.out``."""
    img_id = im["id"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
    base = {
        "source": ld.path,
        "coco_image_id": img_id,
        "file_name": im["file_name"],
        "coco_category_by_name": by_name,
    }
    ref = resolve_image_ref(im["file_name"], ld.image_dir, "file_name")
    try:
        plain, crowd = _boxes(ld, coco, anns, size)
    except DataError as err:
        ld.fail(err)
        return
    if ld.mode == "image":
        if not anns and not ld.include_empty:
            ld.summary.filtered["no_annotations"] += 1
            return
        ld.keep(_image_sample(ld, cats, base, ref, size, plain, crowd), f"image {img_id}")
    else:
        _add_annotations(ld, cats, base, ref, size, plain)


def _boxes(ld: _Load, coco: Any, anns: list[dict], size: tuple[int, int]) -> tuple[list[tuple], list[tuple]]:
    """``(plain, crowd)``: the non-crowd and crowd ``anns`` of one image, each as ``(annotation,
    xyxy box, region or None)`` (the region only ``with_masks``).  DataError naming the
    annotation if one cannot be converted."""
    plain, crowd = [], []
    for a in anns:
        try:
            box = _coco_bbox(a, size, ld.tolerance)
            entry = (a, box, _coco_region(coco, a, size, ld.tolerance) if ld.with_masks else None)
        except FieldError as e:
            raise DataError.from_field(e, ld.path, f"annotation {a['id']}") from None
        (crowd if a.get("iscrowd", 0) else plain).append(entry)
    return plain, crowd


def _image_sample(ld: _Load, cats: dict[int, str], base: dict, ref: Any, size: tuple[int, int],
                  plain: list[tuple], crowd: list[tuple]) -> Sample:
    """The detection sample (``mode="image"``) of one image from its ``(annotation, box, region)``
    entries; ``base`` is its meta shared with every mode."""
    target = {
        "boxes": [b for _, b, _ in plain],
        "labels": [cats[a["category_id"]] for a, _, _ in plain],
        "crowd_boxes": [b for _, b, _ in crowd],
        "crowd_labels": [cats[a["category_id"]] for a, _, _ in crowd],
    }
    if ld.with_masks:
        target["regions"] = [r for _, _, r in plain]
    meta = dict(
        base,
        coco_ann_ids=[a["id"] for a, _, _ in plain],
        coco_category_ids=[a["category_id"] for a, _, _ in plain],
    )
    img_id = base["coco_image_id"]
    return Sample(id=f"coco-{img_id}", task=ld.task, images=[ref], image_sizes=[size], target=target, meta=meta)


def _add_annotations(ld: _Load, cats: dict[int, str], base: dict, ref: Any, size: tuple[int, int],
                     plain: list[tuple]) -> None:
    """The grounding samples (``mode="annotation"``) of one image, one per non-crowd
    ``(annotation, box, region)`` entry of ``plain``, added to ``ld.out`` up to ``limit``
    (``unique_only``: only a category that occurs once in the image)."""
    img_id = base["coco_image_id"]
    counts: dict[int, int] = {}
    for a, _, _ in plain:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
    for a, box, region in plain:
        if ld.full():
            break
        if ld.unique_only and counts[a["category_id"]] > 1:
            ld.summary.filtered["not_unique"] += 1
            continue
        name = cats[a["category_id"]]
        target = {"box": box, "label": name, "boxes": [b for o, b, _ in plain if o["category_id"] == a["category_id"]]}
        if ld.with_masks:
            target["region"] = region
        meta = dict(base, coco_ann_id=a["id"], coco_category_ids=[a["category_id"]])
        sample = Sample(id=f"coco-{img_id}-{a['id']}", task=ld.task, images=[ref], image_sizes=[size],
                        prompt={"object": name}, target=target, meta=meta)
        ld.keep(sample, f"annotation {a['id']}")


def coco_results(
    sample: Sample, boxes: Sequence[Sequence[float]], labels: Sequence[str], scores: Optional[Sequence[float]] = None
) -> list[dict]:
    """Predictions for one COCO-loaded sample in COCO's results format
    (``[{"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}]``), ready for
    ``COCO.loadRes`` / ``COCOeval``.

    ``boxes`` are canonical xyxy, ``labels`` category names; a label the dataset does not have
    cannot be scored by COCO and is left out.  ``scores`` default to 1.0.
    """
    by_name = sample.meta["coco_category_by_name"]
    w, h = sample.image_size
    scores = [1.0] * len(boxes) if scores is None else scores
    out = []
    for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores):
        if label not in by_name:
            continue
        out.append(
            {
                "image_id": sample.meta["coco_image_id"],
                "category_id": by_name[label],
                "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h],
                "score": float(score),
            }
        )
    return out
