"""The code-reward sandbox (posttrain/sandbox.py) against an adversary: every class of escape the
reliability issue found (signals, files by every route, C-level access, host files, fork and thread
bombs, disk filling, verdict forging, network), each asserting containment, plus benign programs
still passing. Each run is a fresh namespace and interpreter (~0.1 s)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from posttrain.sandbox import SandboxConfig, SandboxUnavailable, check_isolation, run_python
from posttrain.sandbox_child import DENIED, seccomp_program

try:
    ISOLATION = check_isolation()
except SandboxUnavailable as e:  # the fail-closed test below still runs
    ISOLATION = None
    WHY = str(e)
isolated = pytest.mark.skipif(ISOLATION is None, reason="the kernel refuses namespaces here")


def run(code, tests=("assert True",), config=None, **kw):
    """The kernel layer alone (no audit hooks): what these tests prove must hold without them."""
    if config is None:
        kw.setdefault("timeout_s", 5)
        kw.setdefault("audit", False)
    return run_python(textwrap.dedent(code), list(tests), config, **kw)


# ---------------------------------------------------------------------------------------------
# Benign programs
# ---------------------------------------------------------------------------------------------
ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(2, 0) == 2", "assert add('a', 'b') == 'ab'"]


@isolated
def test_correct_and_wrong_solutions():
    r = run_python(ADD, TESTS, timeout_s=5)
    assert r.passed == [True, True, True] and r.all_passed and not r.timed_out
    assert r.isolation == "namespaces" and r.seccomp and r.audit
    r = run_python("def add(a, b):\n    return a - b\n", TESTS, timeout_s=5)
    assert r.passed == [False, True, False] and r.fraction == pytest.approx(1 / 3)
    assert r.errors[0].startswith("AssertionError")


@isolated
def test_runs_fork_from_one_launcher_that_is_replaced_if_it_dies():
    from concurrent.futures import ThreadPoolExecutor

    from posttrain import sandbox
    assert run_python(ADD, TESTS, timeout_s=10).all_passed
    first = sandbox._ZYGOTE.proc
    first.kill()
    first.wait()
    assert run_python(ADD, TESTS, timeout_s=10).all_passed
    assert sandbox._ZYGOTE.proc.pid != first.pid
    wrong = "def add(a, b):\n    return a - b\n"
    with ThreadPoolExecutor(3) as pool:  # concurrent runs from threads, each its own namespace and verdicts
        results = list(pool.map(lambda code: run_python(code, TESTS, timeout_s=20), [ADD, wrong] * 3))
    assert [r.passed for r in results] == [[True, True, True], [False, True, False]] * 3


@isolated
def test_audit_hooks_are_a_second_layer():
    for code in ("import os\nos.fork()\n", "import ctypes\n", "import socket\nsocket.socket()\n",
                 "import os\nos.kill(1, 0)\n", "open('/evil', 'w')\n"):
        r = run_python(code, ["assert True"], timeout_s=5)
        assert r.solution_error.startswith("PermissionError: sandbox"), (code, r)
        assert r.passed == [True]


@isolated
def test_plain_data_objects_exceptions_and_mutation_cross_the_pipe():
    code = """
        import math
        from collections import deque
        LIMIT = 10
        def stats(xs):
            return {"n": len(xs), "mean": sum(xs) / len(xs), "set": set(xs), "t": (min(xs), max(xs)),
                    "nan": float("nan"), "big": 3 ** 200, "bytes": bytes(xs), "c": complex(1, -2)}
        def sort_in_place(xs):
            xs.sort()
        def check(x):
            if x < 0:
                raise ValueError("negative")
            return math.sqrt(x)
        class Solution:
            def twoSum(self, nums, target):
                seen = {}
                for i, x in enumerate(nums):
                    if target - x in seen:
                        return [seen[target - x], i]
                    seen[x] = i
        class Stack:
            def __init__(self):
                self.items = deque()
            def push(self, x):
                self.items.append(x)
            def __len__(self):
                return len(self.items)
            def __iter__(self):
                return iter(list(self.items))
    """
    tests = [
        "s = stats([3, 1, 2]); assert s['n'] == 3 and s['mean'] == 2.0 and s['set'] == {1, 2, 3}",
        "assert s['t'] == (1, 3) and math.isnan(s['nan']) and s['big'] == 3 ** 200",
        "assert s['bytes'] == bytes([3, 1, 2]) and s['c'] == 1 - 2j",
        "xs = [3, 1, 2]; sort_in_place(xs); assert xs == [1, 2, 3]",
        "assert check(9) == 3.0",
        "try:\n    check(-1)\n    raise AssertionError('no error')\n"
        "except ValueError as e:\n    assert 'negative' in str(e)",
        "assert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]",
        "st = Stack(); st.push(1); st.push(2); assert len(st) == 2 and list(st) == [1, 2]",
        "assert LIMIT == 10",
    ]
    r = run(code, tests)
    assert r.passed == [True] * len(tests), r.errors


@isolated
def test_timeout_memory_cpu_and_output_limits():
    start = time.monotonic()
    r = run("while True:\n    pass\n", timeout_s=1)
    assert r.timed_out and r.passed == [False] and "timed out" in r.errors[0]
    assert time.monotonic() - start < 5
    r = run("x = bytearray(8 * 1024 ** 3)\n", ["assert 'x' not in dir()"], memory_mb=256)
    assert r.solution_error.startswith("MemoryError") and r.passed == [True]
    r = run("import resource\nlimit = resource.getrlimit(resource.RLIMIT_AS)\n",
            ["assert limit == (256 * 2 ** 20, 256 * 2 ** 20)"], SandboxConfig(memory_mb=256))
    assert r.passed == [True], r
    r = run("print('x' * 10 ** 6)\n", [], max_output_bytes=100)
    assert len(r.stdout) == 100
    # the candidate in a busy loop for longer than its CPU seconds is killed by the kernel
    r = run("while True:\n    pass\n", timeout_s=10, cpu_s=1)
    assert not r.timed_out and r.duration_s < 5 and r.passed == [False]


@isolated
def test_view_is_read_only_private_and_minimal():
    r = run("""
        import os, sys
        root = sorted(os.listdir('/'))
        ids = (os.getuid(), os.geteuid(), os.getgid())
        open('f', 'w').write('x')
        work = (os.getcwd(), os.listdir('.'))
        env = dict(os.environ)
        site = [p for p in sys.path if 'site-packages' in p]
    """, ["assert set(root) <= {'dev', 'etc', 'lib', 'lib32', 'lib64', 'usr', 'tmp', 'work', 'root', 'opt', "
          "'home'}, root",
          "assert 0 not in ids and os.getuid() not in ids, ids",
          "assert work == ('/work', ['f'])",
          "assert set(env) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_ALL'}",
          "assert site == []"])
    assert r.passed == [True] * 5, r.errors
    for path in ("/usr/lib/evil", "/dev/evil", "/evil", sys.base_prefix + "/evil"):
        r = run(f"open({path!r}, 'w')\n")
        assert r.solution_error and r.solution_error.startswith(("OSError", "PermissionError")), (path, r)
        assert not os.path.exists(path)
    # site-packages of the interpreter is hidden; the trainer's venv and repository are not there
    r = run(f"import os\nsite = os.listdir({sys.base_prefix + '/lib/python3.11/site-packages'!r})\n"
            f"repo = os.path.exists({os.getcwd()!r})\n", ["assert site == [] and not repo"])
    assert r.passed == [True], r.errors


# ---------------------------------------------------------------------------------------------
# Escapes, one class per test
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def sentinel():
    """A host process the candidate must not be able to signal."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@isolated
def test_signals_cannot_reach_the_host(sentinel):
    for code in (f"import os\nos.kill({sentinel}, 9)\n", f"import os\nos.kill({os.getpid()}, 9)\n",
                 "import os\nos.kill(os.getppid(), 9)\n", f"import os\nos.killpg({sentinel}, 9)\n",
                 "import os\nos.kill(-1, 9)\n"):
        r = run(code, ["assert True"])
        assert r.passed == [True], (code, r)  # the harness kept going
    time.sleep(0.2)
    os.kill(sentinel, 0)  # still alive (raises if not)


@isolated
def test_files_outside_the_sandbox_cannot_be_written_by_any_route(tmp_path):
    target = tmp_path / "evil"
    routes = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open('/', os.O_RDONLY)\nos.open({str(target)[1:]!r}, os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        f"import os\nopen('a', 'w').close()\nos.rename('a', {str(target)!r})",
        f"import os\nopen('a', 'w').close()\nos.link('a', {str(target)!r})",
        f"import os\nos.symlink('/work', {str(target)!r})",
        f"import shutil\nopen('a', 'w').close()\nshutil.copy('a', {str(target)!r})",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.mkdir({str(target)!r})",
        # C-level: libc's own open(), which no Python hook sees
        f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.open({str(target).encode()!r}, 0o101, 0o644) >= 0, ctypes.get_errno()",
        # and through /proc/self/root or a re-mount, which the view and the filter close
        f"import os\nopen('/proc/self/root' + {str(target)!r}, 'w')",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.mount(b'/', b'/work', None, 4096, None) == 0, ctypes.get_errno()",
    ]
    for code in routes:
        r = run(code + "\n")
        assert r.solution_error, (code, r)
        assert not target.exists(), code
    assert list(tmp_path.iterdir()) == []


@isolated
def test_host_files_cannot_be_read(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("hunter2")
    for path in ("/etc/shadow", "/etc/passwd", str(secret), "/proc/1/environ", os.path.expanduser("~/.bashrc")):
        r = run(f"print(open({path!r}).read())\n")
        assert r.solution_error and r.solution_error.startswith("FileNotFoundError"), (path, r)
        assert "hunter2" not in r.stdout and "root:" not in r.stdout


@isolated
def test_fork_and_thread_bombs_are_capped():
    start = time.monotonic()
    r = run("""
        import os, time
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
        except OSError as e:
            err = str(e)
    """, ["assert n < 16 and 'Resource temporarily unavailable' in err, (n, err)"], max_processes=16)
    assert r.passed == [True], r.errors
    r = run("""
        import threading, time
        n = 0
        try:
            while True:
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
                n += 1
        except RuntimeError as e:
            err = str(e)
    """, ["assert n < 16 and \"can't start new thread\" in err, (n, err)"], max_processes=16)
    assert r.passed == [True], r.errors
    # the sleeping children die with the namespace: the call returns at once, nothing is left
    assert time.monotonic() - start < 10


@isolated
def test_memory_is_capped_for_the_whole_sandbox():
    # six children each touching 400 MiB: 2.4 GiB without a sandbox-wide cap, at most 1 GiB with it. Each
    # holds its block until the parent releases them all, so that a child which finished early cannot
    # free room for a later one (a race CI lost: 3 finished): at the release at most two blocks are alive
    r = run("""
        import os
        import time
        done = 0
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        for _ in range(6):
            if os.fork() == 0:
                os.close(go_w)
                block = bytearray(400 * 2 ** 20)
                block[::4096] = b"x" * len(block[::4096])
                os.read(go_r, 1)      # hold the memory until the release (EOF)
                os.write(w, b"1")
                os._exit(0)
        os.close(w)
        os.close(go_r)
        time.sleep(3)                 # every child allocates, or the cap's OOM killer ends it, meanwhile
        os.close(go_w)                # the release
        for _ in range(6):
            try:
                os.wait()
            except ChildProcessError:
                break
        while os.read(r, 1):
            done += 1
    """, ["assert done <= 2, done", "assert done >= 1, done"], memory_mb=1024, timeout_s=20)
    if not r.cgroups:
        pytest.skip("no cgroup could be made here: only the per-process limits hold")
    assert r.passed == [True, True], r.errors
    for path in r.cgroups:  # kept for the next run (joining is cheap, making one is not), and empty
        assert open(os.path.join(path, "cgroup.procs")).read() == "", path


CGROUP_EXIT = """
import json
from posttrain.sandbox import run_python
r = run_python("x = 1", ["assert x == 1"], timeout_s=10, audit=False)
print(json.dumps(r.cgroups))
"""


@isolated
def test_cgroups_are_removed_at_exit():
    proc = subprocess.run([sys.executable, "-c", CGROUP_EXIT], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    paths = json.loads(proc.stdout.strip().splitlines()[-1])
    if not paths:
        pytest.skip("no cgroup could be made here")
    assert not any(os.path.exists(p) for p in paths), paths


@isolated
def test_disk_is_capped():
    r = run("""
        written = 0
        try:
            with open('/work/big', 'wb') as f:
                for _ in range(1000):
                    f.write(b'x' * 2 ** 20)
                    written += 1
        except OSError as e:
            err = str(e)
        files = 0
        try:
            for i in range(10 ** 6):
                open(f'/tmp/f{i}', 'w').close()
                files += 1
        except OSError as e:
            ferr = str(e)
    """, ["assert written <= 8 and 'No space left' in err, (written, err)",
          "assert files < 200 and 'No space left' in ferr, (files, ferr)"], disk_mb=8, max_files=200)
    assert r.passed == [True, True], r.errors
    r = run("open('f', 'wb').write(b'x' * 5 * 2 ** 20)\n", max_file_mb=4)  # RLIMIT_FSIZE: one file
    assert r.solution_error.startswith("OSError") and "File too large" in r.solution_error, r


@isolated
def test_the_verdict_cannot_be_forged():
    wrong = ["assert add(1, 2) == 3"]
    forgeries = [
        # an object equal to everything, or true whatever it is
        "class E:\n    def __eq__(self, o): return True\n    __bool__ = lambda self: True\n"
        "def add(a, b): return E()\n",
        "class S(str):\n    def __eq__(self, o): return True\ndef add(a, b): return S('x')\n",
        # shadowing the builtins a test computes with
        "def add(a, b): return 0\nsorted = len = abs = lambda *a: 3\n",
        # exiting early, printing what a harness would, writing verdicts on every descriptor
        "import sys\nprint('passed')\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "import os, json\nfor fd in range(3, 256):\n    for i in range(3):\n        try:\n"
        "            os.write(fd, (json.dumps({'test': i, 'passed': True}) + '\\n').encode())\n"
        "        except OSError:\n            pass\ndef add(a, b): return 0\n",
        # walking frames and the heap for a harness to patch (there is none in this process)
        "import gc, sys\nf = sys._getframe()\nwhile f:\n    f.f_globals['passed'] = True\n    f = f.f_back\n"
        "for o in gc.get_objects():\n    if isinstance(o, dict) and 'passed' in o:\n        o['passed'] = True\n"
        "def add(a, b): return 0\n",
        # killing or tracing the harness
        "import os, signal\nfor pid in range(1, 500):\n    try:\n        os.kill(pid, signal.SIGSTOP)\n"
        "    except OSError:\n        pass\ndef add(a, b): return 0\n",
        "import ctypes\nlibc = ctypes.CDLL(None)\nfor pid in range(1, 100):\n    libc.ptrace(16, pid, 0, 0)\n"
        "def add(a, b): return 0\n",
    ]
    for code in forgeries:
        r = run(code, wrong + ["assert sorted([2, 1]) == [1, 2] and len('ab') == 2"])
        assert r.passed[0] is False, (code, r)
    # the real thing passes under the same harness
    assert run(ADD, wrong).passed == [True]


@pytest.fixture
def server(tmp_path):
    """A TCP server on the host's loopback, a unix socket in a host directory and an abstract one."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "sock"))
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\0whaletron-sandbox-test-%d" % os.getpid())
    received, stop = [], threading.Event()
    for s in (tcp, unix, abstract):
        s.listen()
        s.settimeout(0.1)

    def serve():
        while not stop.is_set():
            for s in (tcp, unix, abstract):
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                with conn:
                    conn.settimeout(1)
                    try:
                        received.append(conn.recv(100))
                    except OSError:
                        received.append(b"")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield {"tcp": tcp.getsockname()[1], "unix": str(tmp_path / "sock"),
           "abstract": abstract.getsockname()}, received
    stop.set()
    t.join()
    for s in (tcp, unix, abstract):
        s.close()


@isolated
def test_network_is_unreachable(server):
    where, received = server
    attempts = [
        f"import socket\nsocket.create_connection(('127.0.0.1', {where['tcp']}), timeout=1).sendall(b'leak')",
        f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({where['unix']!r})\ns.sendall(b'leak')",
        f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({where['abstract']!r})\ns.sendall(b'leak')",
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)",
    ]
    for code in attempts:
        r = run(code + "\n")
        assert r.solution_error and r.solution_error.startswith(("OSError", "FileNotFoundError",
                                                                 "ConnectionRefusedError")), (code, r)
    # the same connection from outside the sandbox does arrive: the check above is meaningful
    socket.create_connection(("127.0.0.1", where["tcp"]), timeout=1).sendall(b"host")
    time.sleep(0.3)
    assert received == [b"host"]


@isolated
def test_seccomp_refuses_namespaces_and_tracing():
    r = run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        results = {}
        for name, call in (("unshare", lambda: libc.unshare(0x10000000)),
                           ("ptrace", lambda: libc.ptrace(0, 0, 0, 0)),
                           ("keyctl", lambda: libc.syscall(250, 0, 0, 0, 0))):
            ret = call()
            results[name] = (ret, ctypes.get_errno())
    """, ["assert results == {'unshare': (-1, 1), 'ptrace': (-1, 1), 'keyctl': (-1, 1)}, results"])
    assert r.passed == [True], r.errors


def test_seccomp_program_is_well_formed():
    for machine in ("x86_64", "aarch64"):
        prog = seccomp_program(machine)
        assert len(prog) < 256
        for i, (code, jt, jf, _) in enumerate(prog):
            if code in (0x15, 0x35, 0x45):
                assert i + 1 + jt < len(prog) and i + 1 + jf < len(prog)
        assert prog[-1] == (0x06, 0, 0, 0x80000000) and prog[-4] == (0x06, 0, 0, 0x7FFF0000)
        nrs = {k for c, _, _, k in prog if c == 0x15}
        col = 0 if machine == "x86_64" else 1
        assert {v[col] for v in DENIED.values()} <= nrs
    assert seccomp_program("riscv64") is None


# ---------------------------------------------------------------------------------------------
# Fail closed
# ---------------------------------------------------------------------------------------------
REFUSED = """
import json, sys
from posttrain.sandbox import SandboxUnavailable, run_python
from posttrain.sandbox_child import DENIED, install_seccomp, seccomp_program
# this process and its children may not create namespaces, as in a locked-down container
install_seccomp(seccomp_program("x86_64", {"unshare": DENIED["unshare"]}))
out = {}
try:
    run_python("def add(a, b):\\n    return a + b\\n", ["assert add(1, 2) == 3"])
    out["refused"] = None
except SandboxUnavailable as e:
    out["refused"] = str(e)
r = run_python("def add(a, b):\\n    return a + b\\n", ["assert add(1, 2) == 3"], unsafe_local=True)
out["unsafe"] = [r.passed, r.isolation]
from posttrain.rewards import build_reward  # a stage with a code reward stops at build time
try:
    build_reward({"code": 1.0})
    out["build"] = None
except SandboxUnavailable as e:
    out["build"] = str(e)
out["build_unsafe"] = repr(build_reward({"code": {"weight": 1.0, "unsafe_local": True}}))
print(json.dumps(out))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the refusal is staged with an x86_64 filter")
def test_fails_closed_when_the_kernel_refuses_isolation():
    proc = subprocess.run([sys.executable, "-c", REFUSED], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["refused"] and "unsafe_local" in out["refused"] and "namespaces" in out["refused"]
    assert out["unsafe"] == [[True], "unsafe_local"]
    assert out["build"] and "unsafe_local" in out["build"] and out["build_unsafe"] == "Reward(code=1.0)"
    assert "WITHOUT isolation" in proc.stderr  # the per-call warning


USERNS = """
import json, os
from posttrain.sandbox import run_python
code = ("import os\\nids = (os.getuid(), os.getgid())\\nroot = sorted(os.listdir('/'))\\n"
        "def add(a, b):\\n    return a + b\\n")
tests = ["assert add(1, 2) == 3", "assert ids == (1000, 1000)", "assert 'work' in root and 'proc' not in root"]
r = run_python(code, tests, timeout_s=10, audit=False)
w = run_python("open('/usr/evil', 'w')\\n", [], timeout_s=10, audit=False)
print(json.dumps({"euid": os.geteuid(), "passed": r.passed, "errors": r.errors, "isolation": r.isolation,
                  "write": w.solution_error}))
"""


@isolated
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="a non-root trainer is staged from root with util-linux's unshare")
def test_a_non_root_trainer_isolates_through_a_user_namespace():
    # the trainer sees itself as uid 1234: the sandbox takes the user-namespace path
    proc = subprocess.run(["unshare", "--user", "--map-user=1234", "--map-group=1234", sys.executable, "-c", USERNS],
                          capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["euid"] == 1234 and out["isolation"] == "namespaces"
    assert out["passed"] == [True, True, True], out["errors"]
    assert out["write"].startswith("OSError") and "Read-only" in out["write"]
