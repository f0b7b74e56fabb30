"""Tiny model factory and load_policy: build -> save -> load -> generate with images, for each of
the three families, plus the cache, determinism, options and errors."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from PIL import Image

from vlm_grpo_ma.data.collate import build_generation_inputs
from vlm_grpo_ma.models import TINY_MODELS, ModelFamily, Policy, ensure_tiny, load_policy, resolve_tiny_name, vision_token_ids
from vlm_grpo_ma.models.tiny import build_tiny, tiny_model_path

FAMILIES = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl", "tiny-qwen3-vl": "qwen3_vl"}


def _messages(img, text="Locate the red box."):
    return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_build_save_load_generate(tmp_path, name):
    out = build_tiny(name, tmp_path / name, seed=3)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    policy = load_policy(str(out))
    assert isinstance(policy, Policy) and isinstance(policy.family, ModelFamily)
    assert policy.family.name == FAMILIES[name]
    model, tok = policy.model, policy.tokenizer
    cfg = model.config
    assert cfg.model_type == TINY_MODELS[name].model_type
    text = cfg.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 2, 4)
    assert text.rope_parameters["rope_theta"] == 10.0
    assert sum(text.rope_parameters["mrope_section"]) == 16 // 2
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    # the saved processor folder names the standard class (loadable by AutoProcessor elsewhere)
    saved = json.loads((out / "processor_config.json").read_text())
    assert saved["processor_class"] == type(policy.processor).__name__ == {
        "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[FAMILIES[name]]

    # one prompt with a 112x112 image: a 4x4 grid of merged tokens
    suppress = vision_token_ids(tok)
    inputs = build_generation_inputs(policy.processor, [_messages(Image.new("RGB", (112, 112), (255, 0, 0)))])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 16
    torch.manual_seed(0)
    gen = model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=0, suppress_tokens=suppress)
    new = gen[:, inputs["input_ids"].shape[1]:]
    assert new.shape[0] == 1 and 1 <= new.shape[1] <= 6
    assert not torch.isin(new, torch.tensor(suppress)).any()

    # a batch of two prompts with different image sizes (left-padded)
    batch = build_generation_inputs(
        policy.processor,
        [_messages(Image.new("RGB", (112, 112), (0, 0, 255))), _messages(Image.new("RGB", (300, 60), (0, 255, 0)), "Where is it?")],
    )
    grids = batch["image_grid_thw"]
    assert grids.shape == (2, 3) and grids[0].tolist() != grids[1].tolist()
    gen = model.generate(**batch, max_new_tokens=4, do_sample=False, suppress_tokens=suppress)
    assert gen.shape[0] == 2 and gen.shape[1] > batch["input_ids"].shape[1]
    assert not torch.isin(gen[:, batch["input_ids"].shape[1]:], torch.tensor(suppress)).any()


def test_chat_templates_and_tags(tiny_policy):
    q2, q3 = tiny_policy("qwen2_vl"), tiny_policy("qwen3_vl")
    msgs = _messages("x.png", "Hi")
    t2 = q2.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    t3 = q3.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    body = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    assert t2 == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + body  # Qwen2-VL's default system turn
    assert t3 == body  # Qwen3-VL has none
    tok = q2.tokenizer
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<|box_start|>", "<|im_end|>"):
        ids = tok(tag, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids) == tag
    text = "<think>the box is left</think><answer>[12, 345, 678, 999]</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.convert_tokens_to_ids("<|im_end|>")], skip_special_tokens=True) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert vision_token_ids(tok) == tok.convert_tokens_to_ids(
        ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    )


def test_build_is_deterministic_in_the_seed(tmp_path):
    a = build_tiny("tiny-qwen2.5-vl", tmp_path / "a", seed=7)
    b = build_tiny("tiny-qwen2.5-vl", tmp_path / "b", seed=7)
    c = build_tiny("tiny-qwen2.5-vl", tmp_path / "c", seed=8)
    from safetensors.torch import load_file

    sa, sb, sc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 1 and sa[k].std() > 0)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_ensure_tiny_caches_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_GRPO_MA_CACHE", str(tmp_path))
    path = ensure_tiny("qwen3_vl")
    assert path == tiny_model_path("tiny-qwen3-vl")
    assert path.parent == tmp_path / "tiny" and path.name.startswith("tiny-qwen3-vl-")
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny("tiny-qwen3-vl") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [path.name]  # no temporary left
    # the tiny name goes through the same loader
    policy = load_policy("tiny-qwen3-vl")
    assert pathlib.Path(policy.path) == path


def _race(cache: str, q) -> None:  # a process of the race test
    os.environ["VLM_GRPO_MA_CACHE"] = cache
    from vlm_grpo_ma.models import ensure_tiny

    q.put(str(ensure_tiny("tiny-qwen2-vl")))


@pytest.mark.slow
def test_two_processes_racing_build_one_folder(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs)
    paths = {q.get(timeout=5), q.get(timeout=5)}
    assert len(paths) == 1
    folder = pathlib.Path(paths.pop())
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [folder.name]


def test_load_policy_options(tiny_model_dir):
    path = tiny_model_dir("qwen2_5_vl")
    policy = load_policy(path, dtype="bfloat16", gradient_checkpointing=True, min_pixels=16 * 784, max_pixels=64 * 784, device="cpu")
    assert next(policy.model.parameters()).dtype == torch.bfloat16
    assert any(getattr(m, "gradient_checkpointing", False) for m in policy.model.modules())
    assert (policy.family.min_pixels, policy.family.max_pixels) == (16 * 784, 64 * 784)
    size = policy.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (16 * 784, 64 * 784)
    # the processor follows: a 448x448 image now gives an 8x8 merged grid
    out = policy.processor.image_processor(images=[Image.new("RGB", (448, 448))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 16, 16]]
    eager = load_policy(path, attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"


def test_names_and_errors(tmp_path):
    assert resolve_tiny_name("qwen2_5_vl") == "tiny-qwen2.5-vl"
    assert resolve_tiny_name("tiny-qwen2_5_vl") == "tiny-qwen2.5-vl"
    assert resolve_tiny_name("tiny-qwen3-vl") == "tiny-qwen3-vl"
    assert resolve_tiny_name("Qwen/Qwen2.5-VL-3B-Instruct") is None
    with pytest.raises(ValueError, match="unknown tiny model"):
        ensure_tiny("tiny-llama")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not a supported Qwen-VL family"):
        load_policy(str(tmp_path))
    from vlm_grpo_ma.models.loading import _as_dtype

    assert _as_dtype("bf16") is torch.bfloat16 and _as_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        _as_dtype("float7")
