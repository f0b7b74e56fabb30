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
import json
from pathlib import Path
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


#: ``image_processor_type`` names of released checkpoints that transformers no longer knows ->
#: the class that reads them today.  The first Qwen2.5-VL release (and many checkpoints
#: fine-tuned from it) wrote ``Qwen2_5_VLImageProcessor``; transformers 5 raises "Unrecognized
#: image processor" on it.  The configuration is the same (``min_pixels`` / ``max_pixels``,
#: patch, merge and temporal sizes, CLIP mean/std), read by ``Qwen2VLImageProcessor``.
LEGACY_IMAGE_PROCESSOR_TYPES = {"Qwen2_5_VLImageProcessor": "Qwen2VLImageProcessor"}


def legacy_image_processor_type(path: str) -> str | None:
    """The legacy ``image_processor_type`` of the local checkpoint folder ``path`` (read from
    ``preprocessor_config.json``), or None (not a folder, no such file, a current name)."""
    cfg = Path(path) / "preprocessor_config.json"
    if not cfg.is_file():
        return None
    try:
        name = json.loads(cfg.read_text(encoding="utf-8")).get("image_processor_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg}: not a JSON object ({e})") from e
    return name if name in LEGACY_IMAGE_PROCESSOR_TYPES else None


def _checkpoint_chat_template(path: str, tokenizer: Any) -> str | None:
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def _load_legacy_processor(path: str, model_type: str, **kwargs: Any):
    """The family's processor built from parts, the image processor read with the class that
    understands the legacy configuration (:data:`LEGACY_IMAGE_PROCESSOR_TYPES`)."""
    import transformers
    from transformers import AutoTokenizer

    name = LEGACY_IMAGE_PROCESSOR_TYPES[legacy_image_processor_type(path)]
    ip_cls = getattr(transformers, name if has_torchvision() else f"{name}Pil")
    image_processor = ip_cls.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    chat_template = _checkpoint_chat_template(path, tokenizer)
    if not has_torchvision():
        return image_only_processor_class(model_type)(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
    video_cls = getattr(transformers, "Qwen3VLVideoProcessor" if model_type.startswith("qwen3") else "Qwen2VLVideoProcessor")
    video = video_cls(patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
                      temporal_patch_size=image_processor.temporal_patch_size)
    proc_cls = getattr(transformers, PROCESSOR_CLASSES[model_type])
    return proc_cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video, chat_template=chat_template)


def load_processor(path: str, model_type: str, *, min_pixels: int | None = None, max_pixels: int | None = None, **kwargs: Any):
    """Load the processor saved at ``path`` (a folder or a hub id), image-only without
    torchvision, and apply optional pixel bounds.  A folder whose ``preprocessor_config.json``
    names a legacy image processor (:data:`LEGACY_IMAGE_PROCESSOR_TYPES`) is loaded too."""
    if legacy_image_processor_type(path) is not None:
        processor = _load_legacy_processor(path, model_type, **kwargs)
    elif has_torchvision():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path, **kwargs)
    else:
        processor = image_only_processor_class(model_type).from_pretrained(path, **kwargs)
    set_pixel_bounds(processor, min_pixels, max_pixels)
    return processor


# --------------------------------------------------------------------------- saving
#: The video processor of each family as transformers builds it by default (the class defaults of
#: ``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor``, read from transformers 5.19 with
#: torchvision); ``patch_size``, ``merge_size``, ``temporal_patch_size`` and the mean / std are
#: taken from the model's own image processor when the folder is written.
VIDEO_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "Qwen2VLVideoProcessor": {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "do_sample_frames": False, "max_frames": 768, "max_video_tokens": 128000, "min_frames": 4,
        "resample": 3, "rescale_factor": 1 / 255, "return_metadata": False,
        "size": {"longest_edge": 602112, "shortest_edge": 100352},
    },
    "Qwen3VLVideoProcessor": {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "do_sample_frames": True, "fps": 2, "max_frames": 768, "max_video_tokens": 768, "min_frames": 4,
        "resample": 3, "rescale_factor": 1 / 255, "return_metadata": False,
        "size": {"longest_edge": 786432, "shortest_edge": 131072},
    },
}
#: processor class -> its video processor class
VIDEO_PROCESSOR_OF = {"Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
                      "Qwen3VLProcessor": "Qwen3VLVideoProcessor"}
_FROM_IMAGE_PROCESSOR = ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")


def complete_processor_folder(out_dir: str | Path) -> list[str]:
    """Make a saved processor folder load everywhere a released Qwen-VL checkpoint loads.

    transformers 5 writes one ``processor_config.json`` with the sub-processors nested in it; a
    processor saved WITHOUT torchvision (the image-only variant above) has no video processor
    there, and vLLM's pinned transformers then refuses the folder ("Can't load video
    processor"), as ``AutoProcessor`` does on any machine with torchvision.  Released checkpoints
    (e.g. Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-2B-Instruct) carry ``preprocessor_config.json``
    and, for Qwen3-VL, ``video_preprocessor_config.json``.  This adds what is missing:

    - the family's default video processor to ``processor_config.json`` (with the image
      processor's patch, merge, temporal patch, mean and std);
    - ``preprocessor_config.json`` (the image processor, as older transformers and other
      loaders read it) and ``video_preprocessor_config.json``, where absent.

    Nothing present is changed.  Returns the names of the files written."""
    out = Path(out_dir)
    path = out / "processor_config.json"
    if not path.exists():
        return []
    cfg = json.loads(path.read_text())
    image = cfg.get("image_processor")
    proc_class = cfg.get("processor_class")
    if not isinstance(image, dict) or proc_class not in VIDEO_PROCESSOR_OF:
        return []
    written = []
    if not isinstance(cfg.get("video_processor"), dict):
        vp_class = VIDEO_PROCESSOR_OF[proc_class]
        video = dict(VIDEO_PROCESSOR_DEFAULTS[vp_class])
        video.update({k: image[k] for k in _FROM_IMAGE_PROCESSOR if k in image})
        video["video_processor_type"] = vp_class
        cfg["video_processor"] = dict(sorted(video.items()))
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        written.append(path.name)
    for name, sub in (("preprocessor_config.json", "image_processor"), ("video_preprocessor_config.json", "video_processor")):
        if not (out / name).exists():
            (out / name).write_text(json.dumps({**cfg[sub], "processor_class": proc_class}, indent=2, sort_keys=True) + "\n")
            written.append(name)
    return written


def save_processor(processor: Any, out_dir: str | Path) -> None:
    """``processor.save_pretrained(out_dir)``, then :func:`complete_processor_folder`: every
    model folder this project writes (tiny models, SFT / RL finals, checkpoints' HF folders) loads
    in vLLM and in ``AutoProcessor`` as the released checkpoints do."""
    processor.save_pretrained(str(out_dir))
    complete_processor_folder(out_dir)
