"""Unit tests of the trainer's plumbing (no engine): config and its up-front checks, data
positions, DeepSpeed config filling, LoRA merging, metrics logging."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_grpo_ma.task import Reward, Task
from vlm_grpo_ma.training import distributed as dist
from vlm_grpo_ma.training.checkpoint import merge_lora_state_dict
from vlm_grpo_ma.training.cli import format_summary, parse_train_config
from vlm_grpo_ma.training.data import SampleStream, heldout_samples
from vlm_grpo_ma.training.engine import resolve_ds_config
from vlm_grpo_ma.training.metrics import MetricsLogger, read_metrics
from vlm_grpo_ma.training.stage import split_batch


class _Task(Task):
    name = "toy"
    reward_parts = ("format", "score")

    def __init__(self, behaviour="ok"):
        super().__init__()
        self.behaviour = behaviour

    def messages(self, sample, family):
        return []

    def sft_target(self, sample, family):
        return ""

    def parse(self, answer_text, sample, family):
        return answer_text

    def reward(self, thought, answer, sample, family):
        if self.behaviour == "raise":
            raise ZeroDivisionError("boom")
        if self.behaviour == "nan":
            return Reward(float("nan"), {"format": 1.0, "score": float("nan")})
        return Reward(0.75, {"format": 1.0, "score": 0.75 / 0.9})

    def metrics(self, predictions, samples):
        return {}

    def synthetic(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [f"s{seed}-{i}-{int(torch.randint(0, 10**6, (1,), generator=g))}" for i in range(n)]


def test_config_defaults_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("task: detection\nnum_thoughts: 2\nanswers_per_thought: 8\nsft_steps: 7\n")
    cfg = parse_train_config(["--config", str(y), "--answers_per_thought", "3", "--stage", "rl"])
    assert (cfg.data.task, cfg.rl.num_thoughts, cfg.rl.answers_per_thought, cfg.sft.sft_steps) == ("detection", 2, 3, 7)
    assert cfg.run.stage == "rl" and cfg.model.model == "tiny-qwen2.5-vl"
    assert cfg.flat()["clip_low"] == 0.2
    with pytest.raises(ValueError, match="stage"):
        parse_train_config(["--stage", "pretrain"])
    with pytest.raises(ValueError, match=">= 2"):
        parse_train_config(["--num_thoughts", "1", "--answers_per_thought", "1"])


@pytest.mark.parametrize("args, match", [
    (["--loss_agg_mode", "token_mean"], "loss_agg_mode must be one of token-mean, seq-mean-token-mean"),
    (["--adv_estimator", "gae"], "adv_estimator must be one of grpo, grpo_ma, got 'gae'"),
    (["--policy_loss", "gspo"], "policy_loss must be one of cispo, clipped, sapo, vespo"),
    (["--importance_sampling_level", "path"], "importance_sampling_level must be one of token, sequence"),
    (["--scale_rewards", "global"], "scale_rewards must be one of group, batch, none"),
    (["--scale_rewards", "batch", "--no_scale_adv_by_std"], "conflicts with scale_rewards batch"),
    (["--cispo_cap", "0"], "cispo_cap"),
    (["--overlong_penalty_cache", "-1"], "overlong_penalty_cache"),
    (["--dynamic_sampling", "dapo"], "dynamic_sampling must be one of off, full, pilot"),
    (["--dynamic_sampling", "pilot", "--rollout_backend", "vllm"], "pilot needs rollout_backend hf"),
    (["--dynamic_sampling_max_rounds", "-1"], "dynamic_sampling_max_rounds"),
    (["--eval_suite", "synthetic-vqa"], "eval_suite is evaluated during training"),
    (["--keep_best_metric", "accuracy"], "keep_best_metric needs eval_every"),
    (["--eval_every", "5", "--keep_best_mode", "highest"], "keep_best_mode"),
    (["--kl_estimator", "k4"], "kl_estimator must be one of k1, k2, k3"),
    (["--adv_estimator", "grpo", "--answers_per_thought", "4"], "grpo needs answers_per_thought = 1"),
])
def test_algorithm_names_are_checked_before_any_training(args, match):
    with pytest.raises(ValueError, match=match):
        parse_train_config(args)


def test_every_loss_agg_mode_and_registered_name_is_accepted():
    from vlm_grpo_ma.algorithms import AGGREGATION_MODES

    for mode in AGGREGATION_MODES:
        assert parse_train_config(["--loss_agg_mode", mode]).rl.loss_agg_mode == mode
    for k in ("k1", "k2", "k3"):
        assert parse_train_config(["--kl_estimator", k]).rl.kl_estimator == k
    cfg = parse_train_config(["--adv_estimator", "grpo", "--num_thoughts", "4", "--answers_per_thought", "1"])
    assert cfg.rl.adv_estimator == "grpo"
    from vlm_grpo_ma.algorithms.registry import POLICY_LOSSES
    from vlm_grpo_ma.training.config import policy_loss_options

    for name in POLICY_LOSSES.names():  # every registered loss takes the options the config gives it
        rl = parse_train_config(["--policy_loss", name]).rl
        opts = policy_loss_options(rl)
        x = torch.zeros(3)
        POLICY_LOSSES.get(name)(x, x, x, torch.ones(3), seq_ids=torch.tensor([0, 0, 1]), **opts)


def test_every_shipped_config_parses():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert len(files) >= 12, files
    for f in files:
        cfg = parse_train_config(["--config", str(f)])
        assert cfg.data.task in f.name
        resolve_ds_config(cfg.run.deepspeed, micro_batch_size=1, grad_accum_steps=1, bf16=False,
                          max_grad_norm=1.0, lr=1e-5, weight_decay=0.0)


def test_sample_stream_is_a_function_of_step():
    task = _Task()
    a, b = SampleStream(task, 4, seed=3, stage="sft"), SampleStream(task, 4, seed=3, stage="sft")
    assert a.batch(5) == b.batch(5)  # same on every rank and after a resume
    assert a.batch(5) != a.batch(6)
    assert SampleStream(task, 4, seed=3, stage="rl").batch(5) != a.batch(5)  # stages draw their own
    held = heldout_samples(task, 4, seed=3)
    assert not set(held) & {s for step in range(50) for s in a.batch(step)}


def test_sample_stream_over_a_dataset_visits_each_sample_once_per_epoch():
    data = list(range(10))
    s = SampleStream(_Task(), 5, seed=0, stage="sft", samples=data)
    epoch0 = s.batch(0) + s.batch(1)
    assert sorted(epoch0) == data and epoch0 != data  # a permutation
    epoch1 = s.batch(2) + s.batch(3)
    assert sorted(epoch1) == data and epoch1 != epoch0
    assert SampleStream(_Task(), 5, seed=0, stage="sft", samples=data).batch(3) == s.batch(3)


def test_shard_and_split_batch():
    assert dist.shard(list(range(8)), r=1, n=2) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="evenly"):
        dist.shard(list(range(5)), r=0, n=2)
    assert split_batch(32, 0, "sft_batch_size") == (32, 32, 1)  # one process in tests
    assert split_batch(32, 8, "sft_batch_size") == (32, 8, 4)
    with pytest.raises(ValueError, match="micro batch"):
        split_batch(32, 5, "sft_batch_size")


def test_resolve_ds_config_fills_auto(tmp_path):
    from vlm_grpo_ma.training.config import DEFAULT_DEEPSPEED_CONFIG

    cfg = resolve_ds_config(DEFAULT_DEEPSPEED_CONFIG, micro_batch_size=4, grad_accum_steps=2, bf16=True,
                            max_grad_norm=0.5, lr=1e-5, weight_decay=0.1)
    assert cfg["train_batch_size"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["zero_optimization"]["stage"] == 3
    assert not any(k.startswith("_") for k in cfg)
    off = resolve_ds_config(DEFAULT_DEEPSPEED_CONFIG.replace("zero3.json", "zero3_offload.json"), micro_batch_size=1,
                            grad_accum_steps=1, bf16=False, max_grad_norm=1.0, lr=3e-6, weight_decay=0.0)
    assert off["optimizer"]["params"]["lr"] == 3e-6
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 4,\n "bf16": }')
    with pytest.raises(ValueError, match=r"bad.json: line 2"):
        resolve_ds_config(bad, micro_batch_size=1, grad_accum_steps=1, bf16=False, max_grad_norm=1, lr=1, weight_decay=0)


def test_merge_lora_state_dict_folds_b_times_a():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = torch.tensor([[1.0, 0.0]])  # [r=1, in=2]
    b = torch.tensor([[2.0], [0.5]])  # [out=2, r=1]
    sd = {
        "base_model.model.layer.q_proj.base_layer.weight": w,
        "base_model.model.layer.q_proj.base_layer.bias": torch.tensor([0.1, 0.2]),
        "base_model.model.layer.q_proj.lora_A.default.weight": a,
        "base_model.model.layer.q_proj.lora_B.default.weight": b,
        "base_model.model.head.weight": torch.ones(1),
    }
    out = merge_lora_state_dict(sd, scale=2.0)
    assert set(out) == {"layer.q_proj.weight", "layer.q_proj.bias", "head.weight"}
    # W + 2 * B @ A = [[1 + 4, 2], [3 + 1, 4]]
    assert torch.equal(out["layer.q_proj.weight"], torch.tensor([[5.0, 2.0], [4.0, 4.0]]))


def test_metrics_logger_jsonl_and_truncate(tmp_path):
    lg = MetricsLogger(tmp_path, report_to="tensorboard")
    for s in (1, 2, 3):
        lg.log("rl", s, {"reward/mean": s / 10, "grad/norm": torch.tensor(float("inf"))})
    lg.log("sft", 3, {"loss/sft": 1.0})
    lg.close()
    recs = read_metrics(tmp_path / "metrics.jsonl", "rl")
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[0]["grad/norm"] == "inf"
    assert any((tmp_path / "tensorboard" / "rl").iterdir())
    lg.truncate_after("rl", 1)
    assert [(r["stage"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [("rl", 1), ("sft", 3)]


def test_format_summary_table():
    s = {"evals": {"before_sft": {"mean_iou": 0.0, "eval/parse/no_answer": 3.0}, "after_sft": {"mean_iou": 0.5},
                   "after_rl": {"mean_iou": 0.55}},
         "sft": {"steps": 10, "seconds": 3.0}, "paths": {"run_dir": "/x"}}
    text = format_summary("affordance", s)
    assert "mean_iou" in text and "0.5500" in text and "parse" not in text and "/x" in text
    json.dumps(s)


def test_synthetic_batch_is_the_task_generator_and_does_not_hide_its_errors():
    from vlm_grpo_ma.training.data import synthetic_batch

    class Broken(_Task):
        def synthetic(self, n, seed=0):
            if seed == 7:
                raise ValueError("cannot place a box")
            return super().synthetic(n, seed)

    assert synthetic_batch(Broken(), 3, 8) == _Task().synthetic(3, 8)
    with pytest.raises(ValueError, match="cannot place"):  # no silent substitute seed
        synthetic_batch(Broken(), 3, 7)


def test_help_lists_every_field_with_its_documentation(capsys):
    from vlm_grpo_ma.training.config import ALL_ARGS

    with pytest.raises(SystemExit):
        parse_train_config(["--help"])
    text = capsys.readouterr().out
    for cls in ALL_ARGS:
        for name, f in cls.__dataclass_fields__.items():
            assert f"--{name}" in text
            assert f.metadata.get("help"), f"{cls.__name__}.{name} has no documentation"


def test_task_options_reach_the_task_and_unknown_ones_are_refused():
    from vlm_grpo_ma.task import get_task

    cfg = parse_train_config(["--task", "affordance", "--task_options", '{"object_scale": 1.2, "box_reward": "giou"}'])
    task = get_task(cfg.data.task, **cfg.data.task_kwargs())
    assert (task.object_scale, task.box_reward) == (1.2, "giou")
    assert parse_train_config(["--task", "affordance"]).data.task_kwargs() == {}
    with pytest.raises(ValueError, match=r"no option\(s\) \['moed'\].*reads: \[.*'mode'"):
        get_task("affordance", moed="points")
    # the synthetic objects grow with object_scale
    small, big = (get_task("affordance", object_scale=s).synthetic(40, seed=1) for s in (1.0, 1.6))
    area = lambda ss: sum((s.target["box"][2] - s.target["box"][0]) * (s.target["box"][3] - s.target["box"][1]) for s in ss)  # noqa: E731
    assert area(big) > 2 * area(small)


def test_lr_schedule_is_checked():
    from vlm_grpo_ma.training.cli import parse_train_config

    assert parse_train_config(["--task", "affordance", "--lr_schedule", "constant"]).run.lr_schedule == "constant"
    with pytest.raises(ValueError, match="lr_schedule"):
        parse_train_config(["--task", "affordance", "--lr_schedule", "linear"])


def test_objective_settings_from_the_config():
    """Every RL option of the objective reaches ``algorithms.grpo_ma.ObjectiveSettings``."""
    from vlm_grpo_ma.training.config import objective_settings

    s = objective_settings(parse_train_config([]).rl)
    assert not s.sequence_level and s.loss_options == {"clip_low": 0.2, "clip_high": 0.2} and not s.needs_old_logp
    assert objective_settings(parse_train_config(["--importance_sampling_level", "sequence"]).rl).sequence_level
    s = objective_settings(parse_train_config(["--policy_loss", "vespo"]).rl)  # sequence-level by construction
    assert s.sequence_level and s.loss_options["k_pos"] == 2.0
    assert objective_settings(parse_train_config(["--policy_loss", "cispo", "--cispo_cap", "3"]).rl).loss_options == {"cap": 3.0}
    s = objective_settings(parse_train_config([
        "--no_scale_adv_by_std", "--overlong_penalty_cache", "4", "--mask_truncated_completions", "--kl_coef", "0.1",
        "--kl_estimator", "k2", "--ppo_epochs", "2", "--loss_agg_mode", "seq-mean-token-sum-norm",
        "--max_thought_tokens", "40", "--max_answer_tokens", "8", "--adv_estimator", "grpo_ma"]).rl)
    assert (s.scale_rewards, s.overlong_cache, s.mask_truncated, s.kl_coef, s.kl_estimator, s.needs_old_logp,
            s.loss_agg_mode, s.max_len) == ("none", 4, True, 0.1, "k2", True, "seq-mean-token-sum-norm", 48)


def test_batch_scaled_advantages_use_every_ranks_rewards(monkeypatch):
    """``scale_rewards: batch`` on 2 ranks: each rank's advantages (and overlong punishment) are its
    rows of the whole batch's, not of its own half (which would use another std)."""
    from types import SimpleNamespace

    from vlm_grpo_ma.algorithms.grpo_ma import ObjectiveSettings, tree_advantages
    from vlm_grpo_ma.training import distributed as dist
    from vlm_grpo_ma.training import rl

    g = torch.Generator().manual_seed(0)
    R = torch.rand(4, 2, 3, generator=g)
    R[2:] *= 5  # the second rank's rewards spread wider: its own std differs from the batch's
    T, A = torch.randint(1, 5, (4, 2), generator=g), torch.randint(1, 5, (4, 2, 3), generator=g)
    s = ObjectiveSettings(scale_rewards="batch", overlong_cache=2, max_thought_tokens=4, max_answer_tokens=4)
    whole = tree_advantages(s, R, T, A)
    halves = [(R[:2], T[:2], A[:2]), (R[2:], T[2:], A[2:])]
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_objects", lambda obj: halves)
    for rank in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        r, t, a = halves[rank]
        got = rl.advantages(s, SimpleNamespace(thought_lengths=lambda t=t: t, answer_lengths=lambda a=a: a), r)
        rows = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(got.thought, whole.thought[rows]) and torch.equal(got.answer, whole.answer[rows])
        assert torch.equal(got.penalty, whole.penalty[rows])
        own = tree_advantages(s, r, t, a)
        assert not torch.allclose(own.answer, got.answer)  # the gather matters
