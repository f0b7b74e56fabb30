"""Shipped task and DeepSpeed configs (installed as ``vlm_grpo_ma.configs``; data only)."""
