"""Building and loading Qwen-VL processors, with or without torchvision.

transformers 5 gives every Qwen-VL processor a video processor, and the video processors need
torchvision, which a CPU-only torch install may lack (its wheels pin one torch build):
``AutoProcessor.from_pretrained`` then fails with "Can't load video processor".  Where torchvision
is missing we use an *image-only* variant of the family's processor class: its ``__init__`` takes
no video processor and passes ``video_processor=None`` itself, so it loads the image processor
(``Qwen2VLImageProcessorPil``, which AutoImageProcessor picks without torchvision) and the
tokenizer from a normal checkpoint folder.  The variant carries the parent's class name, so what it
saves (``processor_config.json``, ``tokenizer_config.json``) is an ordinary Qwen-VL processor folder
that ``AutoProcessor`` reads on a machine with torchvision.  Where torchvision exists,
``AutoProcessor`` is used unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

#: model_type -> name of the processor class in transformers
PROCESSOR_CLASSES = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
}


def has_torchvision() -> bool:
    """Whether torchvision can be found (transformers then uses its video processors)."""
    return importlib.util.find_spec("torchvision") is not None


@functools.lru_cache(maxsize=None)
def image_only_processor_class(model_type: str) -> type:
    """A subclass of the family's processor class that has no video processor.

    It has the parent's ``__name__`` (so saved folders name the standard class) and differs only
    in its ``__init__`` signature, from which ProcessorMixin reads its sub-processors.
    """
    import transformers

    if model_type not in PROCESSOR_CLASSES:
        raise ValueError(f"no Qwen-VL processor for model_type {model_type!r}; supported: {sorted(PROCESSOR_CLASSES)}")
    parent = getattr(transformers, PROCESSOR_CLASSES[model_type])

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        parent.__init__(self, image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    return type(
        parent.__name__,
        (parent,),
        {
            "__init__": __init__,
            "__module__": __name__,
            "__qualname__": f"image_only[{parent.__name__}]",
            "__doc__": f"{parent.__name__} without a video processor (images only; no torchvision needed).",
        },
    )


def set_pixel_bounds(processor: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Set the image processor's resize bounds in place (``size`` and the legacy attributes)."""
    ip = getattr(processor, "image_processor", processor)
    size = dict(getattr(ip, "size", None) or {})
    if min_pixels is not None:
        size["shortest_edge"] = int(min_pixels)
        if hasattr(ip, "min_pixels"):
            ip.min_pixels = int(min_pixels)
    if max_pixels is not None:
        size["longest_edge"] = int(max_pixels)
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = int(max_pixels)
    if size:
        ip.size = size
    lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min_pixels ({lo}) must not exceed max_pixels ({hi})")


def load_processor(path: str, model_type: str, *, min_pixels: int | None = None, max_pixels: int | None = None, **kwargs: Any):
    """Load the processor saved at ``path`` (a folder or a hub id), image-only without
    torchvision, and apply optional pixel bounds."""
    if has_torchvision():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, **kwargs)
    else:
        processor = image_only_processor_class(model_type).from_pretrained(path, **kwargs)
    set_pixel_bounds(processor, min_pixels, max_pixels)
    return processor
