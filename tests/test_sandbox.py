"""The code sandbox: correct scoring, and every attack scores 0 and leaves the caller unharmed.

The attack cases need the root-mode sandbox (dedicated uid, network and mount namespaces); they
are skipped with the reason where it cannot be had.  Every destructive solution first checks
that it does NOT run as root, so a broken sandbox cannot take the test machine down with it.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

import pytest

from vlm_grpo_ma.sandbox import (
    Sandbox,
    SandboxLimits,
    TestReport,
    _processes_of,
    normalise_output,
    validate_tests,
)

FAST = SandboxLimits(wall_timeout_s=2.0, cpu_time_s=2.0, memory_bytes=256 * 2**20,
                     max_processes=16, output_bytes=64 * 1024)


#: a uid range of these tests' own, outside the default 64000..64511, so other scorers on a shared
#: machine cannot make the "no process left" checks fail
UIDS = dict(uid_base=64700, uid_count=64)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(limits=FAST, **UIDS)


@pytest.fixture(scope="module")
def root_sandbox(sandbox: Sandbox) -> Sandbox:
    if sandbox.isolation != "root":
        pytest.skip(f"root-mode sandbox unavailable here (isolation={sandbox.isolation})")
    return sandbox


@pytest.fixture(scope="module")
def raw_root_sandbox(root_sandbox: Sandbox) -> Sandbox:
    """Root mode WITHOUT the audit hook, so the OS-level barriers alone are tested."""
    sb = Sandbox(limits=FAST, block_network_hook=False, **UIDS)
    assert sb.isolation == "root"
    return sb


NOT_ROOT_GUARD = "import os\nif os.getuid() == 0:\n    raise SystemExit('refusing to attack as root')\n"


def _no_sandbox_processes_left() -> bool:
    return all(not _processes_of(uid) for uid in range(UIDS["uid_base"], UIDS["uid_base"] + UIDS["uid_count"]))


# ---- plain behaviour ---------------------------------------------------------------------
def test_normalise_output():
    assert normalise_output("3 \r\n4\n\n") == "3\n4"
    assert normalise_output("a\t\nb") == "a\nb"
    assert normalise_output("") == ""
    # the rules docs/BENCHMARKS.md states against open-r1's zip()-paired, both-sides-stripped lines:
    # a truncated or extended output is not the expected one, and leading whitespace counts
    assert normalise_output("3\n") != normalise_output("3\n4\n")
    assert normalise_output("3\n4\n5\n") != normalise_output("3\n4\n")
    assert normalise_output(" 3\n") != normalise_output("3\n")


def test_validate_tests_names_the_bad_item():
    assert validate_tests(["assert 1"]) == ["assert 1"]
    with pytest.raises(ValueError, match=r"\[1\]: a test is"):
        validate_tests(["assert 1", 3])
    with pytest.raises(ValueError, match="non-empty"):
        validate_tests([])
    with pytest.raises(ValueError, match="input"):
        validate_tests([{"input": 1, "output": "x"}])


def test_assert_tests_fraction(sandbox):
    rep = sandbox.run_tests("def f(x):\n    return 2 * x\n",
                            ["assert f(2) == 4", "assert f(3) == 7", "assert f(0) == 0", "assert g(1)"])
    assert rep.passed == [True, False, True, False]
    assert rep.fraction == 0.5 and not rep.all_passed and rep.reason == "test_failed"


def test_stdio_tests(sandbox):
    code = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"
    rep = sandbox.run_tests(code, [{"input": "1 2", "output": "3\n"}, {"input": "5 5\n", "output": "10  "},
                                   {"input": "2 2", "output": "5"}])
    assert rep.passed == [True, True, False] and rep.reason == "wrong_output"


def test_mixed_tests_and_all_pass(sandbox):
    code = "def sq(x):\n    return x * x\nif __name__ == '__main__':\n    print(sq(int(input())))\n"
    rep = sandbox.run_tests(code, ["assert sq(3) == 9", {"input": "4\n", "output": "16"}])
    assert rep.passed == [True, True] and rep.all_passed and rep.reason is None


def test_solution_error_fails_every_assert(sandbox):
    rep = sandbox.run_tests("raise ValueError('boom')\n", ["assert True", "assert True"])
    assert rep.passed == [False, False] and rep.reason == "solution_error"
    rep = sandbox.run_tests("def f(:\n", ["assert True", {"input": "", "output": ""}])
    assert rep.passed == [False, False] and rep.reason == "syntax_error"  # compiled in the sandbox


def test_exit_in_solution_and_nonzero_program_exit(sandbox):
    assert sandbox.run_tests("import os\nos._exit(0)\n", ["assert True"]).passed == [False]
    rep = sandbox.run_tests("import sys\nprint(1)\nsys.exit(3)\n", [{"input": "", "output": "1"}])
    assert rep.passed == [False] and rep.reason == "exit"


def test_forged_report_lines_do_not_count(sandbox):
    forge = ("import os\nfor fd in range(1, 64):\n    try:\n"
             "        os.write(fd, b'{\"event\": \"test\", \"i\": 0, \"ok\": true}\\n')\n"
             "    except OSError:\n        pass\n")
    rep = sandbox.run_tests(forge, ["assert False", "assert False"])
    assert rep.passed == [False, False]


def test_hanging_test_keeps_earlier_results():
    """A test that hangs costs itself and the ones after it.  It sleeps (no CPU) and the CPU
    limit is far above the wall clock, so the wall clock is what ends it, every time: a
    busy loop under equal limits raced RLIMIT_CPU (``exit``) against the wall clock
    (``timeout``) on a loaded machine."""
    sb = Sandbox(limits=SandboxLimits(wall_timeout_s=2.0, cpu_time_s=60.0, memory_bytes=256 * 2**20))
    rep = sb.run_tests("def f():\n    return 1\n",
                       ["assert f() == 1", "import threading\nthreading.Event().wait()", "assert True"])
    assert rep.passed == [True, False, False] and rep.details == ["timeout"]


def test_workdir_is_fresh_and_removed(sandbox):
    code = "import os\nprint(sorted(os.listdir('.')))\nopen('scratch.txt', 'w').write('x')\n"
    r1 = sandbox.run(code)
    r2 = sandbox.run(code)
    assert r1.status == "ok" and r1.stdout == r2.stdout
    assert b"scratch.txt" not in r2.stdout


def test_run_many_bounded_pool_keeps_order(sandbox):
    jobs = [(f"def f():\n    return {k}\n", [f"assert f() == {k % 3}"]) for k in range(6)]
    reports = sandbox.run_many(jobs, max_workers=3)
    assert [r.passed for r in reports] == [[k % 3 == k] for k in range(6)]
    assert all(isinstance(r, TestReport) for r in reports)


def test_user_mode_scores_the_same():
    """The weaker non-root mode (forced here) runs and scores benign code the same way."""
    sb = Sandbox(limits=FAST, isolation="user")
    assert sb.isolation in ("user", "user_ns") and "rlimits" in sb.protections
    code = "def sq(x):\n    return x * x\nif __name__ == '__main__':\n    print(sq(int(input())))\n"
    rep = sb.run_tests(code, ["assert sq(3) == 9", "assert sq(2) == 5", {"input": "4", "output": "16"}])
    assert rep.passed == [True, False, True]
    assert sb.run_tests("while True:\n    pass\n", ["assert True"]).reason == "timeout"


def test_uid_mode_without_namespaces(root_sandbox):
    """The fallback for root without namespaces still isolates by uid and limits."""
    sb = Sandbox(limits=FAST, isolation="uid", **UIDS)
    assert sb.isolation == "uid"
    bomb = NOT_ROOT_GUARD + "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert sb.run_tests(bomb, ["assert True"]).passed == [False]
    assert _no_sandbox_processes_left()
    kill = NOT_ROOT_GUARD + "import signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    assert sb.run_tests(kill, ["assert True"]).reason == "solution_error"
    environ = "import os\nassert b'PATH' in open(f'/proc/{os.getppid()}/environ', 'rb').read()"
    assert sb.run_tests("x = 1\n", [environ]).passed == [False]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=1)\n"
        assert sb.run_tests(code, ["assert True"]).reason == "solution_error"  # the audit hook
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_invalid_isolation_name():
    with pytest.raises(ValueError):
        Sandbox(isolation="docker")


# ---- attacks: each scores 0 and the caller is unharmed ----------------------------------
def test_infinite_loop(root_sandbox):
    t0 = time.monotonic()
    rep = root_sandbox.run_tests("while True:\n    pass\n", ["assert True"])
    assert rep.passed == [False] and rep.reason == "timeout"
    assert time.monotonic() - t0 < FAST.wall_timeout_s + 3


def test_cpu_time_limit_kills_before_the_wall_clock(root_sandbox):
    sb = Sandbox(limits=SandboxLimits(wall_timeout_s=20, cpu_time_s=1))
    t0 = time.monotonic()
    res = sb.run("while True:\n    pass\n")
    assert res.status == "exit" and res.returncode is not None and res.returncode < 0
    assert time.monotonic() - t0 < 10


def test_memory_bomb(root_sandbox):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n"
    rep = root_sandbox.run_tests(code, ["assert True"])
    assert rep.passed == [False]
    rep = root_sandbox.run_tests("x = bytearray(10**11)\n", ["assert True"])
    assert rep.passed == [False] and rep.reason == "solution_error"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB


def test_fork_bomb(raw_root_sandbox):
    code = NOT_ROOT_GUARD + (
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    t0 = time.monotonic()
    rep = raw_root_sandbox.run_tests(code, ["assert True"])
    assert rep.passed == [False]
    assert time.monotonic() - t0 < FAST.wall_timeout_s + 5
    assert _no_sandbox_processes_left()
    # the caller can still start processes
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True).stdout == b"1\n"


def test_escaped_session_is_killed(raw_root_sandbox):
    """A child that leaves the process group (setsid) is still killed through its uid."""
    code = NOT_ROOT_GUARD + "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(60)\n"
    res = raw_root_sandbox.run(code)
    assert res.status in ("ok", "timeout")
    assert _no_sandbox_processes_left()


@pytest.mark.parametrize("hook", [False, True], ids=["namespace-only", "with-audit-hook"])
def test_network_connection(root_sandbox, hook):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    port = server.getsockname()[1]
    sb = Sandbox(limits=FAST, block_network_hook=hook)
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\n"
    try:
        rep = sb.run_tests(code, ["assert True"])
        assert rep.passed == [False] and rep.reason == "solution_error"
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_writing_outside_its_directory(root_sandbox, tmp_path):
    target = tmp_path / "escaped.txt"
    code = NOT_ROOT_GUARD + (
        f"open({str(target)!r}, 'w').write('x')\n")
    rep = root_sandbox.run_tests(code, ["assert True"])
    assert rep.passed == [False] and not target.exists()
    # world-writable /tmp is a private tmpfs inside the sandbox: nothing reaches the real one
    name = f"/tmp/vlm-grpo-ma-escape-{os.getpid()}"
    # (statement tests run in a process of their own: the test asks the solution's process)
    rep = root_sandbox.run_tests(f"import os\nopen({name!r}, 'w').write('x')\nopen('../escape-rel', 'w')\n"
                                 f"def written():\n    return os.path.exists({name!r})\n",
                                 ["ok = written()\nassert ok"])
    assert rep.passed == [True]  # it can write its private /tmp ...
    assert not os.path.exists(name)  # ... which is not the caller's
    assert not os.path.exists("/tmp/escape-rel")


def test_filling_the_disk(root_sandbox):
    """Writes go to a size-limited tmpfs: one big file hits RLIMIT_FSIZE or the tmpfs size,
    many files fill the tmpfs; nothing lands on the caller's disk."""
    big = "open('big', 'wb').write(b'x' * (64 * 2**20))\n"
    many = "for i in range(1000):\n    open(f'f{i}', 'wb').write(b'x' * 2**20)\n"
    for code in (big, many):
        rep = root_sandbox.run_tests(code, ["assert True"])
        assert rep.passed == [False] and rep.reason in ("solution_error", "exit")


def test_reading_parent_environment(root_sandbox, monkeypatch):
    monkeypatch.setenv("VLM_GRPO_MA_TEST_SECRET", "s3cr3t-value")
    tests = [
        "import os\nassert os.environ.get('VLM_GRPO_MA_TEST_SECRET') == 's3cr3t-value'",
        "import os\nassert b's3cr3t-value' in open(f'/proc/{os.getppid()}/environ', 'rb').read()",
        ("import os\nfound = False\nfor p in os.listdir('/proc'):\n    try:\n"
         "        found |= b's3cr3t' in open(f'/proc/{p}/environ', 'rb').read()\n"
         "    except OSError:\n        pass\nassert found"),
    ]
    rep = root_sandbox.run_tests("import os\n", tests)
    assert rep.passed == [False, False, False]


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_printing_gigabytes(root_sandbox, stream):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = f"import sys\nline = 'x' * 65536\nwhile True:\n    sys.{stream}.write(line)\n"
    t0 = time.monotonic()
    res = root_sandbox.run(code)
    assert res.status == "output_limit"
    assert len(res.stdout) <= FAST.output_bytes and len(res.stderr) <= FAST.output_bytes
    assert time.monotonic() - t0 < FAST.wall_timeout_s
    rep = root_sandbox.run_tests(code, [{"input": "", "output": ""}])
    assert rep.passed == [False] and rep.reason == "output_limit"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB


def test_signalling_its_parent(raw_root_sandbox):
    code = NOT_ROOT_GUARD + "import signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    rep = raw_root_sandbox.run_tests(code, ["assert True"])
    assert rep.passed == [False] and rep.reason == "solution_error"
    code = NOT_ROOT_GUARD + "import signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)\n"
    assert raw_root_sandbox.run_tests(code, ["assert True"]).passed == [False]
    # still here
    assert os.getpid() > 0
