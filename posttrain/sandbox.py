"""Run untrusted candidate code against tests in a limited subprocess (R1 §2.2.2: for code, "a compiler
can be used to generate feedback based on predefined test cases").

    result = run_python(code, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], timeout_s=2)
    result.passed        # [True, True]
    result.fraction      # 1.0 (tests passed / tests); result.all_passed

The candidate runs in `sys.executable -I -B -c BOOTSTRAP` (isolated mode: no PYTHON* variables, no
user site, no .pyc writes), in a new session (its whole process group is SIGKILLed at the end), in an
empty temporary working directory, with a scrubbed environment (PATH, HOME=TMPDIR=the directory,
a UTF-8 locale) and stdin at EOF. The bootstrap reads its settings from stdin, then, before any
candidate code runs:

1. sets resource limits, soft = hard: address space (RLIMIT_AS -> MemoryError on huge allocations),
   CPU seconds (RLIMIT_CPU -> killed), file size (RLIMIT_FSIZE), open files, no core dumps, and
   RLIMIT_NPROC (default 0: no new processes or threads; the kernel counts it per user, and does not
   enforce it for root);
2. network, kernel layer: unshare(CLONE_NEWNET) (os.unshare on Python >= 3.12, else libc through
   ctypes), falling back to an unprivileged user namespace (CLONE_NEWUSER | CLONE_NEWNET); in the
   new namespace there is no interface but a down loopback, so every connect fails;
3. an audit hook (PEP 578; it cannot be removed once added) that raises PermissionError on: socket
   creation (network, second layer), process creation and signals to other processes (os.system,
   fork, exec, posix_spawn, subprocess, kill/killpg), raising resource limits, importing ctypes or
   _posixsubprocess (the ways around the rest), hard/symbolic links, and writes, renames, deletes
   and mode changes outside the working directory.

The limits are set by the bootstrap itself rather than in a `preexec_fn`: preexec_fn is not safe in
a multi-threaded parent (a trainer has many threads) and the bootstrap runs before any candidate
code, so the effect is the same. What holds where: on the machine this was written on (Linux 6.18,
running as root, Python 3.11, which has no os.unshare) unshare through libc succeeds, so both network
layers hold (`result.network == "netns"`, and tests/test_rewards.py checks each layer alone); where
namespaces are not permitted the audit hook remains (`result.network == "none"`); RLIMIT_NPROC is not
enforced for root, so there the audit hook is what stops fork bombs.

The audit hook is an in-process Python layer: it stops programs that use Python's own APIs (which
is what RL policies write), not a determined attacker, and its filesystem confinement is best-effort
(the kernel does not confine the filesystem here: run the trainer as an unprivileged user, or in a
container, when that matters). Likewise a candidate that
deliberately introspects the harness could forge its test results; results travel on a private pipe
tagged with a per-run nonce the candidate's code never receives, so exiting early (sys.exit,
os._exit) or printing cannot fake a pass.

Tests are Python snippets (typically asserts) run one by one, in order, after the candidate's code,
in its namespace (`__name__ == "solution"`, so an `if __name__ == "__main__":` block does not run);
a snippet passes when it runs without raising. A string of tests is one test.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

__all__ = ["SandboxConfig", "SandboxResult", "run_python", "extract_code_block"]


@dataclass
class SandboxConfig:
    timeout_s: float = 5.0            # wall clock, interpreter start included
    memory_mb: int = 1024             # RLIMIT_AS
    cpu_s: float | None = None        # RLIMIT_CPU; None: ceil(timeout_s) + 1
    max_output_bytes: int = 10_000    # stdout and stderr are each truncated to this
    max_file_mb: int = 16             # RLIMIT_FSIZE
    max_open_files: int = 256         # RLIMIT_NOFILE
    max_processes: int | None = 0     # RLIMIT_NPROC (per user; root is exempt); None: leave as is
    netns: bool = True                # kernel layer: a new network namespace
    audit: bool = True                # Python layer: the audit hook


@dataclass
class SandboxResult:
    passed: list[bool] = field(default_factory=list)      # one per test
    errors: list[str | None] = field(default_factory=list)  # the exception of each failed test
    solution_error: str | None = None  # the exception the candidate's own code raised, if any
    returncode: int | None = None
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    network: str = "unknown"           # "netns" | "userns+netns" | "none": the kernel layer that held
    audit: bool = False                # whether the audit hook was installed
    duration_s: float = 0.0

    @property
    def n_tests(self) -> int:
        return len(self.passed)

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0

    @property
    def all_passed(self) -> bool:
        return bool(self.passed) and all(self.passed)


_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code_block(text: str, language: str = "python") -> str | None:
    """The last fenced code block tagged `language` (python also: py, python3), else the last untagged
    one, else None. When the text has a `</think>`, only what follows the last one is searched."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    names = {"python", "py", "python3"} if language == "python" else {language}
    tagged, untagged = None, None
    for m in _FENCE.finditer(text):
        lang = m.group(1).lower()
        if lang in names:
            tagged = m.group(2)
        elif not lang:
            untagged = m.group(2)
    return tagged if tagged is not None else untagged


# The bootstrap runs in the child as `python -I -B -c _BOOTSTRAP`; its settings arrive on stdin.
_BOOTSTRAP = r'''
import json, os, sys

def _setup(cfg):
    import resource
    def limit(res, value):
        if value is None:
            return
        soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(res, (value, value))
        except (ValueError, OSError):
            pass
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_AS, cfg["memory_bytes"])
    limit(resource.RLIMIT_CPU, cfg["cpu_s"])
    limit(resource.RLIMIT_FSIZE, cfg["file_bytes"])
    limit(resource.RLIMIT_NOFILE, cfg["nofile"])
    limit(resource.RLIMIT_NPROC, cfg["nproc"])

    network = "none"
    if cfg["netns"]:
        def unshare(flags):
            fn = getattr(os, "unshare", None)
            if fn is not None:
                fn(flags)
                return
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(flags) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
        for flags, name in ((CLONE_NEWNET, "netns"), (CLONE_NEWUSER | CLONE_NEWNET, "userns+netns")):
            try:
                unshare(flags)
                network = name
                break
            except (OSError, AttributeError):
                pass
    for mod in [m for m in sys.modules if m in ("ctypes", "_ctypes", "_posixsubprocess", "subprocess")
                or m.startswith("ctypes.")]:
        del sys.modules[mod]

    if cfg["audit"]:
        root = os.path.realpath(os.getcwd())
        blocked = {"os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
                   "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
                   "resource.prlimit", "os.link", "os.symlink", "socket.__new__", "socket.socketpair",
                   "ctypes.dlopen", "ctypes.dlsym"}
        blocked_imports = {"ctypes", "_ctypes", "_posixsubprocess"}
        # event -> (indices of its path arguments, index of its dir_fd argument or None)
        path_events = {"os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
                       "os.chmod": ((0,), 2), "os.chown": ((0,), 3), "os.utime": ((0,), 3),
                       "os.mkfifo": ((0,), 2), "os.mknod": ((0,), 3), "os.rename": ((0, 1), None),
                       "os.truncate": ((0,), None), "shutil.rmtree": ((0,), None),
                       "os.setxattr": ((0,), None), "os.removexattr": ((0,), None), "os.chflags": ((0,), None)}
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        realpath, join, fsdecode, readlink, getcwd = (os.path.realpath, os.path.join, os.fsdecode,
                                                      os.readlink, os.getcwd)
        busy = []

        def inside(path, dir_fd=None):
            if isinstance(path, int):
                return True  # an already-open descriptor
            try:
                path = fsdecode(path)
                base = getcwd()
                if isinstance(dir_fd, int) and dir_fd >= 0:
                    base = readlink("/proc/self/fd/%d" % dir_fd)
                full = realpath(join(base, path))
            except (OSError, TypeError, ValueError):
                return False
            return full == root or full.startswith(root + os.sep) or full == os.devnull

        def hook(event, args):
            if busy:
                return
            busy.append(1)
            try:
                if event in blocked:
                    raise PermissionError("sandbox: %s is not allowed" % event)
                if event == "import" and args[0] in blocked_imports:
                    raise PermissionError("sandbox: importing %s is not allowed" % args[0])
                if event == "open" and args[2] & write_flags and not inside(args[0]):
                    raise PermissionError("sandbox: writing outside the working directory: %r" % (args[0],))
                if event in path_events:
                    where, fd_at = path_events[event]
                    dir_fd = args[fd_at] if fd_at is not None and fd_at < len(args) else None
                    for i in where:
                        if i < len(args) and not inside(args[i], dir_fd):
                            raise PermissionError("sandbox: %s outside the working directory: %r"
                                                  % (event, args[i]))
            finally:
                busy.pop()

        sys.addaudithook(hook)
        # os.open(..., dir_fd=) is audited without its dir_fd: refuse relative paths with a dir_fd
        real_open = os.open
        def safe_open(path, flags, mode=0o777, *, dir_fd=None):
            if dir_fd is not None and flags & write_flags:
                raise PermissionError("sandbox: os.open with dir_fd for writing is not allowed")
            return real_open(path, flags, mode)
        os.open = safe_open
        import posix
        posix.open = safe_open
    return network

def _main(cfg):
    fd, nonce = cfg["result_fd"], cfg["nonce"]
    write, dumps = os.write, json.dumps
    def report(**rec):
        rec["nonce"] = nonce
        try:
            write(fd, (dumps(rec) + "\n").encode())
        except OSError:
            pass
    def describe(e):
        text = "%s: %s" % (type(e).__name__, e)
        return text[:300]
    network = _setup(cfg)
    report(setup={"network": network, "audit": bool(cfg["audit"])})
    code, tests = cfg["code"], cfg["tests"]
    del cfg
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(code, "<solution>", "exec"), ns)
        report(solution=None)
    except BaseException as e:
        report(solution=describe(e))
    for i, test in enumerate(tests):
        try:
            exec(compile(test, "<test %d>" % i, "exec"), ns)
            report(test=i, passed=True)
        except BaseException as e:
            report(test=i, passed=False, error=describe(e))
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)

_main(json.loads(sys.stdin.read()))  # no global holds the settings: the nonce stays out of reach
'''


def _drain(stream, limit: int, out: list):
    """Read a pipe to its end, keeping only the first `limit` bytes (a chatty candidate cannot fill memory)."""
    kept, size = [], 0
    try:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                break
            if size < limit:
                kept.append(chunk[:limit - size])
                size += len(kept[-1])
    except (OSError, ValueError):
        pass
    out.append(b"".join(kept))


def run_python(code: str, tests: Sequence[str] | str = (), config: SandboxConfig | None = None,
               **overrides) -> SandboxResult:
    """Run `code`, then each test snippet, in the sandbox; never raises for anything the code does.

    `overrides` are SandboxConfig fields (timeout_s=2, memory_mb=256, ...).
    """
    config = replace(config or SandboxConfig(), **overrides)
    if isinstance(tests, str):
        tests = [tests]
    tests = [str(t) for t in tests]
    nonce = secrets.token_hex(16)
    cpu = config.cpu_s if config.cpu_s is not None else math.ceil(config.timeout_s) + 1
    result = SandboxResult(passed=[False] * len(tests), errors=["not run"] * len(tests))
    read_fd, write_fd = os.pipe()
    settings = {
        "code": code, "tests": tests, "nonce": nonce, "result_fd": write_fd,
        "memory_bytes": int(config.memory_mb) * 2 ** 20, "cpu_s": int(math.ceil(cpu)),
        "file_bytes": int(config.max_file_mb) * 2 ** 20, "nofile": int(config.max_open_files),
        "nproc": config.max_processes, "netns": bool(config.netns), "audit": bool(config.audit),
    }
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="whaletron-sandbox-", ignore_cleanup_errors=True) as workdir:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _BOOTSTRAP], cwd=workdir, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(write_fd,), start_new_session=True, close_fds=True)
        finally:
            os.close(write_fd)
        outs: dict[str, list] = {"stdout": [], "stderr": [], "results": []}
        results_pipe = os.fdopen(read_fd, "rb")
        threads = [threading.Thread(target=_drain, args=(proc.stdout, config.max_output_bytes, outs["stdout"])),
                   threading.Thread(target=_drain, args=(proc.stderr, config.max_output_bytes, outs["stderr"])),
                   threading.Thread(target=_drain, args=(results_pipe, 1 << 20, outs["results"]))]
        for t in threads:
            t.daemon = True
            t.start()
        try:
            proc.stdin.write(json.dumps(settings).encode())
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=config.timeout_s)
        except subprocess.TimeoutExpired:
            result.timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the candidate and anything it left behind
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for t in threads:
            t.join(timeout=2.0)
        for f in (proc.stdout, proc.stderr, results_pipe):
            try:
                f.close()
            except OSError:
                pass
    result.duration_s = time.monotonic() - start
    result.returncode = proc.returncode

    def text(key):
        return outs[key][0].decode("utf-8", "replace") if outs[key] else ""

    result.stdout, result.stderr = text("stdout"), text("stderr")
    seen = set()
    for line in (outs["results"][0] if outs["results"] else b"").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or rec.get("nonce") != nonce:
            continue
        if "setup" in rec:
            result.network = rec["setup"]["network"]
            result.audit = rec["setup"]["audit"]
        elif "solution" in rec:
            result.solution_error = rec["solution"]
        elif "test" in rec and isinstance(rec["test"], int) and 0 <= rec["test"] < len(tests):
            i = rec["test"]
            if i in seen:  # the first report of a test counts
                continue
            seen.add(i)
            result.passed[i] = bool(rec.get("passed"))
            result.errors[i] = None if result.passed[i] else rec.get("error")
    if result.timed_out:
        result.errors = [e if e != "not run" else f"timed out after {config.timeout_s}s" for e in result.errors]
    return result
