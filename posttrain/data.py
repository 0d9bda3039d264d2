"""Post-training data: jsonl records -> token ids and loss masks -> packed SFT rows; prompt batches.

Records, one JSON object per line (blank lines are skipped), in one of two shapes:

  conversation   {"messages": [{"role": "system" | "user" | "assistant", "content": str,
                                "reasoning": str (assistant only, optional)}, ...], ...}
  prompt/answer  {"prompt": str, "answer": str | int | float (optional), "response": str (optional), ...}

preference pair {"prompt": str | "messages": [... ending with the user's turn], "chosen": reply,
                "rejected": reply, ...}   (DPO; a reply is a string or an assistant message object)

A file must hold at least one record: an empty one (or one of blank lines only) is a DataError
`FILE: no records`, never an empty data set that a stage would loop on or silently skip.

"answer" is the reference a reward checks (the final answer, e.g. "77"; code tasks carry "tests"
instead). "response" is the whole assistant reply an SFT stage trains on, in the template's format
(e.g. "<think> 23*4=92, 92-15=77 </think> <answer> 77 </answer>" for r1_zero). SFT needs a target:
"response", or an assistant message in "messages"; RL needs only the prompt. Any other keys (task
fields such as "tests", "numbers", "target", "language") are kept and reach the rewards. Every line
is validated; a bad file raises DataError listing each bad line as `file:line: problem`.

    examples = load_sft_examples("sft.jsonl", tokenizer, get_template("chat"))
    rows = pack_examples(examples, seq_len=512, seed=0)          # PackedRows, [n_rows, seq_len] each
    it = PackedIterator(rows, batch_size=8, seed=0)              # epoch-aware, resumable
    batch = next(it)      # input_ids, labels, position_ids, doc_ids: [8, 512]; row_ids, epoch
    state = it.state_dict(); ...; it.load_state_dict(state)      # exact resume

Loss mask: only assistant tokens are trainable, plus the end-of-document id appended after every
assistant turn (so the model learns to stop). In packed rows `labels[t]` is the next token of the
same document when that token is trainable, else IGNORE_INDEX: prompt targets, each document's last
token (no target crosses into the next document) and padding. `doc_ids` numbers the documents of a
row 0, 1, ... (padding -1) for block-diagonal attention (Transformer.loss(..., doc_ids=...), built
by model.attention.attention_mask), and `position_ids` restart at 0 in every document (the model
does not need them: RoPE scores depend only on distances, see attention_mask; they are kept for
models with absolute positions).

Examples longer than seq_len are truncated to seq_len tokens (the prompt is kept, the reply's tail is
cut) and counted; an example with no trainable target left after that is dropped and counted.
`overflow="drop"` drops every over-long example instead.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch

from model.transformer import IGNORE_INDEX
from posttrain.templates import EOD, Template, as_messages, get_template
from pretrain.tokenizer import Tokenizer

__all__ = ["DataError", "Example", "PackingStats", "PackedRows", "PackedIterator", "IGNORE_INDEX",
           "validate_record", "read_jsonl", "tokenize_conversation", "encode_prompt", "load_sft_examples",
           "load_prompts", "load_located_prompts", "check_prompt_fit", "read_sft_records", "tokenize_sft_records",
           "pack_examples", "validate_pair", "load_preference_pairs", "pair_conversations"]

_MAX_LISTED_ERRORS = 10


class DataError(ValueError):
    """A malformed data file; the message names file:line and the problem of each bad line."""


# ---------------------------------------------------------------------------------------------
# Reading and validating
# ---------------------------------------------------------------------------------------------

def validate_record(obj: Any, where: str = "record") -> dict:
    """Check one record (either shape); raises DataError(f"{where}: problem")."""
    def bad(problem: str):
        raise DataError(f"{where}: {problem}")

    if not isinstance(obj, dict):
        bad(f"expected a JSON object, got {type(obj).__name__}")
    has_messages, has_prompt = "messages" in obj, "prompt" in obj
    if has_messages and has_prompt:
        bad('has both "messages" and "prompt"; a record is either a conversation or a prompt/answer pair')
    if not (has_messages or has_prompt):
        bad('missing key: a record needs "messages" (a conversation) or "prompt" (a prompt/answer pair); '
            f"found keys {sorted(obj)}")
    if has_prompt:
        if not isinstance(obj["prompt"], str):
            bad(f'"prompt" must be a string, got {type(obj["prompt"]).__name__}')
        if not obj["prompt"].strip():
            bad('"prompt" is empty')
        if "answer" in obj:
            a = obj["answer"]
            if isinstance(a, bool) or not isinstance(a, (str, int, float)):
                bad(f'"answer" must be a string or a number, got {type(a).__name__}')
            if isinstance(a, str) and not a.strip():
                bad('"answer" is empty')
        if "response" in obj:
            if not isinstance(obj["response"], str):
                bad(f'"response" must be a string, got {type(obj["response"]).__name__}')
            if not obj["response"].strip():
                bad('"response" is empty')
    else:
        try:
            as_messages(obj["messages"])
        except ValueError as e:
            bad(str(e))
    return obj


def validate_pair(obj: Any, where: str = "record") -> dict:
    """Check one preference pair: a prompt (or a conversation ending with the user's turn) and two
    different replies, "chosen" and "rejected"; raises DataError(f"{where}: problem")."""
    validate_record(obj, where)

    def bad(problem: str):
        raise DataError(f"{where}: {problem}")

    if "response" in obj:
        bad('has "response"; a preference pair puts its two replies in "chosen" and "rejected"')
    if "messages" in obj and obj["messages"][-1]["role"] != "user":
        bad('"messages" must end with the user\'s turn; the replies go in "chosen" and "rejected"')
    for key in ("chosen", "rejected"):
        if key not in obj:
            bad(f'missing "{key}": a preference pair needs "chosen" and "rejected" replies')
        reply = obj[key]
        if isinstance(reply, dict):
            try:
                as_messages([{"role": "user", "content": "x"}, {"role": "assistant", **reply}])
            except ValueError as e:
                bad(f'"{key}" is not an assistant message: {str(e).replace("messages[1]", key)}')
        elif not isinstance(reply, str):
            bad(f'"{key}" must be a string or an assistant message object, got {type(reply).__name__}')
        elif not reply.strip():
            bad(f'"{key}" is empty')
    if obj["chosen"] == obj["rejected"]:
        bad('"chosen" and "rejected" are the same reply; a pair must prefer one reply over another')
    return obj


_PROMPTS = 'prompt records ({"prompt": ...} or {"messages": [...]})'
_SFT = 'SFT records ({"prompt": ..., "response": ...} or {"messages": [...]} with an assistant turn)'
_PAIRS = 'preference pairs ({"prompt": ..., "chosen": ..., "rejected": ...})'


def _read(paths: str | os.PathLike | Sequence[str | os.PathLike], validate=validate_record,
          what: str = _PROMPTS) -> list[tuple[str, dict]]:
    """(location "file:line", record) for every record of the files; all bad lines in one DataError, a file
    without a record (empty, or blank lines only) a one-line DataError `FILE: no records` saying `what` it needs."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out, errors = [], []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        lines = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                lines += 1
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    errors.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                    continue
                try:
                    out.append((where, validate(obj, where)))
                except DataError as e:
                    errors.append(str(e))
        if not lines:
            raise DataError(f"{path}: no records (the file is empty or holds only blank lines); write {what} into "
                            "it, one JSON object per line, or take it out of the file list")
    if errors:
        listed = "\n  ".join(errors[:_MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
        raise DataError(f"{len(errors)} bad line(s) in {', '.join(map(os.fspath, paths))}:\n  {listed}{more}")
    return out


def read_jsonl(paths) -> list[dict]:
    """Every record of one or more jsonl files, validated (see the module docstring)."""
    return [r for _, r in _read(paths)]


# ---------------------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------------------

def _encode_segments(tokenizer: Tokenizer, segments, add_bos: bool) -> tuple[list[int], list[int]]:
    ids, mask = [], []
    if add_bos:
        if tokenizer.bos_id is None:
            raise ValueError(f"add_bos=True but tokenizer {tokenizer!r} has no BOS token")
        ids.append(tokenizer.bos_id)
        mask.append(0)
    for text, trainable in segments:
        piece = [tokenizer.eod_id] if text is EOD else (tokenizer.encode(text) if text else [])
        ids += piece
        mask += [int(bool(trainable))] * len(piece)
    return ids, mask


def tokenize_conversation(template: Template | str, tokenizer: Tokenizer, conversation: Any, *,
                          add_bos: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of a conversation: 1 on assistant tokens and the EOD after each turn."""
    return _encode_segments(tokenizer, get_template(template).render(conversation), add_bos)


def encode_prompt(template: Template | str, tokenizer: Tokenizer, conversation: Any, *,
                  add_bos: bool = False) -> list[int]:
    """The ids a generation starts from: the conversation up to the assistant's opening (a trailing
    assistant message is dropped; EOD ids after earlier assistant turns are kept)."""
    messages = as_messages(conversation)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _encode_segments(tokenizer, get_template(template).render(messages), add_bos)[0]


@dataclass
class Example:
    """One tokenized conversation: ids and the per-token loss mask (1 = trainable)."""

    input_ids: list[int]
    loss_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Trainable next-token targets: a token is a target of the one before it, so the first is none."""
        return sum(self.loss_mask[1:])


def read_sft_records(paths) -> list[tuple[str, dict]]:
    """(location "file:line", record) of SFT files, validated; no tokenizer needed (a stage reads its data
    before it builds the model, so that bad data stops it at once)."""
    return _read(paths, what=_SFT)


def tokenize_sft_records(located: list[tuple[str, dict]], tokenizer: Tokenizer, template: Template | str, *,
                         add_bos: bool = False) -> list[Example]:
    """Tokenized SFT examples of read_sft_records' output; a record without an assistant target is an error
    naming file:line."""
    template = get_template(template)
    out, errors = [], []
    for where, record in located:
        try:
            messages = as_messages(record)
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError('no SFT target: add "response" to the prompt/answer record, or an assistant '
                                 'message to "messages"')
            ids, mask = tokenize_conversation(template, tokenizer, messages, add_bos=add_bos)
        except ValueError as e:
            errors.append(f"{where}: {e}")
            continue
        out.append(Example(ids, mask))
    if errors:
        listed = "\n  ".join(errors[:_MAX_LISTED_ERRORS])
        raise DataError(f"{len(errors)} record(s) cannot be used for SFT with the {template.name} template:\n  "
                        f"{listed}")
    return out


def load_sft_examples(paths, tokenizer: Tokenizer, template: Template | str, *,
                      add_bos: bool = False) -> list[Example]:
    """Tokenized SFT examples; a record without an assistant target is an error naming file:line."""
    return tokenize_sft_records(read_sft_records(paths), tokenizer, template, add_bos=add_bos)


def load_prompts(paths) -> list[dict]:
    """Records for RL/generation (the sample dicts rewards receive), validated."""
    return [r for _, r in load_located_prompts(paths)]


def load_located_prompts(paths) -> list[tuple[str, dict]]:
    """(location "file:line", record) of prompt files, validated: the location names a prompt in errors."""
    return _read(paths, what=_PROMPTS)


def check_prompt_fit(located: Sequence[tuple[str, Sequence[int]]], max_new_tokens: int, max_seq_len: int, *,
                     budget: str = "rollout.max_new_tokens", template: str = "") -> None:
    """Every prompt's ids (encoded as the generator receives them) plus `max_new_tokens` must fit in
    `max_seq_len` (the KV cache the generator allocates); otherwise a one-line DataError naming the longest
    prompt's file:line, the numbers and the fixes. `budget` is the config key that set max_new_tokens."""
    over = [(len(ids), where) for where, ids in located if len(ids) + max_new_tokens > max_seq_len]
    if not over:
        return
    n, where = max(over, key=lambda x: x[0])      # the first of the longest
    fixes = [f"raise model.max_seq_len to {n + max_new_tokens}"]
    if max_seq_len - n >= 1:
        fixes.append(f"lower {budget} to {max_seq_len - n}")
    fixes.append(f"drop or shorten the prompts longer than {max(max_seq_len - max_new_tokens, 0)} tokens")
    tmpl = f" with the {template} template" if template else ""
    raise DataError(f"{where}: this prompt is {n} tokens{tmpl}, and {n} + {budget} ({max_new_tokens}) = "
                    f"{n + max_new_tokens} exceeds model.max_seq_len = {max_seq_len} ({len(over)} of {len(located)} "
                    f"prompts do not fit); {', '.join(fixes[:-1])}, or {fixes[-1]}")


def load_preference_pairs(paths) -> list[tuple[str, dict]]:
    """(location "file:line", pair) for every preference pair of the files, validated (validate_pair)."""
    return _read(paths, validate_pair, _PAIRS)


def pair_conversations(pair: dict) -> tuple[list[dict], list[dict]]:
    """The chosen and the rejected conversation of a pair: the shared context, then each reply."""
    context = as_messages({k: v for k, v in pair.items() if k in ("prompt", "messages")})

    def reply(r):
        return {"role": "assistant", **r} if isinstance(r, dict) else {"role": "assistant", "content": r}
    return context + [reply(pair["chosen"])], context + [reply(pair["rejected"])]


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

@dataclass
class PackingStats:
    n_examples: int = 0
    n_packed: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_rows: int = 0
    n_tokens: int = 0     # real (non-padding) tokens in the rows
    n_targets: int = 0    # labels != IGNORE_INDEX
    fill: float = 0.0     # n_tokens / (n_rows * seq_len)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PackedRows:
    """Packed SFT rows, each tensor [n_rows, seq_len] (int64)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    stats: PackingStats

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, idx) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx],
                "position_ids": self.position_ids[idx], "doc_ids": self.doc_ids[idx]}


def _first_fit_decreasing(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices: each example, in `order`, goes to the first bin it fits.

    A max-segment-tree over remaining capacities finds that bin in O(log n); bins not yet opened
    hold the full capacity, and they sit to the right of the open ones, so "first bin that fits"
    opens a new bin exactly when no open one has room.
    """
    size = 1
    while size < max(1, len(order)):
        size *= 2
    tree = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def pack_examples(examples: Sequence[Example], seq_len: int, *, seed: int = 0, overflow: str = "truncate",
                  pad_id: int = 0) -> PackedRows:
    """Pack examples into rows of `seq_len` tokens by first-fit-decreasing (ties in length broken by a
    shuffle with `seed`, so the result is deterministic given the seed).

    overflow: "truncate" (default) cuts an over-long example to seq_len tokens, dropping it if no
    trainable target is left; "drop" drops it. Both are counted in `stats` and warned about once.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    stats = PackingStats(n_examples=len(examples))
    docs: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        if len(ex.input_ids) != len(ex.loss_mask):
            raise ValueError(f"example has {len(ex.input_ids)} ids but {len(ex.loss_mask)} mask entries")
        ids, mask = list(ex.input_ids), list(ex.loss_mask)
        truncated = len(ids) > seq_len
        if truncated and overflow == "drop":
            stats.n_dropped += 1
            continue
        ids, mask = ids[:seq_len], mask[:seq_len]
        if sum(mask[1:]) == 0:  # nothing to learn from (empty, or its whole reply was cut off)
            stats.n_dropped += 1
            continue
        stats.n_truncated += truncated
        docs.append((ids, mask))
    if stats.n_truncated or stats.n_dropped:
        warnings.warn(f"packing into seq_len={seq_len}: {stats.n_truncated} of {len(examples)} examples "
                      f"truncated, {stats.n_dropped} dropped (over-long with overflow={overflow!r}, or no "
                      "trainable token within seq_len)", stacklevel=2)
    lengths = [len(d[0]) for d in docs]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    bins = _first_fit_decreasing(lengths, order, seq_len)

    n = len(bins)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, seq_len), dtype=torch.long)
    doc_ids = torch.full((n, seq_len), -1, dtype=torch.long)
    for r, members in enumerate(bins):
        offset = 0
        for d, i in enumerate(members):
            ids, mask = docs[i]
            L = len(ids)
            t = torch.tensor(ids, dtype=torch.long)
            m = torch.tensor(mask, dtype=torch.bool)
            input_ids[r, offset:offset + L] = t
            target = torch.where(m[1:], t[1:], torch.full_like(t[1:], IGNORE_INDEX))
            labels[r, offset:offset + L - 1] = target  # the document's last token keeps IGNORE_INDEX
            position_ids[r, offset:offset + L] = torch.arange(L)
            doc_ids[r, offset:offset + L] = d
            offset += L
    stats.n_packed = len(docs)
    stats.n_rows = n
    stats.n_tokens = sum(lengths)
    stats.n_targets = int((labels != IGNORE_INDEX).sum())
    stats.fill = stats.n_tokens / (n * seq_len) if n else 0.0
    return PackedRows(input_ids, labels, position_ids, doc_ids, stats)


class PackedIterator:
    """An endless, epoch-aware iterator over batches of packed rows.

    Each epoch visits the rows in a fresh order (a permutation seeded by (seed, epoch)), in global
    batches of `batch_size * dp_size` rows of which data-parallel rank `dp_rank` takes its
    `batch_size`; the last partial global batch of an epoch is skipped. The state is (epoch, index),
    index = global batches already taken in that epoch: `state_dict()` after k batches and
    `load_state_dict()` on a fresh iterator continue with batch k + 1 exactly.
    """

    def __init__(self, rows: PackedRows, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 dp_rank: int = 0, dp_size: int = 1):
        if batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad batching: batch_size={batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch = batch_size * dp_size
        self.batches_per_epoch = len(rows) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(rows)} packed rows are fewer than one global batch of {self.global_batch} "
                             "(batch_size * dp_size); use more data, a shorter seq_len or a smaller batch")
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = None, None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            n = len(self.rows)
            if self.shuffle:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
                self._perm = torch.randperm(n, generator=g)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.global_batch + self.dp_rank * self.batch_size
        idx = self._order(self.epoch)[start:start + self.batch_size]
        self.index += 1
        batch = self.rows[idx]
        batch["row_ids"] = idx  # which packed rows, for logging and checks
        batch["epoch"] = self.epoch
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_rows": len(self.rows),
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        for key in ("epoch", "index"):
            if key not in state:
                raise ValueError(f"iterator state has no {key!r}: {state}")
        for key, mine in (("seed", self.seed), ("n_rows", len(self.rows)), ("global_batch", self.global_batch)):
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume: the saved iterator had {key}={state[key]}, this one has {mine}; "
                                 "resume with the same data, packing and batch settings")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
