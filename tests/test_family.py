"""ModelFamily: smart_resize against qwen-vl-utils and the real HF image processor, and codec
round trips for boxes, points and trajectories on ordinary, large and extreme-aspect images."""

from __future__ import annotations

import itertools
import random

import pytest
from PIL import Image

from vlm_grpo_ma.data.images import qwen_vision_process
from vlm_grpo_ma.models.family import ModelFamily, smart_resize
from vlm_grpo_ma.models.processor import set_pixel_bounds

# (width, height): ordinary, large, extreme aspect, small, odd
SIZES = [(640, 480), (112, 112), (1920, 1080), (4000, 3000), (3000, 40), (40, 3000), (333, 17), (57, 1111)]
# (factor, min_pixels, max_pixels): tiny Qwen2/2.5 and Qwen3 bounds, released defaults
BOUNDS = [
    (28, 4 * 28 * 28, 16 * 28 * 28),
    (32, 4 * 32 * 32, 16 * 32 * 32),
    (28, 4 * 28 * 28, 1280 * 28 * 28),
    (28, 4 * 28 * 28, 16384 * 28 * 28),
    (32, 4 * 32 * 32, 16384 * 32 * 32),
]


# ---- smart_resize ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "height,width,factor,lo,hi,expected",
    [
        (1080, 1920, 28, 3136, 16384 * 784, (1092, 1932)),  # rounding only: 38.57 -> 39, 68.57 -> 69
        (1080, 1920, 28, 3136, 1280 * 784, (728, 1316)),  # beta = sqrt(1920*1080/1003520) = 1.4375
        (3000, 4000, 28, 3136, 1280 * 784, (840, 1148)),  # beta = 3.458: floor(30.98), floor(41.3)
        (112, 112, 28, 3136, 12544, (112, 112)),  # the tiny models' 4x4 grid
        (112, 112, 32, 4096, 16384, (128, 128)),  # Qwen3-VL: round(3.5) = 4
        (40, 3000, 28, 3136, 12544, (28, 952)),  # short side clamped to one factor
        (10, 10, 28, 3136, 12544, (56, 56)),  # min_pixels branch
    ],
)
def test_smart_resize_hand_checked(height, width, factor, lo, hi, expected):
    assert smart_resize(height, width, factor, lo, hi) == expected


def test_smart_resize_rejects_bad_sizes():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010, 28, 3136, 12544)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10, 28, 3136, 12544)


def test_smart_resize_agrees_with_hf_everywhere():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = random.Random(0)
    cases = [(h, w, *b) for (w, h), b in itertools.product(SIZES, BOUNDS)]
    for _ in range(3000):
        h = rng.randint(1, 5000)
        w = rng.randint(max(1, h // 199 + 1), min(5000, h * 199))
        cases.append((h, w, *rng.choice(BOUNDS)))
    for case in cases:
        assert smart_resize(*case) == hf_smart_resize(*case), case


def test_smart_resize_agrees_with_qwen_vl_utils():
    """Equal wherever qwen-vl-utils gives a valid size for an image whose sides are at least half
    a factor; below that it differs from the HF processor (which is what the model sees), e.g. a
    3000x40 image under the tiny bounds, where qwen-vl-utils floors the height to 0."""
    qwen = qwen_vision_process().smart_resize
    rng = random.Random(1)
    cases = [(h, w, *b) for (w, h), b in itertools.product(SIZES, BOUNDS)]
    for _ in range(3000):
        h = rng.randint(14, 5000)
        w = rng.randint(max(14, h // 199 + 1), min(5000, h * 199))
        cases.append((h, w, *rng.choice(BOUNDS)))
    compared = 0
    for h, w, f, lo, hi in cases:
        q = qwen(h, w, f, lo, hi)
        if min(h, w) * 2 < f or min(q) == 0:
            continue
        assert smart_resize(h, w, f, lo, hi) == q, (h, w, f, lo, hi)
        compared += 1
    assert compared > 2500
    # the documented corner case: qwen-vl-utils gives a zero height, the HF processor one factor
    assert qwen(40, 3000, 28, 3136, 12544)[0] == 0
    assert smart_resize(40, 3000, 28, 3136, 12544) == (28, 952)


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_resized_size_matches_real_processor_grid(tiny_policy, family_name):
    """The absolute-pixel frame of Qwen2.5-VL is image_grid_thw x patch size of the real HF
    image processor; check the family's resized_size against it, with tiny and larger bounds."""
    policy = tiny_policy(family_name)
    processor = policy.processor
    factor = policy.family.factor
    for lo, hi in [(4 * factor**2, 16 * factor**2), (4 * factor**2, 256 * factor**2)]:
        set_pixel_bounds(processor, lo, hi)
        family = ModelFamily.from_processor(family_name, processor)
        assert (family.min_pixels, family.max_pixels) == (lo, hi)
        for w, h in SIZES:
            out = processor.image_processor(images=[Image.new("RGB", (w, h), (90, 20, 200))], return_tensors="pt")
            t, gh, gw = out["image_grid_thw"][0].tolist()
            assert t == 1
            assert family.resized_size(w, h) == (gw * family.patch_size, gh * family.patch_size), (w, h, lo, hi)
            assert out["pixel_values"].shape[0] == gh * gw


# ---- codecs ------------------------------------------------------------------------------------
FAMILIES = [
    ModelFamily.from_model_type("qwen2_vl"),
    ModelFamily.from_model_type("qwen2_5_vl"),
    ModelFamily.from_model_type("qwen3_vl"),
    ModelFamily.from_model_type("qwen2_5_vl", patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12544),
    ModelFamily.from_model_type("qwen3_vl", patch_size=16, merge_size=2, min_pixels=4096, max_pixels=16384),
]


def _rand_points(rng: random.Random, n: int) -> list[list[float]]:
    return [[rng.random(), rng.random()] for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f"{f.name}-{f.max_pixels}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trips_exact_to_resolution(family, size):
    rng = random.Random(hash((family.name, family.max_pixels, size)) % 2**32)
    tol = family.resolution_error(size) + 1e-12
    fw, fh = family.frame_size(*size)
    for _ in range(50):
        x1, x2 = sorted((rng.random(), rng.random()))
        y1, y2 = sorted((rng.random(), rng.random()))
        box = [x1, y1, x2, y2]
        enc = family.encode_box(box, size)
        assert all(isinstance(v, int) for v in enc)
        assert 0 <= enc[0] <= enc[2] <= fw and 0 <= enc[1] <= enc[3] <= fh
        dec = family.decode_box(enc, size)
        assert max(abs(a - b) for a, b in zip(dec, box)) <= tol
        # encoding the decoded value again gives the same integers (a fixed point)
        assert family.encode_box(dec, size) == enc

        point = _rand_points(rng, 1)
        assert max(abs(a - b) for a, b in zip(family.decode_points(family.encode_points(point, size), size)[0], point[0])) <= tol

        traj = _rand_points(rng, rng.randint(2, 8))
        dec_traj = family.decode_points(family.encode_points(traj, size), size)
        assert len(dec_traj) == len(traj)
        assert max(abs(a - b) for p, q in zip(dec_traj, traj) for a, b in zip(p, q)) <= tol
    # the corners map to the frame's corners exactly
    assert family.encode_box([0.0, 0.0, 1.0, 1.0], size) == [0, 0, fw, fh]


def test_frames_hand_checked():
    q2, q25, q3 = FAMILIES[:3]
    assert q2.encode_box([0.5, 0.5, 1.0, 1.0], (1920, 1080)) == [500, 500, 1000, 1000]
    assert q3.encode_points([[0.25, 0.1]], (4000, 3000)) == [[250, 100]]
    # Qwen2.5-VL: absolute pixels of the 1932x1092 resized image (released bounds)
    assert q25.encode_box([0.5, 0.5, 1.0, 1.0], (1920, 1080)) == [966, 546, 1932, 1092]
    assert q25.decode_box([966, 546, 1932, 1092], (1920, 1080)) == [0.5, 0.5, 1.0, 1.0]
    # ... and of the 952x28 image an extreme 3000x40 becomes under the tiny bounds
    tiny25 = FAMILIES[3]
    assert tiny25.frame_size(3000, 40) == (952, 28)
    assert tiny25.encode_points([[0.5, 0.5]], (3000, 40)) == [[476, 14]]
    assert tiny25.resolution_error((3000, 40)) == pytest.approx(0.5 / 28)
    assert q2.box_tokens_text([0.1, 0.2, 0.3, 0.4], (640, 480)) == "<|box_start|>(100,200),(300,400)<|box_end|>"
    # decoding never clamps
    assert q2.decode_points([[1200, -10]], (640, 480)) == [[1.2, -0.01]]


def test_from_processor_reads_the_tiny_processors(tiny_policy):
    for name, patch in [("qwen2_vl", 14), ("qwen2_5_vl", 14), ("qwen3_vl", 16)]:
        policy = tiny_policy(name)
        fam = policy.family
        assert (fam.name, fam.patch_size, fam.merge_size) == (name, patch, 2)
        assert (fam.min_pixels, fam.max_pixels) == (4 * (2 * patch) ** 2, 16 * (2 * patch) ** 2)
        assert fam.resized_size(112, 112) == ((112, 112) if patch == 14 else (128, 128))
