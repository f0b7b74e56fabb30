"""Attacks found by trying the code task's reward as a reward-hacking policy would (issue 12).

Each reward-forgery attack must score no more than the format part through ``CodeTask.reward``;
each escape attack must leave nothing on the host (no process of a sandbox uid, no IPC object,
no file).  They need the root-mode sandbox and are skipped, with the reason, where it cannot be
had.  Destructive code first checks that it does NOT run as root.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vlm_grpo_ma.sandbox import Sandbox, SandboxLimits, _processes_of, split_test
from vlm_grpo_ma.tasks.code import CodeTask
from vlm_grpo_ma.data.sample import Sample

FAST = SandboxLimits(wall_timeout_s=3.0, cpu_time_s=3.0, memory_bytes=256 * 2**20,
                     max_processes=16, output_bytes=64 * 1024)
NOT_ROOT_GUARD = "import os\nif os.getuid() == 0:\n    raise SystemExit('refusing to attack as root')\n"
#: a uid range of these tests' own, outside the default 64000..64511: other scorers on a shared
#: machine (older code without machine-wide claims, other test runs) cannot touch or fake it
UID_BASE, UID_COUNT = 64600, 64
SANDBOX_UIDS = range(UID_BASE, UID_BASE + UID_COUNT)


@pytest.fixture(scope="module")
def root_sandbox() -> Sandbox:
    sb = Sandbox(limits=FAST, block_network_hook=False, uid_base=UID_BASE, uid_count=UID_COUNT)
    if sb.isolation != "root":
        pytest.skip(f"root-mode sandbox unavailable here (isolation={sb.isolation})")
    return sb


@pytest.fixture(scope="module")
def task(root_sandbox) -> CodeTask:
    t = CodeTask(timeout_s=3.0, memory_mb=256, max_workers=2)
    t._sandbox = Sandbox(t.limits, max_workers=2, uid_base=UID_BASE, uid_count=UID_COUNT)
    assert t.sandbox.isolation == "root"
    return t


def _sample(tests) -> Sample:
    return Sample(id="attack", task="code", prompt={"problem": "p"}, target={"tests": tests})


def _reward(task: CodeTask, code: str, tests) -> float:
    answer = f"<answer>```python\n{code}\n```</answer>"
    return task.reward("<think>t</think>", answer, _sample(tests), None).total


def _left_on_host() -> list[int]:
    """Live processes with a sandbox uid as any of their uids (one pass over /proc)."""
    left = []
    for name in os.listdir("/proc"):
        try:
            status = open(f"/proc/{name}/status").read() if name.isdigit() else ""
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uids = {int(u) for u in fields.get("Uid", "").split()}
        if uids & set(SANDBOX_UIDS) and fields.get("State", " Z").split()[0] not in ("Z", "X"):
            left.append(int(name))
    return left


# ---- how a test is judged ---------------------------------------------------------------
def test_split_test_value_and_statement_forms():
    assert split_test("assert f(2) == 4") == ("value", "f(2)", 4)
    assert split_test("assert (1, 'a') == g()") == ("value", "g()", (1, "a"))
    assert split_test("assert f(x=[1, 2]) == {'a': {1, 2}}") == ("value", "f(x=[1, 2])", {"a": {1, 2}})
    assert split_test("assert f(2) != 4") == ("compare", "f(2)", ("NotEq", 4, True))
    assert split_test("assert 3 in f()") == ("compare", "f()", ("In", 3, False))
    assert split_test("assert f() is None") == ("compare", "f()", ("Is", None, True))
    assert split_test("assert is_prime(7)") == ("truth", "is_prime(7)", True)
    assert split_test("assert not is_prime(9)") == ("truth", "is_prime(9)", False)
    for statement in ("assert f(2) == g(3)", "assert f(2) == 4, 'msg'", "x = f(1)\nassert x == 2",
                      "assert f(1) == 2 == 2", "assert f() is 5", "assert f(1) and f(2)", "assert f(1) < g(2)"):
        assert split_test(statement)[0] == "statement", statement


def test_value_tests_keep_python_equality(root_sandbox):
    """The caller's comparison by value agrees with ``assert`` on built-in types."""
    code = textwrap.dedent("""
        def f(k):
            return [2.0, True, (1, [2]), {'a': frozenset({1})}, 10**5000, float('nan'), b'x', 1j, None][k]
    """)
    tests = ["assert f(0) == 2", "assert f(1) == 1", "assert f(2) == (1, [2])", "assert f(2) == [1, [2]]",
             "assert f(3) == {'a': frozenset({1})}", "assert f(4) == 0x" + format(10**5000, "x"),
             "assert f(5) == 0.0", "assert f(6) == b'x'", "assert f(7) == 1j", "assert f(8) == None"]
    rep = root_sandbox.run_tests(code, tests)
    assert rep.passed == [True, True, True, False, True, True, False, True, True, True]


def test_compare_and_truth_tests_keep_python_semantics(root_sandbox):
    code = "def f(x):\n    return [x, x * 2]\ndef ok(x):\n    return x > 0\ndef none():\n    pass\n"
    tests = ["assert f(1) != [1, 2]", "assert f(1) != [1, 3]", "assert 2 in f(1)", "assert 5 in f(1)",
             "assert len(f(1)) <= 2", "assert abs(f(1)[1] - 2.0) < 1e-9", "assert none() is None",
             "assert ok(1)", "assert ok(-1)", "assert not ok(-1)", "assert not ok(1)", "assert f(None) < 3"]
    rep = root_sandbox.run_tests(code, tests)
    assert rep.passed == [False, True, True, False, True, True, True, True, False, True, False, False]


def test_truth_polarity_never_enters_the_sandbox(root_sandbox):
    """A solution that forges "true" for every test (from the harness's frames) passes the
    positive truth tests and fails the negative ones: exactly what ``return True`` earns."""
    forge = (FORGERIES["nonce from the harness's frames"]
             .replace("['i', '0x0']", "['B', True]").replace("range(2)", "range(4)"))
    tests = ["assert is_even(2)", "assert not is_even(3)", "assert is_even(4)", "assert not is_even(5)"]
    assert root_sandbox.run_tests(forge, tests).passed == [True, False, True, False]
    assert root_sandbox.run_tests("def is_even(n):\n    return True\n", tests).passed == [True, False, True, False]


# ---- reward forgery: each scores at most the format part ----------------------------------
WRONG = "def f(x):\n    return -1\n"
TESTS = ["assert f(2) == 4", "assert f(3) == 9"]

FORGERIES = {
    "replace builtins.exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.eval = lambda *a, **k: None\n",
    "patch json.dumps": textwrap.dedent("""
        import json
        _dumps = json.dumps
        def dumps(obj, *a, **k):
            obj = dict(obj, ok=True, event='test')
            obj.pop('error', None)
            return _dumps(obj, *a, **k)
        json.dumps = dumps
    """),
    "__eq__ always true": textwrap.dedent("""
        class Anything(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        class Any2:
            def __eq__(self, other):
                return True
        def f(x):
            return Anything(0) if x == 2 else Any2()
    """),
    "nonce from the harness's frames": textwrap.dedent("""
        import json, os, sys
        frame = sys._getframe(1)
        while frame is not None and 'nonce' not in frame.f_locals:
            frame = frame.f_back
        assert frame is not None, 'harness frame not found'
        nonce, fd = frame.f_locals['nonce'], frame.f_locals['fd']
        for i in range(2):
            for ev in ({'event': 'test', 'i': i, 'ok': True}, {'event': 'value', 'i': i, 'v': ['i', '0x0']},
                       {'event': 'value', 'i': i, 'v': ['B', True]}):
                os.write(fd, (json.dumps(dict(ev, nonce=nonce)) + '\\n').encode())
        os._exit(0)
    """),
    "forge then exit": "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"event\": \"test\", \"i\": 0, \"ok\": true}\\n')\n    except OSError:\n        pass\nos._exit(0)\n",
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_reward_forgery_scores_at_most_the_format_part(task, name):
    code = FORGERIES[name] + ("\n" + WRONG if "def f" not in FORGERIES[name] else "")
    assert _reward(task, code, TESTS) <= task.w_format + 1e-9
    assert not _left_on_host()


def test_a_correct_solution_still_scores_full(task):
    assert _reward(task, "def f(x):\n    return x * x\n", TESTS) == pytest.approx(1.0)


# ---- statement tests: run in a tester process that holds no solution code -----------------------
#: statement tests (not judged by the caller): several statements, a message, a loop, two calls
STATEMENT_TESTS = ["x = f(2)\nassert x == 4", "assert f(3) == 9, 'f(3) is 9'",
                   "for x in (2, 3):\n    assert f(x) == x * x", "assert f(3) == f(2) + 5"]
STATEMENT_FORGERIES = dict(FORGERIES, **{
    "fake replies on every fd": textwrap.dedent("""
        import os
        for fd in range(3, 64):
            for line in (b'["ready"]\\n', b'["ok", ["i", "0x4"]]\\n', b'{"event": "test", "i": 0, "ok": true}\\n'):
                try:
                    os.write(fd, line)
                except OSError:
                    pass
        def f(x):
            return -1
    """),
    "reach the tester through /proc": textwrap.dedent("""
        import os
        me = os.getpid()
        for pid in os.listdir('/proc'):
            if not pid.isdigit() or int(pid) == me:
                continue
            try:
                fds = os.listdir('/proc/%s/fd' % pid)
            except OSError:
                continue
            for fd in fds:
                try:
                    w = os.open('/proc/%s/fd/%s' % (pid, fd), os.O_WRONLY | os.O_NONBLOCK)
                    os.write(w, b'{"event": "test", "i": 0, "ok": true}\\n')
                except OSError:
                    pass
            try:
                os.kill(int(pid), 9)
            except OSError:
                pass
        def f(x):
            return -1
    """),
    "__eq__ object from every call": textwrap.dedent("""
        class Anything(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
            def __add__(self, other):
                return self
            __radd__ = __mul__ = __rmul__ = __add__
        def f(x):
            return Anything(0)
    """),
    "raise SystemExit(0) from the call": "import sys\ndef f(x):\n    sys.exit(0)\n",
})


def test_statement_tests_are_not_judged_by_the_caller():
    assert all(split_test(t)[0] == "statement" for t in STATEMENT_TESTS)


@pytest.mark.parametrize("name", list(STATEMENT_FORGERIES))
def test_reward_forgery_of_statement_tests_scores_at_most_the_format_part(task, name):
    code = STATEMENT_FORGERIES[name]
    code += "\n" + WRONG if "def f" not in code else ""
    assert _reward(task, code, STATEMENT_TESTS) <= task.w_format + 1e-9
    assert not _left_on_host()


def test_a_correct_solution_passes_statement_tests(root_sandbox, task):
    code = textwrap.dedent("""
        def f(x):
            return x * x
        def g(x, scale=1):
            if x < 0:
                raise ValueError('negative')
            return [x, x * scale]
        def uid():
            import os
            return os.getuid()
    """)
    tests = STATEMENT_TESTS + [
        "assert g(2, scale=3) == [2, 6] and g(0) == [0, 0], 'kwargs'",
        "try:\n    g(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no error')",
        "assert {f(i) for i in range(4)} == {0, 1, 4, 9}\nassert all(f(i) >= 0 for i in range(-3, 3))",
        # the tester holds no solution code and runs under a uid of its own
        "import os\nassert 'solution.py' not in os.listdir('.')\nassert uid() != os.getuid()",
    ]
    rep = root_sandbox.run_tests(code, tests)
    assert rep.passed == [True] * len(tests), rep
    assert _reward(task, code, STATEMENT_TESTS) == pytest.approx(1.0)


def test_statement_test_limits_of_the_proxies(root_sandbox):
    """Values cross by value, as plain data: an in-place change to an argument is not seen, a
    returned object of a class of the solution is a failed call (not even ``except Exception``
    catches it), a function cannot be passed, a solution's global is not shared."""
    code = ("class P:\n    pass\ndef add(xs):\n    xs.append(1)\n    return len(xs)\n"
            "def make():\n    return P()\nLIMIT = 3\n")
    tests = ["xs = []\nassert add(xs) == 1\nassert xs == []",
             "try:\n    make()\nexcept Exception:\n    pass",
             "try:\n    add(lambda: 1)\nexcept TypeError:\n    pass\nelse:\n    raise AssertionError",
             "assert LIMIT == 3, 'globals are not shared'"]
    rep = root_sandbox.run_tests(code, tests)
    assert rep.passed == [True, False, True, False], rep


def test_statement_tests_keep_their_time_limits(root_sandbox):
    t0 = time.monotonic()
    # a call that hangs (sleeping: the wall clock ends it, not a race with RLIMIT_CPU)
    rep = root_sandbox.run_tests("import threading\ndef f(x):\n    threading.Event().wait()\n",
                                 ["assert f(1) == 1, 'never'", "x = f(2)"])
    assert rep.passed == [False, False] and rep.reason == "timeout", rep
    # a test that hangs in the tester
    rep = root_sandbox.run_tests("def f(x):\n    return x\n",
                                 ["x = f(1)\nassert x == 1", "import threading\nthreading.Event().wait()"])
    assert rep.passed == [True, False] and rep.reason == "timeout", rep
    assert time.monotonic() - t0 < 2 * FAST.wall_timeout_s + 3.0
    assert not _left_on_host()
    # the solution's process ends with the tester, even with a thread of its own left running
    t0 = time.monotonic()
    rep = root_sandbox.run_tests("import threading\nthreading.Thread(target=threading.Event().wait).start()\n"
                                 "def f(x):\n    return x\n", ["x = f(1)\nassert x == 1"])
    assert rep.passed == [True] and time.monotonic() - t0 < FAST.wall_timeout_s - 1.0, rep


# ---- code is compiled inside the sandbox ------------------------------------------------------
def test_pathological_code_costs_the_sandbox_not_the_caller(task):
    """``"lambda:" * 2850`` took 4.9 s to compile in the caller; now the caller never compiles."""
    code = "f = " + "lambda:" * 2850 + " 1\n"
    t0 = time.process_time()
    r = task.reward("<think>t</think>", f"<answer>```python\n{code}```</answer>", _sample(TESTS), None)
    assert time.process_time() - t0 < 1.0  # caller CPU time
    assert r.total <= task.w_format + 1e-9
    r = task.reward("<think>t</think>", "<answer>```python\ndef f(:\n```</answer>", _sample(TESTS), None)
    assert r.total == 0.0 and r.reason == "syntax_error"
    r = task.reward("<think>t</think>", "<answer>```python\nx = '\ud800'\n```</answer>", _sample(TESTS), None)
    assert r.total == 0.0 and r.reason == "syntax_error"  # a lone surrogate: no sandbox_error


def test_text_that_does_not_compile_in_time_costs_one_process(root_sandbox):
    """Program tests run one process each; a text whose compilation alone hits the limits is not
    compiled again for every test (the harness reports when it has compiled the code)."""
    sb = Sandbox(limits=SandboxLimits(wall_timeout_s=1.0, cpu_time_s=1.0), uid_base=UID_BASE, uid_count=UID_COUNT)
    code = "f = " + "lambda:" * 2850 + " 1\n"
    t0 = time.monotonic()
    rep = sb.run_tests(code, [{"input": "", "output": "never printed"}] * 4)
    assert rep.passed == [False] * 4
    assert time.monotonic() - t0 < 2 * 1.0 + 1.5


# ---- escapes and leftovers ---------------------------------------------------------------------
def test_no_new_privs_is_set(root_sandbox):
    code = "def nnp():\n    return [l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0].split()[1]\n"
    assert root_sandbox.run_tests(code, ["assert nnp() == '1'"]).passed == [True]


@pytest.fixture
def setuid_sleep():
    """A root-owned setuid copy of ``sleep`` outside every private tmpfs of the sandbox."""
    d = f"/opt/vlm-grpo-ma-test-{os.getpid()}"
    os.makedirs(d, mode=0o755, exist_ok=True)
    path = os.path.join(d, "sleep")
    shutil.copy(shutil.which("sleep"), path)
    os.chown(path, 0, 0)
    os.chmod(path, 0o4755)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def _processes_running(exe: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.readlink(f"/proc/{name}/exe") == exe:
                out.append(int(name))
        except OSError:
            pass
    return out


def test_setsid_double_fork_setuid_survivor_is_killed(root_sandbox, setuid_sleep):
    code = NOT_ROOT_GUARD + textwrap.dedent(f"""
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                fd = os.open('/dev/shm/held', os.O_CREAT | os.O_WRONLY)
                os.execv({setuid_sleep!r}, ['sleep', '60'])
            os._exit(0)
        import time
        time.sleep(0.5)
        def f(x):
            return -1
    """)
    try:
        assert root_sandbox.run_tests(code, TESTS).passed == [False, False]
        time.sleep(0.2)
        assert not _processes_running(setuid_sleep)
        assert not _left_on_host()
        assert not os.path.exists("/dev/shm/held")  # it wrote the run's private /dev/shm only
    finally:
        for pid in _processes_running(setuid_sleep):
            os.kill(pid, signal.SIGKILL)


def test_sweep_finds_a_process_by_its_real_uid(root_sandbox):
    """A process whose effective uid changed (what a setuid exec does) is still found and killed."""
    uid = UID_BASE + UID_COUNT - 1
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c",
                             f"import os, time\nos.setresuid({uid}, 0, 0)\nprint(1, flush=True)\ntime.sleep(60)"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"1\n"
        assert proc.pid in _processes_of(uid)
        assert root_sandbox._sweep_uid(uid)
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


def _sysv_counts() -> tuple[int, ...]:
    return tuple(len(open(f"/proc/sysvipc/{k}").read().splitlines()) for k in ("shm", "msg", "sem"))


def test_ipc_objects_do_not_outlive_the_run(root_sandbox):
    """SysV shared memory (over the address-space limit in total), a message queue, a semaphore
    set and a POSIX message queue are made inside; none is left on the host afterwards."""
    name = f"/vlm-grpo-ma-attack-{os.getpid()}"
    code = textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        IPC_CREAT = 0o1000
        def make():
            made = 0
            for k in range(40):
                made += libc.shmget(0x5EED000 + k, 16 * 2**20, IPC_CREAT | 0o666) >= 0
            made += libc.msgget(0x5EED100, IPC_CREAT | 0o666) >= 0
            made += libc.semget(0x5EED200, 4, IPC_CREAT | 0o666) >= 0
            rt = ctypes.CDLL('librt.so.1', use_errno=True)
            rt.mq_open.restype = ctypes.c_int
            made += rt.mq_open({name.encode()!r}, os.O_CREAT | os.O_RDWR, 0o666, None) >= 0
            return made
    """)
    before = _sysv_counts()
    assert root_sandbox.run_tests(code, ["assert make() == 43"]).passed == [True]  # they were made
    assert _sysv_counts() == before
    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    assert rt.mq_open(name.encode(), os.O_RDONLY) == -1  # no such queue on the host
    assert not _left_on_host()


@pytest.mark.slow
def test_concurrent_scorers_in_two_processes_never_share_a_uid(tmp_path):
    """Two processes scoring on the same single-uid range wait for each other instead of
    killing each other's programs (a correct slow solution must pass in both)."""
    if Sandbox(limits=FAST).isolation != "root":
        pytest.skip("root-mode sandbox unavailable")
    script = textwrap.dedent("""
        from vlm_grpo_ma.sandbox import Sandbox, SandboxLimits
        sb = Sandbox(SandboxLimits(wall_timeout_s=10, cpu_time_s=10), uid_base=64599, uid_count=1)
        code = "import time\\ntime.sleep(1.5)\\ndef f():\\n    return 1\\n"
        reps = sb.run_many([(code, ["assert f() == 1"])] * 2, max_workers=2)
        print([r.passed for r in reps])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    for out, err in outs:
        assert out.strip() == b"[[True], [True]]", err[-2000:]
