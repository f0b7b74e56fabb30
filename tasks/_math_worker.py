"""The math task's checking process: math-verify runs here, so that the caller can stop it.

math-verify (and sympy under it) can run for minutes on a short input
(``\\binom{10^{9}}{10^{5}}``, ``\\Gamma(10^{10})``), and its own ``signal.alarm`` timeouts work
only in the main thread of the process that calls it.  So :class:`MathWorkers` sends every check
to a separate worker process (``python -m vlm_grpo_ma.tasks._math_worker``) and waits for the
reply until a deadline; past it the worker is killed (and replaced on the next call), and the
check fails with reason ``timeout``.  In the worker math-verify runs in the main thread, so its
own timeouts are on as well (a worker usually answers ``timeout`` itself and survives).

A worker reads requests from the caller's pipe and stops at its end, so it ends with the caller;
one busy when the caller is killed ends when its current computation does.

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.
``{"op": "parse", "text": str}`` -> ``{"reason": None | str}`` (a ParseError reason of
:func:`~vlm_grpo_ma.tasks.math.math_parse`); ``{"op": "equal", "gold": str, "pred": str}`` ->
``{"equal": bool, "reason": None | str}``; ``{"op": "ping"}`` -> ``{"ok": true}``.
Requests also carry ``timeout_s`` and ``max_exponent``.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import subprocess
import sys
import threading
from typing import Any

#: address-space limit of a worker (sympy on a huge number: MemoryError, not the machine's RAM)
WORKER_MEMORY_BYTES = 4 * 2**30
#: how long a new worker may take to import math-verify and answer its first ping
STARTUP_TIMEOUT_S = 120.0


class WorkerTimeout(Exception):
    """A check ran past its deadline (the worker was killed)."""


class WorkerFailed(Exception):
    """The worker died or answered nonsense (the worker was killed)."""


class _Worker:
    def __init__(self) -> None:
        paths = [p for p in sys.path if p and os.path.isdir(p)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlm_grpo_ma.tasks._math_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, text=True, encoding="utf-8", errors="surrogateescape",
        )
        try:
            self.request({"op": "ping"}, STARTUP_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise

    def request(self, req: dict, deadline_s: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerFailed(f"cannot write to the math worker: {e}") from e
        ready, _, _ = select.select([self.proc.stdout], [], [], deadline_s)
        if not ready:
            raise WorkerTimeout(f"no answer within {deadline_s:g} s")
        line = self.proc.stdout.readline()
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise WorkerFailed(f"math worker answered {line[:80]!r}") from e
        if not isinstance(reply, dict):
            raise WorkerFailed(f"math worker answered {line[:80]!r}")
        return reply

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass


class MathWorkers:
    """A pool of at most ``size`` worker processes shared by every thread of the caller; each
    call checks one out (waiting while all are busy), so a check never waits on another's."""

    def __init__(self, size: int = 4):
        self.size = size
        self._idle: list[_Worker] = []
        self._started = 0
        self._cond = threading.Condition()

    def _checkout(self) -> _Worker:
        with self._cond:
            while not self._idle and self._started >= self.size:
                self._cond.wait()
            while self._idle:
                worker = self._idle.pop()
                if worker.proc.poll() is None:
                    return worker
                self._started -= 1  # died while idle (killed from outside, out of memory): replace it
            self._started += 1
        try:
            return _Worker()
        except BaseException:
            with self._cond:
                self._started -= 1
                self._cond.notify()
            raise

    def _checkin(self, worker: _Worker | None) -> None:
        with self._cond:
            if worker is None:
                self._started -= 1
            else:
                self._idle.append(worker)
            self._cond.notify()

    def call(self, req: dict, deadline_s: float) -> dict:
        """The worker's reply to ``req`` within ``deadline_s`` seconds (WorkerTimeout /
        WorkerFailed otherwise; the worker is then killed and replaced later)."""
        worker = self._checkout()
        try:
            reply = worker.request(req, deadline_s)
        except BaseException:
            worker.kill()
            self._checkin(None)
            raise
        self._checkin(worker)
        return reply

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._started -= len(idle)
        for w in idle:
            w.kill()


_POOL: MathWorkers | None = None
_POOL_LOCK = threading.Lock()


def pool() -> MathWorkers:
    """The process-wide pool (created on first use, closed at exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            import atexit

            _POOL = MathWorkers()
            atexit.register(_POOL.close)
        return _POOL


# ---- the worker side ----------------------------------------------------------------------
def _serve() -> None:
    import resource

    try:
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ValueError, OSError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the trainer is the trainer's
    from vlm_grpo_ma.task import ParseError
    from vlm_grpo_ma.tasks._math_verify import math_compare, math_parse

    @functools.lru_cache(maxsize=4096)
    def parsed(text: str, timeout_s: float, max_exponent: int) -> tuple[Any, str | None]:
        try:
            return tuple(math_parse(text, timeout_s=timeout_s, max_exponent=max_exponent)), None
        except ParseError as e:
            return None, e.reason
        except (MemoryError, RecursionError) as e:
            return None, "math_verify_error"

    for line in sys.stdin:
        try:
            req = json.loads(line)
            op, t, mx = req["op"], req.get("timeout_s", 3), int(req.get("max_exponent", 10_000))
            if op == "ping":
                reply = {"ok": True}
            elif op == "parse":
                reply = {"reason": parsed(req["text"], t, mx)[1]}
            elif op == "equal":
                gold, why = parsed(req["gold"], t, mx)
                pred, why_pred = parsed(req["pred"], t, mx)
                if why or why_pred:
                    reply = {"equal": False, "reason": f"gold_{why}" if why else why_pred}
                else:
                    equal, why = math_compare(gold, pred, t)
                    reply = {"equal": equal, "reason": why}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as e:  # never die on one request
            reply = {"error": type(e).__name__}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
