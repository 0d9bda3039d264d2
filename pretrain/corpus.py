"""The embedded default corpus: the Python standard library's own sources.

Real text (code, comments and docstrings) that exists offline on every machine that runs
this project. `ensure_embedded_corpus` walks `sysconfig.get_paths()["stdlib"]` in sorted
order (skipping test directories and site-packages), keeps whole `.py` files, one document
each, up to `max_bytes`, trains a byte-fallback SentencePiece BPE on them, tokenizes them
into a Megatron indexed dataset and caches the result under

    CACHE_DIR/corpus/stdlib-py3.11.7-v4096-b8000000-f1/{stdlib.bin, stdlib.idx, tokenizer.model, manifest.json}

The directory is built under a temporary name and renamed into place, so a concurrent or
interrupted build never leaves a half-built cache; a second call finds it and returns at once.
Call it on one rank (`PretrainData` does: rank 0 builds, the others wait at a barrier).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time

from model.safetensors_io import honour_umask

__all__ = ["stdlib_documents", "ensure_embedded_corpus"]

_FORMAT = 1  # bump when the corpus recipe changes, to invalidate old caches
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_documents(max_bytes: int = 8_000_000) -> list[tuple[str, str]]:
    """(relative path, source text) of standard-library `.py` files, sorted, until `max_bytes`.

    Files that are not UTF-8 are skipped; the walk stops before the first file that would pass
    the cap, so the corpus is a deterministic prefix of the sorted file list.
    """
    root = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            size = len(text.encode("utf-8"))
            if not text.strip():
                continue
            if total + size > max_bytes:
                return docs
            docs.append((os.path.relpath(path, root), text))
            total += size
    return docs


def _cache_key(vocab_size: int, max_bytes: int) -> str:
    py = "{}{}".format(platform.python_implementation().lower()[:2], ".".join(map(str, sys.version_info[:3])))
    return f"stdlib-{py}-v{vocab_size}-b{max_bytes}-f{_FORMAT}"


def embedded_tokenizer_path(cache_dir: str, vocab_size: int = 4096, max_bytes: int = 8_000_000) -> str:
    """Where ensure_embedded_corpus keeps the tokenizer of this corpus (built or not), under cache_dir as given."""
    return os.path.join(cache_dir, "corpus", _cache_key(vocab_size, max_bytes), "tokenizer.model")


def ensure_embedded_corpus(cache_dir: str, vocab_size: int = 4096, max_bytes: int = 8_000_000) -> tuple[str, str]:
    """Build (or find) the embedded corpus; returns (Megatron dataset prefix, tokenizer .model path)."""
    root = os.path.join(os.path.abspath(cache_dir), "corpus")
    final = os.path.join(root, _cache_key(vocab_size, max_bytes))
    prefix, model = os.path.join(final, "stdlib"), os.path.join(final, "tokenizer.model")
    if os.path.isfile(os.path.join(final, "manifest.json")):
        return prefix, model
    if os.path.exists(final):
        raise RuntimeError(f"corpus cache {final} is incomplete (no manifest.json); delete it to rebuild")

    from pretrain.preprocess import write_indexed_dataset
    from pretrain.tokenizer import load_tokenizer, train_sentencepiece

    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(final)}-", dir=root)
    try:
        t0 = time.time()
        docs = stdlib_documents(max_bytes)
        if not docs:
            raise RuntimeError(f"no standard-library sources found under {sysconfig.get_paths()['stdlib']}")
        texts = [t for _, t in docs]
        train_sentencepiece(texts, os.path.join(tmp, "tokenizer"), vocab_size)
        tok = load_tokenizer(os.path.join(tmp, "tokenizer.model"))
        n_docs, n_tokens = write_indexed_dataset((tok.encode(t) + [tok.eod_id] for t in texts),
                                                 os.path.join(tmp, "stdlib"), tok.vocab_size)
        digest = hashlib.sha256()
        for name, text in docs:
            digest.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
        manifest = dict(source=sysconfig.get_paths()["stdlib"], python=sys.version, vocab_size=vocab_size,
                        max_bytes=max_bytes, documents=n_docs, tokens=n_tokens,
                        bytes=sum(len(t.encode("utf-8")) for t in texts), sha256=digest.hexdigest(),
                        build_seconds=round(time.time() - t0, 2), files=[name for name, _ in docs])
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        honour_umask(tmp)  # mkdtemp makes it 0o700; data.cache_dir may be shared
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not os.path.isfile(os.path.join(final, "manifest.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prefix, model
