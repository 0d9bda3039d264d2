"""Pretraining data: Megatron indexed datasets through megatron-core's GPTDataset and blends.

    data = PretrainData(cfg, seed=0, train_samples=N, valid_samples=M, dp_rank=r, dp_size=dp)
    tokens, labels = data.global_batch(consumed_samples, global_batch_size)   # this rank's rows

A global batch is the train samples `consumed .. consumed + global_batch_size` of one fixed
sample order (megatron-core's shuffled GPTDataset, or its BlendedDataset over several), and dp
rank r takes rows `r*n .. (r+1)*n`, n = global_batch_size // dp_size. So the data of step k does
not depend on the parallel layout, and resuming is constructing again and continuing from the
consumed-sample count: there is no iterator state. The sample order depends on (files, split,
seq_len, seed, train_samples), so keep those when resuming.

megatron-core builds its shuffle/sample/blend indices once and caches them under
`cfg.cache_dir/megatron/<fingerprint of the data files>/`; under torch.distributed its builder
builds them on rank 0 while the other ranks wait at a barrier and then read them (every rank
must construct PretrainData). The cache directory must be shared by all nodes, as Megatron's
`--data-cache-path`.

The blend and sample indices use megatron-core's C++ `helpers_cpp` extension; its wheels ship
it prebuilt (there is no Makefile or pybind11 in an installed wheel to compile it again).

Nothing read from disk is trusted: megatron-core loads its index caches with
`numpy.load(..., allow_pickle=True)`, which unpickles (runs) any pickle found under that name on the
shared cache directory, so its dataset modules get a `numpy` whose `load` accepts plain integer .npy
arrays only and never unpickles, and every rank checks the cache files before building (so all ranks
refuse together rather than some waiting at megatron's barrier). Token ids are checked against the
tokenizer's vocabulary: the whole .bin when it is opened (files up to `_SCAN_LIMIT_BYTES`), and every
batch as it is built.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pretrain.tokenizer import Tokenizer, load_tokenizer

__all__ = ["DataConfig", "PretrainData", "global_batch_size_at", "ramp_batch_sizes", "check_batch_sizes",
           "samples_for_steps", "check_indexed_dataset", "check_split", "check_index_cache_file", "IndexedDatasetInfo",
           "DataError"]

IGNORE_INDEX = -100  # model.transformer.IGNORE_INDEX: label positions that carry no loss
_SCAN_LIMIT_BYTES = 1 << 30  # .bin files up to this size have all their token ids checked when opened


class DataError(ValueError):
    """Data that cannot be used as given: a data.* setting, a .bin/.idx pair, token ids the tokenizer does not
    have, a megatron-core index cache file. The message names the key or file and the fix."""


@dataclass
class DataConfig:
    """The `data:` section of a training config."""

    paths: list[str] = field(default_factory=list)  # Megatron prefixes (no .bin/.idx); empty + embedded: stdlib
    weights: list[float] = field(default_factory=list)  # one per path; empty: proportional to each dataset's tokens
    split: str = "98,2,0"  # train,valid,test parts of every dataset's documents
    seq_len: int = 128
    tokenizer: str = ""  # .model / tokenizer.json / directory; "" only with the embedded corpus
    embedded: bool = True  # use the embedded stdlib corpus (built on first use) when paths is empty
    cache_dir: str = ".cache/whaletron"  # embedded corpus + megatron index caches
    vocab_size: int = 4096  # embedded tokenizer vocabulary
    corpus_bytes: int = 8_000_000  # embedded corpus cap


# ---------------------------------------------------------------------------------------------
# Global batch size ramp (Megatron's --rampup-batch-size START INCREMENT SAMPLES).
# V2 §3.1.2: 2304 -> 9216 sequences over the first 225B tokens; V3 §4.2: 3072 -> 15360 over the
# first 469B tokens, i.e. at seq 4096 ramp = [3072, increment, 469e9 // 4096 = 114_501_953]
# (the papers do not give the increment).


def _check_ramp(global_batch_size: int, ramp: list[int]) -> None:
    if not ramp:
        return
    if len(ramp) != 3:
        raise ValueError(f"train.batch_ramp={ramp} must be [] or [start, increment, ramp_samples]")
    start, inc, samples = ramp
    if start <= 0 or inc <= 0 or samples < 0:
        raise ValueError(f"train.batch_ramp={ramp}: start and increment must be positive, ramp_samples >= 0")
    if start > global_batch_size or (global_batch_size - start) % inc:
        raise ValueError(f"train.batch_ramp={ramp}: train.global_batch_size={global_batch_size} must be "
                         f"start + a multiple of increment (start <= global_batch_size)")


def global_batch_size_at(consumed_samples: int, global_batch_size: int, ramp: list[int]) -> int:
    """The global batch size after `consumed_samples`, with Megatron's ramp rule.

    ramp = [start, increment, ramp_samples]: the batch starts at `start` and grows by
    `increment` every ramp_samples / ((global_batch_size - start) / increment) consumed samples,
    reaching `global_batch_size` after ramp_samples (megatron.core.num_microbatches_calculator.
    RampupBatchsizeNumMicroBatchesCalculator.update, reproduced exactly, float division included).
    """
    _check_ramp(global_batch_size, ramp)
    if not ramp:
        return global_batch_size
    start, inc, samples = ramp
    n_increments = (global_batch_size - start) // inc
    if n_increments == 0 or samples == 0 or consumed_samples > samples:  # (megatron divides by 0 there)
        return global_batch_size
    return start + int(consumed_samples / (samples / n_increments)) * inc


def ramp_batch_sizes(global_batch_size: int, ramp: list[int]) -> list[int]:
    """Every global batch size the ramp produces, in order."""
    _check_ramp(global_batch_size, ramp)
    return list(range(ramp[0], global_batch_size + 1, ramp[1])) if ramp else [global_batch_size]


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, dp: int, ramp: list[int]) -> None:
    """Every batch size of the ramp must split into whole micro batches on every dp rank."""
    unit = micro_batch_size * dp
    if micro_batch_size <= 0 or dp <= 0 or global_batch_size <= 0:
        raise ValueError(f"train.global_batch_size={global_batch_size}, train.micro_batch_size={micro_batch_size} "
                         f"and dp={dp} must be positive")
    bad = [b for b in ramp_batch_sizes(global_batch_size, ramp) if b % unit]
    if bad:
        where = (f"the train.batch_ramp={ramp} sizes {bad[:8]}" if ramp
                 else f"train.global_batch_size={global_batch_size}")
        raise ValueError(f"{where} not divisible by train.micro_batch_size * dp = {micro_batch_size} * {dp} = {unit}; "
                         f"choose train.global_batch_size, train.micro_batch_size and train.batch_ramp "
                         f"(start and increment) as multiples of {unit}")


def samples_for_steps(steps: int, global_batch_size: int, ramp: list[int]) -> int:
    """Samples consumed by `steps` optimizer steps under the ramp (PretrainData's train_samples)."""
    consumed = 0
    for _ in range(steps):
        consumed += global_batch_size_at(consumed, global_batch_size, ramp)
    return consumed


# ---------------------------------------------------------------------------------------------
# Checking the .bin/.idx pair before megatron-core reads it (it would assert or read garbage).

_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}  # indexed_dataset.DType
_IDX_HEADER = 34  # magic 9 + version 8 + dtype 1 + sequence count 8 + document count 8


@dataclass
class IndexedDatasetInfo:
    prefix: str
    dtype: type
    sequence_lengths: np.ndarray  # int32, one per sequence (one per document here)
    n_documents: int

    @property
    def n_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def _fix_hint(prefix: str) -> str:
    return (f"recreate it with: python -m pretrain.preprocess --input FILE.jsonl --output-prefix {prefix} "
            "--tokenizer TOKENIZER --overwrite")


def check_indexed_dataset(prefix: str) -> IndexedDatasetInfo:
    """Validate PREFIX.idx (magic, version, dtype, counts, size) and PREFIX.bin (size) and describe them."""
    if prefix.endswith((".bin", ".idx")):
        raise DataError(f"data path {prefix!r} names a file: give the prefix without .bin/.idx ({prefix[:-4]!r})")
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"data file missing: {', '.join(missing)} (data.paths holds the prefix {prefix!r}, "
                                f"without .bin/.idx); create it with: python -m pretrain.preprocess "
                                f"--input FILE.jsonl --output-prefix {prefix} --tokenizer TOKENIZER")
    idx_size, bin_size = os.path.getsize(idx_path), os.path.getsize(bin_path)
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER)

    def bad(what: str) -> DataError:
        return DataError(f"corrupted index {idx_path}: {what}; {_fix_hint(prefix)}")

    if len(head) < 9 or head[:9] != _IDX_MAGIC:
        raise bad(f"bad header magic {head[:9]!r}, expected {_IDX_MAGIC!r} (not a Megatron .idx file)")
    if len(head) < _IDX_HEADER:
        raise bad(f"truncated header ({idx_size} bytes)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1:
        raise bad(f"unsupported version {version}")
    if code not in _IDX_DTYPES:
        raise bad(f"unknown token dtype code {code}")
    expected = _IDX_HEADER + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if idx_size not in (expected, expected + n_seq):  # (+ n_seq: the optional multimodal modes)
        raise bad(f"{idx_size} bytes but its counts ({n_seq} sequences, {n_doc} document bounds) need {expected} "
                  f"(truncated or overwritten)")
    if n_seq == 0 or n_doc < 2:
        raise bad(f"no documents ({n_seq} sequences, {n_doc} document bounds)")
    lengths = np.memmap(idx_path, dtype=np.int32, mode="r", shape=(n_seq,), offset=_IDX_HEADER)
    doc_bounds = np.memmap(idx_path, dtype=np.int64, mode="r", shape=(n_doc,), offset=_IDX_HEADER + 12 * n_seq)
    first, last = int(doc_bounds[0]), int(doc_bounds[-1])
    if first != 0 or last != n_seq or lengths.min() < 0:
        raise bad(f"inconsistent contents ({n_seq} sequences, document bounds {first}..{last})")
    dtype = _IDX_DTYPES[code]
    need = int(lengths.sum(dtype=np.int64)) * np.dtype(dtype).itemsize
    if bin_size != need:
        raise DataError(f"data file {bin_path} has {bin_size} bytes but its index {idx_path} describes {need} "
                        f"({lengths.sum(dtype=np.int64)} tokens of {np.dtype(dtype).name}): the pair does not match "
                        f"(truncated copy, or .bin and .idx from different runs); {_fix_hint(prefix)}")
    return IndexedDatasetInfo(prefix, dtype, lengths, n_doc - 1)


def check_token_ids(info: IndexedDatasetInfo, vocab_size: int, tokenizer: str = "the tokenizer") -> None:
    """Every token id of PREFIX.bin lies in [0, vocab_size); else a DataError naming the file, the ids
    it holds and the first document out of range. Reads the whole file: a min and a max per 64 Mi tokens
    (0.04 s for 512 MiB of uint16 in the page cache; the embedded corpus, 2.8 M tokens, under 4 ms)."""
    bin_path = info.prefix + ".bin"
    tokens = np.memmap(bin_path, dtype=info.dtype, mode="r", shape=(info.n_tokens,))
    step, lo, hi, first = 1 << 26, None, None, None
    for start in range(0, len(tokens), step):
        chunk = tokens[start:start + step]
        c_lo, c_hi = int(chunk.min()), int(chunk.max())
        lo, hi = (c_lo, c_hi) if lo is None else (min(lo, c_lo), max(hi, c_hi))
        if first is None and (c_lo < 0 or c_hi >= vocab_size):
            first = start + int(np.argmax((chunk < 0) | (chunk >= vocab_size)))
    if first is None:
        return
    doc = int(np.searchsorted(np.cumsum(info.sequence_lengths, dtype=np.int64), first, side="right"))
    raise DataError(f"{bin_path} holds token ids {lo}..{hi} but {tokenizer} has {vocab_size} tokens "
                    f"(ids 0..{vocab_size - 1}); the first id out of range is at token {first} (document {doc}): "
                    f"the data was preprocessed with another tokenizer (set data.tokenizer to that one) or the file "
                    f"is damaged; {_fix_hint(info.prefix)}")


# ---------------------------------------------------------------------------------------------
# megatron-core's index caches (.npy under data.cache_dir, a shared file system): read, never unpickled.


def check_index_cache_file(path: str) -> None:
    """PATH is a .npy file holding a plain integer array whose size matches its header; else a DataError.

    megatron-core writes its document/sample/shuffle and blend indices as such files and reads them back
    with numpy.load(allow_pickle=True): a pickle (or an object array) planted under one of their names
    would run code in the trainer. The header is parsed by numpy.lib.format (a literal, never executed)."""
    fmt = np.lib.format

    def refuse(why: str) -> DataError:
        return DataError(f"megatron-core index cache file {path} is not a plain integer .npy array ({why}): a "
                         f"damaged or planted file; delete it, or the directory {os.path.dirname(path)}, to rebuild "
                         f"the indices (or set data.cache_dir to a fresh directory that only you can write)")

    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise refuse(f".npy format version {version[0]}.{version[1]}")
            offset = f.tell()
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise refuse(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "iu":
        raise refuse(f"dtype {dtype.str}, not an integer type")
    need = offset + math.prod(shape) * dtype.itemsize
    if os.path.getsize(path) != need:
        raise refuse(f"{os.path.getsize(path)} bytes, its header describes {need}: truncated or overwritten")


def _check_index_cache_dir(cache: str) -> None:
    """Every .npy megatron-core could load from `cache` is a plain integer array (see check_index_cache_file)."""
    if not os.path.isdir(cache):
        return
    for entry in sorted(os.scandir(cache), key=lambda e: e.name):
        if entry.name.endswith(".npy"):
            check_index_cache_file(entry.path)


class _PickleFreeNumpy:
    """numpy as megatron-core's dataset modules see it, except that `load` checks the file is a plain
    integer .npy array (check_index_cache_file) and never unpickles, whatever allow_pickle it is given."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def load(file, mmap_mode=None, allow_pickle=False, **kwargs):  # allow_pickle is ignored: never unpickle
        check_index_cache_file(os.fspath(file))
        return np.load(file, mmap_mode=mmap_mode, allow_pickle=False)


# ---------------------------------------------------------------------------------------------
# Split strings, megatron-core style ("98,2,0": train, valid, test weights).

_SPLIT_RE = re.compile(r"^\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*$")
_SPLIT_NAMES = ("train", "valid", "test")


def check_split(split: str) -> None:
    """A split string is up to three non-negative numbers, train first and positive ("98,2,0")."""
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise DataError(f"data.split={split!r} is malformed: give up to three non-negative numbers "
                        f"'train,valid,test', e.g. '98,2,0'")
    if float(split.split(",")[0]) <= 0:
        raise DataError(f"data.split={split!r} gives the train part no documents; e.g. '98,2,0'")


# ---------------------------------------------------------------------------------------------
# megatron-core glue.


class _MegatronTokenizer:
    """The little of a megatron tokenizer GPTDataset uses: vocab_size, eod, and cache identity."""

    def __init__(self, tok: Tokenizer):
        self.vocab_size = tok.vocab_size
        self.eod = tok.eod_id
        # Part of megatron's index-cache key (it json-dumps `unique_identifiers`).
        self.unique_identifiers = {"class": "whaletron", "vocab_size": tok.vocab_size, "eod": tok.eod_id}


def _import_megatron() -> dict:
    """The megatron-core dataset classes, importing quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed" etc.
        try:
            import megatron.core.datasets.helpers_cpp  # noqa: F401  (prebuilt in megatron-core's wheels)
        except ImportError as e:
            raise ImportError(f"megatron-core's compiled dataset helpers (helpers_cpp) cannot be imported ({e}); "
                              "install a megatron-core 0.16 binary wheel: "
                              "pip install 'megatron-core>=0.16,<0.17'") from e
        from megatron.core.datasets import blended_dataset, gpt_dataset
        from megatron.core.datasets.blended_dataset import BlendedDataset
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    for module in (gpt_dataset, blended_dataset):  # their index caches: numpy.load(..., allow_pickle=True)
        if not isinstance(module.numpy, _PickleFreeNumpy):
            module.numpy = _PickleFreeNumpy()

    class Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            # BlendedDataset calls torch.distributed.get_rank() on a cache miss even when no process
            # group exists (blended_dataset.py, _build_indices); without one, build it uncached (cheap).
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                *rest, config = args
                log = logging.getLogger("megatron.core.datasets.blended_dataset")
                level = log.level
                log.setLevel(logging.ERROR)  # not its "Cannot save the BlendedDataset indexes" warning
                try:
                    return BlendedDataset(*rest, _copy(config, path_to_cache=None))
                finally:
                    log.setLevel(level)
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)

    return dict(Builder=Builder, GPTDataset=GPTDataset, GPTDatasetConfig=GPTDatasetConfig)


def _copy(obj, **changes):
    import copy

    obj = copy.copy(obj)
    for k, v in changes.items():
        setattr(obj, k, v)
    return obj


def _fingerprint(infos: list[IndexedDatasetInfo]) -> str:
    """Identity of the data files (sizes, and the .idx head and tail), for the index-cache path."""
    h = hashlib.sha1()
    for info in infos:
        idx = info.prefix + ".idx"
        size = os.path.getsize(idx)
        h.update(f"{os.path.abspath(info.prefix)}:{size}:{os.path.getsize(info.prefix + '.bin')}".encode())
        with open(idx, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock on `path` (so concurrent jobs never write the same index cache at once)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


# ---------------------------------------------------------------------------------------------


class PretrainData:
    """Train and validation samples of `cfg`, the same on every rank; see the module docstring.

    Construct it on every rank (it may build caches on rank 0 behind a barrier). `train_samples`
    is the total number of samples training will consume (see `samples_for_steps`), and
    `valid_samples` the number one evaluation reads.
    """

    def __init__(self, cfg: DataConfig, *, seed: int, train_samples: int, valid_samples: int,
                 dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if cfg.seq_len < 2:
            raise DataError(f"data.seq_len={cfg.seq_len} must be at least 2")
        if train_samples <= 0 or valid_samples < 0:
            raise ValueError(f"train_samples={train_samples} must be positive and valid_samples={valid_samples} >= 0")
        self.cfg, self.seed, self.dp_rank, self.dp_size = cfg, seed, dp_rank, dp_size
        self.train_samples, self.valid_samples = train_samples, valid_samples
        check_split(cfg.split)
        paths, tokenizer = self._resolve_sources(cfg)
        weights = [float(w) for w in cfg.weights]
        if weights and len(weights) != len(paths):
            raise DataError(f"data.weights has {len(weights)} entries but data.paths has {len(paths)}; "
                            f"give one weight per path, or none (proportional to size)")
        if any(not (w > 0 and math.isfinite(w)) for w in weights):
            raise DataError(f"data.weights={cfg.weights} must all be positive")

        try:
            self.tokenizer = load_tokenizer(tokenizer)
        except FileNotFoundError as e:  # name the key: a recipe's placeholder path lands here first
            raise FileNotFoundError(f"data.tokenizer = {tokenizer!r}: {e}; point data.tokenizer at the tokenizer "
                                    f"the data was preprocessed with") from None
        self.vocab_size = self.tokenizer.vocab_size
        infos = [check_indexed_dataset(p) for p in paths]
        if len(paths) > 1 and not weights:  # proportional to each dataset's tokens
            weights = [float(info.n_tokens) for info in infos]
        self.paths, self.weights = paths, (weights if len(paths) > 1 else None)

        mc = _import_megatron()
        cache = os.path.join(os.path.abspath(cfg.cache_dir), "megatron", _fingerprint(infos))
        config = mc["GPTDatasetConfig"](
            random_seed=seed, sequence_length=cfg.seq_len, blend=(paths, self.weights), split=cfg.split,
            path_to_cache=cache, tokenizer=_MegatronTokenizer(self.tokenizer), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
        for info in infos:
            self._check_dataset(info, config.split_matrix)
            if os.path.getsize(info.prefix + ".bin") <= _SCAN_LIMIT_BYTES:  # larger ones: every batch (_rows)
                check_token_ids(info, self.vocab_size, f"the tokenizer {self.tokenizer.path}")
        builder = mc["Builder"](mc["GPTDataset"], [train_samples, valid_samples, 0], lambda: True, config)
        distributed = torch.distributed.is_initialized()
        try:
            with _file_lock(os.path.join(cache, ".lock")) if _rank() == 0 else contextlib.nullcontext():
                # Every rank checks the cache files megatron-core may load (the loader checks them again), while
                # rank 0 holds the lock that every writer of the cache takes: so no rank sees a file half-written,
                # and all ranks refuse a bad one together instead of the others waiting at megatron's barrier.
                if distributed:
                    torch.distributed.barrier()
                _check_index_cache_dir(cache)
                if distributed:
                    torch.distributed.barrier()
                self.train, self.valid, _ = builder.build()
        except DataError:
            raise
        except Exception as e:
            e.add_note(f"(while building or reading megatron-core's index cache {cache}: if a killed run left it "
                       f"damaged, delete that directory to rebuild it)")
            raise

    # -- setup ------------------------------------------------------------------------------

    @staticmethod
    def _resolve_sources(cfg: DataConfig) -> tuple[list[str], str]:
        """(dataset prefixes, tokenizer path); builds the embedded corpus on rank 0 when asked for."""
        if cfg.paths:
            if not cfg.tokenizer:
                raise DataError("data.paths is set but data.tokenizer is empty: give the tokenizer the data was "
                                "preprocessed with (a .model, a tokenizer.json, or its directory)")
            return list(cfg.paths), cfg.tokenizer
        if not cfg.embedded:
            raise DataError("no data: set data.paths (Megatron .bin/.idx prefixes from python -m pretrain.preprocess) "
                            "or data.embedded=true for the built-in corpus")
        if cfg.tokenizer:
            raise DataError("data.tokenizer is set but the embedded corpus brings its own tokenizer; "
                            "leave data.tokenizer empty, or set data.paths")
        from pretrain.corpus import ensure_embedded_corpus

        distributed = torch.distributed.is_initialized()
        if _rank() == 0:
            prefix, model = ensure_embedded_corpus(cfg.cache_dir, cfg.vocab_size, cfg.corpus_bytes)
        if distributed:
            torch.distributed.barrier()
        if _rank() != 0:  # a cache hit on a shared file system; builds its own copy on a node-local one
            prefix, model = ensure_embedded_corpus(cfg.cache_dir, cfg.vocab_size, cfg.corpus_bytes)
        return [prefix], model

    def _check_dataset(self, info: IndexedDatasetInfo, split_matrix) -> None:
        """Tokens fit the tokenizer, and every split part holds at least one full sample.

        Without this, megatron-core's GPTDataset loops forever on an empty part."""
        if not np.issubdtype(info.dtype, np.integer):
            raise DataError(f"{info.prefix} stores {np.dtype(info.dtype).name} values, not token ids")
        if np.dtype(info.dtype).itemsize < 4 and self.vocab_size > np.iinfo(info.dtype).max + 1:
            raise DataError(f"{info.prefix} stores {np.dtype(info.dtype).name} token ids but the tokenizer "
                            f"{self.tokenizer.path} has {self.vocab_size} tokens: it was preprocessed with another "
                            f"tokenizer; set data.tokenizer to that one")
        n = len(info.sequence_lengths)
        for name, part in zip(_SPLIT_NAMES, split_matrix):
            if part is None:
                continue
            lo, hi = int(round(part[0] * n)), int(round(part[1] * n))  # as megatron-core's builder
            tokens = int(info.sequence_lengths[lo:hi].sum(dtype=np.int64))
            if tokens < self.cfg.seq_len + 1:
                raise DataError(
                    f"data.split={self.cfg.split!r} leaves the {name} part of {info.prefix} {hi - lo} documents with "
                    f"{tokens} tokens, less than one sample of data.seq_len={self.cfg.seq_len} (+1) tokens; lower "
                    f"data.seq_len, give that part a larger share of data.split (0 drops it), or add data")

    # -- batches ----------------------------------------------------------------------------

    def _rows(self, dataset, start: int, global_batch_size: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if global_batch_size <= 0 or global_batch_size % self.dp_size:
            raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of dp={self.dp_size}")
        n = global_batch_size // self.dp_size
        if start < 0 or start + global_batch_size > len(dataset):
            raise IndexError(f"{what} samples {start}..{start + global_batch_size} requested but the {what} dataset "
                             f"has {len(dataset)}; PretrainData was built for fewer (train_samples="
                             f"{self.train_samples}, valid_samples={self.valid_samples})")
        first = start + self.dp_rank * n
        items = [dataset[i] for i in range(first, first + n)]
        tokens = torch.stack([it["tokens"] for it in items])
        labels = torch.stack([it["labels"] for it in items]).clone()
        ids = torch.cat([tokens, labels[:, -1:]], 1)  # every token of the samples (labels: tokens shifted by one)
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            self._bad_ids(items, first, what)
        labels[torch.stack([it["loss_mask"] for it in items]) == 0] = IGNORE_INDEX
        return tokens, labels

    def _bad_ids(self, items: list[dict], first: int, what: str) -> None:
        for i, it in enumerate(items):
            ids = torch.cat([it["tokens"], it["labels"][-1:]])
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            if len(bad):
                path = self.paths[int(it.get("dataset_id", 0))] + ".bin"
                raise DataError(f"{path} holds token id {int(bad[0])} ({what} sample {first + i}), outside the "
                                f"{self.vocab_size} tokens of the tokenizer {self.tokenizer.path}: the data was "
                                f"preprocessed with another tokenizer (set data.tokenizer to that one) or the file is "
                                f"damaged; {_fix_hint(self.paths[int(it.get('dataset_id', 0))])}")
        raise AssertionError("an id out of range, but in no sample")

    def global_batch(self, consumed_samples: int, global_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This dp rank's rows of the global batch after `consumed_samples`: (tokens, labels), int64 [n, seq_len]."""
        return self._rows(self.train, consumed_samples, global_batch_size, "train")

    def valid_batches(self, n_batches: int, global_batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first `n_batches` validation batches (this rank's rows), the same at every evaluation."""
        if self.valid is None:
            raise DataError(f"data.split={self.cfg.split!r} has no validation part; give it one, e.g. '98,2,0'")
        if n_batches * global_batch_size > len(self.valid):
            raise IndexError(f"{n_batches} validation batches of {global_batch_size} need "
                             f"{n_batches * global_batch_size} samples but PretrainData was built with "
                             f"valid_samples={self.valid_samples}")
        return (self._rows(self.valid, b * global_batch_size, global_batch_size, "valid") for b in range(n_batches))
