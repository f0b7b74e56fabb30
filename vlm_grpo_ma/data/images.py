"""Loading images the way Qwen-VL expects them, through qwen-vl-utils' image path.

A reference (``Sample.images`` entry, or the ``"image"`` of a chat message) is one of

- a local path (``/data/a.jpg`` or ``imgs/a.png``, relative to the working directory),
- a ``file://`` URL (``file:///data/a.jpg``),
- a ``data:image/<fmt>;base64,...`` URI,
- an ``http(s)://`` URL (fetched with ``requests``; useless offline),
- a ``PIL.Image.Image``.

:func:`load_image` decodes it fully and converts it to RGB with qwen-vl-utils' ``to_rgb`` (RGBA is
put on a white background, as Qwen does).  Given the processor's resize parameters it also resizes
it with qwen-vl-utils' ``fetch_image`` (``smart_resize``), which is what Qwen's own inference code
does before the processor; the processor's resize is then the identity.  :func:`image_size` reads
only the header.  Every failure is an :class:`ImageLoadError` naming the reference and the reason.

``qwen_vl_utils`` imports torchvision at module level (for videos only), and torchvision cannot be
installed beside a CPU torch.  :func:`qwen_vision_process` imports it behind a shim: stand-in
``torchvision`` modules exist in ``sys.modules`` only while ``qwen_vl_utils.vision_process`` is
being imported, and are removed right after, so transformers still sees no torchvision and picks
the PIL image processor.  The stand-ins raise if a video function ever touches them.  Where
torchvision exists the real import is used.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import importlib.util
import io
import os
import sys
import types
import urllib.parse
import urllib.request
import warnings
from typing import Any, Union

from PIL import Image, UnidentifiedImageError

ImageRef = Union[str, os.PathLike, Image.Image]

__all__ = ["ImageLoadError", "ImageRef", "describe_ref", "image_size", "load_image", "qwen_vision_process"]


class ImageLoadError(ValueError):
    """An image reference could not be read or decoded.  The message names the reference and
    the reason."""


# ----------------------------------------------------------------------------------------------
# qwen-vl-utils behind a shim
# ----------------------------------------------------------------------------------------------
_VISION_PROCESS: types.ModuleType | None = None
_TORCHVISION_STANDINS = ("torchvision", "torchvision.io", "torchvision.transforms")


class _MissingTorchvision(types.ModuleType):
    """Stand-in module: any attribute use raises, naming what is missing (videos need torchvision)."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr != "__version__":  # import machinery, pickling, ...
            raise AttributeError(attr)
        raise ImportError(
            f"{self.__name__}.{attr} needs torchvision, which is not installed; "
            "vlm_grpo_ma imports qwen_vl_utils for images only (videos need torchvision)"
        )


def _import_with_shim() -> types.ModuleType:
    # Make sure transformers (if it is going to be used) has already looked for torchvision, so the
    # stand-ins can never be seen by it; then expose them only for the duration of the import.
    try:
        importlib.import_module("transformers.utils.import_utils")
    except Exception:  # transformers absent or broken: nothing to protect
        pass
    saved = {name: sys.modules.get(name) for name in _TORCHVISION_STANDINS}
    tv = _MissingTorchvision("torchvision")
    tv.io = _MissingTorchvision("torchvision.io")  # type: ignore[attr-defined]
    tv.transforms = _MissingTorchvision("torchvision.transforms")  # type: ignore[attr-defined]
    tv.transforms.InterpolationMode = None  # type: ignore[attr-defined]  # the `from ... import`
    try:
        sys.modules.update({"torchvision": tv, "torchvision.io": tv.io, "torchvision.transforms": tv.transforms})
        return importlib.import_module("qwen_vl_utils.vision_process")
    except Exception:
        for name in ("qwen_vl_utils.vision_process", "qwen_vl_utils"):
            sys.modules.pop(name, None)
        raise
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
        importlib.invalidate_caches()


def qwen_vision_process() -> types.ModuleType | None:
    """``qwen_vl_utils.vision_process`` (real import where torchvision exists, else through the
    shim), or ``None`` if even the shim fails (then the local equivalents below are used)."""
    global _VISION_PROCESS
    if _VISION_PROCESS is None:
        try:
            if importlib.util.find_spec("torchvision") is not None:
                try:
                    _VISION_PROCESS = importlib.import_module("qwen_vl_utils.vision_process")
                except Exception:  # a torchvision that fails on import (a build for another torch)
                    sys.modules.pop("qwen_vl_utils.vision_process", None)
                    sys.modules.pop("qwen_vl_utils", None)
                    _VISION_PROCESS = _import_with_shim()
            else:
                _VISION_PROCESS = _import_with_shim()
        except Exception as e:  # pragma: no cover - only if qwen-vl-utils changes shape
            warnings.warn(f"qwen_vl_utils could not be imported ({e!r}); using the local image path")
            return None
    return _VISION_PROCESS


def _to_rgb(img: Image.Image) -> Image.Image:
    vp = qwen_vision_process()
    if vp is not None:
        return vp.to_rgb(img)
    if img.mode == "RGBA":  # same as qwen_vl_utils.to_rgb
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.split()[3])
        return bg
    return img.convert("RGB")


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------
def describe_ref(ref: Any, limit: int = 80) -> str:
    """A short printable name for a reference (base64 payloads are cut)."""
    if isinstance(ref, Image.Image):
        return f"<PIL {ref.mode} {ref.size[0]}x{ref.size[1]}>"
    s = os.fspath(ref) if isinstance(ref, os.PathLike) else str(ref)
    if s.startswith("data:"):
        return s[: min(limit, 40)] + f"... ({len(s)} chars)"
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _open(ref: ImageRef) -> Image.Image:
    """Open (lazily: header only) the image a reference points to."""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise ImageLoadError(f"image reference {ref!r}: expected a path, URL, data URI or PIL image, got {type(ref).__name__}")
    if not ref:
        raise ImageLoadError("image reference '': empty string")
    try:
        if ref.startswith("data:"):
            head, sep, payload = ref.partition(",")
            if not sep or not head.startswith("data:image") or not head.endswith(";base64"):
                raise ImageLoadError(f"image {describe_ref(ref)}: not a base64 image data URI (data:image/<fmt>;base64,...)")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ImageLoadError(f"image {describe_ref(ref)}: invalid base64 payload ({e})") from None
            return Image.open(io.BytesIO(data))
        if ref.startswith(("http://", "https://")):
            import requests

            try:
                resp = requests.get(ref, timeout=30)
                resp.raise_for_status()
            except requests.RequestException as e:
                raise ImageLoadError(f"image {describe_ref(ref)}: download failed ({e})") from None
            return Image.open(io.BytesIO(resp.content))
        path = ref
        if ref.startswith("file:"):
            parsed = urllib.parse.urlparse(ref)
            path = urllib.request.url2pathname(parsed.netloc + parsed.path if parsed.netloc not in ("", "localhost") else parsed.path)
        if not os.path.exists(path):
            raise ImageLoadError(f"image {describe_ref(ref)}: file not found ({os.path.abspath(path)})")
        if os.path.isdir(path):
            raise ImageLoadError(f"image {describe_ref(ref)}: is a directory")
        return Image.open(path)
    except ImageLoadError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
        raise ImageLoadError(f"image {describe_ref(ref)}: cannot decode ({type(e).__name__}: {e})") from None


def image_size(ref: ImageRef) -> tuple[int, int]:
    """``(width, height)`` of the referenced image, read from its header (the pixels are not
    decoded, so a file truncated after its header is only caught by :func:`load_image`)."""
    img = _open(ref)
    try:
        return int(img.size[0]), int(img.size[1])
    finally:
        if not isinstance(ref, Image.Image):
            img.close()


def load_image(
    ref: ImageRef,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    patch_size: int | None = None,
) -> Image.Image:
    """Decode a reference into an RGB ``PIL.Image.Image``.

    Args:
        ref: path, ``file://`` URL, base64 data URI, http(s) URL or PIL image.
        min_pixels, max_pixels, patch_size: if ``patch_size`` is given, the image is resized the
            way qwen-vl-utils' ``fetch_image`` does (``smart_resize`` with factor
            ``2 * patch_size`` and these pixel bounds) — pass the processor's values
            (:class:`~vlm_grpo_ma.models.family.ModelFamily` has them).  Without it the image keeps
            its original size and the processor resizes it.

    Raises:
        ImageLoadError: missing file, unreadable or corrupt data, bad data URI, aspect ratio
            beyond 200 (when resizing).
    """
    img = _open(ref)
    try:
        img.load()  # force the full decode: truncated / corrupt pixel data fails here
        rgb = _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"image {describe_ref(ref)}: cannot decode ({type(e).__name__}: {e})") from None
    finally:
        if not isinstance(ref, Image.Image):
            img.close()
    if rgb is ref:  # never hand back the caller's object (callers may mutate it)
        rgb = rgb.copy()
    if patch_size is None:
        return rgb
    ele: dict[str, Any] = {"image": rgb}
    if min_pixels is not None:
        ele["min_pixels"] = int(min_pixels)
    if max_pixels is not None:
        ele["max_pixels"] = int(max_pixels)
    try:
        vp = qwen_vision_process()
        if vp is not None:
            return vp.fetch_image(ele, image_patch_size=int(patch_size))
        from vlm_grpo_ma.models.family import smart_resize

        factor = 2 * int(patch_size)
        h, w = smart_resize(
            rgb.height, rgb.width, factor, ele.get("min_pixels", 4 * factor**2), ele.get("max_pixels", 16384 * factor**2)
        )
        return rgb.resize((w, h))
    except (ValueError, ZeroDivisionError) as e:
        raise ImageLoadError(f"image {describe_ref(ref)}: cannot resize {rgb.width}x{rgb.height} ({e})") from None
