"""Run untrusted Python (model-written code) in a sandbox and score it against tests.

Every run is a fresh interpreter (``python -I -S -B``) in a fresh temporary directory, started in
its own session and process group, with a scrubbed environment and POSIX resource limits.  What is
enforced depends on the privileges of the caller (see docs/SANDBOX.md for the full threat model):

``isolation="root"`` (the caller is root; chosen automatically when it works)
    A small trusted *launcher* (the caller's interpreter, ``-I -S``) runs first in the child:
    it enters new **network** and **mount** namespaces (``unshare(CLONE_NEWNET | CLONE_NEWNS)``;
    the network namespace has no interface up, not even loopback), mounts small private tmpfs
    over ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock`` and the work directory (so nothing
    the code writes reaches the caller's disk, and the space is bounded), sets the resource
    limits, drops to a **dedicated unprivileged uid/gid** taken from a pool (one uid per
    concurrent run, so ``RLIMIT_NPROC`` really bounds a fork bomb, and the code cannot signal,
    ptrace or read ``/proc/<pid>/environ`` of any other process), and ``execve``s the sandbox
    interpreter.
    After the run every process still owned by that uid (for example one that called ``setsid``
    to leave the process group) is killed.

``isolation="uid"`` (root, but namespaces cannot be created; the automatic fallback)
    The same dedicated uid, limits and clean-up, without the network and mount namespaces: the
    audit hook is the only network barrier, and the code can write world-writable places such
    as ``/tmp``.

``isolation="user"`` (not root; the mode in effect is reported as ``"user_ns"`` or ``"user"``)
    Resource limits, a new session, a scrubbed environment and, where unprivileged user
    namespaces are allowed (``"user_ns"``), a new network namespace.  The code runs as the
    caller's uid, so it could signal the caller's other processes or read their
    ``/proc/<pid>/environ``; without user namespaces the audit hook below is the only network
    barrier.

In both modes the harness installs a ``sys.addaudithook`` hook refusing socket creation and
connection (defence in depth; bypassable with ``ctypes``), the wall clock is enforced by killing
the whole process group, and captured output is read in bounded chunks (a run that exceeds
``output_bytes`` on a stream is killed at once, so the caller never buffers more than that).

Tests (``target["tests"]`` of a code sample) are a list whose items are either

- a string: Python statements (usually ``assert f(2) == 4``) executed in the namespace of the
  solution after the solution module ran (``__name__ == "solution"``); the test passes when it
  raises nothing.  All string tests of a sample share one process; each reports as soon as it
  finishes, so a test that hangs costs only itself and the ones after it.
- a dict ``{"input": str, "output": str}``: the solution runs as a program
  (``__name__ == "__main__"``) with ``input`` on stdin, one process per test; it passes when the
  exit status is 0 and stdout equals ``output`` after :func:`normalise_output` (trailing
  whitespace of every line and trailing blank lines are ignored).

Public API: :class:`SandboxLimits`, :class:`RunResult`, :class:`TestReport`, :class:`Sandbox`
(``run``, ``run_tests``, ``run_many``), :func:`normalise_output`, :func:`validate_tests`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

logger = logging.getLogger(__name__)

__all__ = ["RunResult", "Sandbox", "SandboxLimits", "TestReport", "normalise_output", "validate_tests"]

#: exit status the launcher uses when it cannot set up the isolation it was asked for
LAUNCHER_FAILED = 121
_HARNESS = "_harness.py"
_CONFIG = "_config.json"
_STDIN = "_stdin"
_SOLUTION = "solution.py"


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    Attributes:
        wall_timeout_s: wall-clock limit of one process; the whole process group is killed after it.
        cpu_time_s: ``RLIMIT_CPU`` in seconds (SIGXCPU, then SIGKILL one second later).
        memory_bytes: ``RLIMIT_AS`` (address space) of each process.
        max_processes: ``RLIMIT_NPROC``: processes and threads of the sandbox uid (root mode: the
            uid is the run's own, so this is exact; user mode: added to the caller's current count).
        file_size_bytes: ``RLIMIT_FSIZE``: largest file the code may write.
        open_files: ``RLIMIT_NOFILE``.
        output_bytes: most bytes read from each of stdout and stderr; a run that writes more is
            killed and reported as ``output_limit``.
        tmpfs_bytes: size of each private tmpfs: the work directory, /tmp, /var/tmp, /dev/shm, ...
            (root mode; in user mode the work directory is on the caller's disk).
    """

    wall_timeout_s: float = 5.0
    cpu_time_s: float = 5.0
    memory_bytes: int = 512 * 2**20
    max_processes: int = 16
    file_size_bytes: int = 16 * 2**20
    open_files: int = 64
    output_bytes: int = 2**20
    tmpfs_bytes: int = 8 * 2**20


@dataclass
class RunResult:
    """What one sandboxed process did.

    ``status`` is ``"ok"`` (exit 0), ``"exit"`` (non-zero exit or killed by a signal: see
    ``returncode``), ``"timeout"`` (wall clock), ``"output_limit"`` or ``"sandbox_error"``
    (the sandbox itself could not start the run; ``error`` says why).
    """

    status: str
    returncode: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    report: bytes = b""
    wall_s: float = 0.0
    error: str | None = None


@dataclass
class TestReport:
    """Outcome of a solution against its tests: ``passed[i]`` for test ``i`` and a short
    ``reason`` for the first failure kind seen (``None`` when every test passed)."""

    __test__ = False  # not a pytest test class

    passed: list[bool]
    reason: str | None = None
    details: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Fraction of tests passed (0 for a sample without tests)."""
        return sum(self.passed) / len(self.passed) if self.passed else 0.0

    @property
    def all_passed(self) -> bool:
        return bool(self.passed) and all(self.passed)


def normalise_output(text: str) -> str:
    """Program output as compared by stdin/stdout tests: ``\\r\\n`` -> ``\\n``, trailing
    whitespace of each line and trailing blank lines removed.

    >>> normalise_output("3 \\r\\n4\\n\\n")
    '3\\n4'
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).rstrip("\n")


def validate_tests(tests: Any, where: str = "target['tests']") -> list:
    """Check a sample's tests; raise ValueError naming ``where`` and the bad item."""
    if not isinstance(tests, (list, tuple)) or not tests:
        raise ValueError(f"{where}: expected a non-empty list of tests, got {type(tests).__name__}")
    for i, t in enumerate(tests):
        if isinstance(t, str):
            if not t.strip():
                raise ValueError(f"{where}[{i}]: empty test statement")
        elif isinstance(t, dict):
            if not isinstance(t.get("input", ""), str) or not isinstance(t.get("output"), str):
                raise ValueError(f"{where}[{i}]: stdin/stdout test needs string 'input' and 'output'")
        else:
            raise ValueError(f"{where}[{i}]: a test is an assert string or an {{input, output}} dict")
    return list(tests)


# ----------------------------------------------------------------------------------------------
# Code that runs in the child.  Both are plain source strings so they run under ``-I -S``.

#: The trusted launcher: enters namespaces, sets limits, drops privileges, execs the sandbox.
_LAUNCHER_SRC = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
def fail(step, err):
    os.write(2, ("sandbox launcher: %s failed: %s\n" % (step, err)).encode())
    os._exit(__FAILED__)
if cfg["unshare"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
    flags = CLONE_NEWNET
    if cfg["mount"]:
        flags |= CLONE_NEWNS
    if cfg["userns"]:
        flags |= CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        fail("unshare", os.strerror(ctypes.get_errno()))
    if cfg["mount"]:
        MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
        def mount(src, tgt, fstype, flags, data):
            if libc.mount(src, tgt, fstype, flags, data) != 0:
                fail("mount " + tgt.decode(), os.strerror(ctypes.get_errno()))
        mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
        work = os.getcwd()
        files = {}
        for name in os.listdir(work):
            if name != "_stdin":  # already open as fd 0
                with open(name, "rb") as f:
                    files[name] = f.read()
        opts = ("size=%d,mode=1777" % cfg["tmpfs_bytes"]).encode()
        for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock"):
            if os.path.isdir(d) and not os.path.islink(d):
                mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts)
        # the work directory becomes a size-limited tmpfs of its own, owned by the sandbox uid
        os.makedirs(work, exist_ok=True)
        owner = cfg["uid"] if cfg["uid"] is not None else os.getuid()
        opts = ("size=%d,mode=0700,uid=%d,gid=%d" % (cfg["tmpfs_bytes"], owner, owner)).encode()
        mount(b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts)
        os.chdir(work)
        for name, data in files.items():
            with open(name, "wb") as f:
                f.write(data)
            os.chown(name, owner, owner)
for name, value in cfg["rlimits"]:
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError) as e:
        fail("setrlimit " + name, e)
if cfg["uid"] is not None:
    try:
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    except OSError as e:
        fail("setuid", e)
os.umask(0o077)
try:
    os.execve(cfg["python"], cfg["argv"], cfg["env"])
except OSError as e:
    fail("exec " + cfg["python"], e)
""".replace("__FAILED__", str(LAUNCHER_FAILED))

#: The harness: runs in the sandbox, as the sandbox uid, before and around the solution.
_HARNESS_SRC = r'''
import json, os, sys

def _main():
    with open("_config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    os.unlink("_config.json")
    with open("solution.py", encoding="utf-8") as f:
        src = f.read()
    if cfg["block_network"]:
        blocked = frozenset(("socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                             "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname"))
        def hook(event, args):
            if event in blocked:
                raise PermissionError("network access is disabled in the sandbox")
        sys.addaudithook(hook)
    if cfg["mode"] == "program":
        exec(compile(src, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        return
    fd, nonce = cfg["report_fd"], cfg["nonce"]
    def report(**kw):
        kw["nonce"] = nonce
        os.write(fd, (json.dumps(kw) + "\n").encode())
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(src, "solution.py", "exec"), ns)
    except BaseException as e:
        report(event="solution_error", error=type(e).__name__)
        return
    for i, test in enumerate(cfg["tests"]):
        try:
            exec(compile(test, "test_%d" % i, "exec"), ns)
            report(event="test", i=i, ok=True)
        except BaseException as e:
            report(event="test", i=i, ok=False, error=type(e).__name__)

_main()
'''


# ----------------------------------------------------------------------------------------------
class _UidPool:
    """Thread-safe pool of unprivileged uids, one per concurrent root-mode run."""

    def __init__(self, base: int, size: int):
        self.free = list(range(base, base + size))
        self.cond = threading.Condition()

    def acquire(self) -> int:
        with self.cond:
            while not self.free:
                self.cond.wait()
            return self.free.pop(0)

    def release(self, uid: int) -> None:
        with self.cond:
            self.free.append(uid)
            self.cond.notify()


_POOLS: dict[tuple[int, int], _UidPool] = {}
_POOLS_LOCK = threading.Lock()


def _uid_pool(base: int, size: int) -> _UidPool:
    with _POOLS_LOCK:
        return _POOLS.setdefault((base, size), _UidPool(base, size))


def _processes_of(uid: int) -> list[int]:
    """Live (non-zombie) process ids owned by ``uid``, read from /proc."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
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


class Sandbox:
    """Runs Python code in isolated, resource-limited processes (see the module docstring).

    Args:
        limits: resource limits of every run.
        isolation: ``"auto"`` (as root: ``"root"`` when namespaces work, else ``"uid"``;
            otherwise ``"user"``), ``"root"`` (RuntimeError on first use if it cannot be had),
            ``"uid"`` (as root: the dedicated uid and limits without namespaces) or ``"user"``.
        python: the interpreter that runs the code; default: the caller's interpreter, or in root
            mode the first of it, ``/usr/bin/python3``, ``/usr/local/bin/python3`` that an
            unprivileged uid can execute.  Only its standard library is available (``-S``).
        block_network_hook: also install the audit hook refusing sockets.
        uid_base, uid_count: the pool of uids for root mode (default 64000..64511; they need no
            passwd entry but must not belong to real users).
        max_workers: threads of :meth:`run_many`.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        isolation: str = "auto",
        python: str | None = None,
        block_network_hook: bool = True,
        uid_base: int = 64000,
        uid_count: int = 512,
        max_workers: int = 4,
    ):
        if isolation not in ("auto", "root", "uid", "user"):
            raise ValueError(f"isolation must be 'auto', 'root', 'uid' or 'user', got {isolation!r}")
        self.limits = limits or SandboxLimits()
        self.block_network_hook = block_network_hook
        self.max_workers = max_workers
        self._requested = isolation
        self._python = python
        self._uid_base, self._uid_count = uid_base, uid_count
        self._mode: str | None = None
        self._mode_lock = threading.Lock()
        self._launcher_python = os.path.realpath(sys.executable)
        self.protections: list[str] = []

    # ---- set-up --------------------------------------------------------------------------
    @property
    def isolation(self) -> str:
        """The isolation mode in effect (probed once on first use)."""
        with self._mode_lock:
            if self._mode is None:
                self._mode = self._choose_mode()
            return self._mode

    def _sandbox_python(self, mode: str) -> str:
        if self._python:
            return self._python
        here = os.path.realpath(sys.executable)
        if mode not in ("root", "uid"):
            return here
        for cand in (here, "/usr/bin/python3", "/usr/local/bin/python3"):
            if os.path.exists(cand) and _world_executable(cand):
                return os.path.realpath(cand)
        return here

    def _choose_mode(self) -> str:
        wants_root = self._requested == "root" or (self._requested == "auto" and os.geteuid() == 0)
        if wants_root:
            res = self._probe("root")
            if res.status == "ok" and res.stdout.strip() == b"probe-ok":
                self.protections = ["netns", "mountns", "tmpfs", "uid", "rlimits", "session"]
                return "root"
            msg = f"root-mode sandbox unavailable ({res.status}: {res.error or res.stderr[-300:]!r})"
            if self._requested == "root":
                raise RuntimeError(msg)
            logger.warning("%s; falling back to a dedicated uid without namespaces", msg)
        if wants_root or self._requested == "uid":
            res = self._probe("uid")
            if res.status == "ok" and res.stdout.strip() == b"probe-ok":
                self.protections = ["uid", "rlimits", "session"]
                return "uid"
            msg = f"uid-mode sandbox unavailable ({res.status}: {res.error or res.stderr[-300:]!r})"
            if os.geteuid() == 0:  # never run model code as root
                raise RuntimeError(msg)
        if os.geteuid() == 0:
            logger.warning("sandbox in user mode while running as root: model code runs as root")
        res = self._probe("user_ns")
        if res.status == "ok" and res.stdout.strip() == b"probe-ok":
            self.protections = ["netns", "rlimits", "session"]
            return "user_ns"
        self.protections = ["rlimits", "session"]
        return "user"

    def _probe(self, mode: str) -> RunResult:
        return self._run_mode(mode, "print('probe-ok')", mode_name="program")

    # ---- one process ---------------------------------------------------------------------
    def run(self, code: str, stdin: str | bytes = b"", tests: Sequence[str] | None = None) -> RunResult:
        """Run ``code`` once: as a program with ``stdin`` (``tests`` None) or, with a list of
        assert-style ``tests``, as a module followed by the tests, whose outcomes come back in
        ``RunResult.report`` (JSON lines)."""
        return self._run_mode(self.isolation, code, stdin=stdin, tests=tests,
                              mode_name="program" if tests is None else "asserts")

    def _rlimits(self, mode: str) -> list[tuple[str, int]]:
        lim = self.limits
        nproc = lim.max_processes if mode in ("root", "uid") else _count_processes_of_caller() + lim.max_processes
        cpu = max(1, int(-(-lim.cpu_time_s // 1)))
        return [
            ("RLIMIT_CPU", cpu),
            ("RLIMIT_AS", int(lim.memory_bytes)),
            ("RLIMIT_FSIZE", int(lim.file_size_bytes)),
            ("RLIMIT_NOFILE", int(lim.open_files)),
            ("RLIMIT_CORE", 0),
            ("RLIMIT_NPROC", int(nproc)),
        ]

    def _run_mode(self, mode: str, code: str, stdin: str | bytes = b"",
                  tests: Sequence[str] | None = None, mode_name: str = "program") -> RunResult:
        t0 = time.monotonic()
        uid = None
        pool = None
        workdir = None
        try:
            if mode in ("root", "uid"):
                pool = _uid_pool(self._uid_base, self._uid_count)
                uid = pool.acquire()
            workdir = tempfile.mkdtemp(prefix="vlm-grpo-ma-sandbox-")
            report_r, report_w = os.pipe()
            fds = {"r": report_r, "w": report_w}  # _spawn closes "w" once the child has it
            try:
                return self._spawn(mode, uid, workdir, code, stdin, tests, mode_name, fds, t0)
            finally:
                for fd in fds.values():
                    os.close(fd)
        except Exception as e:  # the sandbox failed, not the code: never crash the caller
            logger.exception("sandbox run failed")
            return RunResult("sandbox_error", None, error=f"{type(e).__name__}: {e}",
                             wall_s=time.monotonic() - t0)
        finally:
            if uid is not None:
                clean = self._sweep_uid(uid)
                if clean:
                    pool.release(uid)
                else:
                    logger.error("sandbox uid %d still owns processes; not reused", uid)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    def _spawn(self, mode, uid, workdir, code, stdin, tests, mode_name, fds, t0):
        lim = self.limits
        report_r, report_w = fds["r"], fds["w"]
        python = self._sandbox_python(mode)
        nonce = secrets.token_hex(16)
        with open(os.path.join(workdir, _SOLUTION), "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(workdir, _HARNESS), "w", encoding="utf-8") as f:
            f.write(_HARNESS_SRC)
        with open(os.path.join(workdir, _CONFIG), "w", encoding="utf-8") as f:
            json.dump({"mode": mode_name, "tests": list(tests or []), "nonce": nonce,
                       "report_fd": report_w, "block_network": self.block_network_hook}, f)
        stdin_path = os.path.join(workdir, _STDIN)
        with open(stdin_path, "wb") as f:
            f.write(stdin.encode("utf-8") if isinstance(stdin, str) else stdin)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
            for name in (_SOLUTION, _HARNESS, _CONFIG):
                os.chown(os.path.join(workdir, name), uid, uid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        cfg = {
            "unshare": mode in ("root", "user_ns"),
            "mount": mode == "root",
            "userns": mode == "user_ns",
            "tmpfs_bytes": int(lim.tmpfs_bytes),
            "rlimits": self._rlimits(mode),
            "uid": uid,
            "python": python,
            "argv": [python, "-I", "-S", "-B", _HARNESS],
            "env": env,
        }
        with open(stdin_path, "rb") as fin:
            proc = subprocess.Popen(
                [self._launcher_python, "-I", "-S", "-c", _LAUNCHER_SRC, json.dumps(cfg)],
                cwd=workdir, stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={"PATH": env["PATH"], "LANG": "C.UTF-8"}, pass_fds=(report_w,),
                start_new_session=True, close_fds=True,
            )
        os.close(fds.pop("w"))
        try:
            out, err, rep, status = self._collect(proc, report_r, t0)
        finally:
            _kill_group(proc.pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
                pass
        rc = proc.returncode
        if status is None:
            status = "ok" if rc == 0 else "exit"
        error = None
        if rc == LAUNCHER_FAILED and err.startswith(b"sandbox launcher:"):
            status, error = "sandbox_error", err.decode("utf-8", "replace").strip()
            logger.warning("sandbox could not start a run (scored 0): %s", error)
        if mode_name == "asserts":
            rep = _filter_report(rep, nonce)
        return RunResult(status, rc, out, err, rep, time.monotonic() - t0, error)

    def _collect(self, proc: subprocess.Popen, report_r: int, t0: float):
        """Read stdout, stderr and the report pipe in bounded chunks until the process exits
        and the pipes close, the wall clock runs out, or a stream exceeds its cap."""
        lim = self.limits
        caps = {proc.stdout.fileno(): lim.output_bytes, proc.stderr.fileno(): lim.output_bytes,
                report_r: 4096 + 256 * 1024}
        bufs = {fd: bytearray() for fd in caps}
        sel = selectors.DefaultSelector()
        for fd in caps:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        deadline = t0 + lim.wall_timeout_s
        status = None
        try:
            while sel.get_map() and status is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    status = "timeout"
                    break
                for key, _ in sel.select(timeout=min(0.1, remaining)):
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    bufs[key.fd] += chunk
                    if len(bufs[key.fd]) > caps[key.fd]:
                        del bufs[key.fd][caps[key.fd]:]
                        status = "output_limit"
                        break
        finally:
            sel.close()
        if status is None:  # every pipe closed: wait for the exit within the wall clock
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status = "timeout"
        return (bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]),
                bytes(bufs[report_r]), status)

    def _sweep_uid(self, uid: int) -> bool:
        """Kill every process still owned by ``uid`` (root mode); True when none is left."""
        for _ in range(5):
            left = _processes_of(uid)
            if not left:
                return True
            # kill(-1) as the uid itself reaches all of its processes, wherever they moved
            subprocess.run([self._sandbox_python("root"), "-I", "-S", "-c",
                            "import os, signal; os.kill(-1, signal.SIGKILL)"],
                           user=uid, group=uid, extra_groups=[], env={}, cwd="/",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
            time.sleep(0.02)
        return not _processes_of(uid)

    # ---- tests ---------------------------------------------------------------------------
    def run_tests(self, code: str, tests: Sequence[Any]) -> TestReport:
        """Score ``code`` against ``tests`` (assert strings and/or stdin/stdout dicts).

        Failure reasons: ``solution_error`` (the module raised), ``test_failed``, ``timeout``,
        ``output_limit``, ``wrong_output``, ``exit`` (non-zero status), ``sandbox_error``.
        """
        tests = list(tests)
        passed = [False] * len(tests)
        details: list[str] = []
        asserts = [i for i, t in enumerate(tests) if isinstance(t, str)]
        programs = [i for i, t in enumerate(tests) if isinstance(t, dict)]
        if asserts:
            res = self.run(code, tests=[tests[i] for i in asserts])
            seen = set()
            for line in res.report.splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "solution_error":
                    details.append(f"solution_error:{ev.get('error')}")
                elif ev.get("event") == "test" and isinstance(ev.get("i"), int) \
                        and 0 <= ev["i"] < len(asserts) and ev["i"] not in seen:
                    seen.add(ev["i"])
                    passed[asserts[ev["i"]]] = ev.get("ok") is True
                    if ev.get("ok") is not True:
                        details.append(f"test_failed:{ev.get('error')}")
            if res.status not in ("ok", "exit"):
                details.append(res.status)
            elif len(seen) < len(asserts) and not details:
                details.append("exit")
        for i in programs:
            t = tests[i]
            res = self.run(code, stdin=t.get("input", ""))
            if res.status == "ok":
                got = normalise_output(res.stdout.decode("utf-8", "replace"))
                passed[i] = got == normalise_output(t["output"])
                if not passed[i]:
                    details.append("wrong_output")
            else:
                details.append(res.status)
        reason = None
        if not all(passed):
            reason = details[0].split(":")[0] if details else "test_failed"
        return TestReport(passed, reason, details)

    def run_many(self, jobs: Sequence[tuple[str, Sequence[Any]]],
                 max_workers: int | None = None) -> list[TestReport]:
        """:meth:`run_tests` for many ``(code, tests)`` pairs on a bounded thread pool
        (order kept)."""
        workers = max(1, min(max_workers or self.max_workers, len(jobs) or 1))
        self.isolation  # probe once before the threads start
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
            return list(ex.map(lambda job: self.run_tests(job[0], job[1]), jobs))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _filter_report(report: bytes, nonce: str) -> bytes:
    """Keep only the report lines that carry this run's nonce (anything else was written by
    the solution itself)."""
    keep = []
    for line in report.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and ev.get("nonce") == nonce:
            keep.append(line)
    return b"\n".join(keep)
