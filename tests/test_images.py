"""Image loading: every reference kind, the resize path, errors, and the torchvision shim."""

from __future__ import annotations

import base64
import importlib.util
import io
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from vlm_grpo_ma.data.images import ImageLoadError, image_size, load_image, qwen_vision_process
from vlm_grpo_ma.models.family import smart_resize


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def red_png(tmp_path: pathlib.Path) -> pathlib.Path:
    img = Image.new("RGB", (30, 20), (200, 10, 10))
    img.putpixel((3, 4), (1, 2, 3))
    path = tmp_path / "red image.png"  # a space, to exercise URL quoting
    img.save(path)
    return path


def test_load_from_path_file_url_base64_and_pil(red_png):
    expected = Image.open(red_png).convert("RGB")
    uri = "data:image/png;base64," + base64.b64encode(red_png.read_bytes()).decode()
    refs = [str(red_png), red_png, red_png.as_uri(), "file://" + str(red_png), uri, expected]
    for ref in refs:
        img = load_image(ref)
        assert img.mode == "RGB" and img.size == (30, 20), ref
        assert img.getpixel((3, 4)) == (1, 2, 3)
        assert img.getpixel((0, 0)) == (200, 10, 10)
        assert image_size(ref) == (30, 20)
    assert red_png.as_uri().count("%20") == 1  # the percent-encoded form was the one read


def test_pil_input_is_copied_and_modes_converted():
    src = Image.new("RGB", (4, 4), (9, 9, 9))
    out = load_image(src)
    out.putpixel((0, 0), (0, 0, 0))
    assert src.getpixel((0, 0)) == (9, 9, 9)
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((1, 1)) == (77, 77, 77)
    # RGBA goes on a WHITE background (qwen-vl-utils' to_rgb): 50% red over white
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    r, g, b = load_image(rgba).getpixel((0, 0))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_resize_path_matches_smart_resize(red_png):
    big = Image.new("RGB", (1920, 1080), (0, 0, 0))
    img = load_image(big, patch_size=14, min_pixels=3136, max_pixels=12544)
    h, w = smart_resize(1080, 1920, 28, 3136, 12544)
    assert img.size == (w, h) == (140, 84)  # hand-checked: beta = sqrt(1920*1080/12544) = 12.87
    assert load_image(red_png, patch_size=16, min_pixels=4 * 32 * 32, max_pixels=16 * 32 * 32).size == (96, 64)


def test_missing_file_names_path_and_reason(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError, match=r"nope\.jpg.*file not found"):
        load_image(str(path))
    with pytest.raises(ImageLoadError, match="file not found"):
        image_size(path.as_uri())
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(str(tmp_path))
    assert issubclass(ImageLoadError, ValueError)


def test_corrupt_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ImageLoadError, match=r"garbage\.png: cannot decode"):
        load_image(str(garbage))
    with pytest.raises(ImageLoadError, match="cannot decode"):
        image_size(str(garbage))

    # a JPEG cut in the middle of its pixel data: the header is fine, the pixels are not
    noise = Image.effect_noise((64, 64), 60).convert("RGB")
    data = _png_bytes(noise, "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert image_size(str(cut)) == (64, 64)  # header only
    with pytest.raises(ImageLoadError, match=r"cut\.jpg: cannot decode"):
        load_image(str(cut))

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png"):
        load_image(str(empty))


def test_bad_data_uris_and_types():
    with pytest.raises(ImageLoadError, match="invalid base64"):
        load_image("data:image/png;base64,@@@not base64@@@")
    with pytest.raises(ImageLoadError, match="not a base64 image data URI"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageLoadError, match="cannot decode"):
        load_image("data:image/png;base64," + base64.b64encode(b"hello").decode())
    with pytest.raises(ImageLoadError, match="expected a path"):
        load_image(123)  # type: ignore[arg-type]
    with pytest.raises(ImageLoadError, match="empty string"):
        load_image("")


def test_extreme_aspect_ratio_is_a_clear_error():
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        load_image(Image.new("RGB", (2010, 10)), patch_size=14)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_shim_leaves_no_torchvision_for_transformers():
    """In a fresh interpreter: after qwen_vl_utils is imported through the shim, torchvision is
    not visible and transformers still picks the PIL image processor."""
    code = (
        "import sys, importlib.util\n"
        "from vlm_grpo_ma.data.images import qwen_vision_process\n"
        "vp = qwen_vision_process()\n"
        "assert vp is not None and vp.__name__ == 'qwen_vl_utils.vision_process'\n"
        "assert 'torchvision' not in sys.modules and importlib.util.find_spec('torchvision') is None\n"
        "from transformers.utils import is_torchvision_available\n"
        "assert not is_torchvision_available()\n"
        "from transformers import AutoImageProcessor, Qwen2VLConfig\n"
        "import transformers\n"
        "ip = transformers.models.auto.image_processing_auto.get_image_processor_class_from_name('Qwen2VLImageProcessorPil')\n"
        "assert ip.__name__ == 'Qwen2VLImageProcessorPil'\n"
        "try:\n"
        "    vp.fetch_video({'video': 'x.mp4'})\n"
        "except ImportError as e:\n"
        "    assert 'torchvision' in str(e)\n"
        "else:\n"
        "    raise SystemExit('video path should need torchvision')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_qwen_vl_utils_is_the_resize_used():
    vp = qwen_vision_process()
    assert vp is not None
    assert vp.smart_resize(1080, 1920, 28, 3136, 12544) == smart_resize(1080, 1920, 28, 3136, 12544)
