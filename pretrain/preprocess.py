"""Turn text into Megatron indexed datasets (PREFIX.bin + PREFIX.idx).

    python -m pretrain.preprocess --input a.jsonl b.txt --output-prefix data/mix \\
        --tokenizer path/to/tokenizer.json --workers 4
    python -m pretrain.preprocess --input corpus.jsonl --output-prefix data/corpus \\
        --train-tokenizer --vocab-size 32000        # also writes data/corpus.model

Inputs: `.jsonl`/`.json` files hold one JSON object per line, the text under `--json-key`
(blank lines are skipped); any other file (`.txt`, ...) is one document per file. Every
document is tokenized without special tokens and followed by the tokenizer's end-of-document
token, one Megatron "sequence" per document, written with megatron-core's
`IndexedDatasetBuilder` (uint16 tokens when the vocabulary fits, else int32, as Megatron-LM's
own preprocessing). Documents are tokenized on `--workers` processes in input order, so the
files are byte-identical for any worker count. The outputs are written under temporary names
and renamed at the end: an interrupted run never leaves a partial file under PREFIX.*.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import warnings
from typing import Iterable, Iterator

import numpy as np

from pretrain.tokenizer import load_tokenizer, train_sentencepiece

__all__ = ["iter_documents", "write_indexed_dataset", "preprocess", "main"]

JSONL_SUFFIXES = (".jsonl", ".json")


def iter_documents(path: str, json_key: str = "text") -> Iterator[str]:
    """The documents of one input file: one per JSON line (.jsonl/.json), else the whole file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path}")
    if not path.endswith(JSONL_SUFFIXES):
        with open(path, encoding="utf-8") as f:
            yield f.read()
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg}); "
                                 "every line must be one JSON object") from None
            if not isinstance(obj, dict) or json_key not in obj:
                raise ValueError(f"{path}:{lineno}: no {json_key!r} key in this JSON line; "
                                 f"set --json-key to the field that holds the text")
            if not isinstance(obj[json_key], str):
                raise ValueError(f"{path}:{lineno}: {json_key!r} is a {type(obj[json_key]).__name__}, not a string")
            yield obj[json_key]


def _megatron_indexed():
    """megatron.core.datasets.indexed_dataset, imported without its optional-backend warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def write_indexed_dataset(token_docs: Iterable[Iterable[int]], prefix: str, vocab_size: int) -> tuple[int, int]:
    """Write documents of token ids (EOD included) to PREFIX.bin/.idx atomically; returns (docs, tokens).

    The files are built as PREFIX.bin.tmp-PID/.idx.tmp-PID, then the old PREFIX.idx is removed and
    the new .bin and .idx are renamed into place (so a crash in between leaves a missing .idx, which
    loading reports, never a .bin/.idx pair that disagree).
    """
    indexed = _megatron_indexed()
    dtype = indexed.DType.optimal_dtype(vocab_size)
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp_bin, tmp_idx = f"{bin_path}.tmp-{os.getpid()}", f"{idx_path}.tmp-{os.getpid()}"
    n_docs = n_tokens = 0
    try:
        builder = indexed.IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        for ids in token_docs:
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"token id out of range [0, {vocab_size}) in document {n_docs}")
            builder.add_document(ids, [ids.size])
            n_docs += 1
            n_tokens += ids.size
        if n_docs == 0:
            raise ValueError(f"no documents to write to {prefix}")
        builder.finalize(tmp_idx)
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
    return n_docs, n_tokens


# Worker state: each pool process loads the tokenizer once.
_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_path)


def _encode(text: str) -> np.ndarray:
    return np.asarray(_TOKENIZER.encode(text) + [_TOKENIZER.eod_id], dtype=np.int64)


def _tokenize(texts: Iterable[str], tokenizer_path: str, workers: int) -> Iterator[np.ndarray]:
    """Token ids + EOD of each text, in order, on `workers` processes."""
    if workers <= 1:
        _init_worker(tokenizer_path)
        yield from map(_encode, texts)
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads that a fork would copy broken.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path,)) as pool:
        yield from pool.imap(_encode, texts, chunksize=16)


def preprocess(inputs: list[str], output_prefix: str, tokenizer: str, *, json_key: str = "text",
               workers: int = 1, overwrite: bool = False, progress: bool = True) -> tuple[int, int]:
    """Tokenize `inputs` with `tokenizer` into OUTPUT_PREFIX.bin/.idx; returns (documents, tokens).

    Empty documents are skipped. Refuses to replace an existing dataset unless `overwrite`.
    """
    if not overwrite:
        for p in (output_prefix + ".bin", output_prefix + ".idx"):
            if os.path.exists(p):
                raise FileExistsError(f"{p} exists; pass --overwrite to replace it or choose another --output-prefix")
    for p in inputs:  # fail before any work
        if not os.path.isfile(p):
            raise FileNotFoundError(f"input file not found: {p}")
    tok = load_tokenizer(tokenizer)
    texts = (t for p in inputs for t in iter_documents(p, json_key) if t)
    docs = _tokenize(texts, tokenizer, workers)
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:  # the bar is optional
            pass
        else:
            docs = tqdm(docs, desc=f"tokenize -> {output_prefix}", unit="doc", file=sys.stderr)
    return write_indexed_dataset(docs, output_prefix, tok.vocab_size)


def _sample_text(inputs: list[str], json_key: str, max_bytes: int) -> list[str]:
    """The first `max_bytes` of text of the inputs, for tokenizer training."""
    out, n = [], 0
    for p in inputs:
        for t in iter_documents(p, json_key):
            out.append(t)
            n += len(t.encode("utf-8"))
            if n >= max_bytes:
                return out
    return out


def _train_tokenizer(args) -> str:
    """Train PREFIX.model (+ .vocab) on the inputs, under a temporary name renamed at the end."""
    model = args.output_prefix + ".model"
    if os.path.exists(model) and not args.overwrite:
        raise FileExistsError(f"{model} exists; pass --overwrite to replace it or use --tokenizer {model}")
    tmp = f"{args.output_prefix}.tmp-{os.getpid()}"
    try:
        train_sentencepiece(_sample_text(args.input, args.json_key, args.tokenizer_train_bytes), tmp, args.vocab_size)
        os.replace(tmp + ".vocab", args.output_prefix + ".vocab")
        os.replace(tmp + ".model", model)
    finally:
        for p in (tmp + ".model", tmp + ".vocab"):
            if os.path.exists(p):
                os.remove(p)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.preprocess", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", nargs="+", required=True,
                    help=".jsonl/.json (one object per line) or text files (one document each)")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", help="sentencepiece .model, tokenizer.json, or a directory holding tokenizer.json")
    src.add_argument("--train-tokenizer", action="store_true",
                     help="train a sentencepiece BPE on the inputs first (PREFIX.model)")
    ap.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer")
    ap.add_argument("--tokenizer-train-bytes", type=int, default=100_000_000, help="train on the first N bytes of text")
    ap.add_argument("--json-key", default="text")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx (and PREFIX.model)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        if not args.overwrite:
            for p in (args.output_prefix + ".bin", args.output_prefix + ".idx"):
                if os.path.exists(p):
                    raise FileExistsError(f"{p} exists; pass --overwrite to replace it "
                                          "or choose another --output-prefix")
        tokenizer = args.tokenizer
        if args.train_tokenizer:
            if not args.vocab_size:
                ap.error("--train-tokenizer needs --vocab-size N")
            tokenizer = _train_tokenizer(args)
            print(f"tokenizer: {tokenizer}", file=sys.stderr)
        docs, tokens = preprocess(args.input, args.output_prefix, tokenizer, json_key=args.json_key,
                                  workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.bin/.idx: {docs} documents, {tokens} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
