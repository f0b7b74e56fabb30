"""The trainer's configuration: five typed dataclasses, one documented field each.

Read from ``--config FILE.yaml`` and overridden from the command line (``--key value``) by
:func:`vlm_grpo_ma.config.parse_config` (transformers' ``HfArgumentParser``).  Field names are
unique across the five classes, so a YAML file is one flat mapping.  Names follow the paper
(GRPO-MA, arXiv 2509.24494): ``num_thoughts`` is K, ``answers_per_thought`` is M; T16A1 (K=16, M=1) is plain GRPO.

The defaults are the CPU demo (the embedded tiny model on synthetic data); the shipped
``configs/<task>.qwen2_5_vl_3b.yaml`` files hold the paper's setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from vlm_grpo_ma.algorithms.grpo_ma import ObjectiveSettings
from vlm_grpo_ma.config import JsonObject

#: the shipped default DeepSpeed config (``configs/deepspeed/zero3.json`` in the source tree,
#: ``vlm_grpo_ma.configs`` once installed: see :mod:`vlm_grpo_ma.resources`)
DEFAULT_DEEPSPEED_CONFIG = "configs/deepspeed/zero3.json"


#: the dynamic-sampling modes (training/dynamic_sampling.py implements them)
DYNAMIC_SAMPLING = ("off", "full", "pilot")


@dataclass
class ModelArgs:
    """Which policy to train and how it is held in memory."""

    model: str = field(
        default="tiny-qwen2.5-vl",
        metadata={"help": "Local path, hub id or tiny-model name (tiny-qwen2-vl, tiny-qwen2.5-vl, "
                  "tiny-qwen3-vl) of the policy. With --stage rl after a SFT run, the SFT output "
                  "(<output_dir>/sft/final) is used automatically."},
    )
    bf16: Optional[bool] = field(
        default=None,
        metadata={"help": "Train in bfloat16. None (default): on where the hardware has it "
                  "(a CUDA GPU with bf16 support), off on CPU."},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "transformers attention implementation (eager, sdpa, flash_attention_2)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass (saves memory, costs about a third more compute)."}
    )
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank through peft; 0 trains all weights (full fine-tuning)."}
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = lora_alpha / lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated module names of the language model that get LoRA adapters."},
    )
    freeze_vision: bool = field(
        default=False, metadata={"help": "Freeze the vision tower (and its merger): only the language model learns."}
    )
    min_pixels: Optional[int] = field(
        default=None, metadata={"help": "Processor's minimum image area after resize (None: the checkpoint's)."}
    )
    max_pixels: Optional[int] = field(
        default=None, metadata={"help": "Processor's maximum image area after resize (None: the checkpoint's)."}
    )


@dataclass
class DataArgs:
    """The task and its data."""

    task: str = field(
        default="affordance",
        metadata={"help": "Task plugin name (detection, affordance, trajectory, vqa, math, code, or a third-party one)."},
    )
    task_options: Optional[JsonObject] = field(
        default=None,
        metadata={"help": "Options of the task plugin, a JSON object (a mapping in a YAML config), "
                  "e.g. '{\"mode\": \"points\"}' or '{\"box_reward\": \"giou\"}'; see the task's docstring."},
    )
    train_data: Optional[str] = field(
        default=None,
        metadata={"help": "Training data (JSONL, COCO JSON or a local HF dataset). None: fresh synthetic "
                  "samples from the task every step."},
    )
    eval_data: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out data for the before/after evaluations. None: synthetic samples with a "
                  "seed disjoint from the training seeds."},
    )
    eval_samples: int = field(
        default=64, metadata={"help": "Number of held-out samples evaluated (greedy decoding) before SFT, after SFT and after RL; 0 skips evaluation."}
    )
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call in evaluation."})
    eval_every: int = field(
        default=0,
        metadata={"help": "Held-out evaluation (greedy, the eval_samples) every N steps of SFT and of RL and at each "
                  "stage's last step, logged as heldout/* under <stage>_eval (JSONL and TensorBoard); 0: only before "
                  "and after the stages."},
    )
    eval_suite: Optional[str] = field(
        default=None,
        metadata={"help": "With eval_every: evaluate a benchmark suite (name, e.g. synthetic-vqa, or YAML file) during "
                  "training instead of the run's held-out samples: its task options, data and max_new_tokens, decoded "
                  "greedily and scored as bench run scores."},
    )
    eval_images: int = field(default=4, metadata={"help": "Drawn held-out predictions logged to TensorBoard per evaluation during training."})
    keep_best_metric: Optional[str] = field(
        default=None,
        metadata={"help": "With eval_every: keep the policy with the best value of this held-out metric (e.g. accuracy, "
                  "reward) in <stage>/best; None: keep none."},
    )
    keep_best_mode: str = field(default="max", metadata={"help": "keep_best_metric: max (higher is better) or min."})
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Skip (and count) invalid records of train/eval data instead of raising an error naming file, line and field."},
    )
    max_length: int = field(
        default=1024,
        metadata={"help": "Longest SFT sequence (prompt + target) in tokens; longer samples are dropped and counted, image tokens are never truncated."},
    )

    def task_kwargs(self) -> dict:
        """``task_options`` as keyword arguments of ``get_task``."""
        import json

        return json.loads(self.task_options) if self.task_options else {}


@dataclass
class SFTArgs:
    """Stage 1: supervised warm-start on the task's reference completions."""

    sft_steps: int = field(default=400, metadata={"help": "Optimizer steps of SFT."})
    sft_batch_size: int = field(default=32, metadata={"help": "Global SFT batch (samples per optimizer step, over all ranks)."})
    sft_micro_batch_size: int = field(
        default=0, metadata={"help": "Samples per forward on one rank (gradient accumulation fills the batch); 0: the whole local batch."}
    )
    sft_lr: float = field(default=2e-3, metadata={"help": "Peak learning rate of SFT (AdamW, linear warm-up then lr_schedule)."})
    sft_warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps of SFT."})


@dataclass
class RLArgs:
    """Stage 2: GRPO-MA from the SFT checkpoint (arXiv 2509.24494)."""

    rl_steps: int = field(default=30, metadata={"help": "Rollout batches (one rollout + ppo_epochs optimizer steps each)."})
    prompts_per_step: int = field(default=8, metadata={"help": "Global number of prompts B per rollout batch (over all ranks)."})
    num_thoughts: int = field(default=4, metadata={"help": "K: thoughts sampled per prompt (stage 1 of the tree)."})
    answers_per_thought: int = field(
        default=4, metadata={"help": "M: answers sampled per thought (stage 2). K=16, M=1 (T16A1) is plain GRPO."}
    )
    max_thought_tokens: int = field(default=48, metadata={"help": "Length limit of a thought; a thought that reaches it is closed with </think> and flagged."})
    max_answer_tokens: int = field(default=32, metadata={"help": "Length limit of an answer."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of rollouts (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of rollouts (0: off; transformers' default 50 is not plain sampling)."})
    rl_lr: float = field(default=5e-5, metadata={"help": "Peak learning rate of RL (AdamW, linear warm-up then lr_schedule)."})
    rl_warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up optimizer steps of RL."})
    ppo_epochs: int = field(
        default=1,
        metadata={"help": "Optimisation iterations per rollout batch against the old (sampling-time) log-probs; 1 is on-policy GRPO."},
    )
    rl_micro_batch_size: int = field(
        default=0, metadata={"help": "Prompts per training forward on one rank (gradient accumulation fills the batch); 0: all local prompts at once."}
    )
    clip_low: float = field(default=0.2, metadata={"help": "eps_low: the ratio is clipped below at 1 - clip_low."})
    clip_high: float = field(default=0.2, metadata={"help": "eps_high: the ratio is clipped above at 1 + clip_high (DAPO's clip-higher uses 0.28)."})
    kl_coef: float = field(
        default=0.0, metadata={"help": "beta: weight of the KL (kl_estimator) to a frozen reference (the starting policy); 0 loads no reference model."}
    )
    loss_agg_mode: str = field(
        default="token-mean",
        metadata={"help": "Loss aggregation over the unique trained tokens (each thought once): token-mean (default; "
                  "DAPO, verl), seq-mean-token-mean (original GRPO), seq-mean-token-sum, seq-mean-token-sum-norm "
                  "(Dr.GRPO, L_max = max_thought_tokens + max_answer_tokens)."},
    )
    adv_estimator: str = field(
        default="grpo_ma",
        metadata={"help": "Advantage estimator: grpo_ma (thought and answer advantages; the paper's) or grpo "
                  "(plain GRPO, answers_per_thought = 1 only; the same numbers as grpo_ma there)."},
    )
    policy_loss: str = field(
        default="clipped",
        metadata={"help": "Policy loss: clipped (the PPO/GRPO clipped surrogate, clip_low/clip_high), cispo (MiniMax-M1: "
                  "REINFORCE with the IS weight capped at cispo_cap), sapo (soft sigmoid gate, sapo_temperature_pos/neg) "
                  "or vespo (gamma weight of the sequence ratio, vespo_*; always sequence-level); formulas as TRL 1.16 (docs/ALGORITHMS.md)."},
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={"help": "token: one importance ratio per token; sequence: GSPO's length-normalised ratio per "
                  "sequence, a sequence being a tree segment (a thought, an answer; the whole path when "
                  "answers_per_thought = 1), for the clipped, cispo and sapo losses. GSPO = clipped + sequence; "
                  "LUSPO = that + loss_agg_mode seq-mean-token-sum."},
    )
    cispo_cap: float = field(default=5.0, metadata={"help": "cispo: the largest importance weight (TRL's epsilon_high for cispo; ScaleRL recommends 5)."})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "sapo: gate temperature of tokens with a positive advantage."})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "sapo: gate temperature of tokens with a non-positive advantage."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "vespo: power k of the gamma weight for non-negative advantages."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "vespo: decay lambda of the gamma weight for non-negative advantages."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "vespo: power k of the gamma weight for negative advantages."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "vespo: decay lambda of the gamma weight for negative advantages."})
    kl_estimator: str = field(
        default="k3", metadata={"help": "Per-token KL estimator of the kl_coef penalty: k1, k2 or k3 (Schulman's)."}
    )
    scale_adv_by_std: bool = field(
        default=True, metadata={"help": "Divide advantages by the group std (GRPO); False is Dr.GRPO's unscaled advantage."}
    )
    adv_eps: float = field(default=1e-6, metadata={"help": "eps added to the std when scaling advantages."})
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Whose std divides the thought and answer advantages (TRL's names): group (each prompt's), "
                  "batch (one std over the global batch: all thought values / all rewards), none (no division, "
                  "as --no_scale_adv_by_std, which wins over group)."},
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "DAPO overlong filtering per segment: a truncated answer leaves the loss, a truncated thought "
                  "too, and a thought whose every answer was truncated (docs/ALGORITHMS.md)."},
    )
    overlong_penalty_cache: int = field(
        default=0,
        metadata={"help": "DAPO soft overlong punishment: L_cache tokens before each segment's budget over which the "
                  "reward falls linearly to -overlong_penalty_factor (thought and answer each against their own "
                  "budget); 0: off."},
    )
    overlong_penalty_factor: float = field(default=1.0, metadata={"help": "Scale of the soft overlong punishment."})
    dynamic_sampling: str = field(
        default="off",
        metadata={"help": "Train only on prompts whose rewards have spread: off; full (DAPO: drop prompts whose K*M "
                  "rewards are all equal after scoring, refill from fresh prompts); pilot (GRPO-MA: after the K "
                  "thoughts and one answer each, drop prompts whose K pilot rewards are all equal before generating "
                  "their other answers; hf backend). docs/ALGORITHMS.md."},
    )
    dynamic_sampling_max_rounds: int = field(
        default=3, metadata={"help": "Dynamic sampling: extra generation rounds (fresh prompts) allowed per step to refill the batch."}
    )
    train_layout: str = field(
        default="tree",
        metadata={"help": "Training forward layout: tree (one sequence per prompt: the prompt and its images once, every thought and answer once, under a 4D mask), packed (one sequence per thought with its M answers: the prompt K times) or naive (K*M sequences). tree and packed need an attention kernel that takes a 4D mask (sdpa, eager); others fall back to naive."},
    )
    rollout_backend: str = field(
        default="hf",
        metadata={"help": "Rollout backend: hf (transformers on the gathered training model; the default, CPU or GPU) or vllm (a colocated vLLM engine per rank with prefix caching and weight sync after every update; GPU: pip install 'vlm-grpo-ma[vllm]'; CPU: bash scripts/setup_vllm.sh; docs/VLLM.md)."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vllm backend, GPU: share of the GPU's memory the colocated engine may take (weights + KV cache). Not used on vLLM's CPU platform, where it would be a share of host RAM minus what the trainer already holds: vllm_kv_cache_gib sizes the engine there."}
    )
    vllm_kv_cache_gib: float = field(
        default=0.0, metadata={"help": "vllm backend: fixed KV-cache size in GiB (vLLM's kv_cache_memory_bytes). 0: from vllm_gpu_memory_utilization on a GPU, 1 GiB of host RAM on vLLM's CPU platform."}
    )
    vllm_sleep_mode: bool = field(
        default=True, metadata={"help": "vllm backend: release the engine's GPU memory between rollouts (sleep / wake_up). Only where vLLM has a sleep mode (CUDA, ROCm, XPU); on other platforms (CPU) it is turned off with a log line."}
    )
    vllm_enforce_eager: bool = field(
        default=False, metadata={"help": "vllm backend: no torch.compile / CUDA graphs in the engine (faster start, slower decode)."}
    )
    tis_cap: float = field(
        default=0.0,
        metadata={"help": "vllm backend: truncated importance sampling cap C; token weights are multiplied by min(pi_trainer_old / pi_vllm, C) to correct the engine/trainer log-prob mismatch (0: off)."},
    )


def policy_loss_options(rl: RLArgs) -> dict:
    """The keyword arguments of the registered policy loss ``rl.policy_loss`` that come from the
    config, beside the shared ones (advantages, weights, reference, KL, ``seq_ids``)."""
    clipped = lambda: {"clip_low": rl.clip_low, "clip_high": rl.clip_high}  # noqa: E731
    return {
        "clipped": clipped,
        "cispo": lambda: {"cap": rl.cispo_cap},
        "sapo": lambda: {"tau_pos": rl.sapo_temperature_pos, "tau_neg": rl.sapo_temperature_neg},
        "vespo": lambda: {"k_pos": rl.vespo_k_pos, "lambda_pos": rl.vespo_lambda_pos,
                          "k_neg": rl.vespo_k_neg, "lambda_neg": rl.vespo_lambda_neg},
    }.get(rl.policy_loss, clipped)()  # a third-party loss: the clipped loss's signature


def effective_scale_rewards(rl: RLArgs) -> str:
    """``scale_rewards`` with ``scale_adv_by_std: false`` folded in (it means ``none``)."""
    return rl.scale_rewards if rl.scale_adv_by_std else "none"


def objective_settings(rl: RLArgs) -> ObjectiveSettings:
    """The settings of the GRPO-MA objective (``algorithms.grpo_ma``) this config asks for."""
    return ObjectiveSettings(
        adv_estimator=rl.adv_estimator, scale_rewards=effective_scale_rewards(rl), adv_eps=rl.adv_eps,
        overlong_cache=rl.overlong_penalty_cache, overlong_factor=rl.overlong_penalty_factor,
        max_thought_tokens=rl.max_thought_tokens, max_answer_tokens=rl.max_answer_tokens,
        mask_truncated=rl.mask_truncated_completions, loss_agg_mode=rl.loss_agg_mode, policy_loss=rl.policy_loss,
        loss_options=policy_loss_options(rl), importance_sampling_level=rl.importance_sampling_level,
        kl_coef=rl.kl_coef, kl_estimator=rl.kl_estimator, tis_cap=rl.tis_cap, ppo_epochs=rl.ppo_epochs,
    )


@dataclass
class RunArgs:
    """Where and how the run happens."""

    stage: str = field(default="all", metadata={"help": "sft, rl, or all (SFT, then RL from the SFT model)."})
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Run directory (config, metrics, checkpoints, final models). None: runs/<task>-<UTC time>."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the model init, data order, synthetic samples and sampling."})
    deepspeed: str = field(
        default=DEFAULT_DEEPSPEED_CONFIG,
        metadata={"help": "DeepSpeed JSON config (configs/deepspeed/zero3.json default; zero2.json, zero3_offload.json shipped)."},
    )
    lr_schedule: str = field(
        default="cosine",
        metadata={"help": "Learning-rate schedule of both stages after the linear warm-up: cosine (decay to 0 at the stage's last step) or constant."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (both stages)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping by global norm (0: off)."})
    save_every: int = field(default=0, metadata={"help": "Save a resumable checkpoint every N optimizer steps (SFT) or rollout batches (RL); 0: only at the end of a stage."})
    keep_last: int = field(default=2, metadata={"help": "Resumable checkpoints kept per stage (older ones are deleted)."})
    resume: bool = field(default=True, metadata={"help": "Continue from the latest checkpoint in output_dir when there is one."})
    log_every: int = field(default=50, metadata={"help": "Print a metrics line every N steps, 0 never (JSONL and TensorBoard get every step)."})
    report_to: str = field(default="tensorboard", metadata={"help": "Comma-separated extra loggers: tensorboard, wandb, or none (JSONL is always written)."})
    memory_plan: str = field(
        default="check",
        metadata={"help": "Memory plan printed before launch (per-rank estimate of model states, rollout KV cache and "
                  "activations; docs/MEMORY.md): check refuses a run that cannot fit, warn only prints, off skips it."},
    )
    memory_capacity_gb: float = field(
        default=0.0, metadata={"help": "Memory one rank may use, for the memory plan; 0: the GPU's total memory (on CPU: available RAM / local ranks)."}
    )
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher; ignore."})


ALL_ARGS = (ModelArgs, DataArgs, SFTArgs, RLArgs, RunArgs)


@dataclass
class TrainConfig:
    """The five argument groups of one run."""

    model: ModelArgs
    data: DataArgs
    sft: SFTArgs
    rl: RLArgs
    run: RunArgs

    def flat(self) -> dict:
        """One flat mapping of every field (the YAML form)."""
        out: dict = {}
        for part in (self.model, self.data, self.sft, self.rl, self.run):
            out.update(asdict(part))
        return out

    def validate(self) -> None:
        """Raise a ValueError naming the field for values that cannot work."""
        if self.run.stage not in ("sft", "rl", "all"):
            raise ValueError(f"stage must be sft, rl or all, got {self.run.stage!r}")
        if self.rl.num_thoughts < 1 or self.rl.answers_per_thought < 1:
            raise ValueError("num_thoughts and answers_per_thought must be >= 1")
        if self.rl.num_thoughts * self.rl.answers_per_thought < 2:
            raise ValueError("num_thoughts * answers_per_thought must be >= 2 (a group of one has no advantage)")
        if self.rl.ppo_epochs < 1:
            raise ValueError(f"ppo_epochs must be >= 1, got {self.rl.ppo_epochs}")
        if self.rl.dynamic_sampling not in DYNAMIC_SAMPLING:
            raise ValueError(f"dynamic_sampling must be one of {', '.join(DYNAMIC_SAMPLING)}, got {self.rl.dynamic_sampling!r}")
        if self.rl.dynamic_sampling_max_rounds < 0:
            raise ValueError(f"dynamic_sampling_max_rounds must be >= 0, got {self.rl.dynamic_sampling_max_rounds}")
        if self.rl.dynamic_sampling == "pilot" and self.rl.rollout_backend != "hf":
            raise ValueError("dynamic_sampling pilot needs rollout_backend hf (it continues given thoughts)")
        if self.rl.overlong_penalty_cache < 0:
            raise ValueError(f"overlong_penalty_cache must be >= 0, got {self.rl.overlong_penalty_cache}")
        self._validate_algorithms()
        if self.rl.train_layout not in ("tree", "packed", "naive"):
            raise ValueError(f"train_layout must be tree, packed or naive, got {self.rl.train_layout!r}")
        if self.rl.rollout_backend not in ("hf", "vllm"):
            raise ValueError(f"rollout_backend must be hf or vllm, got {self.rl.rollout_backend!r}")
        if self.rl.vllm_kv_cache_gib < 0:
            raise ValueError(f"vllm_kv_cache_gib must be >= 0, got {self.rl.vllm_kv_cache_gib}")
        if self.rl.tis_cap < 0 or (self.rl.tis_cap > 0 and self.rl.rollout_backend != "vllm"):
            raise ValueError(f"tis_cap must be 0 (off) or > 0 with rollout_backend vllm, got {self.rl.tis_cap}")
        if self.run.memory_plan not in ("check", "warn", "off"):
            raise ValueError(f"memory_plan must be check, warn or off, got {self.run.memory_plan!r}")
        if self.run.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be cosine or constant, got {self.run.lr_schedule!r}")
        if self.data.eval_every < 0 or self.data.eval_images < 0:
            raise ValueError("eval_every and eval_images must be >= 0")
        if self.data.keep_best_mode not in ("max", "min"):
            raise ValueError(f"keep_best_mode must be max or min, got {self.data.keep_best_mode!r}")
        if self.data.keep_best_metric and not (self.data.eval_every > 0 and (self.data.eval_samples > 0 or self.data.eval_suite)):
            raise ValueError("keep_best_metric needs eval_every > 0 and held-out samples (eval_samples > 0 or eval_suite)")
        if self.data.eval_suite and self.data.eval_every <= 0:
            raise ValueError("eval_suite is evaluated during training: it needs eval_every > 0")
        if self.sft.sft_batch_size < 1 or self.rl.prompts_per_step < 1:
            raise ValueError("sft_batch_size and prompts_per_step must be >= 1")

    def _validate_algorithms(self) -> None:
        """The algorithm names (aggregation, advantage estimator, policy loss, KL estimator): a
        typo fails here, before SFT, not in the first RL step."""
        from vlm_grpo_ma.algorithms import AGGREGATION_MODES
        from vlm_grpo_ma.algorithms.registry import ADV_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES

        rl = self.rl
        if rl.loss_agg_mode not in AGGREGATION_MODES:
            raise ValueError(f"loss_agg_mode must be one of {', '.join(AGGREGATION_MODES)}, got {rl.loss_agg_mode!r}")
        for name, value, table in (("adv_estimator", rl.adv_estimator, ADV_ESTIMATORS),
                                   ("policy_loss", rl.policy_loss, POLICY_LOSSES),
                                   ("kl_estimator", rl.kl_estimator, KL_ESTIMATORS)):
            if value not in table:
                raise ValueError(f"{name} must be one of {', '.join(table.names())}, got {value!r}")
        from vlm_grpo_ma.algorithms import IMPORTANCE_SAMPLING_LEVELS, SCALE_REWARDS

        if rl.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {', '.join(IMPORTANCE_SAMPLING_LEVELS)}, "
                             f"got {rl.importance_sampling_level!r}")
        if rl.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {rl.scale_rewards!r}")
        if not rl.scale_adv_by_std and rl.scale_rewards == "batch":
            raise ValueError("scale_adv_by_std false (no std division) conflicts with scale_rewards batch")
        if rl.cispo_cap <= 0 or rl.sapo_temperature_pos <= 0 or rl.sapo_temperature_neg <= 0:
            raise ValueError("cispo_cap, sapo_temperature_pos and sapo_temperature_neg must be > 0")
        if rl.adv_estimator == "grpo" and rl.answers_per_thought != 1:
            raise ValueError(f"adv_estimator grpo needs answers_per_thought = 1 (got {rl.answers_per_thought}); "
                             "use grpo_ma for a tree")
