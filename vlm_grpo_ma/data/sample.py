"""The one Sample schema shared by every task.

Geometry is canonical: floats in [0, 1] of the ORIGINAL image (x right, y down).
- box:        [x1, y1, x2, y2] with x1 <= x2, y1 <= y2
- point:      [x, y]
- trajectory: [[x, y], ...]
- region:     {"polygon": [[x, y], ...]} or {"rle": <COCO RLE dict>, "size": [h, w]}
Loaders convert pixels to this form at the edge; nothing else in the house sees pixels
of the original image.  The model's own coordinate frame is handled by
:class:`vlm_grpo_ma.models.family.ModelFamily`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

ImageRef = Union[str, Image.Image]


@dataclass
class Sample:
    """One example of any task.

    Attributes:
        id: unique, stable identifier (used for resume, predictions and reports).
        task: the task name this sample belongs to (``"detection"``, ``"affordance"``, ...).
        images: image paths, file URLs, base64 data URIs or PIL images (0 or more).
        image_sizes: ``(width, height)`` of each ORIGINAL image, in pixels; filled by loaders
            (needed to map canonical geometry to a family's frame).
        prompt: the task's prompt fields, substituted into ``prompts/<task>.txt``
            (for example ``{"object": "red mug"}`` or ``{"question": "..."}``).
        target: the ground truth in canonical form; its keys are the task's
            (for example ``{"boxes": [[...]], "labels": [...]}``).
        meta: anything else (source file, line, split, reference reasoning, ...).
    """

    id: str
    task: str
    images: list[ImageRef] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    prompt: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the first image; raises if the sample has none."""
        if not self.image_sizes:
            raise ValueError(f"sample {self.id!r} has no image size")
        return self.image_sizes[0]
