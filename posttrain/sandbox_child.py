"""The processes behind posttrain.sandbox. Standard library only: this file runs in bare interpreters
(`python -I -S -B`), never imported by the trainer.

    zygote     (host; the trainer's child, long-lived) forks one launcher per run
    launcher   (host)  joins the run's cgroups, unshare(mount, pid, net, ipc, uts [, user]) and fork
    └─ init    (pid 1 of the new namespaces) builds a read-only root, pivots into it, forks two:
       ├─ harness   (uid H, not dumpable, seccomp): runs the tests; the candidate's functions are
       │            proxies; writes each verdict to the parent's result pipe, which only it holds
       └─ candidate (uid C, a nested pid namespace of its own, seccomp, rlimits):
                    `python -I -S -B -c <this file> candidate`, serving calls over two pipes

Values cross between the two as plain data (tagged JSON: None, bool, int, float, str, bytes, complex,
list, tuple, dict, set, frozenset); any other object stays in the candidate and crosses as a handle.
The harness compares plain data itself and never asks a candidate object to compare itself or give
its truth value, so an object whose __eq__ always says True cannot pass a test.
"""
import json
import os
import select
import struct
import sys

# ---------------------------------------------------------------------------------------------
# Plain data across the pipe (both sides)
# ---------------------------------------------------------------------------------------------
MAX_MESSAGE = 4 << 20   # bytes; a longer message from the candidate is an error, never buffered
MAX_DEPTH = 100


def encode(value, handle_of, depth=0):
    """A JSON-able tree for `value`; objects that are not plain data become {"h": handle_of(obj)}."""
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return value if -(1 << 63) <= value < (1 << 63) else {"int": hex(value)}
    if t is float:
        return {"float": value.hex()} if value != value or value in (float("inf"), float("-inf")) else value
    if depth >= MAX_DEPTH:
        return {"h": handle_of(value)}
    if t is list:
        return [encode(v, handle_of, depth + 1) for v in value]
    if t in (tuple, set, frozenset):
        return {t.__name__: [encode(v, handle_of, depth + 1) for v in value]}
    if t is dict:
        return {"dict": [[encode(k, handle_of, depth + 1), encode(v, handle_of, depth + 1)] for k, v in value.items()]}
    if t is bytes:
        return {"bytes": value.hex()}
    if t is complex:
        return {"complex": [value.real.hex(), value.imag.hex()]}
    return {"h": handle_of(value)}


def decode(tree, remote):
    """Build fresh builtin values from a tree (handles through `remote(id)`); raises ValueError on junk."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode(v, remote) for v in tree]
    if not isinstance(tree, dict) or len(tree) != 1:
        raise ValueError("malformed value")
    (tag, v), = tree.items()
    if tag == "h" and isinstance(v, int):
        return remote(v)
    if tag == "int":
        return int(v, 16)
    if tag == "float":
        return float.fromhex(v)
    if tag == "bytes":
        return bytes.fromhex(v)
    if tag == "complex":
        return complex(float.fromhex(v[0]), float.fromhex(v[1]))
    if tag == "dict":
        return {decode(k, remote): decode(x, remote) for k, x in v}
    kinds = {"tuple": tuple, "set": set, "frozenset": frozenset}
    if tag in kinds and isinstance(v, list):
        return kinds[tag](decode(x, remote) for x in v)
    raise ValueError("malformed value")


class Pipe:
    """Newline-framed JSON over a pair of file descriptors, with a size cap on what is read."""

    def __init__(self, rfd, wfd):
        self.rfd, self.wfd, self.buf = rfd, wfd, b""

    def send(self, obj):
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        while data:
            data = data[os.write(self.wfd, data):]

    def recv(self):
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_MESSAGE:
                raise OSError("message over %d bytes" % MAX_MESSAGE)
            select.select([self.rfd], [], [])
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise EOFError("the other side closed the pipe")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


# ---------------------------------------------------------------------------------------------
# The candidate (inside the sandbox, as uid C)
# ---------------------------------------------------------------------------------------------
# builtins the harness may apply to a candidate object (len(obj), obj[i], x in obj, iteration, str)
OPS = {"__len__": len, "__iter__": iter, "__next__": next, "__str__": str, "__repr__": repr,
       "__getitem__": lambda o, k: o[k], "__setitem__": lambda o, k, v: o.__setitem__(k, v),
       "__delitem__": lambda o, k: o.__delitem__(k), "__contains__": lambda o, x: x in o}


def audit_hook(workdir):
    """Defence in depth, never the boundary (PEP 578 hooks are not a sandbox): refuse, at the Python
    level, what an honest solution never needs: processes, signals, sockets, ctypes, links and writes
    outside the working directory. The kernel layer holds without it (tests run it both ways)."""
    blocked = {"os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
               "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit", "os.link",
               "os.symlink", "socket.__new__", "socket.socketpair", "ctypes.dlopen", "ctypes.dlsym"}
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    root, realpath, fsdecode = os.path.realpath(workdir), os.path.realpath, os.fsdecode

    def hook(event, args):
        if event in blocked or (event == "import" and args[0] in ("ctypes", "_ctypes", "_posixsubprocess")):
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open" and args[2] & write and not isinstance(args[0], int):
            path = realpath(fsdecode(args[0]))
            if path != root and not path.startswith(root + "/") and path != os.devnull:
                raise PermissionError("sandbox: writing outside the working directory: %r" % (args[0],))

    for mod in [m for m in sys.modules if m.split(".")[0] in ("ctypes", "_ctypes", "_posixsubprocess", "subprocess")]:
        del sys.modules[mod]
    sys.addaudithook(hook)


def candidate():
    """Run the candidate's code, then answer the harness's calls until it closes the pipe."""
    pipe = Pipe(3, 4)
    handles, ids = {}, {}

    def handle_of(obj):
        key = id(obj)
        if key not in ids:
            ids[key] = len(handles)
            handles[ids[key]] = obj
        return ids[key]

    def value(obj):
        try:
            return {"value": encode(obj, handle_of)}
        except RecursionError:
            return {"value": {"h": handle_of(obj)}}

    def exc(e):
        return {"exc": [type(e).__name__, str(e)[:300]]}

    first = pipe.recv()
    code = first["code"]
    if first.get("audit"):
        audit_hook(os.getcwd())
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(code, "<solution>", "exec"), ns)
        loaded = {"error": None}
    except BaseException as e:  # the candidate's own exit or error; the tests still run (and fail)
        loaded = {"error": "%s: %s" % (type(e).__name__, str(e)[:300])}
    names = {}
    for name, obj in list(ns.items()):
        if not name.startswith("__"):
            names[name] = {"module": obj.__name__} if type(obj).__name__ == "module" else value(obj)["value"]
    loaded["names"] = names
    pipe.send(loaded)
    while True:
        try:
            req = pipe.recv()
        except (EOFError, OSError, ValueError):
            os._exit(0)
        try:
            obj = handles[req["h"]]
            args = [decode(a, handles.__getitem__) for a in req.get("args", ())]
            kwargs = {k: decode(a, handles.__getitem__) for k, a in req.get("kwargs", {}).items()}
            op = req["op"]
            if op == "getattr":
                if req["name"].startswith("__"):
                    raise AttributeError("dunder attributes are not served: %s" % req["name"])
                reply = value(getattr(obj, req["name"]))
            else:
                attr = req.get("name")
                fn = obj if attr is None else (lambda *a, **k: OPS[attr](obj, *a, **k)) if attr in OPS \
                    else getattr(obj, attr) if not attr.startswith("__") else None
                if fn is None:
                    raise AttributeError("not served: %s" % attr)
                reply = value(fn(*args, **kwargs))
                # lists, dicts and sets the call changed in place travel back (tests check mutation)
                reply["after"] = [value(a)["value"] if type(a) in (list, dict, set) else None for a in args]
        except BaseException as e:
            reply = exc(e)
        try:
            pipe.send(reply)
        except (OSError, ValueError, TypeError):
            os._exit(0)


CANDIDATE_END = "# -- the candidate's bootstrap ends here"  # what precedes this line is all it compiles
# -- the candidate's bootstrap ends here


# ---------------------------------------------------------------------------------------------
# The harness (inside the sandbox, as uid H): the tests run here, against proxies
# ---------------------------------------------------------------------------------------------
class CandidateError(Exception):
    """An exception the candidate raised that has no builtin counterpart, or the candidate died."""


class Remote:
    """A candidate object seen from the harness: it can be called and inspected, never compared."""
    __slots__ = ("_id", "_link")

    def __init__(self, id_, link):
        object.__setattr__(self, "_id", id_)
        object.__setattr__(self, "_link", link)

    def __call__(self, *args, **kwargs):
        return self._link.call(self._id, None, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._link.getattr(self._id, name)

    def _op(name):
        return lambda self, *args: self._link.call(self._id, name, args, {})

    __len__, __iter__, __next__, __getitem__ = _op("__len__"), _op("__iter__"), _op("__next__"), _op("__getitem__")
    __setitem__, __delitem__, __contains__ = _op("__setitem__"), _op("__delitem__"), _op("__contains__")
    __str__, __repr__ = _op("__str__"), _op("__repr__")
    del _op

    def _refuse(self, *_):
        raise TypeError("a test compares plain data: this value is a candidate-defined object; "
                        "return numbers, strings, lists, tuples, dicts or sets")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = _refuse
    __hash__ = object.__hash__

    def __setattr__(self, name, value):
        raise TypeError("setting attributes on candidate objects is not supported")


class Link:
    """The harness's end of the two pipes to the candidate."""

    def __init__(self, pipe):
        self.pipe = pipe

    def remote(self, id_):
        return Remote(id_, self)

    def _reply(self, req):
        import builtins
        try:
            self.pipe.send(req)
            reply = self.pipe.recv()
        except (EOFError, OSError, ValueError) as e:
            raise CandidateError("the candidate process is gone (%s)" % e) from None
        if not isinstance(reply, dict):
            raise CandidateError("malformed reply")
        if "exc" in reply:
            name, message = (list(reply["exc"]) + ["", ""])[:2]
            cls = getattr(builtins, str(name), None)
            if isinstance(cls, type) and issubclass(cls, Exception) and cls is not CandidateError:
                try:
                    err = cls(str(message))
                except Exception:
                    err = CandidateError("%s: %s" % (name, message))
                raise err
            raise CandidateError("%s: %s" % (name, message))
        return reply

    def _value(self, tree):
        try:
            return decode(tree, self.remote)
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            raise CandidateError("malformed value from the candidate (%s)" % type(e).__name__) from None

    def call(self, id_, name, args, kwargs):
        enc = lambda v: encode(v, self._handle)  # noqa: E731
        reply = self._reply({"op": "call", "h": id_, "name": name, "args": [enc(a) for a in args],
                             "kwargs": {str(k): enc(v) for k, v in kwargs.items()}})
        for arg, after in zip(args, reply.get("after") or ()):
            if after is not None and type(arg) in (list, dict, set):
                new = self._value(after)
                if type(new) is type(arg):
                    arg.clear()
                    (arg.extend if type(arg) is list else arg.update)(new)
        return self._value(reply.get("value"))

    def getattr(self, id_, name):
        return self._value(self._reply({"op": "getattr", "h": id_, "name": name}).get("value"))

    @staticmethod
    def _handle(obj):
        if isinstance(obj, Remote):
            return object.__getattribute__(obj, "_id")
        raise TypeError("only plain data and the candidate's own objects can be passed to it")


def harness(code, tests, audit, pipe, result_fd):
    """Load the candidate's code, run every test against it, write each verdict (only here)."""
    out = Pipe(None, result_fd)

    def describe(e):
        return ("%s: %s" % (type(e).__name__, e))[:300]

    try:
        pipe.send({"code": code, "audit": audit})
        loaded = pipe.recv()
        if not isinstance(loaded, dict):
            raise CandidateError("malformed reply")
        out.send({"solution": loaded.get("error") if isinstance(loaded.get("error"), (str, type(None)))
                  else "malformed"})
        link = Link(pipe)
        ns = {"__name__": "tests"}
        import builtins
        import importlib
        for name, tree in dict(loaded.get("names") or {}).items():
            if not isinstance(name, str) or hasattr(builtins, name):
                continue  # a candidate's `sorted` or `len` would decide what the tests compute
            try:
                if isinstance(tree, dict) and list(tree) == ["module"]:
                    # the harness's own copy of a module the candidate imported (tests may use it unimported)
                    ns[name] = importlib.import_module(str(tree["module"]))
                else:
                    ns[name] = link._value(tree)
            except (CandidateError, ImportError, ValueError):
                pass
    except (EOFError, OSError, ValueError, CandidateError) as e:
        out.send({"solution": "the candidate process did not start or died: %s" % describe(e)})
        link, ns = None, None
    for i, test in enumerate(tests):
        if link is None:
            out.send({"test": i, "passed": False, "error": "not run: the candidate process is gone"})
            continue
        try:
            exec(compile(test, "<test %d>" % i, "exec"), ns)
            out.send({"test": i, "passed": True})
        except BaseException as e:
            out.send({"test": i, "passed": False, "error": describe(e)})


# ---------------------------------------------------------------------------------------------
# Isolation (launcher and init, on the host and then as pid 1 of the new namespaces)
# ---------------------------------------------------------------------------------------------
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 24, 38, 22
SANDBOX_UID = 1000  # the id inside a user namespace (it maps to the trainer's own uid outside)

# syscall numbers (x86_64, aarch64) the seccomp filter refuses with EPERM: namespaces, mounts,
# tracing other processes, kernel keyrings, BPF, perf, userfaultfd, modules, kexec, reboot, swap
DENIED = {
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225),
    "acct": (163, 89), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
}
# machine -> (column in DENIED, AUDIT_ARCH, clone, capset, pivot_root)
ARCH = {"x86_64": (0, 0xC000003E, 56, 126, 155), "aarch64": (1, 0xC00000B7, 220, 91, 41)}
CLONE3 = 435
NAMESPACE_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
                   | CLONE_NEWNET)


def _libc():
    import ctypes
    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        ctypes, _ = _libc()
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def unshare(flags):
    if hasattr(os, "unshare"):  # Python >= 3.12
        os.unshare(flags)
        return
    _, libc = _libc()
    _check(libc.unshare(flags), "unshare")


def mount(source, target, fstype, flags, data=None):
    _, libc = _libc()
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), "mount %s" % target)


def prctl(option, arg2, arg3=0):
    _, libc = _libc()
    _check(libc.prctl(option, arg2, arg3, 0, 0), "prctl %d" % option)


def syscall(nr, *args):
    _, libc = _libc()
    return libc.syscall(nr, *args)


def seccomp_program(machine, denied=DENIED):
    """A classic-BPF seccomp filter: EPERM for `denied` and for clone with namespace flags, ENOSYS for
    clone3 (whose flags sit in memory the filter cannot read; glibc then falls back to clone), the
    x32 ABI and foreign architectures killed, everything else allowed. None for an unknown machine."""
    if machine not in ARCH:
        return None
    col, audit_arch, clone_nr = ARCH[machine][:3]
    ALLOW, KILL, ERRNO, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000, 1, 38
    # (opcode, k, label if true, label if false); None: the next instruction
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    code = [(LD, 4), (JEQ, audit_arch, None, "kill"), (LD, 0)]  # seccomp_data.arch, then .nr
    if machine == "x86_64":
        code.append((JGE, 0x40000000, "kill", None))
    code += [(JEQ, nr, "eperm", None) for nr in sorted({v[col] for v in denied.values()})]
    code += [(JEQ, CLONE3, "enosys", None), (JEQ, clone_nr, None, "allow"),
             (LD, 16), (JSET, NAMESPACE_FLAGS, "eperm", "allow"),  # clone's flags: args[0], low word
             "allow", (RET, ALLOW), "eperm", (RET, ERRNO | EPERM), "enosys", (RET, ERRNO | ENOSYS),
             "kill", (RET, KILL)]
    at, n = {}, 0
    for ins in code:
        if isinstance(ins, str):
            at[ins] = n
        else:
            n += 1
    prog = []
    for ins in code:
        if isinstance(ins, str):
            continue
        i = len(prog)
        if ins[0] in (JEQ, JGE, JSET):
            jt, jf = (0 if lab is None else at[lab] - i - 1 for lab in ins[2:])
            prog.append((ins[0], jt, jf, ins[1]))
        else:
            prog.append((ins[0], 0, 0, ins[1]))
    return prog


def install_seccomp(prog):
    ctypes, libc = _libc()
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    _check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0), "seccomp")


def drop_privileges(uid, gid, *, set_ids):
    """Empty the capability bounding set, become uid/gid (root path), clear every capability."""
    ctypes, libc = _libc()
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0 and cap < 64:
        cap += 1
    if set_ids:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    # capset(version 3, this thread, all zero): nothing effective, permitted or inheritable
    header = struct.pack("=Ii", 0x20080522, 0)
    data = ctypes.create_string_buffer(24)
    machine = os.uname().machine
    if machine in ARCH:
        _check(syscall(ARCH[machine][3], ctypes.c_char_p(header), data), "capset")


def set_limits(lim):
    import resource
    for name, value in lim.items():
        if value is None:
            continue
        res = getattr(resource, name)
        soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))


def build_view(s, uid, gid):
    """A read-only root holding the Python runtime, /dev's four harmless nodes and a size-capped
    private /work, then pivot_root into it (the host's tree is detached, not just hidden)."""
    root = s["root_dir"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")

    def make(path, is_dir):
        full = root + path
        os.makedirs(full if is_dir else os.path.dirname(full), mode=0o755, exist_ok=True)
        if not is_dir and not os.path.exists(full):
            os.close(os.open(full, os.O_CREAT | os.O_WRONLY, 0o644))
        return full

    def bind(src, keep_dev=False):
        dst = make(src, os.path.isdir(src))
        mount(src, dst, None, MS_BIND)
        # a remount must keep the flags the source mount has (the kernel refuses to drop them)
        kept = os.statvfs(src).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | kept | (0 if keep_dev else MS_NODEV)
        mount(None, dst, None, flags)

    for link, target in s["symlinks"]:
        make(os.path.dirname(link), True)
        os.symlink(target, root + link)
    for path in s["ro_paths"]:
        bind(path)
    for path in s["hidden"]:  # an empty read-only directory over it (site-packages)
        mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    for dev in ("null", "zero", "random", "urandom"):
        os.makedirs(root + "/dev", mode=0o755, exist_ok=True)
        make("/dev/" + dev, False)
        mount("/dev/" + dev, root + "/dev/" + dev, None, MS_BIND)
        mount(None, root + "/dev/" + dev, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC
              | (os.statvfs("/dev/" + dev).f_flag & MS_RDONLY))
    make("/work", True)
    mount("tmpfs", root + "/work", "tmpfs", MS_NOSUID | MS_NODEV,
          "size=%dk,nr_inodes=%d,mode=0700,uid=%d,gid=%d" % (s["disk_kb"], s["max_files"], uid, gid))
    os.symlink("/work", root + "/tmp")
    mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(root)
    machine = os.uname().machine
    if machine in ARCH:
        _check(syscall(ARCH[machine][4], b".", b"."), "pivot_root")
        _, libc = _libc()
        _check(libc.umount2(b".", MNT_DETACH), "umount old root")
    else:
        os.chroot(".")
    os.chdir("/")


def isolate(s):
    """Enter new namespaces; returns ((harness uid, gid), (candidate uid, gid), whether to set ids)."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if os.geteuid() == 0:
        try:
            unshare(flags)
            base = 1_000_000_000 + 2 * os.getpid()  # fresh ids per sandbox: RLIMIT_NPROC counts per uid
            return (base, base), (base + 1, base + 1), True
        except OSError:
            pass  # root without CAP_SYS_ADMIN (a container): a user namespace may still be allowed
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (SANDBOX_UID, uid)),
                       ("gid_map", "%d %d 1" % (SANDBOX_UID, gid))):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
    os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    unshare(flags)
    ids = (SANDBOX_UID, SANDBOX_UID)
    return ids, ids, False


def confine(s, ids, limits, set_ids, isolated):
    """The last steps of a sandboxed process: rlimits, no privileges, the seccomp filter."""
    set_limits(limits)
    if isolated:
        drop_privileges(*ids, set_ids=set_ids)
        prog = seccomp_program(os.uname().machine) if s["seccomp"] else None
        if prog is not None:
            install_seccomp(prog)


def init(s, result_fd, isolated, harness_ids, candidate_ids, set_ids):
    """pid 1 of the new namespaces: build the view, start the harness and the candidate, wait."""
    try:
        if isolated:
            prctl(PR_SET_PDEATHSIG, 9)  # the launcher gone -> this init and so the whole namespace
            build_view(s, *candidate_ids)
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        setup = {"isolation": "namespaces" if isolated else "unsafe_local", "audit": bool(s["audit"]),
                 "seccomp": bool(isolated and s["seccomp"] and os.uname().machine in ARCH)}
        harness_pid = os.fork()
        if harness_pid == 0:
            os.close(req_r)
            os.close(resp_w)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            confine(s, harness_ids, s["harness_limits"], set_ids, isolated)
            prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/<pid>/mem, even from the same uid
            Pipe(None, result_fd).send({"setup": setup})
            harness(s["code"], s["tests"], s["audit"], Pipe(resp_r, req_w), result_fd)
            os._exit(0)
        if isolated:
            unshare(CLONE_NEWPID)  # the candidate cannot see (or signal) the harness or this init
        candidate_pid = os.fork()
        if candidate_pid == 0:
            import fcntl
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in (req_r, resp_w)]  # dup2 cannot clobber
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)
            os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
            os.closerange(5, 1 << 16)  # the result pipe above all
            confine(s, candidate_ids, s["candidate_limits"], set_ids, isolated)
            os.chdir(s["workdir"])
            python = s["python"]
            os.execve(python, [python, "-I", "-S", "-B", "-c", s["source"]], s["env"])
        for fd in (req_r, req_w, resp_r, resp_w, result_fd):
            os.close(fd)
        os.waitpid(harness_pid, 0)
        os.kill(candidate_pid, 9)  # in the nested namespace: everything the candidate started dies too
        os.waitpid(candidate_pid, 0)
        os._exit(0)
    except BaseException as e:
        try:
            Pipe(None, result_fd).send({"refused": "%s: %s" % (type(e).__name__, e)})
        finally:
            os._exit(3)


def cgroup_plan(memory_bytes=0, pids=0):
    """Where this process's sandbox cgroups go and what each caps: [(parent directory, {file: value})],
    read from /proc/self/cgroup; [] where it cannot be read."""
    try:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return []
    v1 = {c: path for _, ctrls, path in entries for c in ctrls.split(",") if c}
    unified = next((path for hid, ctrls, path in entries if hid == "0" and not ctrls), None)
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers") and unified is not None:
        return [("/sys/fs/cgroup" + unified, {"memory.max": memory_bytes, "memory.swap.max": 0, "pids.max": pids})]
    return [("/sys/fs/cgroup/%s%s" % (c, v1[c]), limits) for c, limits in
            (("memory", {"memory.limit_in_bytes": memory_bytes}), ("pids", {"pids.max": pids}))
            if c in v1 and os.path.isdir("/sys/fs/cgroup/" + c)]


def join_cgroups(name, memory_bytes, pids):
    """Cap the whole sandbox (every process, and /work's pages) at `memory_bytes` and `pids` by moving
    this launcher into the cgroups `name` (made if missing; the parent reuses a name once its run is
    over and removes them at exit) that its children inherit: cgroup v2 where the controllers are
    delegated, else v1's memory and pids hierarchies. Returns the directories joined; none where the
    machine does not let us, and the rlimits still hold."""
    made = []
    for base, limits in cgroup_plan(memory_bytes, pids):
        path = os.path.join(base, name)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            continue
        made.append(path)
        try:
            for key, value in limits.items():
                if os.path.exists(os.path.join(path, key)):
                    with open(os.path.join(path, key), "w") as f:
                        f.write(str(value))
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            pass  # a limit we could not set: the rlimits still hold
    return made


def launch(s, result_fd):
    """One run: cgroups, namespaces, then init; reports init's pid and exits with its status."""
    os.setsid()  # a process group of the run's own, for the parent's kill
    harness_ids = candidate_ids = (os.getuid(), os.getgid())
    set_ids, isolated = False, s["isolate"]
    if isolated and s["cgroup"]:
        Pipe(None, result_fd).send({"cgroups": join_cgroups(s["cgroup"], s["cgroup_memory"], s["cgroup_pids"])})
    if isolated:
        try:
            harness_ids, candidate_ids, set_ids = isolate(s)
        except OSError as e:
            Pipe(None, result_fd).send({"refused": "the kernel refused namespaces (%s)" % e})
            os._exit(3)
    pid = os.fork()
    if pid == 0:
        init(s, result_fd, isolated, harness_ids, candidate_ids, set_ids)
    # the parent kills init (and so the namespace) and this launcher on a timeout
    Pipe(None, result_fd).send({"init_pid": pid, "launcher_pid": os.getpid()})
    _, status = os.waitpid(pid, 0)
    Pipe(None, result_fd).send({"exit": os.waitstatus_to_exitcode(status)})
    os._exit(0)


def zygote(sock_fd):
    """The trainer's long-lived launcher: one fork per run, so that no run pays an interpreter start and
    the imports (json, ctypes) again. A request is a message on the private socket carrying four
    descriptors: the run's stdout, stderr and result pipes and the pipe its settings arrive on. It
    exits when the trainer closes the socket (the trainer's exit included)."""
    import signal
    import socket
    _libc()  # ctypes loaded once, here
    with open(__file__) as f:  # the candidate's bootstrap (the view will not hold this file): its first part
        text = f.read()
    source = text[:text.index("\n" + CANDIDATE_END + "\n")] + "\ncandidate()\n"

    def reap(*_):
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass

    signal.signal(signal.SIGCHLD, reap)
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 4)
        except OSError:
            os._exit(0)
        if not msg or len(fds) != 4:
            for fd in fds:
                os.close(fd)
            if not msg:
                os._exit(0)  # the trainer is gone
            continue
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sock.close()
            out, err, result_fd, settings = fds
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.close(out)
            os.close(err)
            with os.fdopen(settings, "rb") as f:
                s = json.loads(f.read())
            s["source"] = source
            try:
                launch(s, result_fd)
            finally:
                os._exit(3)
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":  # `python -I -S -B sandbox_child.py zygote FD`
    zygote(int(sys.argv[2]))
