"""Model families and their coordinate codecs (the classic bug of this field).

Canonical geometry is floats in [0, 1] of the ORIGINAL image.  Each family reads and writes
another frame:

- Qwen2-VL:   integers in 0..1000, relative to the image (boxes may also be written with
  ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``);
- Qwen2.5-VL: absolute integer pixels of the image AS THE PROCESSOR RESIZED IT
  (``smart_resize`` with the processor's patch size, merge size, min and max pixels);
- Qwen3-VL:   integers in 0..1000, relative.

The resize parameters are read from the processor (:meth:`ModelFamily.from_processor`), never
hard-coded, and the same ``min_pixels`` / ``max_pixels`` must reach every place that resizes
(HF processor, vLLM).  Decoding never clamps: a point outside the image stays outside, and the
task decides what that costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

#: model_type -> model class name in transformers
MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}

REL1000 = "rel1000"
ABS_RESIZED = "abs_resized"

#: model_type (config.json) -> family name
MODEL_TYPES = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl",
}

_FRAMES = {"qwen2_vl": REL1000, "qwen2_5_vl": ABS_RESIZED, "qwen3_vl": REL1000}
#: processor defaults of the released checkpoints (used only when no processor is given)
_DEFAULT_PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}

MAX_ASPECT_RATIO = 200


def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) after Qwen-VL's resize: both divisible by ``factor``, area within
    [min_pixels, max_pixels], aspect ratio kept as well as possible.

    Same algorithm as the HF Qwen-VL image processors (``image_grid_thw`` x patch size), and as
    ``qwen_vl_utils.smart_resize`` wherever that one gives a valid size (tests check both).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got "
            f"{max(height, width) / min(height, width):.1f} for {width}x{height}"
        )
    # As the HF image processors (whose output, image_grid_thw, is what the model sees): a side
    # shorter than factor/2 rounds to 0 here, which sends the image to the min_pixels branch.
    # qwen-vl-utils' copy differs only in such corner cases (it clamps here, and not below).
    h_bar = _round_by(height, factor)
    w_bar = _round_by(width, factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


@dataclass(frozen=True)
class ModelFamily:
    """A Qwen-VL family and its coordinate codec.

    Attributes:
        name: ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"``.
        frame: ``"rel1000"`` or ``"abs_resized"``.
        patch_size: the vision patch size in pixels, from the processor.
        merge_size: the spatial merge size, from the processor.
        min_pixels: the processor's minimum image area after resize.
        max_pixels: the processor's maximum image area after resize.
    """

    name: str
    frame: str
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_model_type(cls, model_type: str, **resize: int) -> "ModelFamily":
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(MODEL_TYPES)}")
        name = MODEL_TYPES[model_type]
        patch = resize.get("patch_size", _DEFAULT_PATCH[name])
        merge = resize.get("merge_size", 2)
        return cls(
            name=name,
            frame=_FRAMES[name],
            patch_size=patch,
            merge_size=merge,
            min_pixels=resize.get("min_pixels", 4 * (patch * merge) ** 2),
            max_pixels=resize.get("max_pixels", 16384 * (patch * merge) ** 2),
        )

    @classmethod
    def from_processor(cls, model_type: str, processor: Any) -> "ModelFamily":
        """Read patch size, merge size and pixel bounds from a (Qwen-VL) processor or its
        image processor."""
        ip = getattr(processor, "image_processor", processor)
        size = getattr(ip, "size", None) or {}
        min_pixels = size.get("shortest_edge") if isinstance(size, dict) else None
        max_pixels = size.get("longest_edge") if isinstance(size, dict) else None
        min_pixels = getattr(ip, "min_pixels", None) or min_pixels
        max_pixels = getattr(ip, "max_pixels", None) or max_pixels
        if not (ip.patch_size and ip.merge_size and min_pixels and max_pixels):
            raise ValueError(f"cannot read resize parameters from {type(ip).__name__}")
        return cls.from_model_type(
            model_type,
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
        )

    def with_pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> "ModelFamily":
        return replace(self, min_pixels=min_pixels or self.min_pixels, max_pixels=max_pixels or self.max_pixels)

    # ---- frames ---------------------------------------------------------------------
    @property
    def factor(self) -> int:
        """Pixels per merged vision token side (patch_size * merge_size)."""
        return self.patch_size * self.merge_size

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of this size after the processor's resize."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) that model coordinates are relative to for this image."""
        if self.frame == REL1000:
            return 1000, 1000
        return self.resized_size(width, height)

    def coord_hint(self, width: int, height: int) -> str:
        """One sentence for prompts telling the model its coordinate frame."""
        if self.frame == REL1000:
            return "Coordinates are integers from 0 to 1000, relative to the image width and height."
        w, h = self.resized_size(width, height)
        return f"Coordinates are absolute integer pixels of the {w}x{h} image."

    # ---- codec ----------------------------------------------------------------------
    def encode_points(self, points01: Sequence[Sequence[float]], image_size: tuple[int, int]) -> list[list[int]]:
        """Canonical [[x, y], ...] in [0, 1] -> integer model coordinates (clamped to the frame)."""
        fw, fh = self.frame_size(*image_size)
        out = []
        for x, y in points01:
            out.append([min(fw, max(0, round(x * fw))), min(fh, max(0, round(y * fh)))])
        return out

    def decode_points(self, points: Sequence[Sequence[float]], image_size: tuple[int, int]) -> list[list[float]]:
        """Model coordinates -> canonical [[x, y], ...] (not clamped)."""
        fw, fh = self.frame_size(*image_size)
        return [[float(x) / fw, float(y) / fh] for x, y in points]

    def encode_box(self, box01: Sequence[float], image_size: tuple[int, int]) -> list[int]:
        (x1, y1), (x2, y2) = self.encode_points([box01[:2], box01[2:]], image_size)
        return [x1, y1, x2, y2]

    def decode_box(self, box: Sequence[float], image_size: tuple[int, int]) -> list[float]:
        (x1, y1), (x2, y2) = self.decode_points([box[:2], box[2:]], image_size)
        return [x1, y1, x2, y2]

    def box_tokens_text(self, box01: Sequence[float], image_size: tuple[int, int]) -> str:
        """Qwen2-VL's special-token box text ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>``."""
        x1, y1, x2, y2 = self.encode_box(box01, image_size)
        return f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>"

    def resolution_error(self, image_size: tuple[int, int]) -> float:
        """The largest canonical error the integer frame can introduce for this image (half a
        frame unit), used by round-trip tests and reward tolerances."""
        fw, fh = self.frame_size(*image_size)
        return 0.5 / min(fw, fh)
