"""Run untrusted Python (model-written code) in a sandbox and score it against tests.

Every run is a fresh interpreter (``python -I -S -B``) in a fresh temporary directory, started in
its own session and process group, with a scrubbed environment and POSIX resource limits.  What is
enforced depends on the privileges of the caller (see docs/SANDBOX.md for the full threat model):

``isolation="root"`` (the caller is root; chosen automatically when it works)
    A small trusted *launcher* (the caller's interpreter, ``-I -S``) runs first in the child:
    it enters new **network**, **IPC** and **mount** namespaces (``unshare(CLONE_NEWNET |
    CLONE_NEWIPC | CLONE_NEWNS)``; the network namespace has no interface up, not even loopback;
    no SysV or POSIX IPC object outlives the run), mounts small private tmpfs
    over ``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock`` and the work directory (so nothing
    the code writes reaches the caller's disk, and the space is bounded), sets the resource
    limits and ``PR_SET_NO_NEW_PRIVS`` (an exec'd setuid program gains nothing), drops to a
    **dedicated unprivileged uid/gid** taken from a pool and claimed machine-wide with an
    ``flock`` per uid (one uid per concurrent run in any process, so ``RLIMIT_NPROC`` really
    bounds a fork bomb, and the code cannot signal, ptrace or read ``/proc/<pid>/environ`` of
    any other process), and ``execve``s the sandbox interpreter.
    After the run every process with that uid as its real, effective or saved uid (for example
    one that called ``setsid`` to leave the process group) is killed.

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

The model's code is compiled inside the sandbox (a syntax error is reported as
``syntax_error``), never in the caller.

Tests (``target["tests"]`` of a code sample) are a list whose items are either

- a string: Python statements (usually ``assert f(2) == 4``).  A single
  ``assert <expr> <op> <literal>`` (``==``, ``<``, ``in``, ...) or ``assert [not] <call>`` is
  judged by the caller (:func:`split_test`): only ``<expr>`` is evaluated, in the namespace of
  the solution after the solution module ran (``__name__ == "solution"``); its value (or truth)
  comes back as plain data and the caller applies the comparison, so the expected value never
  enters the sandbox and the solution cannot forge a pass.  These share one process.  Any other
  string is a *statement test* that passes when it raises nothing: it runs in a separate
  sandboxed process, the *tester*, that holds no solution code; the names it uses are proxies
  that call the solution's functions in the solution's process over a pipe, with arguments and
  results passed by value as plain data (:meth:`Sandbox.run_statements`; limits in
  docs/SANDBOX.md).  Each test reports as soon as it finishes, so a test that hangs costs only
  itself and the ones after it in its process.
- a dict ``{"input": str, "output": str}``: the solution runs as a program
  (``__name__ == "__main__"``) with ``input`` on stdin, one process per test; it passes when the
  exit status is 0 and stdout equals ``output`` after :func:`normalise_output` (trailing
  whitespace of every line and trailing blank lines are ignored).

Public API: :class:`SandboxLimits`, :class:`RunResult`, :class:`TestReport`, :class:`Sandbox`
(``run``, ``run_tests``, ``run_statements``, ``run_many``), :func:`normalise_output`, :func:`split_test`, :func:`validate_tests`.
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
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from vlm_grpo_ma.sandbox.judging import REPLY_BYTES, free_names, harness_kind, judge, split_test
from vlm_grpo_ma.sandbox.programs import HARNESS_SRC, LAUNCHER_FAILED, LAUNCHER_SRC, TESTER_SRC
from vlm_grpo_ma.sandbox.uids import (  # noqa: F401  (_processes_of: used by the tests)
    _count_processes_of_caller,
    _default_lock_dir,
    _processes_of,
    _uid_claims,
    _world_executable,
)

logger = logging.getLogger(__name__)

__all__ = ["RunResult", "Sandbox", "SandboxLimits", "TestReport", "normalise_output", "split_test",
           "validate_tests"]

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
# The child programs (launcher, harness, tester) live in sandbox/programs.py; how an assert test is
# judged by value lives in sandbox/judging.py.

# ----------------------------------------------------------------------------------------------
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
        uid_lock_dir: private directory of the machine-wide uid claims (default
            ``/run/vlm-grpo-ma-sandbox``, or under the temporary directory when ``/run`` is not
            writable); every scorer on the machine using the same uids must use the same one.
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
        uid_lock_dir: str | None = None,
    ):
        if isolation not in ("auto", "root", "uid", "user"):
            raise ValueError(f"isolation must be 'auto', 'root', 'uid' or 'user', got {isolation!r}")
        self.limits = limits or SandboxLimits()
        self.block_network_hook = block_network_hook
        self.max_workers = max_workers
        self._requested = isolation
        self._python = python
        self._uid_base, self._uid_count = uid_base, uid_count
        self._uid_lock_dir = uid_lock_dir or _default_lock_dir()
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
        ``RunResult.report`` (JSON lines; a value test reports the value, never a verdict).
        Statement tests given here run in the solution's namespace (forgeable);
        :meth:`run_tests` runs them in a tester process instead (:meth:`run_statements`)."""
        plan = None if tests is None else [harness_kind(*split_test(t)[:2]) for t in tests]
        return self._run_mode(self.isolation, code, stdin=stdin, tests=plan,
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
                  tests: Sequence[str] | None = None, mode_name: str = "program",
                  channel: dict[str, int] | None = None, extra_cfg: dict | None = None) -> RunResult:
        """One sandboxed process.  ``channel`` (``{"req_fd": fd, "resp_fd": fd}``) are pipe ends
        handed to the child under the same numbers; they are closed here once the child has
        them (or on failure), so the peer sees EOF when the child ends."""
        channel = dict(channel or {})
        try:
            return self._run_mode_inner(mode, code, stdin, tests, mode_name, channel, extra_cfg or {})
        finally:
            for fd in channel.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _run_mode_inner(self, mode, code, stdin, tests, mode_name, channel, extra_cfg) -> RunResult:
        t0 = time.monotonic()
        uid = lock_fd = None
        claims = None
        workdir = None
        try:
            if mode in ("root", "uid"):
                claims = _uid_claims(self._uid_base, self._uid_count, self._uid_lock_dir)
                uid, lock_fd = claims.acquire(self._sweep_uid)
                t0 = time.monotonic()  # waiting for a free uid is not the code's wall-clock time
            workdir = tempfile.mkdtemp(prefix="vlm-grpo-ma-sandbox-")
            report_r, report_w = os.pipe()
            fds = {"r": report_r, "w": report_w}  # _spawn closes "w" once the child has it
            try:
                return self._spawn(mode, uid, workdir, code, stdin, tests, mode_name, fds, t0,
                                   channel, extra_cfg)
            finally:
                for fd in fds.values():
                    os.close(fd)
        except Exception as e:  # the sandbox failed, not the code: never crash the caller
            logger.exception("sandbox run failed")
            return RunResult("sandbox_error", None, error=f"{type(e).__name__}: {e}",
                             wall_s=time.monotonic() - t0)
        finally:
            if uid is not None:
                claims.release(uid, lock_fd, self._sweep_uid(uid))
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    def _spawn(self, mode, uid, workdir, code, stdin, tests, mode_name, fds, t0, channel, extra_cfg):
        lim = self.limits
        report_r, report_w = fds["r"], fds["w"]
        python = self._sandbox_python(mode)
        nonce = secrets.token_hex(16)
        tester = mode_name == "tester"  # statement tests only: no solution code in this process
        if not tester:
            with open(os.path.join(workdir, _SOLUTION), "w", encoding="utf-8") as f:
                f.write(code)
        with open(os.path.join(workdir, _HARNESS), "w", encoding="utf-8") as f:
            f.write(TESTER_SRC if tester else HARNESS_SRC)
        with open(os.path.join(workdir, _CONFIG), "w", encoding="utf-8") as f:
            tests_cfg = list(tests or []) if tester else [list(t) for t in tests or []]
            json.dump({"mode": mode_name, "tests": tests_cfg, "nonce": nonce,
                       "report_fd": report_w, "block_network": self.block_network_hook,
                       **channel, **extra_cfg}, f)
        stdin_path = os.path.join(workdir, _STDIN)
        with open(stdin_path, "wb") as f:
            f.write(stdin.encode("utf-8") if isinstance(stdin, str) else stdin)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chmod(workdir, 0o700)
            for name in (_SOLUTION, _HARNESS, _CONFIG):
                if os.path.exists(os.path.join(workdir, name)):
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
                [self._launcher_python, "-I", "-S", "-c", LAUNCHER_SRC, json.dumps(cfg)],
                cwd=workdir, stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={"PATH": env["PATH"], "LANG": "C.UTF-8"}, pass_fds=(report_w, *channel.values()),
                start_new_session=True, close_fds=True,
            )
        os.close(fds.pop("w"))
        for key in list(channel):  # the child has them now
            os.close(channel.pop(key))
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
        """Kill every process with ``uid`` as any of its uids (root mode); True when none is left."""
        for _ in range(5):
            left = _processes_of(uid)
            if not left:
                return True
            # kill(-1) as the uid itself reaches all of its processes, wherever they moved ...
            subprocess.run([self._sandbox_python("root"), "-I", "-S", "-c",
                            "import os, signal; os.kill(-1, signal.SIGKILL)"],
                           user=uid, group=uid, extra_groups=[], env={}, cwd="/",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
            # ... and root kills what is left by pid (a process whose effective uid changed)
            for pid in _processes_of(uid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.02)
        return not _processes_of(uid)

    # ---- tests ---------------------------------------------------------------------------
    def run_tests(self, code: str, tests: Sequence[Any]) -> TestReport:
        """Score ``code`` against ``tests`` (assert strings and/or stdin/stdout dicts).

        Failure reasons: ``syntax_error`` (the code does not compile; found inside the sandbox),
        ``solution_error`` (the module raised), ``test_failed``, ``timeout``, ``output_limit``,
        ``wrong_output``, ``exit`` (non-zero status), ``sandbox_error``.
        """
        tests = list(tests)
        passed = [False] * len(tests)
        details: list[str] = []
        try:
            code.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no source file can hold it, nothing to run
            return TestReport(passed, "syntax_error", ["syntax_error:UnicodeEncodeError"])
        uncompilable = False  # the text did not compile within the limits: no further process
        strings = [i for i, t in enumerate(tests) if isinstance(t, str)]
        statements = [i for i in strings if split_test(tests[i])[0] == "statement"]
        asserts = [i for i in strings if i not in set(statements)]  # judged by the caller
        programs = [i for i, t in enumerate(tests) if isinstance(t, dict)]
        pair: dict[str, Any] = {}
        if statements:  # the tester and its solution process run alongside the judged run

            def run_pair():
                try:
                    pair["r"] = self.run_statements(code, [tests[i] for i in statements])
                except Exception as e:  # never crash the caller
                    logger.exception("sandbox run failed")
                    err = RunResult("sandbox_error", None, error=f"{type(e).__name__}: {e}")
                    pair["r"] = (err, err)

            pair_thread = threading.Thread(target=run_pair, name="sandbox-statements", daemon=True)
            pair_thread.start()
        if asserts:
            plan = [split_test(tests[i]) for i in asserts]
            res = self.run(code, tests=[tests[i] for i in asserts])
            uncompilable = _never_compiled(res)
            seen = set()
            for ev in _events(res.report):
                i = ev.get("i")
                if ev.get("event") in ("syntax_error", "solution_error"):
                    details.append(f"{ev['event']}:{ev.get('error')}")
                    continue
                if not (type(i) is int and 0 <= i < len(asserts)) or i in seen:
                    continue
                kind, _, expected = plan[i]
                if ev.get("event") == "value" and kind != "statement":
                    ok = judge(kind, ev.get("v"), expected)
                elif ev.get("event") == "test" and (kind == "statement" or ev.get("ok") is False):
                    ok = ev.get("ok") is True
                else:
                    continue
                seen.add(i)
                passed[asserts[i]] = ok
                if not ok:
                    details.append(f"test_failed:{ev.get('error', 'wrong_value')}")
            if res.status not in ("ok", "exit"):
                details.append(res.status)
            elif len(seen) < len(asserts) and not details:
                details.append("exit")
        if statements:
            pair_thread.join()
            uncompilable = self._score_statements(pair["r"], statements, passed, details) or uncompilable
        for i in programs:
            if uncompilable:
                break  # the same text will not compile for the next test either
            t = tests[i]
            res = self.run(code, stdin=t.get("input", ""))
            uncompilable = _never_compiled(res)
            if any(ev.get("event") == "syntax_error" for ev in _events(res.report)):
                details.insert(0, "syntax_error")
            elif res.status == "ok":
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

    def run_statements(self, code: str, tests: Sequence[str]) -> tuple[RunResult, RunResult]:
        """Run statement tests in a process of their own, the *tester*, that holds no solution
        code; the solution runs in another process (``serve`` mode of the harness) and answers
        the tester's calls over a pair of pipes.  Both are sandboxed with the same limits (in
        root mode each under its own uid) and run at the same time.  Returns
        ``(solution's RunResult, tester's RunResult)``; the verdicts (``event: test``) are in the
        tester's report, on a pipe and with a nonce the solution's process never has."""
        names = sorted(set().union(*[free_names(t) for t in tests]))
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        mode = self.isolation
        out: dict[str, RunResult] = {}

        def solution_side():
            out["solution"] = self._run_mode(mode, code, tests=[], mode_name="serve",
                                             channel={"req_fd": req_r, "resp_fd": resp_w})

        th = threading.Thread(target=solution_side, name="sandbox-solution", daemon=True)
        try:
            th.start()
        except BaseException:
            for fd in (req_r, req_w, resp_r, resp_w):
                os.close(fd)
            raise
        tester = self._run_mode(mode, "", tests=list(tests), mode_name="tester",
                                channel={"req_fd": req_w, "resp_fd": resp_r},
                                extra_cfg={"names": names, "reply_bytes": REPLY_BYTES})
        th.join()
        return out["solution"], tester

    @staticmethod
    def _score_statements(results, statements, passed, details) -> bool:
        """Score the statement tests (indices ``statements`` of the sample's tests) from
        :meth:`run_statements`'s ``results`` into ``passed`` and ``details``; True when the
        solution's text never compiled."""
        sol, res = results
        for ev in _events(sol.report):
            if ev.get("event") in ("syntax_error", "solution_error"):
                d = f"{ev['event']}:{ev.get('error')}"
                if d not in details:
                    details.append(d)
        mine: list[str] = []
        seen = set()
        for ev in _events(res.report):
            i = ev.get("i")
            if ev.get("event") != "test" or not (type(i) is int and 0 <= i < len(statements)) or i in seen:
                continue
            seen.add(i)
            passed[statements[i]] = ev.get("ok") is True
            if ev.get("ok") is not True and ev.get("error") != "no_solution":
                mine.append(f"test_failed:{ev.get('error')}")
        failed = not all(passed[i] for i in statements)
        # a limit the solution's process hit (a call that hangs, too much output) explains the
        # failed calls of the tester that follow it: it comes first
        for status in (sol.status, res.status):
            if status not in ("ok", "exit") and failed and status not in details:
                details.append(status)
        details.extend(mine)
        if failed and not details:
            details.append("exit")
        return _never_compiled(sol)

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
        except (ValueError, RecursionError):
            continue
        if isinstance(ev, dict) and ev.get("nonce") == nonce:
            keep.append(line)
    return b"\n".join(keep)


def _never_compiled(res: RunResult) -> bool:
    """Whether a run ended before the harness had compiled the code (a syntax error, or a text
    whose compilation alone hit a limit): running it again for the next test would only repeat that."""
    return res.status != "sandbox_error" and not any(ev.get("event") == "compiled" for ev in _events(res.report))


def _events(report: bytes) -> list[dict]:
    """The JSON-object lines of a (nonce-filtered) report."""
    out = []
    for line in report.splitlines():
        try:
            ev = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out
