"""Which uids the sandbox runs code as, and finding what runs under them.

Root mode runs each solution under a uid of a pool (``uid_base .. uid_base + uid_count - 1``)
that belongs to nobody else; a run claims its uid machine-wide (an ``flock`` per uid, so
concurrent scorers in several processes never share one) and, before the uid goes back to the
pool, every process holding it as its real, effective or saved uid is killed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import stat
import tempfile
import threading
import time

logger = logging.getLogger("vlm_grpo_ma.sandbox")


def _default_lock_dir() -> str:
    return "/run/vlm-grpo-ma-sandbox" if os.access("/run", os.W_OK) else \
        os.path.join(tempfile.gettempdir(), "vlm-grpo-ma-sandbox-uids")


def _private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) or check that the existing one is ours and private."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"sandbox uid lock directory {path} is not a private directory of uid "
                           f"{os.geteuid()} (mode {oct(st.st_mode)}, owner {st.st_uid})")
    return path


class _UidClaims:
    """Machine-wide claims on the sandbox uids: a run holds an exclusive ``flock`` on
    ``<lock_dir>/uid-<n>.lock`` for as long as it uses uid ``n``.  ``flock`` locks belong to an
    open file description, so two threads of one process exclude each other exactly like two
    processes do, and a lock dies with its holder (a crashed scorer frees its uids)."""

    def __init__(self, base: int, count: int, lock_dir: str):
        self.base, self.count, self.lock_dir = base, count, lock_dir
        self.dirty: set[int] = set()  # uids that could not be cleaned: never used again here
        self._ready = False
        self._lock = threading.Lock()

    def acquire(self, sweep) -> tuple[int, int]:
        """(uid, lock fd) of a free uid with no process left (``sweep(uid)`` cleans a uid that
        a crashed scorer left behind); waits while every uid is in use."""
        with self._lock:
            if not self._ready:
                _private_dir(self.lock_dir)
                self._ready = True
        while True:
            start = secrets.randbelow(self.count)
            for k in range(self.count):
                uid = self.base + (start + k) % self.count
                if uid in self.dirty:
                    continue
                fd = os.open(os.path.join(self.lock_dir, f"uid-{uid}.lock"),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                if sweep(uid):
                    return uid, fd
                self.dirty.add(uid)
                logger.error("sandbox uid %d still owns processes; not used again", uid)
                os.close(fd)
            time.sleep(0.05)

    def release(self, uid: int, fd: int, clean: bool) -> None:
        if not clean:
            self.dirty.add(uid)
            logger.error("sandbox uid %d still owns processes; not used again", uid)
        os.close(fd)


_CLAIMS: dict[tuple[int, int, str], _UidClaims] = {}
_CLAIMS_LOCK = threading.Lock()


def _uid_claims(base: int, count: int, lock_dir: str) -> _UidClaims:
    with _CLAIMS_LOCK:
        return _CLAIMS.setdefault((base, count, lock_dir), _UidClaims(base, count, lock_dir))


def _processes_of(uid: int) -> list[int]:
    """Live (non-zombie) process ids with ``uid`` as real, effective, saved or filesystem uid
    (read from ``/proc/<pid>/status``: a setuid program keeps the real uid of its caller)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        state, uids = b"", []
        for line in status.splitlines():
            if line.startswith(b"State:"):
                state = line.split()[1] if len(line.split()) > 1 else b""
            elif line.startswith(b"Uid:"):
                uids = [int(x) for x in line.split()[1:]]
        if uid in uids and state not in (b"Z", b"X"):
            pids.append(int(name))
    return pids


def _world_executable(path: str) -> bool:
    """Whether an unprivileged user can execute ``path`` (every ancestor searchable)."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        d = os.path.dirname(path)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


def _count_processes_of_caller() -> int:
    uid = os.getuid()
    try:
        return len(_processes_of(uid))
    except OSError:
        return 0
