"""Tokenizers: SentencePiece `.model` files and Hugging Face `tokenizer.json` files.

DeepSeek's released tokenizers are byte-level BPE in the Hugging Face format (a directory with
`tokenizer.json` and `tokenizer_config.json`); the embedded default corpus uses a small
SentencePiece BPE trained here. Both sit behind one interface:

    tok = load_tokenizer(path)
    ids = tok.encode(text)          # plain ids, no BOS/EOS added
    text = tok.decode(ids)
    tok.vocab_size, tok.eod_id, tok.bos_id

`eod_id` is the end-of-document token that preprocessing appends to every document (for
SentencePiece its EOS piece, for Hugging Face tokenizers the `eos_token`).
"""
from __future__ import annotations

import abc
import json
import os
from typing import Iterable

__all__ = ["Tokenizer", "SentencePieceTokenizer", "HFTokenizer", "load_tokenizer", "train_sentencepiece"]


class Tokenizer(abc.ABC):
    """What the data pipeline needs from a tokenizer (sentencepiece and HF implement it)."""

    vocab_size: int
    eod_id: int
    bos_id: int | None = None
    path: str = ""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model`; the end-of-document token is its EOS piece."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {path} has no EOS piece (eos_id=-1), which the data "
                             "pipeline uses as the end-of-document token; retrain it with eos_id >= 0")
        self.eod_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        # ids past the tokenizer's are a padded model vocabulary's (vocab_size rounded up): no text
        return self.sp.decode([int(i) for i in ids if int(i) < self.vocab_size])


# Names of end/begin-of-document tokens in common tokenizer.json files, DeepSeek's first.
_EOD_NAMES = ("<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>")


def _config_token(config: dict, key: str) -> str | None:
    """`eos_token`/`bos_token` of a tokenizer_config.json: a string or {"content": ...}."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (e.g. DeepSeek's byte-level BPE), read with `tokenizers`.

    The end-of-document token is `eos_token` from a `tokenizer_config.json` beside the file, or
    else the first of the usual EOS names (DeepSeek's `<｜end▁of▁sentence｜>`, `<|endoftext|>`,
    `</s>`, ...) that the vocabulary holds. `encode` adds no special tokens.
    """

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as e:  # pragma: no cover - tokenizers ships with transformers
            raise ImportError("reading a tokenizer.json needs the `tokenizers` package: pip install tokenizers") from e
        self.path = path
        try:
            self.tk = _HF.from_file(path)
        except Exception as e:
            raise ValueError(f"{path} is not a readable Hugging Face tokenizer.json: {e}") from e
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)

        config = {}
        config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        eod = self._find(_config_token(config, "eos_token"), _EOD_NAMES)
        if eod is None:
            raise ValueError(f"tokenizer {path} has no end-of-document token: no eos_token in "
                             f"{config_path} and none of {list(_EOD_NAMES)} in its vocabulary; "
                             "add an eos_token to tokenizer_config.json")
        self.eod_id = eod
        self.bos_id = self._find(_config_token(config, "bos_token"), _BOS_NAMES)

    def _find(self, configured: str | None, names: tuple[str, ...]) -> int | None:
        for name in ([configured] if configured else []) + list(names):
            idx = self.tk.token_to_id(name)
            if idx is not None:
                return idx
        return None

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        # ids past the tokenizer's are a padded model vocabulary's (vocab_size rounded up): no text
        return self.tk.decode([int(i) for i in ids if int(i) < self.vocab_size], skip_special_tokens=False)


def load_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece `.model`, a Hugging Face `tokenizer.json`, or a directory holding one."""
    path = os.fspath(path)
    if not path:
        raise ValueError("no tokenizer given: set data.tokenizer (a sentencepiece .model, a tokenizer.json "
                         "or a directory holding tokenizer.json)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if os.path.isdir(path):
        for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if os.path.isfile(os.path.join(path, name)):
                return cls(os.path.join(path, name))
        raise ValueError(f"directory {path} holds neither tokenizer.json nor tokenizer.model")
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json"):
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer file type: {path}; expected a sentencepiece .model, a Hugging Face "
                     "tokenizer.json, or a directory holding tokenizer.json")


def train_sentencepiece(text_iter_or_files, model_prefix: str, vocab_size: int, *,
                        max_sentences: int = 100_000, model_type: str = "bpe", **options) -> str:
    """Train a byte-fallback SentencePiece model on text; returns the path of `model_prefix.model`.

    `text_iter_or_files` is a list of file paths or an iterable of documents (strings). Documents
    are split into non-empty lines (SentencePiece's sentences), and an evenly strided sample of at
    most `max_sentences` lines is used, so training takes seconds and is deterministic. The model
    keeps text exactly (identity normalization, whitespace kept, no dummy prefix; newlines and any
    unseen character encode through the 256 byte pieces), so `decode(encode(text)) == text`.
    Ids: unk 0, bos 1, eos 2 (the end-of-document token), no pad. `options` go to the trainer.
    """
    import sentencepiece as spm

    items = list(text_iter_or_files)
    if items and all(isinstance(x, (str, os.PathLike)) and os.path.isfile(x) for x in items):
        items = [open(x, encoding="utf-8").read() for x in items]
    lines = [line for doc in items for line in doc.split("\n") if line.strip()]
    if not lines:
        raise ValueError("no text to train the tokenizer on")
    lines = lines[::max(1, len(lines) // max_sentences)][:max_sentences]
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    kwargs = dict(
        model_type=model_type, vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 14,
        input_sentence_size=0, num_threads=1,  # one thread: the same model on every machine
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    kwargs.update(options)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=model_prefix, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"sentencepiece training failed (vocab_size={vocab_size}): {e}") from e
    return model_prefix + ".model"
