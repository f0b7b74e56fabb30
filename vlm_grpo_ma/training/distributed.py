"""Process-group plumbing: one code path for the deepspeed launcher, torchrun and plain python.

- No CUDA: ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported, the shared-memory
  allreduce op (a ~40 s JIT build on first use) is skipped, and the backend is gloo
  (DeepSpeed's CPU accelerator; NCCL needs CUDA).
- No launcher (plain ``python scripts/train.py``): a one-process group on a free local port.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch


def prepare_environment() -> None:
    """Set what must be set before ``import deepspeed``: the CPU accelerator when there is no
    CUDA device, and the single-process rendezvous variables when no launcher set them."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def on_cpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "") == "cpu" or not torch.cuda.is_available()


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPUs); idempotent."""
    prepare_environment()
    import deepspeed
    import deepspeed.ops

    if on_cpu():
        # the shm allreduce op is a JIT C++ build (~40 s); gloo alone is correct and enough here
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu() else "nccl", auto_mpi_discovery=False)
    if not on_cpu():
        torch.cuda.set_device(local_rank())


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized() and world_size() > 1:
        torch.distributed.barrier()


def device() -> torch.device:
    return torch.device("cpu") if on_cpu() else torch.device("cuda", local_rank())


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(x: float) -> float:
    """The sum of a Python number over ranks."""
    if world_size() == 1:
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def shard(items: list, r: int | None = None, n: int | None = None) -> list:
    """The contiguous block of ``items`` that rank ``r`` of ``n`` owns (len(items) % n == 0)."""
    r = rank() if r is None else r
    n = world_size() if n is None else n
    if len(items) % n:
        raise ValueError(f"{len(items)} items do not split evenly over {n} ranks")
    k = len(items) // n
    return items[r * k : (r + 1) * k]
