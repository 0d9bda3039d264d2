"""Data side of pretraining: tokenizers, preprocessing to Megatron .bin/.idx, loading and blends
through megatron-core, dp-invariant global batches, the batch ramp, bad input, embedded corpus."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from pretrain import corpus, preprocess
from pretrain.data import (DataConfig, PretrainData, check_batch_sizes, check_indexed_dataset,
                           global_batch_size_at, samples_for_steps)
from pretrain.tokenizer import load_tokenizer, train_sentencepiece
from distributed import run_ranks

DOCS = [
    "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.\n\nTwo blank-line separated paragraphs.",
    "Unicode: héllo wörld, ☃, 日本語, emoji 🐳 — and tabs\tand  double  spaces.",
    "class Whale:\n    size = 42\n\n    def swim(self):\n        return 'splash' * self.size\n",
] * 5 + [f"document number {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(30)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A small sentencepiece tokenizer and two synthetic token datasets shared by the tests."""
    root = tmp_path_factory.mktemp("data")
    model = train_sentencepiece(DOCS * 3, str(root / "tok"), 400)
    tok = load_tokenizer(model)
    rng = np.random.default_rng(0)
    prefixes = []
    for name, (lo, hi) in (("a", (10, 100)), ("b", (200, 390))):  # disjoint id ranges tell the sources apart
        docs = [list(rng.integers(lo, hi, rng.integers(5, 120))) + [tok.eod_id] for _ in range(200)]
        preprocess.write_indexed_dataset(docs, str(root / name), tok.vocab_size)
        prefixes.append(str(root / name))
    return dict(root=root, model=model, tok=tok, a=prefixes[0], b=prefixes[1])


def _cfg(work, **kw):
    kw = dict(dict(paths=[work["a"]], tokenizer=work["model"], cache_dir=str(work["root"] / "cache"), seq_len=32), **kw)
    return DataConfig(**kw)


# -- tokenizers ---------------------------------------------------------------------------------


def test_sentencepiece_train_load_roundtrip(work):
    tok = work["tok"]
    assert tok.vocab_size == 400 and tok.eod_id == 2 and tok.bos_id == 1
    for text in DOCS[:4] + ["never seen: Ωμέγα ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\n\t  x"]:  # byte fallback: unseen text
        ids = tok.encode(text)
        assert tok.eod_id not in ids and tok.decode(ids) == text
    # a model vocabulary padded past the tokenizer's may sample the padding ids: they decode to nothing
    ids = tok.encode(DOCS[0])
    assert tok.decode(ids[:3] + [tok.vocab_size, tok.vocab_size + 7] + ids[3:]) == DOCS[0]


def test_hf_tokenizer_json_roundtrip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek's special tokens
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=400, special_tokens=[bos, eos],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    for path in (tmp_path / "hf", tmp_path / "hf" / "tokenizer.json"):
        tok = load_tokenizer(str(path))
        assert tok.eod_id == hf.token_to_id(eos) and tok.bos_id == hf.token_to_id(bos)
        assert tok.vocab_size == hf.get_vocab_size()
        for text in DOCS[:4]:
            assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(DOCS[0]) + [tok.vocab_size + 3]) == DOCS[0]   # a padded vocabulary's id
    # tokenizer_config.json's eos_token wins over the built-in names
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": bos}}))
    assert load_tokenizer(str(tmp_path / "hf")).eod_id == hf.token_to_id(bos)


def test_load_tokenizer_errors(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="unknown tokenizer file type"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="neither tokenizer.json"):
        load_tokenizer(str(tmp_path))


# -- preprocessing ------------------------------------------------------------------------------


def test_preprocess_roundtrip_workers_identical(work, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)) + "\n")
    txt = tmp_path / "extra.txt"
    txt.write_text("a plain text file is one document\n\nwith blank lines kept\n")
    args = ["--input", str(src), str(txt), "--tokenizer", work["model"], "--no-progress"]
    assert preprocess.main(args + ["--output-prefix", str(tmp_path / "w1"), "--workers", "1"]) == 0
    assert preprocess.main(args + ["--output-prefix", str(tmp_path / "w2"), "--workers", "2"]) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes()
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]

    ds, tok = IndexedDataset(str(tmp_path / "w1")), work["tok"]
    expected = DOCS + [txt.read_text()]
    assert len(ds) == len(expected)
    for i, text in enumerate(expected):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod_id and tok.decode(ids[:-1]) == text
    # an existing dataset is never replaced silently
    assert preprocess.main(args + ["--output-prefix", str(tmp_path / "w1")]) == 1


def test_preprocess_train_tokenizer_and_bad_json(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    out = str(tmp_path / "t")
    assert preprocess.main(["--input", str(src), "--output-prefix", out, "--train-tokenizer", "--vocab-size", "400",
                            "--json-key", "body", "--no-progress"]) == 0
    assert load_tokenizer(out + ".model").vocab_size == 400 and check_indexed_dataset(out).n_documents == len(DOCS)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        preprocess.preprocess([str(bad)], str(tmp_path / "x"), out + ".model", progress=False)
    with pytest.raises(ValueError, match=r"in.jsonl:1: no 'text' key"):
        preprocess.preprocess([str(src)], str(tmp_path / "y"), out + ".model", progress=False)
    assert not any(p.startswith(("x.", "y.")) for p in os.listdir(tmp_path))  # nothing half-written


# -- loading ------------------------------------------------------------------------------------


def test_blend_follows_weights(work):
    d = PretrainData(_cfg(work, paths=[work["a"], work["b"]], weights=[0.75, 0.25]),
                     seed=3, train_samples=2000, valid_samples=16)
    source = np.asarray(d.train.dataset_index[:2000])
    assert abs((source == 0).mean() - 0.75) < 0.01
    tokens, _ = d.global_batch(0, 400)  # the token ranges agree with the dataset index
    from_a = ((tokens < 100) | (tokens == work["tok"].eod_id)).all(dim=1)
    assert from_a.tolist() == (source[:400] == 0).tolist()


def test_dp_invariance_resume_and_labels(work):
    kw = dict(seed=1, train_samples=20 * 8, valid_samples=16)
    cfg = _cfg(work, paths=[work["a"], work["b"]], weights=[0.5, 0.5])
    one = PretrainData(cfg, **kw)
    ramp, consumed, batches = [4, 4, 24], 0, []
    for _ in range(10):
        gbs = global_batch_size_at(consumed, 8, ramp)
        batches.append((consumed, gbs, one.global_batch(consumed, gbs)))
        consumed += gbs
    assert [b[1] for b in batches] == [4, 4, 4, 4, 4, 4, 8, 8, 8, 8]
    for tokens, labels in (b[2] for b in batches):
        assert tokens.dtype == labels.dtype == torch.int64 and tokens.shape[1] == 32
        assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next tokens
    for dp in (2, 4):
        ranks = [PretrainData(cfg, dp_rank=r, dp_size=dp, **kw) for r in range(dp)]
        for consumed, gbs, (tokens, labels) in batches:
            parts = [r.global_batch(consumed, gbs) for r in ranks]
            assert torch.equal(torch.cat([p[0] for p in parts]), tokens)
            assert torch.equal(torch.cat([p[1] for p in parts]), labels)
    resumed = PretrainData(cfg, **kw)  # resume = rebuild and continue from the consumed count
    for consumed, gbs, (tokens, labels) in batches[5:]:
        assert torch.equal(resumed.global_batch(consumed, gbs)[0], tokens)
    v1, v2 = list(one.valid_batches(2, 8)), list(resumed.valid_batches(2, 8))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(v1, v2)) and len(v1) == 2
    with pytest.raises(IndexError, match="train_samples=160"):
        one.global_batch(156, 8)


def test_batch_ramp_matches_megatron():
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    for gbs, ramp in ((64, [16, 16, 1000]), (96, [32, 8, 777]), (40, [8, 8, 10])):
        calc = RampupBatchsizeNumMicroBatchesCalculator(gbs, 8, 1, False, 0, *ramp)
        for consumed in list(range(0, 1200, 7)) + [ramp[2], ramp[2] + 1]:
            calc.update(consumed, consistency_check=False)
            assert global_batch_size_at(consumed, gbs, ramp) == calc.get_current_global_batch_size()
    assert global_batch_size_at(10**9, 64, []) == 64
    assert global_batch_size_at(0, 48, [48, 8, 100]) == 48  # start == full size (megatron divides by 0)
    assert global_batch_size_at(0, 48, [8, 8, 0]) == 48
    assert samples_for_steps(4, 8, [4, 4, 8]) == 4 + 4 + 8 + 8  # full size once 8 samples are consumed
    check_batch_sizes(64, 2, 4, [16, 8, 1000])  # 16, 24, ..., 64 all multiples of 8
    with pytest.raises(ValueError, match=r"train.batch_ramp=\[16, 4, 1000\] sizes \[20, 28.*train.micro_batch_size"):
        check_batch_sizes(64, 2, 4, [16, 4, 1000])
    with pytest.raises(ValueError, match=r"train.global_batch_size=60 not divisible by train.micro_batch_size \* dp"):
        check_batch_sizes(60, 2, 4, [])
    with pytest.raises(ValueError, match="train.batch_ramp"):
        check_batch_sizes(64, 2, 4, [16, 5, 1000])


# -- bad input ----------------------------------------------------------------------------------


def test_bad_data_files(work, tmp_path):
    for ext in (".bin", ".idx"):
        shutil.copy(work["a"] + ext, tmp_path / f"d{ext}")
    prefix, idx = str(tmp_path / "d"), tmp_path / "d.idx"
    good = idx.read_bytes()
    idx.write_bytes(b"XXIDIDX\x00\x00" + good[9:])
    with pytest.raises(ValueError, match="corrupted index .*bad header magic.*pretrain.preprocess"):
        check_indexed_dataset(prefix)
    idx.write_bytes(good[:-100])
    with pytest.raises(ValueError, match="corrupted index .*truncated"):
        check_indexed_dataset(prefix)
    idx.write_bytes(good)
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="d.bin has .* bytes but its index .* describes"):
        check_indexed_dataset(prefix)
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"data file missing: .*d\.bin.*python -m pretrain.preprocess"):
        PretrainData(_cfg(work, paths=[prefix]), seed=0, train_samples=8, valid_samples=0)


def test_bad_config(work):
    def build(**kw):
        return PretrainData(_cfg(work, **kw), seed=0, train_samples=8, valid_samples=0)

    with pytest.raises(ValueError, match="data.weights has 1 entries but data.paths has 2"):
        build(paths=[work["a"], work["b"]], weights=[1.0])
    with pytest.raises(ValueError, match="data.split='98;2' is malformed"):
        build(split="98;2")
    with pytest.raises(ValueError, match=r"train part of .* less than one sample of data.seq_len=100000"):
        build(seq_len=100_000)
    with pytest.raises(ValueError, match="data.tokenizer is empty"):
        PretrainData(DataConfig(paths=[work["a"]]), seed=0, train_samples=8, valid_samples=0)
    with pytest.raises(ValueError, match="no validation part"):
        build(split="100,0,0").valid_batches(1, 8)


# -- embedded corpus ----------------------------------------------------------------------------


def test_embedded_corpus_cached_and_decodes(tmp_path):
    import sysconfig

    prefix, model = corpus.ensure_embedded_corpus(str(tmp_path), vocab_size=512, max_bytes=300_000)
    t0 = time.perf_counter()
    assert corpus.ensure_embedded_corpus(str(tmp_path), vocab_size=512, max_bytes=300_000) == (prefix, model)
    assert time.perf_counter() - t0 < 0.5  # a cache hit: two stat calls
    manifest = json.load(open(os.path.join(os.path.dirname(prefix), "manifest.json")))
    assert 0 < manifest["bytes"] <= 300_000 and manifest["documents"] == len(manifest["files"])
    assert [p for p in os.listdir(tmp_path / "corpus") if p.startswith(".tmp")] == []

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok, ds = load_tokenizer(model), IndexedDataset(prefix)
    source = open(os.path.join(sysconfig.get_paths()["stdlib"], manifest["files"][0]), encoding="utf-8").read()
    assert tok.decode(ds[0][:-1].tolist()) == source and ds[0][-1] == tok.eod_id

    cfg = DataConfig(cache_dir=str(tmp_path), vocab_size=512, corpus_bytes=300_000, split="80,20,0", seq_len=64)
    d = PretrainData(cfg, seed=0, train_samples=32, valid_samples=8)
    text = d.tokenizer.decode(d.global_batch(0, 4)[0][0].tolist())
    assert len(text) > 64 and d.vocab_size == 512


# -- torch.distributed (gloo): rank 0 builds the index caches, the other ranks read them -------


def _dist_worker(cfg, expected_path):
    rank = torch.distributed.get_rank()
    d = PretrainData(cfg, seed=5, train_samples=64, valid_samples=8, dp_rank=rank, dp_size=2)
    expected = torch.load(expected_path)
    for k, (consumed, tokens) in enumerate(expected):
        assert torch.equal(d.global_batch(consumed, 8)[0], tokens[rank * 4:(rank + 1) * 4]), (rank, k)


def test_distributed_gloo_build(work, tmp_path):
    cfg = DataConfig(paths=[work["a"], work["b"]], weights=[2.0, 1.0], tokenizer=work["model"],
                     cache_dir=str(tmp_path / "cache"), seq_len=32)
    ref = PretrainData(_copy(cfg, cache_dir=str(tmp_path / "ref")), seed=5, train_samples=64, valid_samples=8)
    torch.save([(c, ref.global_batch(c, 8)[0]) for c in (0, 8, 56)], tmp_path / "expected.pt")
    run_ranks(2, _dist_worker, cfg, str(tmp_path / "expected.pt"))
    assert any(p.endswith("BlendedDataset-train-dataset_index.npy")
               for _, _, files in os.walk(tmp_path / "cache") for p in files)


def _copy(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


# -- untrusted files: megatron-core's index caches, token ids beyond the vocabulary --------------


class _Plant:
    """Unpickling this creates the marker file: what a planted cache file could do in the trainer."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_index_cache_is_never_unpickled(work, tmp_path):
    import pickle

    cfg = _cfg(work, cache_dir=str(tmp_path / "cache"))
    ref = PretrainData(cfg, seed=0, train_samples=16, valid_samples=8).global_batch(0, 8)[0]
    files = sorted(str(p) for p in (tmp_path / "cache").rglob("*-GPTDataset-train-shuffle_index.npy"))
    assert len(files) == 1
    good, marker = open(files[0], "rb").read(), tmp_path / "pwned"
    plants = {"a pickle": pickle.dumps(_Plant(marker)),
              "an object array": None,
              "a truncated array": good[:-3],
              "a float array": None}
    for what, content in plants.items():
        if what == "an object array":
            np.save(files[0], np.array([_Plant(marker)] * 3, dtype=object), allow_pickle=True)
        elif what == "a float array":
            np.save(files[0], np.zeros(4, dtype=np.float32))
        else:
            open(files[0], "wb").write(content)
        with pytest.raises(ValueError, match=r"index cache file .*shuffle_index\.npy .*delete") as e:
            PretrainData(cfg, seed=0, train_samples=16, valid_samples=8)
        assert files[0] in str(e.value) and "\n" not in str(e.value), what
        assert not marker.exists(), f"{what} was unpickled"
    open(files[0], "wb").write(good)  # the real cache file still loads
    assert torch.equal(PretrainData(cfg, seed=0, train_samples=16, valid_samples=8).global_batch(0, 8)[0], ref)
    # the blended dataset's cache (read when torch.distributed is up) goes through the same loader
    from megatron.core.datasets import blended_dataset, gpt_dataset

    open(files[0], "wb").write(pickle.dumps(_Plant(marker)))
    for module in (gpt_dataset, blended_dataset):
        with pytest.raises(ValueError, match="index cache file"):
            module.numpy.load(files[0], allow_pickle=True, mmap_mode="r")
    assert not marker.exists()


def test_token_ids_beyond_the_vocabulary(work, tmp_path):
    import pretrain.data as data

    rng = np.random.default_rng(0)
    eod, vocab = work["tok"].eod_id, work["tok"].vocab_size  # 400
    docs = [list(rng.integers(10, 100, 50)) + [eod] for _ in range(40)]
    docs[7][3] = 417  # preprocessed with a larger tokenizer
    prefix = str(tmp_path / "big")
    preprocess.write_indexed_dataset(docs, prefix, 1000)
    with pytest.raises(ValueError, match=rf"big\.bin holds token ids 2\.\.417 .* {vocab} tokens .*document 7"):
        PretrainData(_cfg(work, paths=[prefix]), seed=0, train_samples=16, valid_samples=0)

    # files too large to scan when opened are checked batch by batch
    docs = [list(rng.integers(10, 100, 50)) + [450, eod] for _ in range(40)]
    preprocess.write_indexed_dataset(docs, prefix, 1000)
    old, data._SCAN_LIMIT_BYTES = data._SCAN_LIMIT_BYTES, 0
    try:
        d = PretrainData(_cfg(work, paths=[work["a"], prefix], weights=[0.5, 0.5]), seed=0, train_samples=64,
                         valid_samples=0)
        with pytest.raises(ValueError, match=rf"big\.bin holds token id 450 .* {vocab} tokens"):
            d.global_batch(0, 16)
    finally:
        data._SCAN_LIMIT_BYTES = old
