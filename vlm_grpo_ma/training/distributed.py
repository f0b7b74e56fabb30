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


# ---------------------------------------------------------------------------------------------
# A failing rank stops every rank, with the cause named
#
# When one rank raises, the others are (or soon will be) blocked in a collective that never
# completes: NCCL waits for its watchdog (10-30 min), and across nodes no launcher kills them
# (each node's launcher only watches its own processes).  So the failing rank writes its cause
# into the job's rendezvous store (the TCPStore at MASTER_ADDR:MASTER_PORT that every rank
# already reaches) and every rank runs a small watcher thread that polls that key: a rank that
# sees another rank's failure logs it and exits at once, even from inside a stuck collective.

FAILURE_KEY = "vlm_grpo_ma/failure"
POLL_S = 0.5

_watch: "FailureWatch | None" = None


def _store_client(timeout_s: float = 10.0):
    """A client of the rendezvous store of this job (None for a one-process run)."""
    import datetime

    if world_size() == 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                      timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class FailureWatch:
    """Polls the store for another rank's failure; on one, names it and ends this process."""

    def __init__(self):
        import threading

        self.store = _store_client()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rank-failure-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        misses = 0
        while not self.stop.wait(POLL_S):
            try:
                found = self.store.check([FAILURE_KEY])
                misses = 0
            except Exception:  # noqa: BLE001 - the store's host is gone: tolerated briefly (it may be ending normally)
                misses += 1
                if misses < 20 or self.stop.is_set():
                    continue
                _exit_with(f"rank {rank()}: lost the job's store at {os.environ.get('MASTER_ADDR')}:"
                           f"{os.environ.get('MASTER_PORT')} for {misses * POLL_S:.0f} s (the process hosting it, "
                           f"rank 0 or node 0's launcher, died): stopping")
                return
            if found and not self.stop.is_set():
                info = self.store.get(FAILURE_KEY).decode(errors="replace")
                _exit_with(f"rank {rank()}: stopping because another rank failed: {info}")
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _exit_with(message: str) -> None:
    import logging
    import sys

    logging.getLogger(__name__).error(message)
    print(message, file=sys.stderr, flush=True)
    for h in logging.getLogger().handlers:
        h.flush()
    os._exit(1)


def start_failure_watch() -> None:
    """Start the watcher of this process (multi-rank runs only); idempotent."""
    global _watch
    if _watch is None and world_size() > 1:
        _watch = FailureWatch()


def stop_failure_watch() -> None:
    global _watch
    if _watch is not None:
        _watch.close()
        _watch = None


def announce_failure(exc: BaseException) -> None:
    """Tell every rank that this one failed with ``exc`` (then the caller re-raises).

    The first failure wins (a rank failing because another did does not overwrite the cause).
    The announcing process waits a few poll periods so that the others read the cause before
    it exits (rank 0's process may host the store)."""
    import socket as _socket
    import time
    import traceback

    global _watch
    if world_size() == 1:
        return
    if _watch is not None:  # this rank's own failure must not make its watcher exit it first
        _watch.stop.set()
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {frame.filename}:{frame.lineno})" if frame else ""
    cause = f"rank {rank()} (pid {os.getpid()} on {_socket.gethostname()}) raised {type(exc).__name__}: {exc}{where}"
    try:
        store = _watch.store if _watch is not None else _store_client()
        first = store.compare_set(FAILURE_KEY, "", cause).decode(errors="replace")  # set unless a rank was first
    except Exception:  # noqa: BLE001 - the store may be gone: the cause is still in this rank's log
        return
    if first != cause:  # this rank's error is a consequence (e.g. a collective broken by the first failure)
        import logging
        import sys

        msg = f"rank {rank()}: stopping because another rank failed: {first}"
        logging.getLogger(__name__).error(msg)
        print(msg, file=sys.stderr, flush=True)
        return
    time.sleep(4 * POLL_S)  # let the other ranks read the cause before this process (maybe the store's host) ends
