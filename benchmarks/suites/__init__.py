"""Bundled benchmark suites (installed as ``vlm_grpo_ma.suites``; data only)."""
