"""The passkey benchmark's documents and scorer (benchmarks/passkey.py); the training is not run here."""
import os
import random
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import passkey as pk  # noqa: E402


class DigitTokenizer:
    """A stand-in for the embedded sentencepiece tokenizer: one token per character (digits split, as there)."""

    vocab_size, eod_id = 200, 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i)


@pytest.fixture
def maker():
    filler = np.array([ord(c) for c in "abcdefghij" * 500])
    return pk.PasskeyMaker(DigitTokenizer(), filler)


@pytest.mark.parametrize("length", [128, 256, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_document_length_and_depth(maker, length, depth):
    tok = maker.tok
    doc = maker.make(length, depth, random.Random(3))
    assert len(doc.ids) == length and doc.ids[-1] == tok.eod_id
    text = tok.decode(doc.ids)
    needle = pk.NEEDLE.format(key=doc.key)
    assert text.count(needle) == 1 and len(doc.key) == pk.KEY_DIGITS and doc.key.isdigit()
    assert tok.decode(doc.ids[doc.needle_start:]).startswith(needle)
    n_filler = length - maker.overhead()
    assert doc.needle_start == round(depth * n_filler)           # the needle sits after depth x the filler
    prompt = tok.decode(doc.ids[:doc.prompt_len])
    assert prompt.endswith(pk.QUESTION) and doc.key not in prompt.replace(needle, "")
    assert doc.ids[doc.prompt_len:-1] == doc.answer and tok.decode(doc.answer) == " " + doc.key


def test_cells_are_reproducible_and_distinct(maker):
    a = pk.cell_docs(maker, 256, 0.5, 4, seed=0)
    b = pk.cell_docs(maker, 256, 0.5, 4, seed=0)
    c = pk.cell_docs(maker, 256, 0.75, 4, seed=0)
    assert [d.ids for d in a] == [d.ids for d in b]
    assert [d.ids for d in a] != [d.ids for d in c]


def test_too_short_and_bad_depth(maker):
    with pytest.raises(ValueError, match="shorter"):
        maker.make(maker.overhead() - 1, 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        maker.make(256, 1.5, random.Random(0))


def test_scorer():
    assert pk.score(" 71432", "71432")
    assert pk.score("71432. remember", "71432")
    assert not pk.score(" 71433", "71432")
    assert not pk.score(" 7143", "71432")          # too few digits
    assert not pk.score(" 714320", "71432")        # too many
    assert not pk.score(" the pass key", "71432")
    assert pk.key_from_text("  0123x") == "0123"


def test_embedded_tokenizer_splits_digits(corpus, tmp_path):
    """The embedded corpus's tokenizer (the session's small build) splits digits, as the documents assume."""
    from pretrain.corpus import embedded_tokenizer_path
    from pretrain.tokenizer import load_tokenizer

    path = embedded_tokenizer_path(str(corpus), vocab_size=512, max_bytes=400_000)   # conftest.corpus's build
    tok = load_tokenizer(path)
    maker = pk.PasskeyMaker(tok, np.arange(10, tok.vocab_size))
    doc = maker.make(256, 0.5, random.Random(0))
    assert len(doc.ids) == 256 and len(doc.answer) == pk.KEY_DIGITS + 1
    assert tok.decode(doc.answer).strip() == doc.key
    prefix = str(tmp_path / "pk")
    assert pk.write_passkey_dataset(maker, prefix, 5, 256, seed=0) == 5 * 256
    from pretrain.data import check_indexed_dataset
    info = check_indexed_dataset(prefix)
    assert info.n_documents == 5 and list(info.sequence_lengths) == [256] * 5


def test_phases_chain_and_the_control_differs_only_in_yarn():
    """Each pretraining stage starts from the previous stage's weights, the extension from the last; the
    extension keeps pretraining's tokens per step; yarn and control differ in YaRN's model keys alone."""
    plan = pk.Plan()
    cfgs = {ph: pk.phase_config(plan, "/R", "/C", "/T", phase=ph) for ph in plan.phases}
    names = [st[0] for st in plan.stages]
    assert "init" not in cfgs[names[0]]
    for before, ph in zip(names, names[1:] + ["yarn"]):
        assert cfgs[ph]["init"]["checkpoint"] == f"/R/{before}/checkpoints"
    assert cfgs["control"]["init"] == cfgs["yarn"]["init"]
    last = cfgs[names[-1]]
    assert last["data"]["seq_len"] == plan.pre_len
    ext = cfgs["yarn"]
    assert ext["data"]["seq_len"] * ext["train"]["global_batch_size"] == \
        last["data"]["seq_len"] * last["train"]["global_batch_size"]
    assert ext["parallel"] == {"cp": plan.cp} and ext["train"]["lr"] == last["train"]["lr"]   # V3 §4.3
    yarn_keys = {k for k in ext["model"] if ext["model"][k] != cfgs["control"]["model"].get(k)}
    assert yarn_keys == {"rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}
    assert ext["model"]["original_seq_len"] == plan.pre_len and ext["model"]["rope_factor"] == plan.rope_factor
    strip = lambda c: {k: v for k, v in c.items() if k not in ("model", "logging")}  # noqa: E731
    assert strip(ext) == strip(cfgs["control"])
    for arm in ("yarn", "control"):   # the short pair: the same extension on a smaller step budget
        short, full = cfgs[f"{arm}_short"], cfgs[arm]
        assert short["train"]["steps"] == plan.short_ext_steps < full["train"]["steps"]
        assert {k: v for k, v in short["train"].items() if k != "steps"} == \
            {k: v for k, v in full["train"].items() if k != "steps"}
        assert short["model"] == full["model"] and short["data"] == full["data"] and short["init"] == full["init"]
    with pytest.raises(ValueError, match="unknown phase"):
        pk.phase_config(plan, "/R", "/C", "/T", phase="pretrain_repeat")

