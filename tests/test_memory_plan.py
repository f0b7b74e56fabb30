"""The memory plan against what the tiny model really holds.

- parameter counts from the meta-device instance equal the loaded model's, and Qwen2.5-VL-3B's
  published total (3,754,622,976);
- model states: the engine's own tensors after a step (ZeRO-3, fp32, 1 rank) are exactly the
  plan's 20 bytes per parameter;
- KV cache: the cache of a real forward has the plan's size;
- activations: the bytes autograd saves in an SFT forward are within a factor 1.5 of the plan's
  per-token count;
- an RL stage (slow): the peak resident set of one rollout + update on a widened tiny model
  (40M parameters, ZeRO-3, fp32, 1 rank) is within a factor 1.5 of the plan's peak;
- a run that cannot fit is refused before anything is loaded, naming the largest parts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_grpo_ma.training import distributed as dist

dist.prepare_environment()

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    dist.init_distributed()
    yield


def _cfg(tmp_path, *extra):
    from vlm_grpo_ma.training.cli import parse_train_config

    return parse_train_config(["--task", "affordance", "--deepspeed", "configs/deepspeed/zero3.json", "--output_dir", str(tmp_path), "--report_to", "none", *extra])


def _shape(model: str = "tiny-qwen2.5-vl", **kw):
    from vlm_grpo_ma.training.memory_plan import model_config, shape_from_config

    return shape_from_config(model_config(model), **kw)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_parameter_counts_match_the_loaded_model(tiny_policy, family):
    shape = _shape(family)
    model = tiny_policy(family).model
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    frozen = _shape(family, freeze_vision=True)
    assert frozen.trainable_params == sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    lora = _shape(family, lora_r=4, lora_target_modules="q_proj,v_proj")
    layer = model.model.language_model.layers[0].self_attn
    per_layer = 4 * (layer.q_proj.in_features + layer.q_proj.out_features + layer.v_proj.in_features
                     + layer.v_proj.out_features)
    assert lora.trainable_params == per_layer * len(model.model.language_model.layers)


def test_qwen2_5_vl_3b_count_is_the_published_one():
    from vlm_grpo_ma.training.memory_plan import QWEN25_VL, shape_from_config

    assert shape_from_config(QWEN25_VL["3B"]()).total_params == 3_754_622_976


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_model_states_are_the_engines_tensors(tmp_path):
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.memory_plan import plan_memory, setting_from_config
    from vlm_grpo_ma.training.engine import resolve_ds_config

    cfg = _cfg(tmp_path, "--sft_batch_size", "2")
    st = stg.build_stage(cfg, "sft", cfg.model.model, global_batch=2, micro=2, lr=1e-3, warmup=0, total_optimizer_steps=2)
    try:
        eng = st.engine
        ids = torch.tensor([[1, 2, 3, 4]])
        eng.backward(eng(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().pow(2).mean())
        eng.step()
        opt = eng.optimizer
        params = _storage_bytes(p.ds_tensor for p in eng.module.parameters())
        grads = _storage_bytes([opt.grad_partitions_flat_buffer])
        optim = _storage_bytes(list(opt.fp32_partitioned_groups_flat)
                               + [v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1])
        ds = resolve_ds_config(cfg.run.deepspeed, micro_batch_size=2, grad_accum_steps=1, bf16=False, max_grad_norm=1.0,
                               lr=1e-3, weight_decay=0.0)
        plan = plan_memory(_shape(), setting_from_config(cfg, ds, 1))
        comp = plan.components["sft_step"]
        assert (comp["params"], comp["grads"], comp["optimizer"]) == (params, grads, optim)
    finally:
        stg.release(st)


def test_kv_cache_is_the_plans(tiny_policy):
    from vlm_grpo_ma.training.memory_plan import kv_bytes_per_token

    for family in ("qwen2_5_vl", "qwen3_vl"):
        model = tiny_policy(family).model
        ids = torch.randint(0, 100, (3, 11))
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        assert sum(t.numel() * t.element_size() for t in tensors) == 3 * 11 * kv_bytes_per_token(_shape(family), 4)


def test_saved_activations_of_an_sft_forward_are_within_1_5x(tiny_policy, tmp_path):
    from vlm_grpo_ma.data.collate import build_sft_batch
    from vlm_grpo_ma.task import get_task
    from vlm_grpo_ma.training.memory_plan import activation_bytes, image_tokens
    from vlm_grpo_ma.training.sft import assistant_token_nll

    pol = tiny_policy("qwen2_5_vl")
    task = get_task("affordance")
    samples = task.synthetic(4, seed=3)
    batch = build_sft_batch(pol.processor, [task.messages(s, pol.family) for s in samples],
                            [task.sft_target(s, pol.family) for s in samples], 1024)
    params = {p.untyped_storage().data_ptr() for p in pol.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        assistant_token_nll(pol.model, batch)
    measured = sum(saved.values())
    shape = _shape("qwen2_5_vl")
    tokens = int(batch.model_inputs()["attention_mask"].numel())
    scored = int((batch.labels[:, 1:] != -100).sum())
    patches = int(batch.model_inputs()["pixel_values"].shape[0])
    est = activation_bytes(shape, tokens=tokens, scored=scored, patches=patches, elem=4, checkpointing=False)
    ratio = sum(est.values()) / measured
    print(f"saved activations: plan {sum(est.values())} B, measured {measured} B, ratio {ratio:.2f}")
    assert 1 / 1.5 <= ratio <= 1.5, (est, measured, ratio)


def test_a_run_that_cannot_fit_is_refused_naming_the_biggest_parts(tmp_path):
    from vlm_grpo_ma.training.cli import main
    from vlm_grpo_ma.training.memory_plan import DoesNotFit

    with pytest.raises(DoesNotFit, match=r"does not fit: .* needs about .* GiB per rank, and there are 0.0 GiB \(--memory_capacity_gb; largest parts: "):
        main(["--task", "affordance", "--deepspeed", "configs/deepspeed/zero3.json", "--output_dir", str(tmp_path), "--report_to", "none",
              "--memory_capacity_gb", "0.001"])
    assert not (tmp_path / "sft").exists()  # refused before any stage started


_MEASURE = r"""
# One RL stage of the trainer (build, one rollout + update) in a fresh process; prints the resident
# set before it and its peak during the steps (VmHWM, reset through /proc/self/clear_refs once the
# stage is built, so that loading transients are not charged to the steps). glibc serves every
# allocation over 1 MiB with mmap (MALLOC_MMAP_THRESHOLD_ in the environment), so freed tensors
# leave the resident set and it follows torch's live tensors (benchmarks/logprob_memory.py).
import json, sys
from vlm_grpo_ma.training import distributed as dist
dist.init_distributed()
from vlm_grpo_ma.task import get_task
from vlm_grpo_ma.training import stage as stg
from vlm_grpo_ma.training.cli import parse_train_config
from vlm_grpo_ma.training.metrics import MetricsLogger
from vlm_grpo_ma.training.rl import RLState, run_rl


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


cfg = parse_train_config(sys.argv[1:])
task = get_task("affordance")
base = status("VmRSS:")
st = stg.build_stage(cfg, "rl", cfg.model.model, global_batch=cfg.rl.prompts_per_step, micro=0, lr=1e-5, warmup=0,
                     total_optimizer_steps=cfg.rl.rl_steps)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
built = status("VmRSS:")
run_rl(st, cfg, task, MetricsLogger(cfg.run.output_dir, "none", cfg.flat()), RLState(task), 0, None)
print(json.dumps({"baseline": base, "built": built, "peak": status("VmHWM:")}))
"""


def _widened_tiny(out: Path) -> Path:
    """The tiny Qwen2.5-VL with a 40M-parameter language model (so that the model's memory, not the
    Python process, dominates the RSS)."""
    import shutil

    import transformers
    from transformers import AutoConfig

    from vlm_grpo_ma.models import ensure_tiny

    src = ensure_tiny("tiny-qwen2.5-vl")
    cfg = AutoConfig.from_pretrained(src)
    t = cfg.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers = 1024, 2048, 4
    t.num_attention_heads, t.num_key_value_heads = 8, 4
    t.layer_types = ["full_attention"] * 4
    t.rope_parameters["mrope_section"] = [16, 24, 24]
    cfg.vision_config.out_hidden_size = 1024
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja") and f.name not in ("config.json", "model.safetensors"):
            if not (out / f.name).exists():
                shutil.copy(f, out / f.name)
    return out


@pytest.mark.slow
def test_rl_stage_peak_rss_is_within_1_5x_of_the_plan(tmp_path):
    model = _widened_tiny(tmp_path / "wide")
    args = ["--task", "affordance", "--deepspeed", "configs/deepspeed/zero3.json", "--model", str(model), "--output_dir", str(tmp_path / "run"), "--report_to", "none",
            "--stage", "rl", "--rl_steps", "1", "--prompts_per_step", "2", "--num_thoughts", "2",
            "--answers_per_thought", "2", "--max_thought_tokens", "16", "--max_answer_tokens", "8", "--eval_samples", "0"]
    (tmp_path / "run").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_=str(2**20))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-c", _MEASURE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    measured = m["peak"] - m["baseline"]

    from vlm_grpo_ma.training.cli import parse_train_config
    from vlm_grpo_ma.training.engine import resolve_ds_config
    from vlm_grpo_ma.training.memory_plan import plan_memory, setting_from_config, shape_from_config, model_config

    cfg = parse_train_config(args)
    ds = resolve_ds_config(cfg.run.deepspeed, micro_batch_size=1, grad_accum_steps=1, bf16=False, max_grad_norm=1.0,
                           lr=1.0, weight_decay=0.0)
    plan = plan_memory(shape_from_config(model_config(str(model))), setting_from_config(cfg, ds, 1))
    ratio = plan.peak / measured
    print(f"plan {plan.peak / 2**20:.0f} MiB ({plan.peak_phase}), measured peak RSS growth {measured / 2**20:.0f} MiB "
          f"(after building {(m['built'] - m['baseline']) / 2**20:.0f} MiB), ratio {ratio:.2f}")
    assert 1 / 1.5 <= ratio <= 1.5, (plan.format(), measured)


def test_plan_arithmetic_by_hand():
    from vlm_grpo_ma.training.memory_plan import ModelShape, Setting, plan_memory

    shape = ModelShape(total_params=1000, trainable_params=600, largest_layer_params=100, layers=2, hidden=8,
                       intermediate=16, kv_dim=4, vocab=50, vision_depth=1, vision_hidden=8, vision_intermediate=8,
                       vision_trainable=False, patch=14, merge=2)
    base = dict(world_size=4, bf16=True, prefetch_bucket=0, reduce_bucket=10, prompts_per_step=8, num_thoughts=2,
                answers_per_thought=3, max_thought_tokens=5, max_answer_tokens=2, image_pixels=14 * 14 * 4,
                text_prompt_tokens=9, run_sft=False)
    z3 = plan_memory(shape, Setting(zero_stage=3, layout="packed", **base)).components
    # bf16: weights 2 B / 4 ranks; grads 2 B x 600 / 4; optimizer (4 + 8 + 4) B x 600 / 4
    assert (z3["rl_step"]["params"], z3["rl_step"]["grads"], z3["rl_step"]["optimizer"]) == (500, 300, 2400)
    assert z3["rl_step"]["gathered_layer"] == 4 * 100 and z3["rl_step"]["grad_bucket"] == 20
    # rollout: 2 local prompts, prompt = 1 image token + 9 = 10; KV per token 2 x 2 layers x 4 x 2 B = 32
    assert z3["rollout"]["kv_cache"] == 2 * 2 * (10 + 5) * 32 + 2 * 2 * 3 * (10 + 5 + 2) * 32
    assert z3["rollout"]["gathered_model"] == 2000
    # packed RL step, micro = 2 local prompts: 4 rows of 10 + 5 + 3 x 2 tokens, 4 x (5 + 6) scored
    per_layer = 2 * (13 * 8 + 2 * 4 + 4 * 16)
    assert z3["rl_step"]["activations"] == 4 * 21 * 2 * per_layer
    assert z3["rl_step"]["lm_head"] == 4 * 11 * 50 * (2 + 4)
    assert z3["rl_step"]["attention_mask"] == 4 * 21 * 21 * (1 + 2)  # bool mask + its bf16 additive copy
    # tree RL step (the default): 2 rows (one per prompt) of 10 + 2 x (5 + 3 x 2) = 32 tokens
    tree = plan_memory(shape, Setting(zero_stage=3, **base)).components["rl_step"]
    assert tree["activations"] == 2 * 32 * 2 * per_layer and tree["lm_head"] == z3["rl_step"]["lm_head"]
    assert tree["attention_mask"] == 2 * 32 * 32 * 3
    z2 = plan_memory(shape, Setting(zero_stage=2, **base)).components["rl_step"]
    assert (z2["params"], z2["grads"], z2["optimizer"]) == (2000, 300, 2400)
    off = plan_memory(shape, Setting(zero_stage=3, offload_optimizer=True, offload_params=True, **base))
    assert off.components["rl_step"]["optimizer"] == off.components["rl_step"]["params"] == 0
    assert off.host == {"optimizer states": 2400, "parameters": 500}
