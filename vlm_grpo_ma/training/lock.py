"""One live run per output folder: an advisory ``flock`` on ``<output_dir>/.run.lock``.

Why: when a launcher is killed with SIGKILL its workers can live on as orphans and keep writing
checkpoints into the folder while a new run resumes from it.  The lock is held by the open file
itself, so the operating system releases it when the holding process dies, however it dies
(SIGKILL included): there is never a stale lock to delete by hand.

Every rank of a run holds the lock (shared), so a run is "live" while ANY of its processes is: an
orphaned worker keeps the folder locked.  Rank 0 first takes it exclusively (no other run may
hold it), then all ranks hold it shared for the rest of the run.  The file names the holders
(host, pid, rank) so that a refused run can say whom it is waiting for.

``flock`` is per host on local file systems; on NFSv4 and Lustre it is forwarded to the server
(Linux emulates it with POSIX byte-range locks there), so it also guards a folder shared between
nodes.  Not every network file system implements it: see docs/MULTINODE.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from vlm_grpo_ma.training import distributed as dist

LOCK_NAME = ".run.lock"

#: lock files held by this process, by resolved folder: main() may run twice in one process
#: (tests, notebooks); a new run in the same process supersedes the old one's lock.
_HELD: dict[str, int] = {}


class RunFolderLocked(RuntimeError):
    """Another live run holds the output folder."""


def _holders(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return "another process (its pid could not be read from the lock file)"
    ranks = info.get("ranks") or []
    others = ", ".join(f"pid {r['pid']} (rank {r['rank']} on {r['host']})" for r in ranks[1:])
    return (f"pid {info.get('pid')} on {info.get('host')} (started {info.get('started')})"
            + (f"; its other ranks: {others}" if others else ""))


def _open_and_lock(path: Path, mode: int) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _reads_back(path: Path, rank0: dict) -> bool:
    """Whether ``path`` holds rank 0's lock record (the folder is the same one as rank 0's)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("pid") == rank0["pid"] and info.get("host") == rank0["host"]


def acquire(folder: str | Path) -> Path:
    """Lock ``folder`` for this run on every rank, or raise :class:`RunFolderLocked` naming the
    holder.  Collective: every rank calls it (after rank 0 created the folder)."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:  # an earlier run in this same process: it is over
        release(folder)
    error = None
    if dist.is_main():
        fd = _open_and_lock(path, fcntl.LOCK_EX)
        if fd is None:
            error = f"{folder} is in use by another run: {_holders(path)}. Wait for it to end or stop it " \
                    f"(the lock is released when all its processes exit), or choose another --output_dir."
        else:
            _HELD[key] = fd
    error = dist.broadcast_object(error)
    if error:
        raise RunFolderLocked(error)
    me = {"rank": dist.rank(), "pid": os.getpid(), "host": socket.gethostname()}
    ranks = dist.all_gather_objects(me)
    if dist.is_main():
        fd = _HELD[key]
        info = {"pid": os.getpid(), "host": me["host"], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "ranks": ranks}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        fcntl.flock(fd, fcntl.LOCK_SH)  # downgrade: the other ranks join as shared holders
    dist.barrier()
    # every rank must see rank 0's folder: checkpoints are written by all ranks into one folder
    seen = dist.all_gather_objects((me["host"], _reads_back(path, ranks[0])))
    blind = [f"rank {r} on {h}" for r, (h, ok) in enumerate(seen) if not ok]
    if blind:
        release(folder)
        raise RuntimeError(f"output_dir {folder} is not shared by all ranks ({', '.join(blind)} cannot see rank 0's "
                           f"files in it): give every node the same folder on a shared file system (docs/MULTINODE.md)")
    if not dist.is_main():
        fd = _open_and_lock(path, fcntl.LOCK_SH)
        if fd is None:  # an exclusive holder appeared between rank 0's check and now
            raise RunFolderLocked(f"{folder} is in use by another run: {_holders(path)}")
        _HELD[key] = fd
    dist.barrier()
    return path


def release(folder: str | Path) -> None:
    """Give the lock up (also done by the OS when the process exits)."""
    key = str((Path(folder) / LOCK_NAME).resolve())
    fd = _HELD.pop(key, None)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def release_all() -> None:
    """Give up every lock this process holds (the trainer's entry point, when a run ends)."""
    for key in list(_HELD):
        release(Path(key).parent)
