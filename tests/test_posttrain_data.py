"""Post-training data: templates, jsonl validation, tokenization + loss masks, SFT packing, the resumable
iterator and prompt collation."""
import json
import random
import warnings

import pytest
import torch

from model.transformer import IGNORE_INDEX
from posttrain.data import (DataError, Example, PackedIterator,
                            encode_prompt, load_prompts, load_sft_examples, pack_examples, read_jsonl,
                            tokenize_conversation)
from posttrain.templates import (ASSISTANT, EOD, USER, ChatTemplate, R1ZeroTemplate, as_messages, get_template,
                                 template_names)
from pretrain.tokenizer import Tokenizer

# The R1-Zero template (R1 §2.2.3, Table 1), as in shared/reference/deepseek-numbers.md.
R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
           "The assistant first thinks about the reasoning process in the mind and then provides the user with "
           "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
           "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
           "</answer>. User: {prompt}. Assistant:")


class CharTokenizer(Tokenizer):
    """One id per character (its code point + 3), eod 1, bos 2: exact, easy to count."""

    vocab_size, eod_id, bos_id = 0x110003, 1, 2

    def encode(self, text):
        return [ord(c) + 3 for c in text]

    def decode(self, ids):
        return "".join("" if i < 3 else chr(i - 3) for i in ids)


TOK = CharTokenizer()


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def conv(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------

def test_r1_zero_prompt_is_the_paper_template():
    tpl = get_template("r1_zero")
    assert tpl.prompt("Compute 3+5") == R1_ZERO.format(prompt="Compute 3+5")
    assert tpl.prompt([{"role": "user", "content": "x"}]) == R1_ZERO.format(prompt="x")
    segs = tpl.render({"prompt": "Compute 3+5", "response": "<think> 3+5=8 </think> <answer> 8 </answer>"})
    assert segs == [(R1_ZERO.format(prompt="Compute 3+5"), False),
                    (" <think> 3+5=8 </think> <answer> 8 </answer>", True), (EOD, True)]
    # an assistant message with "reasoning" is wrapped in the tags
    segs = tpl.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "8", "reasoning": "r"}])
    assert segs[1] == (" <think> r </think> <answer> 8 </answer>", True)


def test_r1_zero_rejects_multi_turn_and_system():
    tpl = R1ZeroTemplate()
    with pytest.raises(ValueError, match="single-turn"):
        tpl.render(conv("a", "b", "c"))
    with pytest.raises(ValueError, match="system"):
        tpl.render(conv("a", system="s"))


def test_chat_template_multi_turn_and_system():
    tpl = get_template("chat", system="default")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning": "2+2=4"}]
    assert tpl.render(msgs) == [
        (f"Be brief.{USER}hi{ASSISTANT}", False), ("hello", True), (EOD, True),
        (f"{USER}2+2?{ASSISTANT}", False), ("<think>2+2=4</think> 4", True), (EOD, True)]
    # the generation prompt: the conversation up to the assistant's opening; default system prompt
    assert tpl.prompt("q") == f"default{USER}q{ASSISTANT}"
    assert ChatTemplate().prompt(msgs) == f"Be brief.{USER}hi{ASSISTANT}hello{USER}2+2?{ASSISTANT}"


def test_get_template_error_lists_names():
    assert template_names() == ["chat", "r1_zero"]
    with pytest.raises(ValueError, match="valid names: chat, r1_zero"):
        get_template("llama")


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty"),
    ([{"role": "bot", "content": "x"}], "valid roles: system, user, assistant"),
    ([{"role": "user", "content": "  "}], "content is empty"),
    ([{"role": "user"}], "has no 'content'"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "assistant", "content": "x"}], "first non-system message must be from the user"),
    (conv("a") + conv("b"), "two user messages in a row"),
    (conv("a") + [{"role": "system", "content": "s"}], "only the first message"),
])
def test_as_messages_rejects(messages, problem):
    with pytest.raises(ValueError, match=problem):
        as_messages(messages)


# ----------------------------------------------------------------------------------------------
# Reading and validation
# ----------------------------------------------------------------------------------------------

def test_read_jsonl_both_shapes(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        {"messages": conv("hi", "hello")}, "", {"prompt": "Compute 1+1", "answer": 2, "task": "arithmetic"},
        {"prompt": "p", "response": "r"}])
    recs = read_jsonl(path)
    assert len(recs) == 3 and recs[1]["task"] == "arithmetic"  # blank line skipped, extra keys kept
    assert load_prompts(path) == recs


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "x", "answer": ', "invalid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"question": "x"}', 'missing key: a record needs "messages"'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role is 'bot'; valid roles"),
    ('{"messages": [{"role": "user", "content": ""}]}', "messages[0].content is empty"),
    ('{"prompt": ""}', '"prompt" is empty'),
    ('{"prompt": "x", "answer": null}', '"answer" must be a string or a number'),
    ('{"prompt": "x", "response": 5}', '"response" must be a string'),
    ('{"prompt": "x", "messages": []}', "has both"),
])
def test_bad_line_error_names_file_and_line(tmp_path, line, problem):
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "fine", "answer": "1"}, line])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert f"{path}:2: " in str(err.value) and problem in str(err.value)


def test_every_bad_line_is_reported(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{", {"prompt": "ok"}, "nope", {"messages": []}])
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    msg = str(err.value)
    assert msg.startswith("3 bad line(s)") and f"{path}:1:" in msg and f"{path}:3:" in msg and f"{path}:4:" in msg


def test_sft_needs_a_target_and_a_fitting_template(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "only", "answer": "1"}])
    with pytest.raises(DataError, match=rf"{path}:2: no SFT target"):
        load_sft_examples(path, TOK, "r1_zero")
    path = write_lines(tmp_path / "m.jsonl", [{"messages": conv("a", "b", "c", "d")}])
    with pytest.raises(DataError, match=rf"{path}:1: the r1_zero template is single-turn"):
        load_sft_examples(path, TOK, "r1_zero")
    assert len(load_sft_examples(path, TOK, "chat")) == 1
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("content", ["", "\n", "\n  \n\t\n"])
def test_a_file_without_records_is_an_error_naming_it(tmp_path, content):
    """An empty file (or blank lines only) is `FILE: no records` from every loader, in one line, even beside a
    good file; never an empty data set that a stage loops on (GRPO) or silently skips (evaluation)."""
    from posttrain.data import load_located_prompts, load_preference_pairs, read_sft_records
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    good = write_lines(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r", "chosen": "a", "rejected": "b"}])
    loaders = [read_jsonl, load_prompts, load_located_prompts, read_sft_records, load_preference_pairs,
               lambda f: load_sft_examples(f, TOK, "chat")]
    for load in loaders:
        for files in (str(empty), [good, str(empty)]):
            with pytest.raises(DataError) as err:
                load(files)
            msg = str(err.value)
            assert msg.startswith(f"{empty}: no records") and "\n" not in msg, msg
    assert "preference pairs" in str(pytest.raises(DataError, load_preference_pairs, empty).value)


def test_prompt_fit_names_the_longest_prompt_and_the_fixes():
    from posttrain.data import check_prompt_fit
    located = [("a.jsonl:1", [1] * 10), ("a.jsonl:3", [1] * 30), ("b.jsonl:2", [1] * 40), ("b.jsonl:5", [1] * 40)]
    check_prompt_fit(located, 24, 64)                       # 40 + 24 = 64 fits
    with pytest.raises(DataError) as err:
        check_prompt_fit(located, 25, 64, template="chat")
    msg = str(err.value)
    assert msg.startswith("b.jsonl:2: this prompt is 40 tokens with the chat template, and 40 + "
                          "rollout.max_new_tokens (25) = 65 exceeds model.max_seq_len = 64 (2 of 4 prompts"), msg
    for fix in ("raise model.max_seq_len to 65", "lower rollout.max_new_tokens to 24",
                "drop or shorten the prompts longer than 39 tokens"):
        assert fix in msg, fix
    with pytest.raises(DataError) as err:                   # no reply budget could help: that fix is not offered
        check_prompt_fit(located, 8, 40, budget="eval.max_new_tokens")
    assert "eval.max_new_tokens (8)" in str(err.value) and "lower eval" not in str(err.value)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# Tokenization and loss masks
# ----------------------------------------------------------------------------------------------

def test_loss_mask_covers_assistant_tokens_and_eod():
    msgs = conv("hi", "hello", "2+2?", "four", system="sys")
    ids, mask = tokenize_conversation("chat", TOK, msgs)
    assert len(ids) == len(mask)
    trainable = [i for i, m in zip(ids, mask) if m]
    assert TOK.decode(trainable) == "hellofour"
    assert trainable.count(TOK.eod_id) == 2 and ids.count(TOK.eod_id) == 2  # one EOD per assistant turn
    assert all(m == 1 for i, m in zip(ids, mask) if i == TOK.eod_id)
    assert ids[-1] == TOK.eod_id
    assert TOK.decode([i for i, m in zip(ids, mask) if not m]) == f"sys{USER}hi{ASSISTANT}{USER}2+2?{ASSISTANT}"


def test_prompt_ids_are_the_training_prefix():
    msgs = conv("hi", "hello", "2+2?", "four")
    ids, mask = tokenize_conversation("chat", TOK, msgs)
    prompt = encode_prompt("chat", TOK, msgs)  # the final reply dropped, the EOD of turn one kept
    assert ids[:len(prompt)] == prompt and mask[len(prompt)] == 1 and not mask[len(prompt) - 1]
    assert prompt.count(TOK.eod_id) == 1
    assert encode_prompt("r1_zero", TOK, "q") == TOK.encode(R1_ZERO.format(prompt="q"))
    ids, _ = tokenize_conversation("r1_zero", TOK, conv("q", "a"), add_bos=True)
    assert ids[0] == TOK.bos_id


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

PROMPT_IDS, REPLY_IDS = range(3, 100), range(500, 600)


def random_examples(n, seed=0, max_len=40):
    """Examples shaped like conversations: untrainable prompt runs and trainable reply runs (ids from
    disjoint ranges) ending in a trainable EOD."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids, mask = [], []
        for _ in range(rng.randint(1, 2)):
            p, r = rng.randint(1, max_len // 4), rng.randint(1, max_len // 4 - 1)
            ids += [rng.choice(PROMPT_IDS) for _ in range(p)] + [rng.choice(REPLY_IDS) for _ in range(r)] + [1]
            mask += [0] * p + [1] * (r + 1)
        out.append(Example(ids, mask))
    return out


def docs_of(rows):
    """Every document of the packed rows as (ids, labels, positions)."""
    docs = []
    for r in range(len(rows)):
        d = rows.doc_ids[r]
        for k in range(int(d.max()) + 1):
            sel = d == k
            docs.append((rows.input_ids[r][sel].tolist(), rows.labels[r][sel].tolist(),
                         rows.position_ids[r][sel].tolist()))
    return docs


def test_packing_invariants():
    examples = random_examples(60)
    seq_len = 64
    rows = pack_examples(examples, seq_len, seed=3)
    assert rows.input_ids.shape == rows.labels.shape == rows.doc_ids.shape == (len(rows), seq_len)
    assert rows.stats.n_truncated == rows.stats.n_dropped == 0 and rows.stats.n_packed == 60
    for r in range(len(rows)):
        d, lab, ids, pos = rows.doc_ids[r], rows.labels[r], rows.input_ids[r], rows.position_ids[r]
        real = d >= 0
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any()  # documents first, then padding
        assert (lab[~real] == IGNORE_INDEX).all()
        for t in range(seq_len):
            if t + 1 < seq_len and d[t] >= 0 and d[t + 1] == d[t]:
                assert pos[t + 1] == pos[t] + 1  # positions count up inside a document
            elif d[t] >= 0:
                assert lab[t] == IGNORE_INDEX  # a document's last token has no target
            if t == 0 or (d[t] >= 0 and d[t] != d[t - 1]):
                assert pos[t] == 0  # ... and restart at every document
            if lab[t] != IGNORE_INDEX:  # a target is the next token of the same document
                assert d[t + 1] == d[t] and lab[t] == ids[t + 1]
    # every example is packed once and whole, with its loss mask turned into shifted labels
    packed = sorted(docs_of(rows))
    expected = []
    for ex in examples:
        labels = [ex.input_ids[t + 1] if ex.loss_mask[t + 1] else IGNORE_INDEX for t in range(len(ex) - 1)]
        expected.append((ex.input_ids, labels + [IGNORE_INDEX], list(range(len(ex)))))
    assert packed == sorted(expected)
    # trainable tokens are preserved; targets are assistant tokens (and EODs) only
    assert rows.stats.n_targets == sum(ex.n_targets for ex in examples) == int((rows.labels != IGNORE_INDEX).sum())
    targets = set(rows.labels[rows.labels != IGNORE_INDEX].tolist())
    assert targets <= set(REPLY_IDS) | {TOK.eod_id}
    assert rows.stats.fill > 0.8


def test_packing_is_deterministic_and_first_fit_decreasing():
    examples = random_examples(40, seed=1)
    a, b = pack_examples(examples, 64, seed=7), pack_examples(examples, 64, seed=7)
    for key in ("input_ids", "labels", "position_ids", "doc_ids"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    # lengths 6,5,4,3,2 into rows of 10: FFD gives [6,4] and [5,3,2]
    exs = [Example(list(range(3, 3 + n)), [0] + [1] * (n - 1)) for n in (3, 6, 2, 5, 4)]
    rows = pack_examples(exs, 10)
    assert [torch.bincount(rows.doc_ids[r]).tolist() for r in range(len(rows))] == [[6, 4], [5, 3, 2]]


def test_packing_overflow_truncates_or_drops_and_counts():
    long = Example(list(range(3, 23)), [0] * 5 + [1] * 15)     # 20 tokens, reply from token 5
    prompt_only = Example(list(range(3, 23)), [0] * 15 + [1] * 5)  # its reply starts past seq_len
    short = Example([3, 4, 5], [0, 1, 1])
    with pytest.warns(UserWarning, match="1 of 3 examples truncated, 1 dropped"):
        rows = pack_examples([long, prompt_only, short], 10)
    assert (rows.stats.n_truncated, rows.stats.n_dropped, rows.stats.n_packed) == (1, 1, 2)
    assert rows.stats.n_targets == 5 + 2  # the truncated one keeps its targets at tokens 5..9
    with pytest.warns(UserWarning):
        rows = pack_examples([long, prompt_only, short], 10, overflow="drop")
    assert (rows.stats.n_truncated, rows.stats.n_dropped, len(rows)) == (0, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pack_examples([short], 10)  # nothing to warn about
    with pytest.raises(ValueError, match="overflow"):
        pack_examples([short], 10, overflow="wrap")


def test_iterator_epochs_cover_rows_and_resume_exactly():
    rows = pack_examples(random_examples(80, seed=2), 40, seed=0)
    n = len(rows)
    it = PackedIterator(rows, batch_size=3, seed=5)
    per_epoch = n // 3
    seen = [next(it) for _ in range(per_epoch)]
    taken = torch.cat([b["row_ids"] for b in seen])
    assert len(set(taken.tolist())) == per_epoch * 3 and it.state_dict()["epoch"] == 0  # no row twice
    assert torch.equal(torch.cat([b["input_ids"] for b in seen]), rows.input_ids[taken])
    nxt = next(it)
    assert nxt["epoch"] == 1 and it.state_dict()["index"] == 1

    ref = PackedIterator(rows, batch_size=3, seed=5)
    for _ in range(per_epoch - 2):
        next(ref)
    state = ref.state_dict()
    expect = [next(ref) for _ in range(5)]  # crosses into epoch 1
    resumed = PackedIterator(rows, batch_size=3, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for a in expect:
        b = next(resumed)
        assert a["epoch"] == b["epoch"] and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["labels"], b["labels"])
    # epochs visit rows in different orders
    e0 = PackedIterator(rows, batch_size=n, seed=5)
    assert not torch.equal(next(e0)["input_ids"], next(e0)["input_ids"])
    with pytest.raises(ValueError, match="had seed=5, this one has 6"):
        PackedIterator(rows, batch_size=3, seed=6).load_state_dict(state)


def test_iterator_data_parallel_ranks_split_the_global_batch():
    rows = pack_examples(random_examples(40, seed=4), 40)
    whole = next(PackedIterator(rows, batch_size=4, seed=1))["input_ids"]
    parts = [next(PackedIterator(rows, batch_size=2, seed=1, dp_rank=r, dp_size=2))["input_ids"] for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedIterator(rows, batch_size=len(rows) + 1)


# ----------------------------------------------------------------------------------------------
# Prompt batches
# ----------------------------------------------------------------------------------------------

def test_sft_end_to_end_with_the_task_tokenizer(tmp_path):
    from posttrain.tasks import build_task_tokenizer, write_task_splits

    tok = build_task_tokenizer(str(tmp_path / "tok.model"), n_per_level=20)
    paths = write_task_splits(str(tmp_path), "arithmetic", 30, 5, seed=0)
    examples = load_sft_examples(paths["train"], tok, "r1_zero")
    records = read_jsonl(paths["train"])
    for ex, rec in zip(examples, records):
        reply = [i for i, m in zip(ex.input_ids, ex.loss_mask) if m]
        assert reply[-1] == tok.eod_id and tok.decode(reply[:-1]) == " " + rec["response"]
        assert ex.input_ids[:len(ex) - len(reply)] == encode_prompt("r1_zero", tok, rec["prompt"])
    rows = pack_examples(examples, 256)
    assert rows.stats.n_targets == sum(e.n_targets for e in examples)
