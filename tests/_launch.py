"""Helpers for tests that start the trainer in other processes (launchers, torchrun, nodes)."""

from __future__ import annotations

import os
import socket


def clean_env() -> dict:
    """This process's environment for a child run: one thread, the CPU accelerator, unbuffered
    output, and none of a surrounding launcher's rank variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
