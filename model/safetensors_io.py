"""Safetensors checkpoint directories, whatever the model: a lazy reader of model.safetensors or a sharded
model.safetensors.index.json, a shard writer that names its files as transformers does, atomic directory
writes, and the dtype names the command lines accept. Nothing here knows a tensor name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def as_dtype(dtype) -> torch.dtype | None:
    """torch.dtype, None, or one of 'fp32' / 'bf16' / 'float32' / 'bfloat16' / 'fp16' / 'float16'."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")


def _shard_name(index: Path, key: str, name) -> str:
    """A weight_map entry: a file name in the checkpoint directory itself (as transformers writes them), so
    that an index can never make us read a file elsewhere (an absolute path, `../`, a subdirectory)."""
    if not isinstance(name, str) or not name or name != os.path.basename(name) or "\\" in name \
            or name.startswith("."):
        raise ValueError(f"{index} names a file outside the checkpoint directory: {key!r} -> {name!r}; "
                         "weight_map entries must be file names in the directory of the index")
    return name


def _unreadable(file: Path, e: Exception) -> ValueError:
    msg = " ".join(str(e).split()) or type(e).__name__
    return ValueError(f"{file} is not a readable safetensors file ({type(e).__name__}: {msg}); it is truncated or "
                      "damaged: download or export it again")


class SafetensorsDir:
    """Lazy reader of model.safetensors or a sharded model.safetensors.index.json in a directory, keeping
    at most `max_open` files mapped so that reading a whole checkpoint never maps all of it at once.
    Shards are read from the directory only; a damaged file raises a ValueError that names it."""

    def __init__(self, path, max_open: int = 2):
        from safetensors import SafetensorError, safe_open

        self._safe_open, self._error = safe_open, SafetensorError
        self.path = Path(path)
        index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{index} is not valid JSON ({e})") from None
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map (a JSON object of tensor name -> shard file name)")
            self.file_of = {k: self.path / _shard_name(index, k, f) for k, f in weight_map.items()}
            absent = sorted({str(f.name) for f in self.file_of.values() if not f.is_file()})
            if absent:
                raise FileNotFoundError(f"{index} lists shard(s) missing from {self.path}: {', '.join(absent[:5])}")
        elif single.is_file():
            try:
                with safe_open(single, framework="pt") as f:
                    self.file_of = {k: single for k in f.keys()}
            except Exception as e:  # noqa: BLE001 (safetensors raises SafetensorError and OSError, unnamed)
                raise _unreadable(single, e) from None
        else:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = (f" (found {bins[0]}: load it with transformers and save_pretrained it as safetensors)"
                    if bins else "")
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json{hint}")
        self._open: OrderedDict[Path, object] = OrderedDict()
        self.max_open = max_open

    def keys(self) -> list[str]:
        return list(self.file_of)

    def _handle(self, file: Path):
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        while len(self._open) >= self.max_open:
            _, old = self._open.popitem(last=False)
            old.__exit__(None, None, None)
        try:
            h = self._safe_open(file, framework="pt", device="cpu")
            h.__enter__()
        except Exception as e:  # noqa: BLE001 (see __init__)
            raise _unreadable(file, e) from None
        self._open[file] = h
        return h

    def get(self, key: str, index=None) -> torch.Tensor:
        if key not in self.file_of:
            raise KeyError(f"{key} is not in {self.path}")
        file = self.file_of[key]
        h = self._handle(file)
        try:
            return h.get_tensor(key) if index is None else h.get_slice(key)[index]
        except (self._error, OSError) as e:  # e.g. a tensor missing from the shard its index names
            raise ValueError(f"{file}: cannot read tensor {key!r} ({type(e).__name__}: "
                             f"{' '.join(str(e).split())}); is the file damaged, or its index wrong?") from None

    def close(self) -> None:
        while self._open:
            _, h = self._open.popitem()
            h.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardWriter:
    """Writes tensors into safetensors shards of at most max_shard_bytes (a larger tensor gets its own),
    named like transformers': model.safetensors when one shard suffices, else model-0000i-of-0000N.safetensors
    plus model.safetensors.index.json. Holds at most one shard in memory."""

    def __init__(self, directory, max_shard_bytes: int = 5 * 2**30):
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.dir, self.max = Path(directory), int(max_shard_bytes)
        self._buf: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: list[list[str]] = []
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self._buf and self._bytes + n > self.max:
            self._flush()
        self._buf[key] = t.detach()
        self._bytes += n
        self.total += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        seen, buf = set(), {}
        for k, t in self._buf.items():  # safetensors refuses tensors that share storage: copy those
            t = t.to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t.data_ptr() != ptr or t.numel() * t.element_size() != t.untyped_storage().nbytes():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            buf[k] = t
        save_file(buf, self.dir / f".shard-{len(self._shards)}.safetensors", metadata={"format": "pt"})
        honour_umask(self.dir / f".shard-{len(self._shards)}.safetensors")
        self._shards.append(list(self._buf))
        self._buf, self._bytes = {}, 0

    def close(self) -> list[str]:
        """Flush and name the shards; returns the file names."""
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.dir / ".shard-0.safetensors", self.dir / "model.safetensors")
            return ["model.safetensors"]
        names, weight_map = [], {}
        for i, keys in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f".shard-{i}.safetensors", self.dir / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _umask() -> int:
    try:  # Linux >= 4.7: read it without changing it (os.umask sets it, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path) -> None:
    """Give `path` (and, for a directory, everything under it) the mode a plain open()/mkdir() would:
    0o666 / 0o777 less the umask. tempfile.mkdtemp makes 0o700 directories and safetensors writes 0o600
    files; an export must be readable by whoever the umask lets read the user's other files."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextmanager
def atomic_dir(path, overwrite: bool = False):
    """Yield a fresh temporary directory beside `path`; on success it replaces `path`, on error it is
    removed and `path` is left as it was. A non-empty `path` is refused unless overwrite. The result
    has the modes the umask gives new files and directories (not mkdtemp's owner-only 0o700)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        if any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} is not empty; choose another directory or pass overwrite=True "
                                  "(--overwrite on the command line) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    honour_umask(tmp)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "previous")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
