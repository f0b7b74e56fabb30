"""The vLLM rollout backend: everything that can be checked without vLLM (the real engine's tests
are tests/test_vllm_real.py and tests/test_vllm_train.py, run by scripts/test_vllm.sh).

Without vLLM: the Hugging Face -> vLLM name mapping against each tiny family's REAL parameter
names (and the pre-4.52 checkpoint names); request building from the real processors (collapsed
prompt token ids = the unexpanded chat template, multi_modal_data, n, stops, seeds, sampling
knobs); the pixel-bound check (match passes, mismatch raises, including two real processors that
expand the same image differently); the thought / answer finishing rules; the weight-sync
batching (bounded bytes, every parameter exactly once, stable order) into a recording receiver;
LoRA merging with a real PEFT LoRA (merged weight = W + s * B @ A by hand, base weights untouched
bit for bit); ZeRO-3 gathering in a one-process DeepSpeed run (slow); TIS weights by hand; the
ImportError without vLLM; and the backend's orchestration end to end against a test double of the
engine (a scripted stand-in for ``vllm.LLM``, clearly not vLLM: it checks what the backend asks
and how it assembles what comes back, not vLLM's behaviour).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlm_grpo_ma.algorithms.tis import tis_metrics, tis_weights
from vlm_grpo_ma.data.collate import build_generation_inputs, prompt_text
from vlm_grpo_ma.models import ModelFamily
from vlm_grpo_ma.rollout.hf import RolloutTokenIds
from vlm_grpo_ma.rollout.types import SamplingParams
from vlm_grpo_ma.rollout.vllm import (
    INSTALL_HINT,
    PixelBoundsMismatch,
    build_completion_requests,
    build_engine_kwargs,
    build_stage1_requests,
    build_stage2_requests,
    check_pixel_bounds,
    check_prompt_expansion,
    collapse_image_pads,
    count_image_runs,
    derive_seed,
    engine_mm_processor_kwargs,
    finish_answer,
    finish_thought,
    sampled_logprobs,
)
from vlm_grpo_ma.rollout.vllm_weights import (
    checkpoint_name,
    hf_to_vllm_name,
    iter_weight_buckets,
    param_nbytes,
    plan_buckets,
    plan_units,
    sync_weights,
)

TINY = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl", "qwen3_vl": "tiny-qwen3-vl"}


def _messages():
    return [
        [{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (64, 48), (200, 30, 30))},
            {"type": "text", "text": "Where is the red box? Think, then answer."}]}],
        [{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (150, 100), (0, 0, 255))},
            {"type": "text", "text": "Point at it."}]}],
    ]


class RecordingReceiver:
    """Test double of the engine: records the one weight stream of each sync (cloned) and the resets."""

    def __init__(self):
        self.pairs: list[tuple[str, torch.Tensor]] = []
        self.events: list[str] = []

    def load_weights(self, weights):
        self.pairs.extend((n, t.detach().clone()) for n, t in weights)
        self.events.append("load")

    def reset_prefix_cache(self):
        self.events.append("reset")

    @property
    def names(self):
        return [n for n, _ in self.pairs]

    def tensor(self, name):
        return next(t for n, t in self.pairs if n == name)


# --------------------------------------------------------------------------- name mapping
@pytest.mark.parametrize("family", list(TINY))
def test_name_mapping_on_real_parameter_names(tiny_policy, family):
    names = [n for n, _ in tiny_policy(TINY[family]).model.named_parameters()]
    mapped = [hf_to_vllm_name(checkpoint_name(n), family) for n in names]
    assert all(checkpoint_name(n) == n for n in names)  # no wrapper: names are checkpoint names
    assert len(set(mapped)) == len(mapped)  # injective
    for n, v in zip(names, mapped):
        if n.startswith("model.visual."):
            assert v == "visual." + n[len("model.visual."):]
        elif n.startswith("model.language_model."):
            assert v == "language_model.model." + n[len("model.language_model."):]
        else:
            assert n == "lm_head.weight" and v == "language_model.lm_head.weight"
    # hand-checked examples
    assert hf_to_vllm_name("model.language_model.layers.0.self_attn.q_proj.weight", family) == \
        "language_model.model.layers.0.self_attn.q_proj.weight"
    assert hf_to_vllm_name("model.visual.blocks.0.attn.qkv.weight", family) == "visual.blocks.0.attn.qkv.weight"
    assert sum(v.startswith("visual.") for v in mapped) == sum(n.startswith("model.visual.") for n in names) > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_old_checkpoint_names_map_like_new_ones(tiny_policy, family):
    """transformers < 4.52 checkpoints: ``model.layers.*``, ``model.embed_tokens``, ``visual.*``."""
    names = [n for n, _ in tiny_policy(TINY[family]).model.named_parameters()]

    def old(n):
        if n.startswith("model.language_model."):
            return "model." + n[len("model.language_model."):]
        if n.startswith("model.visual."):
            return n[len("model."):]
        return n

    assert [hf_to_vllm_name(old(n), family) for n in names] == [hf_to_vllm_name(n, family) for n in names]
    assert hf_to_vllm_name("model.embed_tokens.weight", family) == "language_model.model.embed_tokens.weight"


def test_name_mapping_errors():
    with pytest.raises(ValueError, match="no vLLM module|in no module"):
        hf_to_vllm_name("model.layers.0.mlp.up_proj.weight", "qwen3_vl")  # vLLM maps no old names for Qwen3-VL
    with pytest.raises(ValueError, match="family"):
        hf_to_vllm_name("lm_head.weight", "llava")


def test_checkpoint_name_peft_and_wrappers():
    p = "base_model.model.model.language_model.layers.3.self_attn.v_proj"
    assert checkpoint_name(p + ".base_layer.weight") == "model.language_model.layers.3.self_attn.v_proj.weight"
    assert checkpoint_name(p + ".base_layer.bias") == "model.language_model.layers.3.self_attn.v_proj.bias"
    for lora in (".lora_A.default.weight", ".lora_B.other.weight", ".lora_magnitude_vector.default.weight"):
        assert checkpoint_name(p + lora) is None
    assert checkpoint_name("base_model.model.model.language_model.embed_tokens.lora_embedding_A.default") is None
    assert checkpoint_name("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert checkpoint_name("base_model.model.lm_head.original_module.weight") is None
    assert checkpoint_name("module.lm_head.weight") == "lm_head.weight"
    assert checkpoint_name("_orig_mod.model.visual.merger.ln_q.weight") == "model.visual.merger.ln_q.weight"


# --------------------------------------------------------------------------- requests
@pytest.fixture(scope="module", params=list(TINY))
def policy_inputs(request, tiny_model_dir):
    from vlm_grpo_ma.models import load_policy

    policy = load_policy(tiny_model_dir(TINY[request.param]))
    msgs = _messages()
    return policy, msgs, dict(build_generation_inputs(policy.processor, msgs))


def _prompts(inputs):
    ids, attn = inputs["input_ids"], inputs["attention_mask"].bool()
    return [ids[b][attn[b]].tolist() for b in range(ids.shape[0])]


def test_collapsed_prompt_is_the_unexpanded_chat_template(policy_inputs):
    policy, msgs, inputs = policy_inputs
    pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for b, ids in enumerate(_prompts(inputs)):
        raw = policy.tokenizer(prompt_text(policy.processor, msgs[b]), add_special_tokens=False)["input_ids"]
        assert collapse_image_pads(ids, pad) == raw
        assert count_image_runs(ids, pad) == 1
        assert ids.count(pad) == int(inputs["image_grid_thw"][b].prod()) // policy.family.merge_size**2 > 1
    assert collapse_image_pads([5, 9, 9, 9, 6, 9, 9, 7], 9) == [5, 9, 6, 9, 7]
    assert count_image_runs([9, 9, 1, 9, 2], 9) == 2


def test_stage_requests(policy_inputs):
    policy, msgs, inputs = policy_inputs
    ids = RolloutTokenIds.from_tokenizer(policy.tokenizer)
    pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prompts = [collapse_image_pads(p, pad) for p in _prompts(inputs)]
    images = [[m[0]["content"][0]["image"]] for m in msgs]
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_thought_tokens=12, max_answer_tokens=5, seed=3)
    K, M = 3, 4
    s1 = build_stage1_requests(prompts, images, K, sp, ids)
    assert len(s1) == 2
    for b, r in enumerate(s1):
        assert r.prompt["prompt_token_ids"] == prompts[b]
        assert r.prompt["multi_modal_data"]["image"][0] is images[b][0]  # the same PIL image, not a copy
        k = r.sampling
        assert (k["n"], k["max_tokens"], k["stop_token_ids"]) == (K, 12, [ids.think_end])
        assert (k["temperature"], k["top_p"], k["top_k"]) == (0.7, 0.9, -1)
        assert k["ignore_eos"] and k["include_stop_str_in_output"] and k["logprobs"] == 0
        assert not k["skip_special_tokens"]
        assert set(k["logit_bias"]) == set(ids.suppress) and pad in k["logit_bias"]
        assert all(v < -1e3 for v in k["logit_bias"].values())
    assert s1[0].sampling["seed"] != s1[1].sampling["seed"]
    assert [r.sampling["seed"] for r in build_stage1_requests(prompts, images, K, sp, ids)] == [r.sampling["seed"] for r in s1]

    thoughts = [[[10 + b, 20 + k, ids.think_end] for k in range(K)] for b in range(2)]
    s2 = build_stage2_requests(prompts, images, thoughts, M, sp, ids)
    assert len(s2) == 2 * K
    for b in range(2):
        for k in range(K):
            r = s2[b * K + k]
            assert r.prompt["prompt_token_ids"] == prompts[b] + [10 + b, 20 + k, ids.think_end]
            assert r.prompt["multi_modal_data"]["image"][0] is images[b][0]
            assert (r.sampling["n"], r.sampling["max_tokens"]) == (M, 5)
            assert r.sampling["stop_token_ids"] == list(ids.stop)
    seeds = [r.sampling["seed"] for r in s1 + s2]
    assert len(set(seeds)) == len(seeds)
    # greedy, seed None, text-only prompt
    g = build_completion_requests([prompts[0], [1, 2, 3]], [images[0], None], 1, SamplingParams(temperature=0.0, top_k=5),
                                  ids, max_tokens=9)
    assert (g[0].sampling["temperature"], g[0].sampling["top_k"], g[0].sampling["top_p"]) == (0.0, -1, 1.0)
    assert g[0].sampling["seed"] is None and g[1].prompt == {"prompt_token_ids": [1, 2, 3]}
    assert g[0].sampling["stop_token_ids"] == list(ids.stop) and g[0].sampling["max_tokens"] == 9


def test_split_and_merge_greedy_requests():
    from vlm_grpo_ma.rollout.vllm import VLLMRequest, merge_split_outputs, split_greedy_requests

    reqs = [VLLMRequest({"prompt_token_ids": [1]}, {"n": 3, "temperature": 0.0}),
            VLLMRequest({"prompt_token_ids": [2]}, {"n": 2, "temperature": 1.0}),
            VLLMRequest({"prompt_token_ids": [3]}, {"n": 1, "temperature": 0.0})]
    flat, owner = split_greedy_requests(reqs)
    assert [r.prompt["prompt_token_ids"][0] for r in flat] == [1, 1, 1, 2, 3]
    assert [r.sampling["n"] for r in flat] == [1, 1, 1, 2, 1]
    assert owner == [(0, 0), (0, 1), (0, 2), (1, None), (2, None)]
    c = lambda i, t: SimpleNamespace(index=i, token_ids=(t,))  # noqa: E731
    outs = [SimpleNamespace(prompt_token_ids=[1], outputs=[c(0, 7)], num_cached_tokens=k) for k in (0, 1, 1)]
    outs += [SimpleNamespace(prompt_token_ids=[2], outputs=[c(0, 8), c(1, 9)], num_cached_tokens=0),
             SimpleNamespace(prompt_token_ids=[3], outputs=[c(0, 5)], num_cached_tokens=0)]
    merged = merge_split_outputs(outs, owner, 3)
    assert [c.index for c in merged[0].outputs] == [0, 1, 2] and merged[0].num_cached_tokens == 2
    assert merged[0].prompt_token_ids == [1] and merged[1] is outs[3] and merged[2] is outs[4]
    assert outs[0].outputs[0].index == 0  # the engine's objects are not mutated


def test_derive_seed():
    assert derive_seed(None, 1, 0) is None
    s = {derive_seed(7, stage, i) for stage in (0, 1, 2) for i in range(100)}
    assert len(s) == 300 and all(0 <= x < 2**31 for x in s)
    assert derive_seed(7, 1, 5) == derive_seed(7, 1, 5) != derive_seed(8, 1, 5)


def test_engine_kwargs():
    fam = ModelFamily.from_model_type("qwen2_5_vl", min_pixels=3136, max_pixels=12544)
    kw = build_engine_kwargs("/ckpt", fam, gpu_memory_utilization=0.4, enable_sleep_mode=True, colocate_ranks=4,
                             extra={"max_num_seqs": 64})
    assert kw["enable_prefix_caching"] is True and kw["enable_sleep_mode"] is True
    assert kw["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 12544}
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["max_num_seqs"] == 64
    assert "distributed_executor_backend" not in build_engine_kwargs("/ckpt", fam, colocate_ranks=1)
    q3 = ModelFamily.from_model_type("qwen3_vl", min_pixels=4096, max_pixels=16384)
    assert engine_mm_processor_kwargs(q3) == {"size": {"shortest_edge": 4096, "longest_edge": 16384}}


# --------------------------------------------------------------------------- pixel bounds
@pytest.mark.parametrize("family", list(TINY))
def test_pixel_bounds_match_passes(tiny_policy, family):
    policy = tiny_policy(TINY[family], min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 40)
    kw = engine_mm_processor_kwargs(policy.family)
    check_pixel_bounds(policy.family, kw)
    check_pixel_bounds(policy.processor, kw)
    check_pixel_bounds(policy.processor.image_processor, kw)


def test_pixel_bounds_read_from_size_dicts(tiny_model_dir):
    """transformers 5 keeps the bounds in ``size`` (a SizeDict after from_pretrained kwargs)."""
    from vlm_grpo_ma.models.processor import image_only_processor_class

    proc = image_only_processor_class("qwen2_5_vl").from_pretrained(tiny_model_dir("qwen2_5_vl"), min_pixels=4444,
                                                                     max_pixels=99999)
    check_pixel_bounds(proc, {"min_pixels": 4444, "max_pixels": 99999})
    check_pixel_bounds(proc, {"size": {"shortest_edge": 4444, "longest_edge": 99999}})
    with pytest.raises(PixelBoundsMismatch):
        check_pixel_bounds(proc, {"min_pixels": 4444, "max_pixels": 12544})


def test_pixel_bounds_mismatch_raises(tiny_policy):
    policy = tiny_policy("tiny-qwen2.5-vl")
    lo, hi = policy.family.min_pixels, policy.family.max_pixels
    with pytest.raises(PixelBoundsMismatch, match=rf"max_pixels: training {hi}, engine {hi * 4}"):
        check_pixel_bounds(policy.processor, {"min_pixels": lo, "max_pixels": hi * 4})
    with pytest.raises(PixelBoundsMismatch, match="min_pixels"):
        check_pixel_bounds(policy.family, {"size": {"shortest_edge": lo // 2, "longest_edge": hi}})
    with pytest.raises(PixelBoundsMismatch, match="not set"):
        check_pixel_bounds(policy.family, {})
    with pytest.raises(PixelBoundsMismatch, match="not set"):
        check_pixel_bounds(policy.family, None)


def test_prompt_expansion_check_with_two_real_processors(tiny_policy):
    """Two processors with other max_pixels expand the same image to other token counts: the
    runtime check raises; the same processor passes; a collapsed report is 'cannot tell'."""
    a = tiny_policy("tiny-qwen2.5-vl")
    b = tiny_policy("tiny-qwen2.5-vl", max_pixels=a.family.max_pixels // 4)
    msgs = _messages()[1:]
    ia = _prompts(dict(build_generation_inputs(a.processor, msgs)))[0]
    ib = _prompts(dict(build_generation_inputs(b.processor, msgs)))[0]
    pad = a.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ia.count(pad) != ib.count(pad)
    assert check_prompt_expansion(ia, ia, pad) is True
    assert check_prompt_expansion(ia, collapse_image_pads(ia, pad), pad) is False
    with pytest.raises(PixelBoundsMismatch, match=f"{ib.count(pad)} image tokens.*to {ia.count(pad)}"):
        check_prompt_expansion(ia, ib, pad, where="prompt 0: ")
    with pytest.raises(ValueError, match="differ"):
        check_prompt_expansion(ia, ia[:-1] + [ia[-1] + 1], pad)


# --------------------------------------------------------------------------- outputs
def test_finish_thought_and_answer():
    E = 99
    assert finish_thought([1, 2, E], [-1.0, -2.0, -3.0], E, 5) == ([1, 2, E], [-1.0, -2.0, -3.0], False)
    ids, lp, tr = finish_thought([1, 2, 3, 4, 5], [-1.0] * 5, E, 5)  # hit the limit: last token replaced
    assert ids == [1, 2, 3, 4, E] and tr and math.isnan(lp[-1]) and lp[:4] == [-1.0] * 4
    ids, lp, tr = finish_thought([1, 2], [-1.0, -2.0], E, 5, stopped=True)  # stop token left out
    assert ids == [1, 2, E] and not tr and math.isnan(lp[-1])
    ids, lp, tr = finish_thought([], [], E, 5)
    assert ids == [E] and tr
    with pytest.raises(ValueError, match="log-probs"):
        finish_thought([1], [], E, 5)
    assert finish_answer([4, 5, 7], [-1.0, -1.0, -0.5], (7, 8)) == ([4, 5, 7], [-1.0, -1.0, -0.5], False)
    assert finish_answer([4, 5], [-1.0, -1.0], (7, 8))[2] is True
    assert finish_answer([], [], (7,))[2] is True


def test_sampled_logprobs_forms():
    Lp = lambda x: SimpleNamespace(logprob=x)  # noqa: E731  (vLLM's Logprob has .logprob)
    assert sampled_logprobs([3, 4], [{3: Lp(-0.5), 9: Lp(-2.0)}, {4: Lp(-1.5)}]) == [-0.5, -1.5]
    assert sampled_logprobs([3], [{3: -0.25}]) == [-0.25]
    out = sampled_logprobs([3, 4], None)
    assert len(out) == 2 and all(math.isnan(x) for x in out)


# --------------------------------------------------------------------------- weight sync
def test_plan_buckets_by_hand():
    assert plan_buckets([4, 4, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert plan_buckets([8, 8], 8) == [[0], [1]]
    assert plan_buckets([1] * 5, 100) == [[0, 1, 2, 3, 4]]
    assert plan_buckets([], 8) == []
    with pytest.raises(ValueError):
        plan_buckets([1], 0)


def test_plan_units_groups_lora_layers():
    names = ["a.weight",
             "x.q.base_layer.weight", "x.q.base_layer.bias", "x.q.lora_A.default.weight", "x.q.lora_B.default.weight",
             "b.weight", "x.v.base_layer.weight", "x.v.lora_A.default.weight", "x.v.lora_B.default.weight"]
    units = plan_units(names)
    assert [u.params for u in units] == [(0,), (1, 2, 3, 4), (5,), (6, 7, 8)]
    assert [u.lora_module for u in units] == [None, "x.q", None, "x.v"]


@pytest.mark.parametrize("bucket_bytes", [1, 20_000, 10**9])
def test_sync_sends_every_parameter_once_in_order_within_bound(tiny_policy, bucket_bytes):
    model = tiny_policy("tiny-qwen2.5-vl").model
    named = list(model.named_parameters())
    rec = RecordingReceiver()
    stats = sync_weights(model, rec, bucket_bytes=bucket_bytes, family="qwen2_5_vl")
    assert rec.names == [n for n, _ in named]  # every parameter exactly once, stable order
    assert rec.events == ["load", "reset"]  # ONE stream (vLLM's reload must see every weight), then the reset
    buckets = list(iter_weight_buckets(model, bucket_bytes))  # how the stream is gathered
    for batch in buckets:
        nbytes = sum(t.numel() * t.element_size() for _, t in batch)
        assert nbytes <= bucket_bytes or len(batch) == 1
    if bucket_bytes == 1:
        assert len(buckets) == len(named)
    if bucket_bytes == 10**9:
        assert len(buckets) == 1
    for n, p in named:
        assert torch.equal(rec.tensor(n), p.detach())
    assert stats.tensors == len(named) and stats.buckets == len(buckets)
    assert stats.bytes == sum(param_nbytes(p) for _, p in named)


def test_sync_refuses_a_partial_update(tiny_policy):
    """A receiver that stops consuming the stream leaves the engine half-updated: an error."""
    model = tiny_policy("tiny-qwen2-vl").model

    class Stops(RecordingReceiver):
        def load_weights(self, weights):
            self.pairs.append(next(iter(weights)))

    rec = Stops()
    with pytest.raises(RuntimeError, match="stopped after"):
        sync_weights(model, rec, bucket_bytes=1)
    assert rec.events == []  # no prefix-cache reset after a partial update


def test_sync_of_a_deepspeed_like_wrapper(tiny_policy):
    model = tiny_policy("tiny-qwen2-vl").model

    class Engine(torch.nn.Module):  # what DeepSpeedEngine looks like to the sync: .module + stage
        def __init__(self, m):
            super().__init__()
            self.module = m

        def zero_optimization_stage(self):
            return 0

    rec = RecordingReceiver()
    sync_weights(Engine(model), rec, bucket_bytes=50_000)
    assert rec.names == [n for n, _ in model.named_parameters()]


def test_lora_merge_names_and_values(tiny_policy):
    from peft import LoraConfig, get_peft_model

    policy = tiny_policy("tiny-qwen2.5-vl")
    base_names = [n for n, _ in policy.model.named_parameters()]
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=r"^(?!.*visual).*\.(q_proj|v_proj)$", bias="none")
    model = get_peft_model(policy.model, lcfg)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.5)  # B is zero at init: make the adapter do something
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        out_before = model(input_ids=x).logits

    rec = RecordingReceiver()
    sync_weights(model, rec, bucket_bytes=30_000, family="qwen2_5_vl")

    assert rec.names == base_names  # same names and order as the plain model; no lora_* sent
    pre = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    W, A, B = before[pre + ".base_layer.weight"], before[pre + ".lora_A.default.weight"], before[pre + ".lora_B.default.weight"]
    expected = W + (8 / 4) * (B @ A)  # hand formula: W + (alpha / r) * B A
    got = rec.tensor("model.language_model.layers.0.self_attn.q_proj.weight")
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, W)
    # unmerged after: base weights bit for bit, adapters active, same outputs
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert not any(getattr(m, "merged", False) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, out_before)
    # the merged model = the PEFT model: load what was sent into a plain copy and compare
    plain = tiny_policy("tiny-qwen2.5-vl").model
    plain.load_state_dict(dict(rec.pairs), strict=True)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, out_before, atol=1e-5)


@pytest.mark.slow
def test_zero3_gathered_sync_in_one_process(tiny_model_dir, tmp_path):
    """Under DeepSpeed ZeRO-3 (CPU, one process, every parameter partitioned) the sync gathers
    bucket by bucket and sends the full tensors, equal to the checkpoint's; with a LoRA model the
    merged weights equal an unpartitioned copy's, and a second sync sends the same bits (the
    partitions were not changed by merge / unmerge)."""
    script = textwrap.dedent(f"""
        import json, os, sys, torch
        from vlm_grpo_ma.training import distributed as dist
        dist.init_distributed()
        import deepspeed
        from vlm_grpo_ma.models import load_policy
        from vlm_grpo_ma.rollout.vllm_weights import sync_weights, is_zero3_param, iter_weight_buckets
        ref = dict(load_policy({tiny_model_dir("qwen2_5_vl")!r}).model.named_parameters())
        cfg = {{"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1,
               "zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0}},
               "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-3, "torch_adam": True}}}}}}
        from transformers.integrations import HfDeepSpeedConfig
        keep = HfDeepSpeedConfig(cfg)
        model = load_policy({tiny_model_dir("qwen2_5_vl")!r}).model
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        assert all(is_zero3_param(p) and p.numel() == 0 for p in engine.module.parameters())
        class Rec:  # keeps REFERENCES (as vLLM's reload does for a layer that straddles two buckets)
            def __init__(self): self.pairs = []; self.resets = 0
            def load_weights(self, w): self.pairs.extend(w)
            def reset_prefix_cache(self): self.resets += 1
        rec = Rec()
        stats = sync_weights(engine, rec, bucket_bytes=40_000, family="qwen2_5_vl")
        names = [n for n, _ in rec.pairs]
        ok = names == list(ref) and rec.resets == 1 and stats.buckets > 1
        # still the checkpoint's values after every bucket was released: gathered tensors are sent as copies
        ok = ok and all(torch.equal(t, ref[n].detach()) for n, t in rec.pairs)
        ok = ok and all(sum(t.numel() * t.element_size() for _, t in b) <= 40_000 or len(b) == 1
                        for b in iter_weight_buckets(engine, 40_000))
        ok = ok and all(p.numel() == 0 for p in engine.module.parameters())  # released again
        # LoRA under ZeRO-3: merged weights equal those of an unpartitioned copy, twice (no drift)
        from peft import LoraConfig, get_peft_model
        def peft_model():
            torch.manual_seed(0)
            m = get_peft_model(load_policy({tiny_model_dir("qwen2_5_vl")!r}).model,
                               LoraConfig(r=4, lora_alpha=8, target_modules=r"^(?!.*visual).*\\.(q_proj|v_proj)$"))
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.ds_shape if hasattr(p, "ds_shape") else p.shape, generator=g))
            return m
        del keep
        plain = Rec(); sync_weights(peft_model(), plain, bucket_bytes=40_000)
        keep = HfDeepSpeedConfig(cfg)
        lora_engine, *_ = deepspeed.initialize(model=(pm := peft_model()),
                                               model_parameters=[p for p in pm.parameters() if p.requires_grad], config=cfg)
        z1, z2 = Rec(), Rec()
        sync_weights(lora_engine, z1, bucket_bytes=40_000, family="qwen2_5_vl")
        sync_weights(lora_engine, z2, bucket_bytes=40_000, family="qwen2_5_vl")
        flat = lambda r: r.pairs
        ok2 = [n for n, _ in flat(z1)] == [n for n, _ in flat(plain)] == list(ref)
        ok2 = ok2 and all(torch.allclose(a, b, atol=1e-6) for (_, a), (_, b) in zip(flat(z1), flat(plain)))
        ok2 = ok2 and all(torch.equal(a, b) for (_, a), (_, b) in zip(flat(z1), flat(z2)))
        ok2 = ok2 and not torch.allclose(dict(flat(z1))["model.language_model.layers.0.self_attn.q_proj.weight"],
                                         ref["model.language_model.layers.0.self_attn.q_proj.weight"].detach())
        print("RESULT", ok, ok2, stats.buckets, stats.tensors)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=str(tmp_path))
    assert "RESULT True True" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# --------------------------------------------------------------------------- TIS
def test_tis_weights_by_hand():
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0])
    roll = torch.tensor([-1.0, -1.0, -2.0, float("nan"), -1.2])
    w = tis_weights(old, roll, cap=2.0)
    # exp(0) = 1; exp(-1) = 0.367879; exp(1.5) = 4.48 -> capped at 2; NaN (not sampled) -> 1; exp(0.2) = 1.221403
    assert torch.allclose(w, torch.tensor([1.0, 0.367879, 2.0, 1.0, 1.221403]), atol=1e-6)
    assert not w.requires_grad
    g = tis_weights(old.clone().requires_grad_(), roll, cap=1.5)
    assert not g.requires_grad and float(g[2]) == pytest.approx(1.5)
    assert float(tis_weights(torch.tensor([1000.0]), torch.tensor([-1000.0]), cap=3.0)[0]) == pytest.approx(3.0)
    m = tis_metrics(w, cap=2.0)
    assert m["tis/capped"] == pytest.approx(0.2) and m["tis/mean"] == pytest.approx((1 + 0.367879 + 2 + 1 + 1.221403) / 5, abs=1e-6)
    assert tis_metrics(w, 2.0, mask=torch.tensor([1, 1, 0, 0, 0]))["tis/capped"] == 0.0
    with pytest.raises(ValueError):
        tis_weights(old, roll[:2])
    with pytest.raises(ValueError):
        tis_weights(old, roll, cap=0)


# --------------------------------------------------------------------------- without vLLM
def test_clear_import_error_without_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed")
    from vlm_grpo_ma.bench.backends import BackendUnavailable, load_backend
    from vlm_grpo_ma.rollout.vllm import VLLMBackend

    with pytest.raises(ImportError, match=r"pip install 'vlm-grpo-ma\[vllm\]'"):
        VLLMBackend("tiny-qwen2.5-vl")
    with pytest.raises(BackendUnavailable, match="vLLM"):
        load_backend("vllm", "tiny-qwen2.5-vl", min_pixels=None, max_pixels=None)
    assert "vlm-grpo-ma[vllm]" in INSTALL_HINT


# --------------------------------------------------------------------------- the backend against an engine double
class _FakeVLLM:
    """A stand-in for the ``vllm`` module (test double of the engine, NOT vLLM): ``LLM`` expands
    each image pad the way vLLM's Qwen-VL processor does (smart_resize with the engine's
    ``mm_processor_kwargs``) and answers from a script, so the backend's orchestration (requests,
    ordering, finishing, TreeRollout assembly, expansion check, sleep / wake, weight loading) is
    exercised end to end.  Script: completion j of a request ends at its stop token when j is
    even, and runs to ``max_tokens`` when j is odd."""

    class SamplingParams:
        def __init__(self, **kw):
            if kw["temperature"] == 0 and kw["n"] > 1:  # as vLLM's own validation
                raise ValueError("n must be 1 when using greedy sampling")
            self.__dict__.update(kw)

    class EngineArgs:  # no dataclass fields: every engine argument passes
        pass

    class LLM:
        def __init__(self, family, image_pad, **kw):
            self.kw, self.family, self.image_pad = kw, family, image_pad
            self.requests, self.loaded, self.events = [], [], []
            model = SimpleNamespace(load_weights=lambda weights: self.loaded.extend(n for n, _ in weights))
            worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(worker=worker)),
                                              model_config=SimpleNamespace(mm_processor_kwargs=kw["mm_processor_kwargs"]))

        def _expand(self, ids, images):
            from vlm_grpo_ma.rollout.vllm import pixel_bounds

            lo, hi = pixel_bounds(self.kw["mm_processor_kwargs"])
            fam = ModelFamily.from_model_type(self.family.name, patch_size=self.family.patch_size,
                                              merge_size=self.family.merge_size, min_pixels=lo, max_pixels=hi)
            out, i = [], 0
            for t in ids:
                if t == self.image_pad:
                    w, h = fam.resized_size(*images[i].size)
                    out += [t] * ((w // fam.factor) * (h // fam.factor))
                    i += 1
                else:
                    out.append(t)
            return out

        def generate(self, prompts, params, use_tqdm=False):
            Lp = lambda x: SimpleNamespace(logprob=x)  # noqa: E731
            outs = []
            for prompt, sp in zip(prompts, params):
                self.requests.append((prompt, sp))
                self.events.append("generate")
                comps = []
                for j in reversed(range(sp.n)):  # out of order on purpose: the backend sorts by index
                    stop = sp.stop_token_ids[0]
                    toks = [30 + j, stop] if j % 2 == 0 else [31] * sp.max_tokens
                    toks = toks[: sp.max_tokens]
                    comps.append(SimpleNamespace(
                        index=j, token_ids=tuple(toks), logprobs=[{t: Lp(-0.5 * (i + 1))} for i, t in enumerate(toks)],
                        finish_reason="stop" if toks[-1] == stop else "length",
                        stop_reason=stop if toks[-1] == stop else None))
                images = prompt.get("multi_modal_data", {}).get("image", [])
                outs.append(SimpleNamespace(prompt_token_ids=self._expand(prompt["prompt_token_ids"], images),
                                            outputs=comps, num_cached_tokens=3))
            return outs

        def reset_prefix_cache(self):
            self.events.append("reset")
            return True

        def sleep(self, level):
            self.events.append(f"sleep{level}")

        def wake_up(self, tags=None):
            self.events.append("wake:" + ",".join(tags or []))


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = SimpleNamespace(SamplingParams=_FakeVLLM.SamplingParams, EngineArgs=_FakeVLLM.EngineArgs, __version__="fake")
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the backend sets it; restored after the test
    return mod


def _fake_backend(fake_vllm, tiny_model_dir, family="qwen2_5_vl", engine_bounds=None, **kw):
    from vlm_grpo_ma.models import load_policy
    from vlm_grpo_ma.rollout.vllm import VLLMBackend

    policy = load_policy(tiny_model_dir(family))
    pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    made = {}

    def LLM(**engine_kw):
        if engine_bounds is not None:
            engine_kw["mm_processor_kwargs"] = engine_bounds
        made["llm"] = _FakeVLLM.LLM(policy.family, pad, **engine_kw)
        return made["llm"]

    fake_vllm.LLM = LLM
    return VLLMBackend(tiny_model_dir(family), **kw), policy


def test_backend_tree_against_engine_double(fake_vllm, tiny_model_dir, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    be, policy = _fake_backend(fake_vllm, tiny_model_dir, gpu_memory_utilization=0.25, enable_sleep_mode=True,
                               sleep_level=2)
    llm = be.llm
    assert llm.kw["enable_prefix_caching"] and llm.kw["enable_sleep_mode"] and llm.kw["gpu_memory_utilization"] == 0.25
    assert llm.kw["mm_processor_kwargs"] == {"min_pixels": policy.family.min_pixels, "max_pixels": policy.family.max_pixels}
    msgs = _messages()
    K, M = 3, 2
    sp = SamplingParams(temperature=1.0, max_thought_tokens=6, max_answer_tokens=4, seed=11)
    tree = be.generate_tree_from_messages(msgs, K, M, sp)
    inputs = dict(build_generation_inputs(policy.processor, msgs))
    E, stop = be.ids.think_end, be.ids.stop[0]
    assert (tree.B, tree.K, tree.M) == (2, K, M)
    for b, p in enumerate(_prompts(inputs)):
        assert tree.prompt_ids[b].tolist() == p
        assert torch.equal(tree.image_grid_thw[b], inputs["image_grid_thw"][b:b + 1])
        for k in range(K):
            th = tree.thought_ids[b][k].tolist()
            if k % 2 == 0:  # stopped at </think>
                assert th == [30 + k, E] and not tree.thought_truncated[b, k]
                assert tree.thought_logprobs[b][k].tolist() == [-0.5, -1.0]
            else:  # hit the limit: last token replaced by </think>, its log-prob unknown
                assert th == [31] * 5 + [E] and tree.thought_truncated[b, k]
                assert math.isnan(tree.thought_logprobs[b][k][-1]) and tree.thought_logprobs[b][k][0] == -0.5
            assert tree.thought_texts[b][k] == policy.tokenizer.decode(th, skip_special_tokens=False)
            for m in range(M):
                a = tree.answer_ids[b][k][m].tolist()
                assert a == ([30 + m, stop] if m % 2 == 0 else [31] * 4)
                assert bool(tree.answer_truncated[b, k, m]) == (m % 2 == 1)
                assert tree.answer_texts[b][k][m] == policy.tokenizer.decode(a[:-1] if m % 2 == 0 else a,
                                                                             skip_special_tokens=False)
    # what the engine was asked: stage 1 (n=K) per prompt, then stage 2 (n=M) per thought on prompt + thought
    reqs = llm.requests
    assert len(reqs) == 2 + 2 * K
    pad = be.image_pad
    for b in range(2):
        collapsed = collapse_image_pads(_prompts(inputs)[b], pad)
        assert reqs[b][0]["prompt_token_ids"] == collapsed and reqs[b][1].n == K
        for k in range(K):
            prompt, params = reqs[2 + b * K + k]
            assert prompt["prompt_token_ids"] == collapsed + tree.thought_ids[b][k].tolist()
            assert params.n == M and prompt["multi_modal_data"]["image"][0].size == msgs[b][0]["content"][0]["image"].size
    assert tree.stats["tokens_prefix_cached"] == 3 * len(reqs)
    assert tree.stats["tokens_generated"] == sum(len(t) for r in tree.thought_ids for t in r) + \
        sum(len(a) for r in tree.answer_ids for th in r for a in th)
    # sleep after the rollout; the sync wakes the weights, loads, resets; the next rollout wakes the KV cache
    assert llm.events[-1] == "sleep2"
    model = policy.model
    stats = be.sync_weights(model)
    assert llm.events[-3:] == ["sleep2", "wake:weights", "reset"]
    assert llm.loaded == [n for n, _ in model.named_parameters()] and stats.tensors == len(llm.loaded)
    texts = be.generate(msgs, n=2, sampling=SamplingParams(temperature=0.0), max_new_tokens=5)
    assert "wake:kv_cache" in llm.events
    assert [len(t) for t in texts] == [2, 2] and all(p.n == 1 for _, p in llm.requests[-4:])  # greedy: split


def test_backend_refuses_an_engine_with_other_pixel_bounds(fake_vllm, tiny_model_dir):
    """A pre-built engine reporting other bounds is refused at construction; the runtime
    expansion check catches an engine that resizes differently even if it reports nothing."""
    from vlm_grpo_ma.models import load_policy
    from vlm_grpo_ma.rollout.vllm import VLLMBackend

    policy = load_policy(tiny_model_dir("qwen2_5_vl"))
    pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    other = {"min_pixels": policy.family.min_pixels, "max_pixels": policy.family.max_pixels // 4}
    llm = _FakeVLLM.LLM(policy.family, pad, mm_processor_kwargs=other)
    with pytest.raises(PixelBoundsMismatch, match="max_pixels"):
        VLLMBackend(tiny_model_dir("qwen2_5_vl"), llm=llm)
    llm.llm_engine.model_config = SimpleNamespace()  # reports nothing: only the runtime check can tell
    be = VLLMBackend(tiny_model_dir("qwen2_5_vl"), llm=llm)
    with pytest.raises(PixelBoundsMismatch, match="image tokens"):
        be.generate_tree_from_messages(_messages()[1:], 2, 2, SamplingParams(max_thought_tokens=4, max_answer_tokens=3))


def test_bench_factory_against_engine_double(fake_vllm, tiny_model_dir):
    from vlm_grpo_ma.bench.suite import GenerationSpec
    from vlm_grpo_ma.models import load_policy
    from vlm_grpo_ma.bench.backends import load_backend

    policy = load_policy(tiny_model_dir("qwen3_vl"))
    pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    fake_vllm.LLM = lambda **kw: _FakeVLLM.LLM(policy.family, pad, **kw)
    bb = load_backend("vllm", tiny_model_dir("qwen3_vl"), min_pixels=None, max_pixels=None, device="cuda:0")
    assert bb.name == "vllm" and bb.family == policy.family
    assert bb.rollout.llm.kw["mm_processor_kwargs"] == {"size": {"shortest_edge": policy.family.min_pixels,
                                                                 "longest_edge": policy.family.max_pixels}}
    greedy = bb.complete([None, None], _messages(), GenerationSpec(max_new_tokens=6), seed=0)
    assert [len(x) for x in greedy] == [1, 1]
    tree = bb.complete([None, None], _messages(), GenerationSpec(do_sample=True, num_thoughts=2, num_answers=3,
                                                                  max_new_tokens=8), seed=0)
    assert [len(x) for x in tree] == [6, 6]
    assert all("</think>" in t for row in tree for t in row)


def test_engine_internals_are_found_along_each_vllm_versions_path():
    """No vLLM needed: the attribute paths the weight sync and the processor check walk, on fakes
    shaped like the V1 in-process engine, the V0 engine and an engine that exposes neither."""
    from types import SimpleNamespace as NS

    from vlm_grpo_ma.rollout.vllm_engine import _engine_mm_kwargs, _local_vllm_model

    model = NS(load_weights=lambda weights: None)
    v1 = NS(llm_engine=NS(model_executor=NS(driver_worker=NS(worker=NS(model_runner=NS(model=model))))),
            model_config=None)
    v0 = NS(llm_engine=NS(model_executor=NS(driver_worker=NS(model_runner=NS(get_model=lambda: model))),
                          model_config=NS(multimodal_config=NS(mm_processor_kwargs={"max_pixels": 256}))))
    remote = NS(llm_engine=NS(engine_core=NS()))
    assert _local_vllm_model(v1) is model and _local_vllm_model(v0) is model
    assert _local_vllm_model(remote) is None
    assert _engine_mm_kwargs(v0) == {"max_pixels": 256}
    assert _engine_mm_kwargs(v1) is None and _engine_mm_kwargs(remote) is None


class _Platform:
    def __init__(self, cpu: bool, sleep: bool):
        self.cpu, self.sleep, self.device_name = cpu, sleep, "cpu" if cpu else "cuda"

    def is_cpu(self):
        return self.cpu

    def is_sleep_mode_available(self):
        return self.sleep


@pytest.mark.parametrize("cpu", [True, False])
def test_platform_defaults_sleep_mode_and_kv_cache(fake_vllm, tiny_model_dir, monkeypatch, caplog, cpu):
    """Where vLLM has no sleep mode (its CPU platform) the backend turns it off and says so; on the
    CPU platform the KV cache gets a fixed size in host RAM (gpu_memory_utilization would be a share
    of host RAM minus what the trainer already holds); on a GPU platform neither changes."""
    from vlm_grpo_ma.rollout.vllm import DEFAULT_CPU_KV_CACHE_BYTES

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    fake_vllm.platforms = SimpleNamespace(current_platform=_Platform(cpu=cpu, sleep=not cpu))
    with caplog.at_level("INFO", logger="vlm_grpo_ma.rollout.vllm"):
        be, _ = _fake_backend(fake_vllm, tiny_model_dir, enable_sleep_mode=True)
    kw = be.llm.kw
    assert kw["enable_sleep_mode"] is (not cpu) and be.enable_sleep_mode is (not cpu)
    assert kw.get("kv_cache_memory_bytes") == (DEFAULT_CPU_KV_CACHE_BYTES if cpu else None)
    assert ("no sleep mode" in caplog.text) is cpu
    # vLLM 0.32's CPU platform cannot rewind a request's own generator (a chunked prefill then
    # crashes): no per-request seeds there, and seeds on GPU platforms
    be.generate_tree_from_messages(_messages(), 2, 2, SamplingParams(temperature=1.0, max_thought_tokens=6,
                                                                      max_answer_tokens=4, seed=3))
    seeds = [getattr(params, "seed", None) for _, params in be.llm.requests]
    assert seeds and all((s is None) is cpu for s in seeds)
    # an explicit size wins on every platform
    be, _ = _fake_backend(fake_vllm, tiny_model_dir, kv_cache_bytes=123 << 20)
    assert be.llm.kw["kv_cache_memory_bytes"] == 123 << 20
