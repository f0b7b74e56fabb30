"""The memory plan: will a run fit, per rank, before anything is loaded?

From the model's config (parameter counts from a meta-device instance: exact, no weights read),
the DeepSpeed config (ZeRO stage, offload), LoRA / frozen vision, the number of ranks, the K x M
rollout with its token limits and the micro-batches, per rank:

- model states: parameters, gradients, optimizer states (fp32 master copy + Adam moments), split
  by ZeRO stage and offload.  DeepSpeed's own estimator for the same setting
  (``estimate_zero3_model_states_mem_needs`` / ``estimate_zero2_model_states_mem_needs``) is
  printed beside ours: it assumes full fine-tuning in 16-bit, so it is the reference where that
  holds and ours covers LoRA, frozen towers and fp32;
- rollout: the whole model gathered for generation (ZeRO-3, ``engine.gathered_parameters``), the
  KV cache of the K thoughts and of the K x M answers, the sampling logits;
- training: the saved activations of one micro-batch in the chosen layout (tree: one sequence of
  prompt + K thoughts + K x M answers per prompt, its images once; packed: K sequences of
  prompt + thought + M answers per prompt; naive: K x M sequences), with or without gradient
  checkpointing, the LM head's logits of the scored tokens, and the ZeRO-3 gathered layers;
- peak = max(rollout, SFT step, RL step) + a fixed allowance on GPUs (CUDA context and allocator
  fragmentation: 1.5 GiB + 10 %).

Activation bytes per token and decoder layer are counted from the tensors transformers' Qwen2-VL
decoder layer saves for its backward, the method of Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models" (2022), section 4.1: two RMSNorms (input, normalised
and scaled copies: 3h each), q/k/v and their rotary halves, the key and value repeated to all
heads for SDPA and the attention output (7h + 2kv), the SwiGLU MLP's gate, up, activation and
product (4I): 13h + 2kv + 4I elements (fused SDPA keeps no T x T scores); a vision block likewise
15 h_v + 4 I_v.  All figures are estimates: ``tests/test_memory_plan.py`` checks them against
what the tiny model really holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GiB = 1024**3
#: text tokens of a prompt besides its image (system prompt, instruction, chat markup)
TEXT_PROMPT_TOKENS = 160


@dataclass
class ModelShape:
    """What the plan needs to know about a model (all counts exact, from its config)."""

    total_params: int
    trainable_params: int
    largest_layer_params: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # num_key_value_heads * head_dim
    vocab: int
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_trainable: bool
    patch: int  # vision patch side in pixels
    merge: int  # spatial merge (2: 4 patches per image token)


def _lora_params(model, targets: list[str], r: int) -> int:
    import torch

    n = 0
    for name, mod in model.named_modules():
        if "visual" in name or not isinstance(mod, torch.nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] in targets:
            n += r * (mod.in_features + mod.out_features)
    return n


def shape_from_config(config, *, lora_r: int = 0, lora_target_modules: str = "", freeze_vision: bool = False) -> ModelShape:
    """:class:`ModelShape` of a transformers Qwen-VL config, counted on a meta-device instance."""
    import torch
    import transformers

    from vlm_grpo_ma.models import MODEL_CLASSES

    from transformers.integrations import deepspeed as hf_ds

    cls = getattr(transformers, MODEL_CLASSES[config.model_type])
    live = hf_ds._hf_deepspeed_config_weak_ref  # a ZeRO-3 engine alive in this process would make
    hf_ds._hf_deepspeed_config_weak_ref = None  # transformers partition this meta model: not here
    try:
        with torch.device("meta"):
            model = cls(config)
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = live
    params = {id(p): p for p in model.parameters()}  # tied weights once
    total = sum(p.numel() for p in params.values())
    vision = {id(p) for n, p in model.named_parameters() if "visual" in n}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    if lora_r > 0:
        targets = [t.strip() for t in lora_target_modules.split(",") if t.strip()]
        lora = _lora_params(model, targets, lora_r)
        trainable, total = lora, total + lora
    else:
        trainable = total - (sum(params[i].numel() for i in vision if i in params) if freeze_vision else 0)
    t, v = config.text_config, config.vision_config
    v_hidden = getattr(v, "embed_dim", None) or v.hidden_size  # Qwen2-VL names its width embed_dim
    v_mlp = getattr(v, "intermediate_size", None) or int(v_hidden * v.mlp_ratio)
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return ModelShape(
        total_params=total, trainable_params=trainable, largest_layer_params=largest,
        layers=t.num_hidden_layers, hidden=t.hidden_size, intermediate=t.intermediate_size,
        kv_dim=t.num_key_value_heads * head_dim, vocab=t.vocab_size,
        vision_depth=getattr(v, "depth", None) or v.num_hidden_layers,
        vision_hidden=v_hidden, vision_intermediate=v_mlp,
        vision_trainable=not freeze_vision and lora_r == 0, patch=v.patch_size, merge=v.spatial_merge_size,
    )


@dataclass
class Setting:
    """The run's choices that decide memory (what :func:`setting_from_config` reads)."""

    world_size: int = 1
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = True
    gradient_checkpointing: bool = False
    prefetch_bucket: int = 50_000_000  # stage3_prefetch_bucket_size (elements)
    reduce_bucket: int = 50_000_000  # reduce_bucket_size (elements): the gradient bucket of ZeRO-2/3
    # RL
    prompts_per_step: int = 8  # global
    rl_micro_batch: int = 0  # prompts per training forward on one rank (0: all local prompts)
    num_thoughts: int = 4
    answers_per_thought: int = 4
    max_thought_tokens: int = 48
    max_answer_tokens: int = 32
    layout: str = "tree"
    kl_reference: bool = False
    # SFT
    sft_micro_batch: int = 1
    max_length: int = 1024
    # prompts
    image_pixels: int = 448 * 448  # max_pixels: the largest image area after resize
    text_prompt_tokens: int = TEXT_PROMPT_TOKENS
    run_sft: bool = True
    run_rl: bool = True


@dataclass
class Plan:
    """Per-rank bytes by phase and component; ``peak`` is the largest phase plus the allowance."""

    components: dict[str, dict[str, float]] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    deepspeed_estimate: dict[str, float] = field(default_factory=dict)
    allowance: float = 0.0
    capacity: float | None = None
    device: str = "GPU"
    notes: list[str] = field(default_factory=list)

    def phase_total(self, phase: str) -> float:
        return sum(self.components[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.components, key=self.phase_total)

    @property
    def peak(self) -> float:
        return self.phase_total(self.peak_phase) + self.allowance

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.peak <= self.capacity

    def format(self) -> str:
        def g(x: float) -> str:
            return f"{x / GiB:8.2f} GiB"

        lines = ["memory plan per rank (estimates; docs/MEMORY.md says what each line counts):"]
        for phase, comps in self.components.items():
            lines.append(f"  {phase:<9}{g(self.phase_total(phase))}   "
                         + ", ".join(f"{k} {v / GiB:.2f}" for k, v in comps.items() if v))
        if self.allowance:
            lines.append(f"  allowance{g(self.allowance)}   (CUDA context + allocator fragmentation)")
        lines.append(f"  peak     {g(self.peak)}   ({self.peak_phase})"
                     + (f" of {self.capacity / GiB:.2f} GiB ({self.device})" if self.capacity else ""))
        if any(self.host.values()):
            lines.append("  host RAM " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in self.host.items() if v))
        if self.deepspeed_estimate:
            lines.append("  DeepSpeed's model-state estimator (full fine-tuning, 16-bit): "
                         + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in self.deepspeed_estimate.items()))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def image_tokens(shape: ModelShape, pixels: int) -> tuple[int, int]:
    """(vision patches, LM image tokens) of an image of ``pixels`` area after resize."""
    patches = max(1, pixels // (shape.patch * shape.patch))
    return patches, max(1, patches // (shape.merge * shape.merge))


def kv_bytes_per_token(shape: ModelShape, elem: int) -> int:
    """Bytes of the KV cache per token of one sequence: keys and values of every layer."""
    return 2 * shape.layers * shape.kv_dim * elem


def activation_bytes(shape: ModelShape, *, tokens: int, scored: int, patches: int, elem: int,
                     checkpointing: bool) -> dict[str, float]:
    """Bytes autograd keeps for the backward of one training forward: ``tokens`` through the
    language model, ``scored`` of them through the LM head, ``patches`` vision patches (counted
    only when the vision tower trains).

    Per token and decoder layer 13h + 2kv + 4I elements (see the module docstring); with gradient
    checkpointing the layer inputs (h per layer) and one layer's recomputed activations."""
    e = elem
    per_layer = e * (13 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate)
    if checkpointing:
        lm = tokens * (shape.layers * e * shape.hidden + per_layer)
    else:
        lm = tokens * shape.layers * per_layer
    vis = 0.0
    if shape.vision_trainable:
        v_layer = e * (15 * shape.vision_hidden + 4 * shape.vision_intermediate)
        if checkpointing:
            vis = patches * (shape.vision_depth * e * shape.vision_hidden + v_layer)
        else:
            vis = patches * shape.vision_depth * v_layer
    head = scored * shape.vocab * (e + 4)  # the logits and their fp32 log-softmax
    return {"activations": float(lm + vis), "lm_head": float(head)}


def plan_memory(shape: ModelShape, s: Setting) -> Plan:
    """Per-rank memory of the run ``s`` with the model ``shape``.  Pure arithmetic."""
    n = max(1, s.world_size)
    e = 2 if s.bf16 else 4  # bytes of a weight / activation element
    P, Pt = shape.total_params, shape.trainable_params
    plan = Plan()

    # --- model states ------------------------------------------------------------------------
    # 16-bit (or fp32) weights, gradients of the trainable ones, then the optimizer side: the fp32
    # master copy (4), Adam's two moments (8) and, in 16-bit training, fp32 gradients (4)
    # (DeepSpeed's accounting, deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_...).
    opt_per_param = 4 + 8 + (4 if s.bf16 else 0)
    params = P * e / (n if s.zero_stage >= 3 else 1)
    grads = Pt * e / (n if s.zero_stage >= 2 else 1)
    optim = Pt * opt_per_param / (n if s.zero_stage >= 1 else 1)
    if s.offload_optimizer:
        plan.host["optimizer states"], optim = optim, 0.0
    if s.offload_params and s.zero_stage >= 3:
        plan.host["parameters"], params = params, 0.0
    states = {"params": params, "grads": grads, "optimizer": optim}
    ref = P * e / (n if s.zero_stage >= 3 else 1) if s.kl_reference else 0.0
    if ref:
        states["reference"] = ref
    gathered_layer = (4 * shape.largest_layer_params + s.prefetch_bucket * e) if s.zero_stage >= 3 else 0.0
    grad_bucket = s.reduce_bucket * e if s.zero_stage >= 2 else 0.0  # gradients gathered before reduce-scatter

    # --- prompt lengths -------------------------------------------------------------------------
    patches, img_tok = image_tokens(shape, s.image_pixels)
    prompt = img_tok + s.text_prompt_tokens
    K, M, T, A = s.num_thoughts, s.answers_per_thought, s.max_thought_tokens, s.max_answer_tokens

    def act_bytes(tokens: int, scored: int, images: int) -> dict[str, float]:
        return activation_bytes(shape, tokens=tokens, scored=scored, patches=images * patches, elem=e,
                                checkpointing=s.gradient_checkpointing)

    if s.run_rl:
        local = max(1, s.prompts_per_step // n)
        # rollout: the K thoughts' cache, then the K*M answers' cache over prompt + thought + answer
        kv_tok = kv_bytes_per_token(shape, e)
        # (the hf backend prefills each prompt once and repeats its cache: K*M rows at the end,
        # the K-row cache alive while it is repeated)
        kv = local * K * (prompt + T) * kv_tok + local * K * M * (prompt + T + A) * kv_tok
        # ZeRO-3 generation on gathered parameters: the full model is materialised beside the
        # rank's partition (also on 1 rank)
        gathered = P * e if s.zero_stage >= 3 else 0.0
        # the prefill (once per prompt, no autograd): one layer's transient tensors at a time
        prefill = max(local * patches * e * (4 * shape.vision_hidden + 3 * shape.vision_intermediate),
                      local * prompt * e * (4 * shape.hidden + 3 * shape.intermediate))
        plan.components["rollout"] = dict(states, gathered_model=gathered, kv_cache=kv,
                                          sampling=local * K * M * shape.vocab * 4 * 2, prefill=prefill)
        micro = s.rl_micro_batch or local
        if s.layout == "tree":  # one row per prompt: its images once
            seqs, length, scored, images = micro, prompt + K * (T + M * A), micro * K * (T + M * A), micro
        elif s.layout == "packed":
            seqs, length, scored = micro * K, prompt + T + M * A, micro * K * (T + M * A)
            images = seqs
        else:
            seqs, length, scored = micro * K * M, prompt + T + A, micro * K * M * (T + A)
            images = seqs
        # tree / packed: the boolean 4D mask and the additive mask SDPA makes of it ([rows, 1, L, L])
        mask = seqs * length * length * (1 + e) if s.layout in ("tree", "packed") else 0
        plan.components["rl_step"] = dict(states, gathered_layer=gathered_layer, grad_bucket=grad_bucket,
                                          attention_mask=float(mask), **act_bytes(seqs * length, scored, images))
    if s.run_sft:
        sft_states = {k: v for k, v in states.items() if k != "reference"}
        # an SFT sample is the prompt and its reference thought + answer (max_length caps it);
        # the LM head runs on the target tokens only (sft.assistant_token_nll)
        target = min(T + A, s.max_length)
        length = min(prompt + T + A, s.max_length)
        plan.components["sft_step"] = dict(sft_states, gathered_layer=gathered_layer, grad_bucket=grad_bucket,
                                           **act_bytes(s.sft_micro_batch * length, s.sft_micro_batch * target,
                                                       s.sft_micro_batch))
    return plan


def deepspeed_estimate(shape: ModelShape, s: Setting, gpus_per_node: int = 1) -> dict[str, float]:
    """DeepSpeed's own model-state estimate for this setting (full fine-tuning, 16-bit)."""
    n = max(1, s.world_size)
    nodes = max(1, n // max(1, gpus_per_node))
    per_node = n // nodes
    if s.zero_stage >= 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.total_params, shape.largest_layer_params, num_gpus_per_node=per_node, num_nodes=nodes,
            cpu_offload=s.offload_optimizer, cpu_offload_params=s.offload_params, zero_init=True)
    elif s.zero_stage >= 1:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(shape.total_params, num_gpus_per_node=per_node,
                                                         num_nodes=nodes, cpu_offload=s.offload_optimizer)
    else:
        return {}
    return {"per GPU": float(gpu), "host per node": float(cpu)}


# ---------------------------------------------------------------------------------------------
# The released Qwen2.5-VL models, for the docs table (their config.json on the Hugging Face hub:
# Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct)


def _qwen25_vl(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int, tied: bool):
    def make():
        from transformers import Qwen2_5_VLConfig

        text = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab, tie_word_embeddings=tied)
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=hidden,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)

    return make


QWEN25_VL = {
    "3B": _qwen25_vl(2048, 36, 16, 2, 11008, 151936, True),
    "7B": _qwen25_vl(3584, 28, 28, 4, 18944, 152064, False),
}


# ---------------------------------------------------------------------------------------------
# From a run's config, and the check before launch


def model_config(model: str):
    """The transformers config of a local folder, a tiny-model name, or a cached hub id."""
    from transformers import AutoConfig

    from vlm_grpo_ma.models import ensure_tiny, resolve_tiny_name

    if resolve_tiny_name(model) is not None:
        model = str(ensure_tiny(model))
    return AutoConfig.from_pretrained(model)


def checkpoint_max_pixels(model: str) -> int | None:
    """The processor's largest image area saved with a local checkpoint (``size.longest_edge``
    or ``max_pixels`` of its image processor), None when there is none to read."""
    import json
    from pathlib import Path

    from vlm_grpo_ma.models import ensure_tiny, resolve_tiny_name

    folder = Path(str(ensure_tiny(model)) if resolve_tiny_name(model) is not None else model)
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = folder / name
        if f.is_file():
            d = json.loads(f.read_text())
            d = d.get("image_processor", d)
            px = (d.get("size") or {}).get("longest_edge") or d.get("max_pixels")
            if px:
                return int(px)
    return None


def setting_from_config(cfg, ds_config: dict, world_size: int) -> Setting:
    """:class:`Setting` of a TrainConfig and its resolved DeepSpeed config."""
    zero = ds_config.get("zero_optimization", {})
    off_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    off_par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    local_sft = max(1, cfg.sft.sft_batch_size // world_size)
    return Setting(
        world_size=world_size, zero_stage=int(zero.get("stage", 0)), offload_optimizer=off_opt, offload_params=off_par,
        bf16=bool(ds_config.get("bf16", {}).get("enabled", False)), gradient_checkpointing=cfg.model.gradient_checkpointing,
        prefetch_bucket=int(float(zero.get("stage3_prefetch_bucket_size", 5e7))) if zero.get("stage", 0) == 3 else 0,
        reduce_bucket=int(float(zero.get("reduce_bucket_size", 5e8))),  # DeepSpeed's default 5e8
        prompts_per_step=cfg.rl.prompts_per_step, rl_micro_batch=cfg.rl.rl_micro_batch_size,
        num_thoughts=cfg.rl.num_thoughts, answers_per_thought=cfg.rl.answers_per_thought,
        max_thought_tokens=cfg.rl.max_thought_tokens, max_answer_tokens=cfg.rl.max_answer_tokens,
        layout=cfg.rl.train_layout, kl_reference=cfg.rl.kl_coef > 0,
        sft_micro_batch=cfg.sft.sft_micro_batch_size or local_sft, max_length=cfg.data.max_length,
        image_pixels=cfg.model.max_pixels or checkpoint_max_pixels(cfg.model.model) or 448 * 448,
        run_sft=cfg.run.stage in ("sft", "all") and cfg.sft.sft_steps > 0,
        run_rl=cfg.run.stage in ("rl", "all") and cfg.rl.rl_steps > 0,
    )


def device_capacity(on_cpu: bool, local_world_size: int) -> tuple[float, str]:
    """(bytes one rank may use, what it is): the GPU's total memory, or on CPU this host's
    available memory shared by its ranks."""
    if not on_cpu:
        import torch

        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory), "this GPU"
    avail = 0.0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = float(line.split()[1]) * 1024
    return avail / max(1, local_world_size), "available host RAM / local ranks"


class DoesNotFit(RuntimeError):
    """The memory plan's peak is larger than the device."""


def check_before_launch(cfg, ds_config: dict, world_size: int, on_cpu: bool, mode: str = "check",
                        capacity_gb: float = 0.0, config=None) -> Plan | None:
    """Build, print (returned) and enforce the plan: ``mode`` ``check`` raises :class:`DoesNotFit`
    naming the biggest components and what to change; ``warn`` only prints; ``off`` does nothing."""
    if mode == "off":
        return None
    m = cfg.model
    shape = shape_from_config(config or model_config(m.model), lora_r=m.lora_r, lora_target_modules=m.lora_target_modules,
                              freeze_vision=m.freeze_vision)
    s = setting_from_config(cfg, ds_config, world_size)
    plan = plan_memory(shape, s)
    if s.run_rl and cfg.rl.rollout_backend == "vllm":
        plan.notes.append("rollout_backend vllm: the rollout line counts the hf backend; the colocated vLLM engine "
                          f"takes vllm_gpu_memory_utilization={cfg.rl.vllm_gpu_memory_utilization} of the GPU instead")
    if s.zero_stage >= 1 and s.bf16:
        plan.deepspeed_estimate = deepspeed_estimate(shape, s, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if capacity_gb > 0:
        plan.capacity, plan.device = capacity_gb * GiB, "--memory_capacity_gb"
    else:
        plan.capacity, plan.device = device_capacity(on_cpu, local_ranks)
    if not on_cpu:
        plan.allowance = 1.5 * GiB + 0.1 * plan.phase_total(plan.peak_phase)
    if mode == "check" and not plan.fits:
        phase = plan.peak_phase
        top = sorted(plan.components[phase].items(), key=lambda kv: -kv[1])[:3]
        raise DoesNotFit(
            f"the run does not fit: {phase} needs about {plan.peak / GiB:.1f} GiB per rank, and there are "
            f"{plan.capacity / GiB:.1f} GiB ({plan.device}; largest parts: " + ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in top)
            + "). Options: more ranks (ZeRO-3 splits the model states), gradient_checkpointing, a smaller "
              "rl_micro_batch_size / sft_micro_batch_size or max_pixels, fewer prompts_per_step per rank, "
              "LoRA (lora_r), configs/deepspeed/zero3_offload.json; --memory_plan warn launches anyway.\n"
            + plan.format())
    return plan


def check_run(cfg) -> Plan | None:
    """The trainer's hook: the plan of ``cfg`` on this job's ranks, logged by rank 0; raises
    :class:`DoesNotFit` (``--memory_plan check``) when the peak exceeds the device.  A model whose
    config cannot be read here (a hub id not yet downloaded) is planned by nobody: warned."""
    import logging

    from vlm_grpo_ma.training import distributed as dist
    from vlm_grpo_ma.training.engine import resolve_ds_config
    from vlm_grpo_ma.training.stage import use_bf16

    log = logging.getLogger(__name__)
    if cfg.run.memory_plan == "off":
        return None
    ds = resolve_ds_config(cfg.run.deepspeed, micro_batch_size=1, grad_accum_steps=1, bf16=use_bf16(cfg),
                           max_grad_norm=cfg.run.max_grad_norm, lr=1.0, weight_decay=0.0)
    try:
        config = model_config(cfg.model.model)
    except (OSError, ValueError) as e:
        if dist.is_main():
            log.warning("memory plan skipped: the config of %s cannot be read here (%s)", cfg.model.model, e)
        return None
    plan = check_before_launch(cfg, ds, dist.world_size(), dist.on_cpu(), cfg.run.memory_plan,
                               cfg.run.memory_capacity_gb, config)
    if plan is not None and dist.is_main():
        log.info("%s", plan.format())
        if not plan.fits:
            log.warning("the memory plan's peak exceeds what there is (%s; --memory_plan warn): launching anyway", plan.device)
    return plan
