"""The trainer in one process on the tiny model: the whole pipeline, the RL update, skipping a
non-finite step, atomic checkpoints and exact in-process resume, and the exported model.

Every test here builds real DeepSpeed ZeRO-3 engines in this process (CPU accelerator, gloo).
Measured on a shared 2-core machine (``pytest tests/test_train_run.py --durations=0``): the
end-to-end pipeline about 35 s (marked ``slow``), each other test 3-6 s.  A per-test timeout
turns a hang (a collective waiting forever) into a failure long before the suite's 600 s."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlm_grpo_ma.training import distributed as dist

dist.prepare_environment()

TINY = ["--eval_samples", "4", "--eval_batch_size", "4", "--max_thought_tokens", "12", "--max_answer_tokens", "10",
        "--report_to", "tensorboard", "--log_every", "1"]


pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    dist.init_distributed()
    yield


def _cfg(tmp_path, *extra):
    from vlm_grpo_ma.training.cli import parse_train_config

    # ZeRO-3 (the trainer's default engine) unless a test asks for another: the affordance demo
    # config itself runs without ZeRO (zero0.json)
    return parse_train_config(["--task", "affordance", "--output_dir", str(tmp_path), "--sft_batch_size", "4",
                               "--prompts_per_step", "2", "--sft_warmup_steps", "0",
                               "--deepspeed", "configs/deepspeed/zero3.json", *TINY, *extra])


def _params(stage) -> dict[str, torch.Tensor]:
    with stage.gather():
        return {n: p.detach().clone() for n, p in stage.engine.module.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


#: the pipeline test's run: enough SFT (40 steps at 5e-3) and token budget (a reference completion
#: is about 43 tokens) for the tiny model to learn to open and close its thought
PIPELINE = ["--task", "affordance", "--sft_steps", "40", "--sft_batch_size", "4", "--sft_lr", "5e-3",
            "--sft_warmup_steps", "0", "--rl_steps", "2", "--prompts_per_step", "2", "--num_thoughts", "2",
            "--answers_per_thought", "2", "--eval_samples", "4", "--eval_batch_size", "4",
            "--max_thought_tokens", "32", "--max_answer_tokens", "24", "--report_to", "tensorboard", "--log_every", "1"]


@pytest.mark.slow
def test_pipeline_end_to_end_and_final_model_loads(tmp_path):
    from transformers import AutoConfig

    from vlm_grpo_ma.models import MODEL_CLASSES, load_policy
    from vlm_grpo_ma.training.cli import main
    from vlm_grpo_ma.training.metrics import read_metrics

    summary = main([*PIPELINE, "--output_dir", str(tmp_path)])
    assert set(summary["evals"]) == {"before_sft", "after_sft", "after_rl"}
    for ev in summary["evals"].values():
        assert "mean_iou" in ev and 0.0 <= ev["eval/format_rate"] <= 1.0
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "summary.json").is_file()
    assert any((tmp_path / "tensorboard" / "rl").iterdir())
    sft = read_metrics(tmp_path / "metrics.jsonl", "sft")
    rl = read_metrics(tmp_path / "metrics.jsonl", "rl")
    assert [r["step"] for r in sft] == list(range(1, 41)) and [r["step"] for r in rl] == [1, 2]
    assert sft[-1]["loss/sft"] < sft[0]["loss/sft"]  # lr 5e-3 on 4 samples: the NLL falls
    names = {"reward/mean", "reward/affordance/format", "reward/affordance/iou", "rollout/thought_len",
             "rollout/answer_len", "adv/thought_std", "adv/answer_std", "rollout/zero_spread_frac", "clip/low",
             "clip/high", "loss/policy", "loss/kl", "grad/norm", "grad/gss", "time/rollout", "time/reward",
             "time/update", "train/skipped_steps", "lr"}
    assert names <= set(rl[0]), names - set(rl[0])
    # the SFT targets fit the RL length caps (checked once, on 256 samples of the RL stream)
    caps = summary["length_caps"]
    assert caps["n"] == 256 and caps["thought_over"] == 0.0 and caps["answer_over"] == 0.0, caps
    assert 0 < caps["thought_max"] <= 32 and 0 < caps["answer_max"] <= 24
    # SFT taught the thought format: before it every greedy completion of the random model breaks
    # the <think> rule; after it fewer do (measured: none; an untrained model fails this)
    before, after = summary["evals"]["before_sft"], summary["evals"]["after_sft"]
    assert before.get("eval/parse/bad_think", 0.0) == 4.0
    assert after.get("eval/parse/bad_think", 0.0) < before["eval/parse/bad_think"], after
    # every RL pair (2 prompts x 2 thoughts x 2 answers) is well formed or counted under one reason
    for r in rl:
        failed = sum(v for k, v in r.items() if k.startswith("parse/"))
        assert failed == pytest.approx(8 * (1.0 - r["reward/affordance/format"])), r

    # the exported model: the project's loader and plain transformers read the same weights
    final = tmp_path / "rl" / "final"
    pol = load_policy(str(final))
    import transformers

    cls = getattr(transformers, MODEL_CLASSES[AutoConfig.from_pretrained(final).model_type])
    hf = cls.from_pretrained(final)
    base = load_policy("tiny-qwen2.5-vl")
    sd_pol, sd_hf, sd_base = pol.model.state_dict(), hf.state_dict(), base.model.state_dict()
    assert set(sd_pol) == set(sd_hf)
    assert all(torch.equal(sd_pol[k], sd_hf[k]) for k in sd_pol)
    assert any(not torch.equal(sd_pol[k], sd_base[k]) for k in sd_pol)  # it was trained
    assert type(pol.processor).__name__ == type(base.processor).__name__

    # running the same command again finds both stages complete and only re-prints the summary
    again = main([*PIPELINE, "--output_dir", str(tmp_path)])
    assert again["evals"] == json.loads(json.dumps(summary["evals"]))
    assert len(read_metrics(tmp_path / "metrics.jsonl", "rl")) == 2


def _shaped_task():
    """Affordance with a reward that varies on an untrained model (longer answers score more),
    so that advantages are non-zero and the update does something."""
    from vlm_grpo_ma.task import Reward, get_task

    task = get_task("affordance")

    def reward(thought, answer, sample, family):
        v = min(1.0, len(answer) / 40.0)
        return Reward(v, {p: v for p in task.reward_parts})

    task.reward = reward
    return task


@pytest.mark.parametrize("k,m,layout", [(2, 2, "tree"), (2, 2, "packed"), (4, 1, "naive")])
def test_rl_step_updates_the_policy(tmp_path, k, m, layout):
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.rl import RLState, rl_step

    cfg = _cfg(tmp_path, "--num_thoughts", str(k), "--answers_per_thought", str(m), "--train_layout", layout,
               "--ppo_epochs", "2", "--rl_lr", "1e-3")
    task = _shaped_task()
    st = stg.build_stage(cfg, "rl", "tiny-qwen2.5-vl", global_batch=2, micro=1, lr=1e-3, warmup=0, total_optimizer_steps=10)
    before = _params(st)
    state = RLState(task)
    out = rl_step(st, cfg, task, state, task.synthetic(2, seed=1))
    assert out["adv/answer_std"] > 0 and out["train/skipped_steps"] == 0
    assert math.isfinite(out["loss/policy"]) and out["grad/norm"] > 0
    assert 0.0 <= out["reward/mean"] <= 1.0 and out["rollout/thought_len"] <= 12
    assert state.gss.num_steps == 2  # one optimizer step per ppo epoch
    assert out["ratio/mean"] != 1.0  # second epoch: the policy moved away from the old log-probs
    assert not _same(before, _params(st))
    stg.release(st)


@pytest.mark.parametrize("extra", [
    ["--policy_loss", "clipped", "--importance_sampling_level", "sequence", "--scale_rewards", "batch",
     "--mask_truncated_completions", "--overlong_penalty_cache", "4"],
    ["--policy_loss", "cispo", "--cispo_cap", "1.1", "--importance_sampling_level", "sequence"],
    ["--policy_loss", "sapo", "--loss_agg_mode", "seq-mean-token-mean"],
    ["--policy_loss", "vespo", "--importance_sampling_level", "sequence"],
    ["--dynamic_sampling", "full", "--dynamic_sampling_max_rounds", "1"],
    ["--dynamic_sampling", "pilot", "--dynamic_sampling_max_rounds", "1"],
], ids=["gspo-batch-mask-penalty", "cispo-seq", "sapo", "vespo", "dynamic-full", "dynamic-pilot"])
def test_rl_step_with_the_objective_variants(tmp_path, extra):
    """Each variant goes through the trainer's step (config -> objective -> loss) and moves the policy."""
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.rl import RLState, rl_step

    torch.manual_seed(0)  # the rollout samples from the global generator: unseeded, a tree without signal was possible

    cfg = _cfg(tmp_path, "--num_thoughts", "2", "--answers_per_thought", "2", "--ppo_epochs", "2", "--rl_lr", "1e-3",
               *extra)
    task = _shaped_task()
    st = stg.build_stage(cfg, "rl", "tiny-qwen2.5-vl", global_batch=2, micro=1, lr=1e-3, warmup=0, total_optimizer_steps=10)
    before = _params(st)
    out = rl_step(st, cfg, task, RLState(task), task.synthetic(2, seed=1), more=lambda r: task.synthetic(2, seed=10 + r))
    assert math.isfinite(out["loss/policy"]) and out["train/skipped_steps"] == 0
    if cfg.rl.dynamic_sampling != "off":
        assert out["dynamic/rounds"] >= 1 and out["dynamic/prompts_trained"] >= 1
        if out["dynamic/fallback"] == 0:
            assert out["rollout/zero_spread_frac"] == 0.0
    if cfg.rl.mask_truncated_completions:
        assert 0.0 <= out["mask/thoughts"] <= 1.0 and 0.0 <= out["mask/answers"] <= 1.0
        assert out["reward/overlong_penalty"] <= 0.0
    if cfg.rl.policy_loss == "vespo":
        assert out["vespo/phi_mean"] > 0
    moved = not _same(before, _params(st))
    if cfg.rl.mask_truncated_completions:  # the tiny model rarely ends a segment: all may be filtered out
        assert moved == (out["grad/norm"] > 0)
    else:
        assert out["grad/norm"] > 0 and moved
    stg.release(st)


@pytest.mark.parametrize("zero", ["zero3", "zero0"])
def test_nonfinite_loss_skips_the_step(tmp_path, monkeypatch, zero):
    from vlm_grpo_ma.task import get_task
    from vlm_grpo_ma.training import sft as sft_mod
    from vlm_grpo_ma.training import stage as stg

    schedule = "cosine" if zero == "zero3" else "constant"
    cfg = _cfg(tmp_path, "--deepspeed", f"configs/deepspeed/{zero}.json", "--lr_schedule", schedule)
    task = get_task("affordance")
    st = stg.build_stage(cfg, "sft", "tiny-qwen2.5-vl", global_batch=4, micro=0, lr=1e-3, warmup=0, total_optimizer_steps=10)
    batches, _ = sft_mod.collate_micro_batches(st, cfg, task, task.synthetic(4, seed=0))
    before, lr_before = _params(st), stg.lr_of(st)
    real = sft_mod.assistant_token_nll
    monkeypatch.setattr(sft_mod, "assistant_token_nll", lambda model, b: (real(model, b)[0] * float("nan"), 0))
    out = sft_mod.sft_step(st, batches)
    assert out["train/step_applied"] == 0.0 and out["train/skipped_steps"] == 1.0
    assert _same(before, _params(st))  # nothing moved
    if zero == "zero3":
        assert stg.lr_of(st) == lr_before  # DeepSpeed's ZeRO skip also holds the schedule
    assert st.engine.zero_optimization_stage() == int(zero[-1])
    monkeypatch.setattr(sft_mod, "assistant_token_nll", real)
    out = sft_mod.sft_step(st, batches)
    assert out["train/step_applied"] == 1.0 and math.isfinite(out["loss/sft"])
    assert math.isfinite(out["grad/norm"]) and out["grad/norm"] > 0  # stage 0: our own norm
    # one applied step of 10 without warm-up: cosine 1e-3 * (1 + cos(pi / 10)) / 2; constant 1e-3
    assert stg.lr_of(st) == pytest.approx(0.975528e-3 if schedule == "cosine" else 1e-3, rel=1e-5)
    assert not _same(before, _params(st)) and st.skipped_steps == 1
    stg.release(st)


def test_checkpoint_is_atomic_and_resume_is_exact(tmp_path, monkeypatch):
    from vlm_grpo_ma.task import get_task
    from vlm_grpo_ma.training import checkpoint as ckpt
    from vlm_grpo_ma.training import sft as sft_mod
    from vlm_grpo_ma.training import stage as stg

    cfg = _cfg(tmp_path)
    task = get_task("affordance")
    st = stg.build_stage(cfg, "sft", "tiny-qwen2.5-vl", global_batch=4, micro=2, lr=1e-3, warmup=2, total_optimizer_steps=10)
    batches = [sft_mod.collate_micro_batches(st, cfg, task, task.synthetic(4, seed=s))[0] for s in range(3)]
    sft_mod.sft_step(st, batches[0])
    first = ckpt.save_checkpoint(st.engine, st.dir, 1, {"skipped_steps": 0}, keep_last=1)
    files = sorted(p.relative_to(first) for p in first.rglob("*"))

    # a crash in the middle of the next save leaves step 1 as it was, and the next resume uses it
    real_save = st.engine.save_checkpoint

    def crash(save_dir, **kw):
        (ckpt.Path(save_dir) / "partial.bin").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(st.engine, "save_checkpoint", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(st.engine, st.dir, 2, {"skipped_steps": 0}, keep_last=1)
    monkeypatch.setattr(st.engine, "save_checkpoint", real_save)
    assert ckpt.latest_checkpoint(st.dir) == first
    assert sorted(p.relative_to(first) for p in first.rglob("*")) == files
    assert json.loads((first / "trainer_state.json").read_text())["step"] == 1

    # exact continuation: two steps after the checkpoint, reload it, the same two steps again
    torch.manual_seed(123)  # the RNG state at the checkpoint is what resume restores
    ckpt.save_checkpoint(st.engine, st.dir, 1, {"skipped_steps": 0}, keep_last=1)
    losses_a = [sft_mod.sft_step(st, b)["loss/sft"] for b in batches[1:]]
    rand_a = torch.rand(3)
    after_a, lr_a = _params(st), stg.lr_of(st)
    state = ckpt.load_checkpoint(st.engine, ckpt.latest_checkpoint(st.dir))
    assert state["step"] == 1
    losses_b = [sft_mod.sft_step(st, b)["loss/sft"] for b in batches[1:]]
    assert losses_a == losses_b and torch.equal(rand_a, torch.rand(3))
    assert _same(after_a, _params(st)) and stg.lr_of(st) == lr_a

    # keep_last=1: a later save removes the older checkpoint and the crashed temporary folder
    ckpt.save_checkpoint(st.engine, st.dir, 3, {"skipped_steps": 0}, keep_last=1)
    names = sorted(p.name for p in ckpt.checkpoints_dir(st.dir).iterdir())
    assert names == ["step-0000003"], names
    stg.release(st)


def test_lora_frozen_vision_checkpointing_and_kl_reference(tmp_path):
    from vlm_grpo_ma.models import load_policy
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.engine import build_reference, vision_parameters
    from vlm_grpo_ma.training.rl import RLState, rl_step

    cfg = _cfg(tmp_path, "--lora_r", "4", "--lora_alpha", "8", "--freeze_vision", "--gradient_checkpointing",
               "--kl_coef", "0.5", "--ppo_epochs", "2", "--num_thoughts", "2", "--answers_per_thought", "2")
    task = _shaped_task()
    st = stg.build_stage(cfg, "rl", "tiny-qwen2.5-vl", global_batch=2, micro=0, lr=1e-2, warmup=0, total_optimizer_steps=10)
    model = st.engine.module
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # LoRA only; the vision tower has none
    assert all("visual" not in n for n in trainable) and vision_parameters(model)
    st.reference = build_reference(cfg.model, "tiny-qwen2.5-vl", st.ds_config)  # as the trainer does
    out = rl_step(st, cfg, task, RLState(task), task.synthetic(2, seed=3))
    assert out["loss/kl"] > 0 and out["kl/mean"] > 0  # the second epoch moved away from the reference
    final = stg.save_final(st, cfg)
    stg.release(st)  # drops the HfDeepSpeedConfig: from here on from_pretrained loads whole tensors
    from deepspeed.runtime.zero import parameter_offload

    assert not parameter_offload.FWD_MODULE_STACK  # neither the policy nor the reference is kept alive
    merged = load_policy(str(final)).model.state_dict()
    base = load_policy("tiny-qwen2.5-vl").model.state_dict()
    assert set(merged) == set(base)  # plain weights under the base model's names
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed and all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj")) and "visual" not in k for k in changed), changed


def test_rollout_without_zero3_hooks_restores_them_and_changes_nothing(tmp_path):
    """Generation inside ``gathered_parameters`` takes ZeRO-3's module hooks off (as TRL does) and
    DeepSpeed's memory-efficient ``F.linear`` with them, and puts both back: the greedy rollout is
    the same with or without them, and training still works."""
    import torch.nn.functional as F
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as _Init
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    from vlm_grpo_ma.data.collate import build_generation_inputs
    from vlm_grpo_ma.rollout import HFRolloutBackend, SamplingParams
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.engine import _zero3_offload, gathered_parameters
    from vlm_grpo_ma.training.rl import RLState, rl_step

    cfg = _cfg(tmp_path, "--num_thoughts", "2", "--answers_per_thought", "2")
    task = _shaped_task()
    st = stg.build_stage(cfg, "rl", "tiny-qwen2.5-vl", global_batch=2, micro=1, lr=1e-3, warmup=0, total_optimizer_steps=10)
    off = _zero3_offload(st.engine)
    assert off is not None, "ZeRO-3 engine expected (configs/deepspeed/zero3.json)"
    n_hooks = len(off.forward_hooks)
    assert n_hooks > 0
    assert F.linear is zero3_linear_wrap  # zero.Init patched it process-wide
    samples = task.synthetic(2, seed=3)
    inputs = build_generation_inputs(st.processor, [task.messages(s, st.family) for s in samples])
    greedy = SamplingParams(temperature=0.0, max_thought_tokens=8, max_answer_tokens=6)
    texts = {}
    for remove in (True, False):
        seen = []

        def ctx(remove=remove, seen=seen):
            import contextlib

            @contextlib.contextmanager
            def inner():
                with gathered_parameters(st.engine, remove_hooks=remove):
                    seen.append(len(off.forward_hooks))
                    assert (F.linear is _Init.linear_bk) == remove
                    yield
            return inner()

        backend = HFRolloutBackend(st.engine.module, processor=st.processor, gather_context=ctx)
        tree = backend.generate_tree(inputs, 2, 2, greedy)
        texts[remove] = (tree.thought_texts, tree.answer_texts)
        assert seen and all(n == (0 if remove else n_hooks) for n in seen)
        assert len(off.forward_hooks) == n_hooks  # back on after the rollout
        assert F.linear is zero3_linear_wrap
    assert texts[True] == texts[False]
    out = rl_step(st, cfg, task, RLState(task), samples)  # the engine still trains with the hooks back
    assert math.isfinite(out["loss/policy"]) and out["grad/norm"] > 0
    stg.release(st)


def test_rl_step_with_the_vllm_backend_against_an_engine_double(tmp_path, monkeypatch):
    """``--rollout_backend vllm`` wiring in the RL step, with a scripted stand-in for the vLLM engine
    (tests/test_vllm_backend.py's ``_FakeVLLM``; no real vLLM here): the engine is built once, gets
    the weights before the first rollout and again after the update, and TIS weights (NaN rollout
    log-probs at forced ``</think>``) keep the loss finite."""
    import sys
    from types import SimpleNamespace

    from tests.test_vllm_backend import _FakeVLLM
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.rl import RLState, rl_step, rollout_backend

    made = {}
    mod = SimpleNamespace(SamplingParams=_FakeVLLM.SamplingParams, EngineArgs=_FakeVLLM.EngineArgs, __version__="fake")
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    cfg = _cfg(tmp_path, "--num_thoughts", "2", "--answers_per_thought", "2", "--rollout_backend", "vllm",
               "--tis_cap", "2.0", "--ppo_epochs", "1")
    task = _shaped_task()
    st = stg.build_stage(cfg, "rl", "tiny-qwen2.5-vl", global_batch=2, micro=1, lr=1e-3, warmup=0, total_optimizer_steps=10)
    pad = st.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def LLM(**kw):
        made["llm"] = _FakeVLLM.LLM(st.family, pad, **kw)
        return made["llm"]

    mod.LLM = LLM
    backend = rollout_backend(st, cfg)
    assert rollout_backend(st, cfg) is backend  # built once per stage
    llm = made["llm"]
    n_params = len(list(st.engine.module.parameters()))
    assert len(llm.loaded) == n_params and llm.events.count("reset") == 1  # weights pushed before any rollout
    out = rl_step(st, cfg, task, RLState(task), task.synthetic(2, seed=5))
    assert math.isfinite(out["loss/policy"]) and math.isfinite(out["grad/norm"])
    assert out["rollout/thought_truncated"] > 0  # the double truncates odd thoughts: NaN log-probs went through TIS
    assert 0.0 < out["tis/mean"] <= 2.0 and 0.0 <= out["tis/capped"] <= 1.0  # logged, as docs/VLLM.md says
    assert len(llm.loaded) == 2 * n_params and llm.events.count("reset") == 2  # synced again after the update
    stg.release(st)


def test_rollout_backend_config_is_checked(tmp_path):
    with pytest.raises(ValueError, match="rollout_backend"):
        _cfg(tmp_path, "--rollout_backend", "sglang")
    with pytest.raises(ValueError, match="tis_cap"):
        _cfg(tmp_path, "--tis_cap", "2.0")  # TIS only means something with vLLM rollouts


def test_eval_every_logs_the_heldout_curve_images_and_keeps_best(tmp_path):
    """Evaluation during training through the trainer's own entry point: held-out records at the
    due steps of both stages (JSONL and TensorBoard, with drawn predictions), a kept best model."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vlm_grpo_ma.training.cli import main
    from vlm_grpo_ma.training.metrics import read_metrics

    summary = main(["--task", "affordance", "--output_dir", str(tmp_path), "--sft_steps", "5", "--sft_batch_size", "4",
                    "--sft_warmup_steps", "0", "--rl_steps", "3", "--prompts_per_step", "2", "--num_thoughts", "2",
                    "--answers_per_thought", "2", "--eval_samples", "4", "--eval_batch_size", "4",
                    "--max_thought_tokens", "12", "--max_answer_tokens", "10", "--eval_every", "2",
                    "--eval_images", "2", "--keep_best_metric", "reward", "--report_to", "tensorboard",
                    "--deepspeed", "configs/deepspeed/zero3.json"])
    sft = read_metrics(tmp_path / "metrics.jsonl", "sft_eval")
    rl = read_metrics(tmp_path / "metrics.jsonl", "rl_eval")
    assert [r["step"] for r in sft] == [2, 4, 5] and [r["step"] for r in rl] == [2, 3]  # every 2 and the last
    for r in sft + rl:
        assert {"heldout/mean_iou", "heldout/reward", "heldout/format_rate", "time/eval", "heldout/best"} <= set(r)
    assert summary["periodic_eval"]["evaluations"] == 5 and summary["periodic_eval"]["seconds"] > 0
    for stage in ("sft", "rl"):
        rec = json.loads((tmp_path / stage / "best" / "stage_record.json").read_text())
        assert rec["metric"] == "reward" and rec["stage"] == stage
        assert (tmp_path / stage / "best" / "config.json").is_file()
        acc = EventAccumulator(str(tmp_path / "tensorboard" / f"{stage}_eval"), size_guidance={"images": 0})
        acc.Reload()
        assert {"heldout/predictions/0", "heldout/predictions/1"} <= set(acc.Tags()["images"])
        assert "heldout/mean_iou" in acc.Tags()["scalars"]


def test_keep_best_saves_only_on_improvement(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from vlm_grpo_ma.training import periodic_eval as pe

    values = iter([0.2, 0.5, 0.4, 0.7, 0.1])
    monkeypatch.setattr(pe, "evaluate", lambda *a, **k: {"accuracy": next(values), "eval/reward": 0.0})
    saved, logged = [], []
    logger = SimpleNamespace(log=lambda stage, step, m: logged.append((stage, step, m)),
                             log_images=lambda *a: None)
    stage = SimpleNamespace(name="rl", dir=tmp_path, engine=SimpleNamespace(module=None), processor=None,
                            family=None, gather=None)

    def save(st, path, record):
        saved.append(record["step"])
        path.mkdir(parents=True, exist_ok=True)
        (path / "stage_record.json").write_text(json.dumps(record))

    ev = pe.PeriodicEval(SimpleNamespace(name="vqa"), ["x"], logger, every=1, images=0, keep_best_metric="accuracy",
                         save_model=save)
    for step in (1, 2, 3):
        ev(stage, step, 10)
    assert saved == [1, 2] and [m["heldout/best"] for _, _, m in logged] == [0.2, 0.5, 0.5]
    # a resumed run reads the best back from the kept folder: 0.7 beats it, a fresh 0.45 would not
    ev2 = pe.PeriodicEval(SimpleNamespace(name="vqa"), ["x"], logger, every=1, images=0, keep_best_metric="accuracy",
                          save_model=save)
    ev2(stage, 4, 10)
    assert saved == [1, 2, 4]
    with pytest.raises(KeyError, match="keep_best_metric"):
        pe.PeriodicEval(SimpleNamespace(name="vqa"), ["x"], logger, every=1, images=0, keep_best_metric="iou",
                        save_model=save)(stage, 5, 10)
    assert not ev.due(3, 10) or ev.every == 1
    assert pe.PeriodicEval(None, ["x"], logger, every=4).due(10, 10) and not pe.PeriodicEval(None, ["x"], logger, every=4).due(9, 10)


def test_eval_suite_by_name_during_training(tmp_path):
    """--eval_suite: a benchmark suite (here a file) evaluated during training through bench's
    suite loader, which the command line hands to the trainer."""
    from vlm_grpo_ma.cli import register_training_hooks
    from vlm_grpo_ma.training import periodic_eval
    from vlm_grpo_ma.training.cli import main
    from vlm_grpo_ma.training.metrics import read_metrics

    suite = tmp_path / "tiny-vqa.yaml"
    suite.write_text("name: tiny-vqa\ntask: vqa\ndata: {format: synthetic, n: 3, seed: 5}\n"
                     "generation: {max_new_tokens: 16, batch_size: 3}\n")
    register_training_hooks()
    try:
        main(["--task", "affordance", "--stage", "sft", "--output_dir", str(tmp_path / "run"), "--sft_steps", "2",
              "--sft_batch_size", "2", "--sft_warmup_steps", "0", "--eval_samples", "0", "--eval_every", "2",
              "--eval_suite", str(suite), "--eval_images", "1", "--deepspeed", "configs/deepspeed/zero3.json"])
    finally:
        periodic_eval.set_suite_resolver(None)
    rec = read_metrics(tmp_path / "run" / "metrics.jsonl", "sft_eval")
    assert [r["step"] for r in rec] == [2] and "heldout/accuracy" in rec[0]  # the suite's task: vqa metrics
    with pytest.raises(ValueError, match="no suite resolver"):
        periodic_eval.resolve_suite("synthetic-vqa")


def test_drawn_prediction_marks_reference_and_prediction():
    from vlm_grpo_ma import get_task
    from dataclasses import replace

    from vlm_grpo_ma.training.periodic_eval import _shapes, draw_prediction

    sample = get_task("affordance").synthetic(1, seed=3)[0]
    boxes, points = _shapes({"box": [0.1, 0.2, 0.5, 0.6], "p": [[0.3, 0.4]], "n": [3, 4]})
    assert boxes == [[0.1, 0.2, 0.5, 0.6]] and points == [[0.3, 0.4]]  # [3, 4] is not canonical geometry
    img = draw_prediction(sample, "<think>x</think><answer>[1, 2]</answer>", [0.1, 0.1, 0.4, 0.4], None)
    red = sum(1 for px in img.getdata() if px == (255, 40, 40))
    assert img.width == 320 and red > 50  # the predicted box is drawn
    text_only = draw_prediction(replace(sample, images=[], target={"answer": "red"}), "x", None, "no_answer")
    assert text_only.height > 20


def test_sft_evaluation_never_overlaps_the_collate_thread(tmp_path, monkeypatch):
    """SFT collates step s+1 in a thread while step s trains; the processor's tokenizer is not
    thread-safe (its padding state is shared), so an evaluation waits for that thread."""
    import threading
    import time as _time

    from vlm_grpo_ma.training import sft
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.metrics import MetricsLogger

    busy = threading.Event()
    real = sft.collate_micro_batches

    def slow_collate(*a, **k):
        busy.set()
        _time.sleep(0.3)
        try:
            return real(*a, **k)
        finally:
            busy.clear()

    monkeypatch.setattr(sft, "collate_micro_batches", slow_collate)
    seen = []

    class Periodic:
        def due(self, step, last):
            return True

        def __call__(self, stage, step, last):
            seen.append(busy.is_set())

    cfg = _cfg(tmp_path, "--sft_steps", "3")
    from vlm_grpo_ma import get_task

    task = get_task("affordance")
    st = stg.build_stage(cfg, "sft", "tiny-qwen2.5-vl", global_batch=4, micro=0, lr=1e-3, warmup=0, total_optimizer_steps=3)
    sft.run_sft(st, cfg, task, MetricsLogger(tmp_path, "none"), periodic=Periodic())
    stg.release(st)
    assert seen == [False, False, False]
