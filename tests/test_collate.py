"""Collation: left-padded generation inputs, SFT label masking, over-long samples dropped."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from vlm_grpo_ma.data.collate import IGNORE_INDEX, build_generation_inputs, build_sft_batch, message_images
from vlm_grpo_ma.data.images import ImageLoadError


def _msgs(img, text):
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    a = d / "a.png"
    Image.new("RGB", (112, 112), (255, 0, 0)).save(a)
    return {"small": str(a), "wide": Image.new("RGB", (300, 60), (0, 0, 255))}


def test_message_images_in_template_order():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "image": "1.png"}, {"image_url": {"url": "2.png"}}]},
    ]
    assert message_images(msgs) == ["1.png", "2.png"]
    with pytest.raises(ValueError, match="message 0, content item 0: videos are not supported"):
        message_images([{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_generation_inputs_left_padded(tiny_policy, images, family):
    policy = tiny_policy(family)
    side = policy.tokenizer.padding_side
    batch = build_generation_inputs(policy.processor, [_msgs(images["small"], "Locate the red box."), _msgs(images["wide"], "Hi")])
    assert policy.tokenizer.padding_side == side  # restored
    ids, mask, grid = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    image_id = policy.model.config.image_token_id
    # each row holds exactly as many image tokens as its grid has merged cells
    merged = (grid.prod(-1) // 4).tolist()
    assert (ids == image_id).sum(-1).tolist() == merged
    assert batch["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    assert torch.equal(batch["mm_token_type_ids"].bool(), ids == image_id)
    # left padding: every row ends with the assistant header, pads only at the start
    header = policy.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, m in zip(ids, mask):
        assert row[-len(header):].tolist() == header
        n_pad = int((m == 0).sum())
        assert m[n_pad:].all() and not m[:n_pad].any()
        assert (row[:n_pad] == policy.tokenizer.pad_token_id).all()
    assert int((mask == 0).sum()) > 0  # the two prompts differ in length


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_sft_labels_mask_everything_but_target_and_end(tiny_policy, images, family):
    policy = tiny_policy(family)
    tok = policy.tokenizer
    prompts = [_msgs(images["small"], "Locate the red box."), _msgs(images["wide"], "Where is the blue box?")]
    targets = ["<think>it is at the top left</think><answer>[0, 0, 500, 500]</answer>", "<think>x</think><answer>[1, 2]</answer>"]
    batch = build_sft_batch(policy.processor, prompts, targets, max_length=512)
    assert batch.kept == [0, 1] and batch.dropped == [] and len(batch) == 2
    gen = build_generation_inputs(policy.processor, prompts)
    for b, target in enumerate(targets):
        labels, ids = batch.labels[b], batch.input_ids[b]
        sel = labels != IGNORE_INDEX
        assert tok.decode(ids[sel]) == target + "<|im_end|>"
        assert torch.equal(labels[sel], ids[sel])
        n_target = len(tok(target, add_special_tokens=False)["input_ids"]) + 1
        assert int(sel.sum()) == n_target
        # the prompt part is token for token the generation prompt (without its left padding)
        prompt = gen["input_ids"][b][gen["attention_mask"][b].bool()]
        n = int(batch.attention_mask[b].sum())
        assert torch.equal(ids[: len(prompt)], prompt)
        assert n == len(prompt) + n_target
        # the unmasked tokens are one contiguous block at the end of the real tokens
        assert sel.nonzero().flatten().tolist() == list(range(len(prompt), n))
        # right padding
        assert batch.attention_mask[b, :n].all() and not batch.attention_mask[b, n:].any()
        assert (ids[n:] == tok.pad_token_id).all()
    image_id = policy.model.config.image_token_id
    assert torch.equal(batch.mm_token_type_ids.bool(), batch.input_ids == image_id)
    assert batch.pixel_values.shape[0] == int(batch.image_grid_thw.prod(-1).sum())
    # the batch runs through the model; at random weights the loss is about ln(vocab)
    loss = policy.model(**batch.model_inputs(with_labels=True)).loss
    assert abs(loss.item() - math.log(policy.model.config.text_config.vocab_size)) < 1.0


def test_sft_backward_with_activation_checkpointing(tiny_policy, images):
    policy = tiny_policy("qwen2_5_vl", gradient_checkpointing=True)
    policy.model.train()
    batch = build_sft_batch(policy.processor, [_msgs(images["small"], "Go.")], ["<answer>1</answer>"], max_length=256)
    policy.model(**batch.model_inputs(with_labels=True)).loss.backward()
    grads = [p.grad for p in policy.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:5]) and any(g.abs().sum() > 0 for g in grads if g is not None)


def test_overlong_samples_are_dropped_and_counted_never_truncated(tiny_policy, images):
    policy = tiny_policy("qwen2_vl")
    tok = policy.tokenizer
    prompts = [_msgs(images["small"], "Short."), _msgs(images["wide"], "Short too."), _msgs(images["small"], "Third.")]
    targets = ["<answer>1</answer>", "<answer>" + "word " * 60 + "</answer>", "<answer>3</answer>"]
    full = build_sft_batch(policy.processor, prompts, targets, max_length=10_000)
    lengths = full.attention_mask.sum(-1).tolist()
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit
    batch = build_sft_batch(policy.processor, prompts, targets, max_length=limit)
    assert batch.kept == [0, 2]
    assert [(d.index, d.length, d.max_length) for d in batch.dropped] == [(1, lengths[1], limit)]
    # the kept rows are the full, uncut sequences, with their images only
    assert torch.equal(batch.input_ids[0, : lengths[0]], full.input_ids[0, : lengths[0]])
    assert torch.equal(batch.input_ids[1, : lengths[2]], full.input_ids[2, : lengths[2]])
    grids = full.image_grid_thw
    assert torch.equal(batch.image_grid_thw, grids[[0, 2]])
    assert batch.pixel_values.shape[0] == int(grids[[0, 2]].prod(-1).sum())
    # a sequence exactly max_length long is kept
    assert build_sft_batch(policy.processor, prompts[:1], targets[:1], max_length=lengths[0]).kept == [0]
    # everything dropped: an empty batch, still counted
    empty = build_sft_batch(policy.processor, prompts, targets, max_length=5)
    assert len(empty) == 0 and [d.index for d in empty.dropped] == [0, 1, 2]
    assert empty.pixel_values is None and empty.input_ids.shape == (0, 0)
    assert tok.decode(batch.input_ids[1][batch.labels[1] != IGNORE_INDEX]) == targets[2] + "<|im_end|>"


def test_bad_inputs(tiny_policy, tmp_path):
    policy = tiny_policy("qwen2_vl")
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        build_sft_batch(policy.processor, [_msgs("a", "x")] * 2, ["t"], max_length=100)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="missing.png.*file not found"):
        build_sft_batch(policy.processor, [_msgs(missing, "x")], ["t"], max_length=100)
    with pytest.raises(ImageLoadError, match="missing.png"):
        build_generation_inputs(policy.processor, [_msgs(missing, "x")])
