"""Weights & Biases for the metrics logger: which mode to run in, the run itself (init with its fallback,
log, finish), and reading an offline run's history back without the W&B server.

Modes: "online" | "offline" | "disabled". "online" falls back to "offline", with one printed line,
when there is no API key (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or a ~/.netrc / $NETRC entry for
the host of WANDB_BASE_URL, api.wandb.ai by default), when that host does not answer within a few
seconds, or when wandb.init fails. WANDB_MODE=offline|disabled in the environment lowers the configured
mode (never raises it). Offline runs are under RUN_DIR/wandb/offline-run-*; upload them with
`wandb sync RUN_DIR/wandb/offline-run-*`. finish() finishes the run and shuts wandb's service down, so
that the run's files are complete when it returns (also in multiprocessing children).

`wandb` itself is imported only when a run starts (the import takes about a second).
"""
from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

WANDB_MODES = ("online", "offline", "disabled")
_MODE_RANK = {"disabled": 0, "offline": 1, "online": 2}


# -- W&B mode resolution ------------------------------------------------------------------------------

def _normalize_mode(mode) -> str:
    if mode is None or mode is False or mode == "":
        return "disabled"
    if mode is True:
        return "online"
    mode = str(mode).lower()
    mode = {"dryrun": "offline", "true": "online", "false": "disabled", "off": "disabled"}.get(mode, mode)
    if mode not in WANDB_MODES:
        raise ValueError(f"logging.wandb={mode!r} is not a W&B mode: use one of {', '.join(WANDB_MODES)}")
    return mode


def _wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def wandb_credentials() -> str | None:
    """Where wandb would find credentials for WANDB_BASE_URL's host, or None. Mirrors
    wandb/sdk/lib/wbauth/authenticate.py (_use_system_auth): environment first, then .netrc ($NETRC or
    ~/.netrc, ~/_netrc), without importing wandb."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    import netrc
    host = _wandb_host()[0]
    paths = [os.environ["NETRC"]] if os.environ.get("NETRC") else \
        [os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for path in paths:
        try:
            if netrc.netrc(path).authenticators(host):
                return path
        except (OSError, netrc.NetrcParseError):
            continue
    return None


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to WANDB_BASE_URL's host opens within `timeout` seconds, name lookup
    included (run in a thread: getaddrinfo has no timeout of its own)."""
    host, port = _wandb_host()
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def resolve_wandb_mode(mode, *, probe_timeout: float = 3.0) -> tuple[str, str | None]:
    """(the mode to run W&B in, why it was lowered or None)."""
    mode = _normalize_mode(mode)
    env = os.environ.get("WANDB_MODE", "")
    if env:
        try:
            env = _normalize_mode(env)
        except ValueError:
            env = ""
    if env and _MODE_RANK[env] < _MODE_RANK[mode]:
        return env, f"WANDB_MODE={os.environ['WANDB_MODE']} in the environment"
    if mode == "online":
        if wandb_credentials() is None:
            return "offline", (f"no API key (WANDB_API_KEY, or a .netrc entry for {_wandb_host()[0]}; "
                               f"`wandb login` writes one)")
        if not wandb_reachable(probe_timeout):
            return "offline", f"{':'.join(map(str, _wandb_host()))} is not reachable"
    return mode, None


# -- reading an offline run back ----------------------------------------------------------------------

def read_wandb_records(path) -> Iterator[Any]:
    """The protobuf records (wandb.proto.wandb_internal_pb2.Record) of a run-*.wandb file. The file is
    a LevelDB log (github.com/google/leveldb doc/log_format.md: 32 KiB blocks of records with a 7-byte
    header crc32/length/type) after a 7-byte W&B header (":W&B", magic 0xBEE1, version) — the format of
    wandb/sdk/internal/datastore.py in wandb < 0.19, written by wandb-core's Go store since."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log (no :W&B header)")
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                      # a block's tail too short for a header is zero padding
            pos += left
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pos += 7
        if kind == 0:                     # zero type: preallocated, unwritten space
            pos += left - 7
            continue
        buf += data[pos:pos + n]
        pos += n
        if kind in (1, 4):                # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def read_wandb_history(run_dir) -> list[dict[str, Any]]:
    """The history rows (one dict per wandb.log step, values JSON-decoded) of an offline run directory
    RUN_DIR/wandb/offline-run-*/ (its run-*.wandb file)."""
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    rows = []
    for rec in read_wandb_records(files[0]):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json)
                         for it in rec.history.item})
    return rows


# -- the run ------------------------------------------------------------------------------------------

class WandbRun:
    """A W&B run whose files go under RUN_DIR/wandb, started in `mode` ("online" or "offline"; see
    resolve_wandb_mode). project, entity, name, tags, config: the run's. resume_step: not None when
    training resumes, and then the run id saved in RUN_DIR/wandb/whaletron-run-id is continued.
    settings: overrides of wandb.Settings (defaults: silent, console capture off, no code/git/requirements
    capture, init_timeout 30 s). An online init that fails falls back to offline, with one printed line.
    """

    def __init__(self, run_dir, mode: str, *, project: str = "whaletron", entity: str = "", name: str = "",
                 tags=(), config: dict | None = None, resume_step: int | None = None,
                 settings: dict | None = None):
        import wandb

        run_dir = Path(run_dir)
        opts = dict(silent=True, console="off", init_timeout=30.0, disable_git=True,
                    x_save_requirements=False, disable_code=True)
        opts.update(settings or {})
        id_file = run_dir / "wandb" / "whaletron-run-id"
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else None
        tags = list(tags or ())

        def init(mode):
            return wandb.init(dir=str(run_dir), mode=mode, project=project or None, entity=entity or None,
                              name=name or None, tags=tags or None, config=config or {},
                              id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(**opts))
        try:
            self._run = init(mode)
        except Exception as e:   # a server that fails or times out: keep training, log offline
            if mode != "online":
                raise
            reason = (str(e).strip().splitlines() or [""])[0]
            print(f"wandb: online init failed ({type(e).__name__}: {reason}): logging offline to "
                  f"{run_dir / 'wandb'}", flush=True)
            mode = "offline"
            self._run = init(mode)
        self.mode = mode
        self._wandb = wandb
        self.dir = Path(self._run.dir).parent   # RUN_DIR/wandb/offline-run-* or run-*
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self._run.id + "\n")

    @property
    def url(self) -> str | None:
        return self._run.url if self.mode == "online" else None

    def log(self, step: int, values: Mapping[str, Any], images: Mapping[str, Any] | None = None) -> None:
        """One W&B log at `step`: the values as they are (non-finite included) and the images (RGB arrays)."""
        data: dict[str, Any] = dict(values)
        for k, img in (images or {}).items():
            data[k] = self._wandb.Image(img)
        self._run.log(data, step=int(step))

    def finish(self, exit_code: int = 0) -> None:
        self._run.finish(exit_code=exit_code)
        # finish() can return before wandb-core has flushed the run's .wandb file (measured: only its
        # 7-byte header on disk), and its atexit teardown does not run in multiprocessing children
        # (they leave through os._exit): shut the service down here (wandb/sdk/wandb_setup.py teardown)
        try:
            self._wandb.teardown()
        except SystemExit as e:   # teardown exits when the service failed; metrics must not end the job
            print(f"wandb: service exited with code {e.code} at teardown", flush=True)
