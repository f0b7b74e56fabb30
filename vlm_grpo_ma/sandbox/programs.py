"""The programs that run in the sandbox's child processes, as plain source strings (they run
under ``python -I -S``, so they import nothing of this package):

- ``LAUNCHER_SRC``: the trusted launcher: enters namespaces, sets limits, drops privileges, execs
  the sandboxed interpreter;
- ``HARNESS_SRC``: runs the solution (and, in ``serve`` mode, answers the tester's calls);
- ``TESTER_SRC``: runs statement tests in a process that holds no solution code;
- ``CODEC_SRC``: the tagged plain-data encoding they share (decoded in the caller by
  :func:`vlm_grpo_ma.sandbox.judging.decode_value`).
"""

from __future__ import annotations

#: exit status the launcher uses when it cannot set up the isolation it was asked for
LAUNCHER_FAILED = 121


#: The trusted launcher: enters namespaces, sets limits, drops privileges, execs the sandbox.
LAUNCHER_SRC = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
def fail(step, err):
    os.write(2, ("sandbox launcher: %s failed: %s\n" % (step, err)).encode())
    os._exit(__FAILED__)
if cfg["unshare"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWIPC = 0x00020000, 0x40000000, 0x10000000, 0x08000000
    flags = CLONE_NEWNET | CLONE_NEWIPC
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
# no_new_privs (inherited, irreversible): a setuid/setgid program (su, sudo, ...) exec'd by the
# code gains nothing, so every process of the run keeps the sandbox uid as real AND effective uid
# and the sweep finds it.  Set before dropping root: ctypes may not be readable by the sandbox uid.
import ctypes
PR_SET_NO_NEW_PRIVS = 38
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    fail("prctl(PR_SET_NO_NEW_PRIVS)", os.strerror(ctypes.get_errno()))
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

#: Tagged plain-data encoding shared by the harness, the tester and (decoding) the caller.
CODEC_SRC = r'''
def _encode(v, depth=0):
    """A value of built-in type as tagged JSON data; anything else (subclasses included) -> TypeError."""
    if depth > 64:
        raise ValueError("nested too deep")
    t = type(v)
    if v is None:
        return ["N"]
    if t is bool:
        return ["B", v]
    if t is int:
        return ["i", hex(v)]
    if t is float:
        return ["f", v.hex()]
    if t is complex:
        return ["c", v.real.hex(), v.imag.hex()]
    if t is str:
        return ["s", v]
    if t is bytes:
        return ["b", v.hex()]
    if t in (list, tuple, set, frozenset):
        return [{list: "l", tuple: "t", set: "S", frozenset: "F"}[t], [_encode(x, depth + 1) for x in v]]
    if t is dict:
        return ["d", [[_encode(k, depth + 1), _encode(x, depth + 1)] for k, x in v.items()]]
    raise TypeError(t.__name__)

def _decode(data, depth=0):
    """The tagged form back into built-in objects (ValueError/TypeError/... if malformed)."""
    if depth > 64 or type(data) is not list or not data or type(data[0]) is not str:
        raise ValueError("malformed value")
    tag, args = data[0], data[1:]
    if tag == "N":
        return None
    if tag == "B" and args and type(args[0]) is bool:
        return args[0]
    if tag == "i" and type(args[0]) is str:
        return int(args[0], 16)
    if tag == "f" and type(args[0]) is str:
        return float.fromhex(args[0])
    if tag == "c" and type(args[0]) is str and type(args[1]) is str:
        return complex(float.fromhex(args[0]), float.fromhex(args[1]))
    if tag == "s" and args and type(args[0]) is str:
        return args[0]
    if tag == "b" and type(args[0]) is str:
        return bytes.fromhex(args[0])
    seq = {"l": list, "t": tuple, "S": set, "F": frozenset}
    if tag in seq and args and type(args[0]) is list:
        return seq[tag](_decode(x, depth + 1) for x in args[0])
    if tag == "d" and args and type(args[0]) is list:
        return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in args[0]}
    raise ValueError("malformed value tag")
'''

#: The harness: runs in the sandbox, as the sandbox uid, before and around the solution.  It is
#: NOT trusted: the solution runs in the same interpreter and can patch or read anything here.
#: So it never sees an expected value: for a value test (``assert <expr> == <literal>``) it only
#: evaluates ``<expr>`` and reports the value in a tagged, plain-data form; the caller decodes it
#: into built-in types and compares it with the literal itself (:func:`vlm_grpo_ma.sandbox.judging.decode_value`).
HARNESS_SRC = r'''
import json, os, sys

__CODEC__
def _main():
    with open("_config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    os.unlink("_config.json")
    with open("solution.py", encoding="utf-8", errors="surrogateescape") as f:
        src = f.read()
    fd, nonce = cfg["report_fd"], cfg["nonce"]
    def report(**kw):
        kw["nonce"] = nonce
        os.write(fd, (json.dumps(kw) + "\n").encode())
    if cfg["block_network"]:
        blocked = frozenset(("socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                             "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname"))
        def hook(event, args):
            if event in blocked:
                raise PermissionError("network access is disabled in the sandbox")
        sys.addaudithook(hook)
    # the model's text is compiled here, under the sandbox's limits, never in the caller
    try:
        code = compile(src, "solution.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        report(event="syntax_error", error=type(e).__name__)
        sys.exit(1)
    del src
    report(event="compiled")
    if cfg["mode"] == "program":
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        return
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(code, ns)
    except BaseException as e:
        report(event="solution_error", error=type(e).__name__)
        return
    if cfg["mode"] == "serve":
        _serve(ns, cfg["req_fd"], cfg["resp_fd"])
        os._exit(0)  # the tester is done: do not wait for threads the solution left running
    for i, (kind, text) in enumerate(cfg["tests"]):
        try:
            if kind == "value":
                value = eval(compile(text, "test_%d" % i, "eval"), ns)
                report(event="value", i=i, v=_encode(value))
            elif kind == "truth":  # whether the caller wants it true or false is not sent
                value = eval(compile(text, "test_%d" % i, "eval"), ns)
                report(event="value", i=i, v=["B", bool(value)])
            else:
                exec(compile(text, "test_%d" % i, "exec"), ns)
                report(event="test", i=i, ok=True)
        except BaseException as e:
            report(event="test", i=i, ok=False, error=type(e).__name__)

def _serve(ns, req_fd, resp_fd):
    """Answer the tester's calls: ``[id, name, [args], [[key, value], ...]]`` (tagged values) ->
    ``[id, "ok", value]`` or ``[id, "err", first built-in class of the exception]``, one JSON
    line each (``id``: a random token of the call, so no reply can be written ahead)."""
    rf, wf = os.fdopen(req_fd, "rb"), os.fdopen(resp_fd, "wb", 0)
    def send(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(wf.fileno(), data):]
    send(["ready"])
    while True:
        line = rf.readline()
        if not line:
            return
        cid = None
        try:
            cid, name, args, kwargs = json.loads(line)
            if name not in ns or not callable(ns[name]):
                raise NameError(name)
            value = ns[name](*[_decode(a) for a in args], **{k: _decode(v) for k, v in kwargs})
            try:
                out = ["ok", _encode(value)]
            except (TypeError, ValueError, RecursionError):
                out = ["unencodable", type(value).__name__[:100]]
        except BaseException as e:
            name = "Exception"
            for c in type(e).__mro__:
                if c.__module__ == "builtins":
                    name = c.__name__
                    break
            out = ["err", name]
        send([cid] + out)

sys.set_int_max_str_digits(0) if hasattr(sys, "set_int_max_str_digits") else None
_main()
'''
HARNESS_SRC = HARNESS_SRC.replace("__CODEC__", CODEC_SRC)


#: The tester: runs statement tests in a process of their own (a sandbox with the same limits,
#: in root mode under a uid of its own) that holds NO solution code.  The names a test uses that
#: are not built-ins are proxies: a call sends its arguments as tagged plain data over a pipe to
#: the solution's process (the harness in ``serve`` mode) and gets the result back the same way,
#: decoded into built-in objects only.  The verdict is reported here, on a pipe and with a nonce
#: the solution's process never has.
TESTER_SRC = r"""
import builtins, json, os, sys

class SolutionCallError(BaseException):
    # not an Exception: ``except Exception`` in a test does not turn a broken call into a pass
    pass

__CODEC__

def _main():
    try:  # not dumpable: a process of the same uid (user mode) cannot ptrace it or open its fds
        import ctypes
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    except Exception:
        pass
    with open("_config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    os.unlink("_config.json")
    fd, nonce = cfg["report_fd"], cfg["nonce"]
    def report(**kw):
        kw["nonce"] = nonce
        os.write(fd, (json.dumps(kw) + "\n").encode())
    rf, wf = os.fdopen(cfg["resp_fd"], "rb"), cfg["req_fd"]
    cap = cfg["reply_bytes"]
    state = {"broken": None}
    def recv():
        line = rf.readline(cap)
        if not line.endswith(b"\n"):
            raise SolutionCallError("the solution's process ended or sent a reply too long")
        try:
            return json.loads(line)
        except Exception:
            raise SolutionCallError("malformed reply")
    def proxy(name):
        def call(*args, **kwargs):
            if state["broken"]:
                raise SolutionCallError(state["broken"])
            try:
                cid = os.urandom(8).hex()
                msg = json.dumps([cid, name, [_encode(a) for a in args], [[k, _encode(v)] for k, v in kwargs.items()]])
            except (TypeError, ValueError) as e:
                raise TypeError("only None/bool/int/float/complex/str/bytes/list/tuple/set/frozenset/dict "
                                "arguments can be passed to the solution, not %s" % e)
            try:
                data = (msg + "\n").encode()
                while data:
                    data = data[os.write(wf, data):]
                reply = recv()
                if type(reply) is not list or not reply or reply[0] != cid:
                    raise SolutionCallError("a reply to another call")
                reply = reply[1:]
            except (OSError, SolutionCallError) as e:
                state["broken"] = "the solution's process ended or sent a malformed reply"
                raise SolutionCallError(state["broken"])
            if type(reply) is list and len(reply) == 2 and reply[0] == "ok":
                try:
                    return _decode(reply[1])
                except Exception:
                    raise SolutionCallError("malformed value")
            if type(reply) is list and len(reply) == 2 and reply[0] == "err" and type(reply[1]) is str:
                cls = getattr(builtins, reply[1], None)
                exc = None
                if isinstance(cls, type) and issubclass(cls, Exception):
                    try:
                        exc = cls("raised in the solution")
                    except Exception:
                        pass
                if exc is not None:
                    raise exc
                raise SolutionCallError("the solution raised %s" % reply[1][:100])
            if type(reply) is list and reply and reply[0] == "unencodable":
                raise SolutionCallError("%s() returned a value that is not plain data" % name)
            state["broken"] = "malformed reply"
            raise SolutionCallError(state["broken"])
        call.__name__ = call.__qualname__ = name
        return call
    try:
        ready = recv() == ["ready"]
    except SolutionCallError:
        ready = False
    if not ready:
        for i in range(len(cfg["tests"])):
            report(event="test", i=i, ok=False, error="no_solution")
        return
    ns = {"__name__": "test", "__builtins__": builtins}
    for name in cfg["names"]:
        ns[name] = proxy(name)
    for i, text in enumerate(cfg["tests"]):
        try:
            exec(compile(text, "test_%d" % i, "exec", dont_inherit=True), ns)
            report(event="test", i=i, ok=True)
        except BaseException as e:
            report(event="test", i=i, ok=False, error=type(e).__name__)

sys.set_int_max_str_digits(0) if hasattr(sys, "set_int_max_str_digits") else None
_main()
""".replace("__CODEC__", CODEC_SRC)
