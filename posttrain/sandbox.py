"""Run untrusted candidate code against tests, isolated by the kernel (R1 §2.2.2: for code, "a compiler
can be used to generate feedback based on predefined test cases"). The code reward must hold against
a policy optimised to maximise it, so nothing here trusts the candidate's process.

    result = run_python(code, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], timeout_s=2)
    result.passed        # [True, True]
    result.fraction      # 1.0 (tests passed / tests); result.all_passed

What holds (posttrain/sandbox_child.py builds it; docs/operating.md says what the machine needs):
- Namespaces: the candidate runs in new mount, pid, network, ipc and uts namespaces (and a user
  namespace when the trainer is not root), in a pid namespace nested once more so that it sees only
  its own processes: it cannot signal the trainer, the harness or anything else on the host.
- An unprivileged user: as root the candidate gets a fresh uid per run (RLIMIT_NPROC then counts only
  its own processes); otherwise the trainer's uid through a user namespace. No capabilities, no new
  privileges, and a seccomp filter (x86_64, aarch64) that refuses namespaces, mounts, ptrace, BPF,
  keyrings, io_uring and the like.
- A read-only view: the root is a fresh tmpfs holding only the interpreter's prefix (its
  site-packages hidden), the system library directories the interpreter loads from, and /dev's null,
  zero, random and urandom; the host's tree is detached by pivot_root. The only writable place is
  /work (also /tmp), a private tmpfs capped at `disk_mb` and `max_files`.
- Limits: wall clock (the parent kills the namespace), CPU seconds, address space per process,
  processes and threads, bytes per file, open files, and, where cgroups let us (v2 delegated, or
  v1's memory and pids hierarchies as root), the whole sandbox's memory and process count; stdout
  and stderr are read up to `max_output_bytes` each; the network namespace has only a down loopback.
- The verdict is computed outside the candidate's process: the tests run in a separate harness
  process (another uid, not dumpable, outside the candidate's pid namespace) against proxies of the
  candidate's functions; arguments and results cross a pipe as plain data, compared by the harness
  itself. A candidate object is never asked to compare itself or give its truth value (an object
  whose __eq__ is always True fails), and only the harness holds the pipe the verdicts travel on.
- Defence in depth, never the boundary: Python audit hooks in the candidate refuse processes,
  signals, sockets, ctypes and writes outside /work at the Python level (`audit=False` turns them
  off; the adversarial tests run without them, so the kernel layer is what they prove).

If the kernel refuses the namespaces, `run_python` raises SandboxUnavailable (fail closed) unless
`unsafe_local=True`, which runs the same processes and limits without the isolation and logs a
warning on every call. `check_isolation()` probes once, so a stage fails in its first second.

Tests are Python snippets (typically asserts), run in order in one namespace holding the candidate's
top-level names; a snippet passes when it runs without raising. A string of tests is one test.
"""
from __future__ import annotations

import atexit
import functools
import glob
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from posttrain.sandbox_child import cgroup_plan

__all__ = ["SandboxConfig", "SandboxResult", "SandboxUnavailable", "run_python", "check_isolation",
           "extract_code_block"]

log = logging.getLogger(__name__)
CHILD = str(Path(__file__).with_name("sandbox_child.py"))


class SandboxUnavailable(RuntimeError):
    """The kernel refused the isolation; candidate code is not run (fail closed)."""


@dataclass
class SandboxConfig:
    timeout_s: float = 5.0            # wall clock, interpreter start included
    memory_mb: int = 1024             # RLIMIT_AS per process
    cpu_s: float | None = None        # RLIMIT_CPU; None: ceil(timeout_s) + 1
    max_output_bytes: int = 10_000    # stdout and stderr are each truncated to this
    max_file_mb: int = 16             # RLIMIT_FSIZE: bytes per file
    disk_mb: int = 32                 # the size of /work, the only writable place
    max_files: int = 1024             # inodes in /work
    max_open_files: int = 256         # RLIMIT_NOFILE
    max_processes: int = 16           # RLIMIT_NPROC: processes and threads of the sandbox's uid
    seccomp: bool = True              # the syscall filter (where the machine is x86_64 or aarch64)
    cgroup: bool = True               # cap the whole sandbox's memory at memory_mb where the machine allows
    audit: bool = True                # Python audit hooks in the candidate: defence in depth, not the boundary
    unsafe_local: bool = False        # run without isolation when the kernel refuses it (warns per call)


@dataclass
class SandboxResult:
    passed: list[bool] = field(default_factory=list)      # one per test
    errors: list[str | None] = field(default_factory=list)  # the exception of each failed test
    solution_error: str | None = None  # the exception the candidate's own code raised, if any
    returncode: int | None = None
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    isolation: str = "unknown"         # "namespaces" | "unsafe_local"
    seccomp: bool = False
    audit: bool = False
    cgroups: list[str] = field(default_factory=list)  # the cgroups that capped the whole sandbox, if any
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


@functools.lru_cache(maxsize=1)
def _view() -> dict:
    """What the read-only root holds: the base interpreter's prefix (not a venv's: the candidate
    needs the standard library only) and the directories its shared libraries come from."""
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefix = os.path.realpath(sys.base_prefix)
    ro, links = [], []
    for d in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32", "/usr/local/lib",
              "/etc/ld.so.cache", prefix, python):
        if os.path.islink(d):
            links.append((d, os.readlink(d)))
        elif os.path.exists(d):
            ro.append(os.path.realpath(d))
    # a path inside another bound path is already there
    ro = sorted({p for p in ro if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in ro)})
    links = [(p, t) for p, t in links if not any(p.startswith(q + "/") for q in ro)]
    paths = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix, "installed_base": prefix})
    hidden = sorted({os.path.realpath(paths[k]) for k in ("purelib", "platlib") if os.path.isdir(paths[k])})
    return {"python": python, "ro_paths": ro, "symlinks": links, "hidden": hidden}


class _Reader(threading.Thread):
    """Reads a pipe to its end, keeping only the first `limit` bytes (a chatty candidate cannot fill memory)."""

    def __init__(self, stream, limit: int):
        super().__init__(daemon=True)
        self.stream, self.limit, self.chunks, self.size = stream, limit, [], 0

    def run(self):
        try:
            while True:
                chunk = self.stream.read1(65536)
                if not chunk:
                    break
                if self.size < self.limit:
                    self.chunks.append(chunk[:self.limit - self.size])
                    self.size += len(self.chunks[-1])
        except (OSError, ValueError):
            pass

    def data(self) -> bytes:
        return b"".join(self.chunks)


def _records(data: bytes) -> list[dict]:
    out = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _kill(results: _Reader) -> None:
    """SIGKILL the namespace's init (its death kills every process in the namespace) and the launcher's
    process group. Called only while a pipe of the run is open, so the launcher, which holds them all
    until it has reaped init, is alive and both pids are still theirs."""
    for rec in _records(results.data()):
        if isinstance(rec.get("init_pid"), int) and isinstance(rec.get("launcher_pid"), int):
            for kill, pid in ((os.kill, rec["init_pid"]), (os.killpg, rec["launcher_pid"])):
                if pid > 1:
                    try:
                        kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass


def _write_all(fd: int, data: bytes) -> None:
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:
        pass  # the launcher is gone: its run reports nothing, which reads as failed


class _Zygote:
    """The long-lived launcher (sandbox_child.zygote), started on a process's first run: each run is one
    fork of it, so that no run pays an interpreter start and its imports. It exits when this process
    closes the socket, at exit at the latest."""

    def __init__(self):
        self.lock, self.sock, self.proc, self.pid = threading.Lock(), None, None, None

    def send(self, fds: list[int], python: str) -> None:
        with self.lock:
            for _ in range(2):  # a zygote that died (or one inherited through fork) is replaced once
                if self.sock is None or self.pid != os.getpid() or self.proc.poll() is not None:
                    self._start(python)
                try:
                    socket.send_fds(self.sock, [b"run"], fds)
                    return
                except OSError:
                    self.sock = None
        raise SandboxUnavailable("the code sandbox's launcher process does not start or accept runs here")

    def _start(self, python: str) -> None:
        if self.sock is not None and self.pid == os.getpid():
            self.close()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen([python, "-I", "-S", "-B", CHILD, "zygote", str(child.fileno())],
                                         pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True, cwd="/", env={})
        finally:
            child.close()
        self.sock, self.pid = parent, os.getpid()
        atexit.register(self.close)

    def close(self) -> None:
        if self.sock is not None and self.pid == os.getpid():
            self.sock.close()
            self.sock = None
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_ZYGOTE = _Zygote()


class _CgroupSlots:
    """Cgroup names for the runs in flight, reused once a run is over: making and removing a v1 memory
    cgroup per call costs about 50 ms, joining an existing one well under 1 ms. A run's processes are
    all gone when its launcher has exited (init reaps them, and its death kills the namespace), so a
    released name holds no process. The directories are removed at exit, and those left by a process
    that died are removed by the next one to start a sandbox."""

    PREFIX = "whaletron-sandbox-"

    def __init__(self):
        self.lock, self.free, self.count, self.paths, self.pid = threading.Lock(), [], 0, set(), None

    def acquire(self) -> str:
        with self.lock:
            if self.pid != os.getpid():  # first use in this process (or a fork's): a pool of its own
                self.pid, self.free, self.count, self.paths = os.getpid(), [], 0, set()
                atexit.register(self.remove_all)
                self.remove_stale()
            if self.free:
                return self.free.pop()
            self.count += 1
            return f"{self.PREFIX}{os.getpid()}-{self.count}"

    def release(self, name: str, paths) -> None:
        with self.lock:
            self.paths.update(p for p in paths if isinstance(p, str) and os.path.basename(p) == name
                              and p.startswith("/sys/fs/cgroup/"))
            self.free.append(name)

    def remove_all(self) -> None:
        for path in list(self.paths):
            _rmdir(path)
        self.paths.clear()

    def remove_stale(self) -> None:
        """The empty cgroups of sandboxes whose process is gone (killed before its exit handlers ran)."""
        for base, _ in cgroup_plan():
            for d in glob.glob(os.path.join(base, self.PREFIX + "*")):
                m = re.fullmatch(re.escape(self.PREFIX) + r"(\d+)-\d+", os.path.basename(d))
                if m and not os.path.exists(f"/proc/{m.group(1)}"):
                    _rmdir(d)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty, or gone: nothing to do


_SLOTS = _CgroupSlots()


def run_python(code: str, tests: Sequence[str] | str = (), config: SandboxConfig | None = None,
               **overrides) -> SandboxResult:
    """Run `code`, then each test snippet against it, in the sandbox; never raises for anything the code
    does. Raises SandboxUnavailable when the kernel refuses isolation and unsafe_local is off.

    `overrides` are SandboxConfig fields (timeout_s=2, memory_mb=256, ...).
    """
    config = replace(config or SandboxConfig(), **overrides)
    tests = [tests] if isinstance(tests, str) else [str(t) for t in tests]
    result = SandboxResult(passed=[False] * len(tests), errors=["not run"] * len(tests))
    isolate = not config.unsafe_local
    if not isolate:
        log.warning("sandbox: unsafe_local is set: candidate code runs WITHOUT isolation (same user, "
                    "host filesystem and network); use it only on a machine you can lose")
    cpu = config.cpu_s if config.cpu_s is not None else math.ceil(config.timeout_s) + 1
    view = _view()
    mb = 2 ** 20
    limits = {"RLIMIT_CORE": 0, "RLIMIT_AS": int(config.memory_mb) * mb, "RLIMIT_CPU": int(math.ceil(cpu)),
              "RLIMIT_FSIZE": int(config.max_file_mb) * mb, "RLIMIT_NOFILE": int(config.max_open_files),
              "RLIMIT_NPROC": int(config.max_processes) if isolate else None}
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="whaletron-sandbox-", ignore_cleanup_errors=True) as tmp:
        workdir = "/work" if isolate else tmp
        settings = {
            "code": code, "tests": tests, "isolate": isolate, "seccomp": config.seccomp,
            "audit": config.audit, "cgroup": _SLOTS.acquire() if config.cgroup and isolate else None,
            "cgroup_memory": int(config.memory_mb) * mb,
            "cgroup_pids": int(config.max_processes) + 4,  # + the launcher, init, the harness
            "root_dir": tmp, "workdir": workdir, "disk_kb": int(config.disk_mb) * 1024,
            "max_files": int(config.max_files), "candidate_limits": limits,
            "harness_limits": {**limits, "RLIMIT_FSIZE": 0},
            "env": {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                    "LC_ALL": "C.UTF-8"},
            **view,
        }
        out, err, res, sett = os.pipe(), os.pipe(), os.pipe(), os.pipe()
        try:  # the launcher gets the write ends (and the settings' read end); this process keeps the rest
            _ZYGOTE.send([out[1], err[1], res[1], sett[0]], view["python"])
        except BaseException:
            for fd in (*out, *err, *res, *sett):
                os.close(fd)
            raise
        for fd in (out[1], err[1], res[1], sett[0]):
            os.close(fd)
        readers = [_Reader(os.fdopen(out[0], "rb"), config.max_output_bytes),
                   _Reader(os.fdopen(err[0], "rb"), config.max_output_bytes), _Reader(os.fdopen(res[0], "rb"), 4 << 20)]
        for r in readers:
            r.start()
        # a thread: settings larger than a pipe's buffer must not block this one past the deadline
        threading.Thread(target=_write_all, args=(sett[1], json.dumps(settings).encode()), daemon=True).start()
        deadline = start + config.timeout_s
        for r in readers:  # every pipe reaches its end once every process of the run has exited
            r.join(max(0.0, deadline - time.monotonic()))
        if any(r.is_alive() for r in readers):
            result.timed_out = True
            _kill(readers[2])
            for r in readers:
                r.join(timeout=2.0)
        for r in readers:
            try:
                r.stream.close()
            except OSError:
                pass
    if config.cgroup and isolate:
        _SLOTS.release(settings["cgroup"], next((r["cgroups"] for r in _records(readers[2].data()) if "cgroups" in r),
                                                ()))
    result.duration_s = time.monotonic() - start
    result.stdout, result.stderr = (r.data().decode("utf-8", "replace") for r in readers[:2])
    seen = set()
    for rec in _records(readers[2].data()):
        if "refused" in rec:
            raise SandboxUnavailable(
                f"the code sandbox cannot isolate candidate code here: {rec['refused']}. It needs Linux "
                "namespaces (run as root, or allow unprivileged user namespaces: sysctl "
                "kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0; in a container, "
                "allow unshare, e.g. docker --security-opt seccomp=unconfined). To run candidate code "
                "WITHOUT isolation on a machine you can lose, set the code reward's unsafe_local: true")
        if "exit" in rec:
            result.returncode = rec["exit"]
        if "cgroups" in rec:
            result.cgroups = [str(p) for p in rec["cgroups"] or ()]
        if "setup" in rec:
            result.isolation = str(rec["setup"].get("isolation"))
            result.seccomp = bool(rec["setup"].get("seccomp"))
            result.audit = bool(rec["setup"].get("audit"))
        elif "solution" in rec:
            result.solution_error = rec["solution"]
        elif isinstance(rec.get("test"), int) and 0 <= rec["test"] < len(tests) and rec["test"] not in seen:
            i = rec["test"]
            seen.add(i)
            result.passed[i] = rec.get("passed") is True
            result.errors[i] = None if result.passed[i] else str(rec.get("error"))
    if result.timed_out:
        result.errors = [e if e != "not run" else f"timed out after {config.timeout_s}s" for e in result.errors]
    return result


@functools.lru_cache(maxsize=None)
def check_isolation(unsafe_local: bool = False) -> str:
    """Probe the sandbox once (a trivial candidate): returns the isolation that held; raises
    SandboxUnavailable when the kernel refuses it and unsafe_local is off."""
    r = run_python("x = 1", ["assert x == 1"], timeout_s=30, unsafe_local=unsafe_local)
    if not r.all_passed:
        raise SandboxUnavailable(f"the code sandbox does not run a trivial program here: {r.errors[0]}; "
                                 f"stderr: {r.stderr.strip()[-300:]}")
    return r.isolation
