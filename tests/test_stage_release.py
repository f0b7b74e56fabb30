"""SFT then RL in one process: after SFT's release its DeepSpeed engine, optimizer, model and
parameters are gone before RL builds its own (weak references on the tiny model).

DeepSpeed ZeRO-3 keeps the wrapped root module in a module-global list and the module's hooks
close over the engine and the optimizer; without :func:`vlm_grpo_ma.training.stage.release`
dropping them, all of it stayed reachable (issue: ~10 GB resident at Qwen2.5-VL-3B widths
after SFT, RL then killed for memory)."""

from __future__ import annotations

import gc
import weakref

import pytest

from vlm_grpo_ma.training import distributed as dist

dist.prepare_environment()


@pytest.fixture(scope="module", autouse=True)
def _process_group():
    dist.init_distributed()
    yield


def test_sft_engine_optimizer_and_model_are_freed_before_rl(tmp_path):
    from deepspeed.runtime.zero import parameter_offload

    from vlm_grpo_ma.task import get_task
    from vlm_grpo_ma.training import stage as stg
    from vlm_grpo_ma.training.cli import parse_train_config
    from vlm_grpo_ma.training.metrics import MetricsLogger
    from vlm_grpo_ma.training.sft import run_sft

    cfg = parse_train_config(["--task", "affordance", "--deepspeed", "configs/deepspeed/zero3.json", "--output_dir", str(tmp_path), "--sft_batch_size", "2",
                              "--sft_steps", "1", "--sft_warmup_steps", "0", "--report_to", "none"])
    st = stg.build_stage(cfg, "sft", cfg.model.model, global_batch=2, micro=2, lr=1e-4, warmup=0, total_optimizer_steps=1)
    run_sft(st, cfg, get_task("affordance"), MetricsLogger(tmp_path, "none"), 0)
    module = st.engine.module
    assert any(len(m._forward_pre_hooks) for m in module.modules())  # ZeRO-3 hooks are there
    refs = {
        "engine": weakref.ref(st.engine),
        "optimizer": weakref.ref(st.engine.optimizer),
        "model": weakref.ref(module),
        "parameter": weakref.ref(next(module.parameters())),
    }
    assert st.engine.optimizer.__class__.__name__.startswith("DeepSpeedZeroOptimizer")
    del module
    stg.release(st)
    gc.collect()
    assert {k: r() is None for k, r in refs.items()} == {k: True for k in refs}
    assert not parameter_offload.FWD_MODULE_STACK
    # the next stage builds and trains as usual in the same process
    st2 = stg.build_stage(cfg, "rl", cfg.model.model, global_batch=2, micro=2, lr=1e-4, warmup=0, total_optimizer_steps=1)
    assert st2.engine.module is not None
    stg.release(st2)
