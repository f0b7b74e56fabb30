"""Shipped DeepSpeed configs (data only)."""
