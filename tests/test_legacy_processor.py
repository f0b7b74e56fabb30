"""Checkpoints with the preprocessor configurations of the released Qwen2-VL / Qwen2.5-VL models.

Released folders carry a ``preprocessor_config.json`` with ``min_pixels`` / ``max_pixels`` and an
``image_processor_type`` of ``Qwen2_5_VLImageProcessor`` (the first Qwen2.5-VL release, still in
many fine-tuned checkpoints: transformers 5 raises "Unrecognized image processor" on it) or
``Qwen2VLImageProcessor``, with or without a ``size`` entry.  Each form must load through
``load_policy`` and preprocess an image exactly as the processor saved today does.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from vlm_grpo_ma.models import load_policy

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _legacy_folder(src, dst, image_processor_type: str, with_size: bool, min_pixels: int, max_pixels: int):
    shutil.copytree(src, dst)
    (dst / "processor_config.json").unlink()
    cfg = {
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": image_processor_type, "processor_class": "Qwen2_5_VLProcessor",
    }
    if with_size:
        cfg["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    (dst / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.mark.parametrize("with_size", [False, True], ids=["no-size", "size"])
@pytest.mark.parametrize("image_processor_type", ["Qwen2_5_VLImageProcessor", "Qwen2VLImageProcessor"])
def test_legacy_preprocessor_config_loads(tiny_model_dir, tmp_path, image_processor_type, with_size):
    src = tiny_model_dir("qwen2_5_vl")
    today = load_policy(src)
    lo, hi = today.family.min_pixels, today.family.max_pixels
    folder = _legacy_folder(src, tmp_path / "ckpt", image_processor_type, with_size, lo, hi)
    policy = load_policy(str(folder))
    assert policy.family.name == "qwen2_5_vl"
    assert (policy.family.min_pixels, policy.family.max_pixels) == (lo, hi)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    text = policy.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == today.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (90, 70), (10, 200, 30))
    got = policy.processor(text=[text], images=[image], return_tensors="pt")
    want = today.processor(text=[text], images=[image], return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"])


def test_a_broken_preprocessor_config_names_the_file(tiny_model_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir("qwen2_5_vl"), dst)
    (dst / "preprocessor_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        load_policy(str(dst))
