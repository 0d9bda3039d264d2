"""Prompt templates: DeepSeek-R1-Zero's single-turn template and a multi-turn chat template whose
assistant turns are `<think>reasoning</think> summary`.

    tpl = get_template("r1_zero")            # or "chat" (options: system=...)
    text = tpl.prompt("Compute 3+5")         # the text a policy continues when generating
    segs = tpl.render([{"role": "user", "content": "Compute 3+5"},
                       {"role": "assistant", "content": "<think> 3+5=8 </think> <answer> 8 </answer>"}])
    # -> [(prompt text, False), (" <think> ... </answer>", True), (EOD, True)]

`render` returns segments `(text, trainable)`; the tokenizer side (`posttrain.data`) encodes each
segment on its own, so the prompt's ids are exactly those a generation run starts from, and turns
the `EOD` sentinel into the tokenizer's end-of-document id (appended after every assistant turn and
trainable, so the model learns to stop). A conversation that ends with a user message renders with
the generation prompt at its end (the assistant's opening) and no trainable segment after it.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`;
an assistant message may carry `"reasoning"` (its chain of thought), which the template wraps in
`<think> </think>`. A bare string is one user message; a record `{"prompt": ..., "response": ...}`
is a user message and (when "response" is present) an assistant reply.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

__all__ = ["EOD", "Segment", "Template", "R1ZeroTemplate", "ChatTemplate", "get_template", "template_names",
           "as_messages", "THINK_OPEN", "THINK_CLOSE", "ANSWER_OPEN", "ANSWER_CLOSE", "USER", "ASSISTANT",
           "SPECIAL_TAGS", "ROLES", "segments_text"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# DeepSeek-V3/R1 chat role markers (full-width vertical bars, as in DeepSeek's tokenizer)
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, USER, ASSISTANT)
ROLES = ("system", "user", "assistant")


class _EOD(str):
    """The end-of-document sentinel in rendered segments; its text is empty."""

    def __repr__(self) -> str:
        return "EOD"


EOD = _EOD("")  # compare with `is`: the tokenizer maps it to `tokenizer.eod_id`
Segment = tuple  # (text: str, trainable: bool); text may be the EOD sentinel


def as_messages(conversation: Any) -> list[dict]:
    """A conversation as a validated message list (see the module docstring for the accepted shapes).

    Raises ValueError naming the problem: wrong role, empty or non-string content, a system message
    that is not first, roles that do not alternate user/assistant, no user message.
    """
    if isinstance(conversation, str):
        messages = [{"role": "user", "content": conversation}]
    elif isinstance(conversation, dict):
        if "messages" in conversation:
            messages = conversation["messages"]
        elif "prompt" in conversation:
            messages = [{"role": "user", "content": conversation["prompt"]}]
            if conversation.get("response") is not None:
                messages.append({"role": "assistant", "content": conversation["response"]})
        else:
            raise ValueError('a conversation record needs "messages" or "prompt"')
    else:
        messages = conversation
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list, got {type(messages).__name__}"
                         + (" (empty)" if isinstance(messages, (list, tuple)) else ""))
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise ValueError(f"messages[{i}] has no {key!r}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"messages[{i}].content is empty")
        if "reasoning" in m and m["reasoning"] is not None:
            if role != "assistant":
                raise ValueError(f"messages[{i}] has 'reasoning' but only assistant messages may")
            if not isinstance(m["reasoning"], str):
                raise ValueError(f"messages[{i}].reasoning must be a string, got {type(m['reasoning']).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message; only the first message may be one")
        out.append(dict(m))
    turns = [m["role"] for m in out if m["role"] != "system"]
    if not turns or turns[0] != "user":
        raise ValueError("the first non-system message must be from the user")
    for i in range(1, len(turns)):
        if turns[i] == turns[i - 1]:
            raise ValueError(f"two {turns[i]} messages in a row; user and assistant turns must alternate")
    return out


class Template(abc.ABC):
    """A prompt format: `prompt()` for generation, `render()` for training segments."""

    name: str = ""

    @abc.abstractmethod
    def render(self, conversation: Any) -> list[Segment]:
        """Segments `(text, trainable)`: assistant turns (and the EOD after each) trainable, the rest not."""

    def prompt(self, messages_or_prompt: Any) -> str:
        """The text the assistant's reply continues. A trailing assistant message is dropped; EOD
        sentinels between earlier turns are left out of the text (`posttrain.data.encode_prompt`
        keeps them as ids)."""
        messages = as_messages(messages_or_prompt)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return self.text(messages)

    def text(self, conversation: Any) -> str:
        """All segments joined into one string (without EOD)."""
        return segments_text(self.render(conversation))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class R1ZeroTemplate(Template):
    """DeepSeek-R1-Zero's template, verbatim (R1 §2.2.3, Table 1); `{prompt}` is the question.

    Single turn: one user message, optionally followed by the assistant's reply. The reply is
    trained as given, after one space (the template ends with "Assistant:"); an assistant message
    with "reasoning" renders as `<think> reasoning </think> <answer> content </answer>`.
    """

    name = "r1_zero"
    TEXT = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
            "The assistant first thinks about the reasoning process in the mind and then provides the user with "
            "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
            "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
            "</answer>. User: {prompt}. Assistant:")

    def render(self, conversation: Any) -> list[Segment]:
        messages = as_messages(conversation)
        if messages[0]["role"] == "system":
            raise ValueError("the r1_zero template has its own fixed instruction and takes no system message; "
                             "drop it or use the 'chat' template")
        if len(messages) > 2:
            raise ValueError(f"the r1_zero template is single-turn (one user message, then at most one assistant "
                             f"reply), got {len(messages)} messages; use the 'chat' template for multi-turn data")
        segments: list[Segment] = [(self.TEXT.format(prompt=messages[0]["content"]), False)]
        if len(messages) == 2:
            reply = messages[1]
            if reply.get("reasoning") is not None:
                body = (f"{THINK_OPEN} {reply['reasoning']} {THINK_CLOSE} "
                        f"{ANSWER_OPEN} {reply['content']} {ANSWER_CLOSE}")
            else:
                body = reply["content"]
            segments += [(body if body[:1].isspace() else " " + body, True), (EOD, True)]
        return segments


class ChatTemplate(Template):
    """Multi-turn chat in DeepSeek's format with R1's readable cold-start pattern (R1 §2.3.1):

        {system}<｜User｜>{user}<｜Assistant｜><think>{reasoning}</think> {summary}<EOD><｜User｜>...

    An assistant message with "reasoning" renders as `<think>reasoning</think> summary`; one without
    it is trained exactly as its content reads (it may hold the think block itself, or none: R1
    §2.3.3 gives simple queries no chain of thought). `system` is a default system prompt used when
    the conversation has none.
    """

    name = "chat"

    def __init__(self, system: str | None = None):
        self.system = system

    def render(self, conversation: Any) -> list[Segment]:
        messages = as_messages(conversation)
        segments: list[Segment] = []
        pending = ""  # untrainable text not yet emitted
        if messages[0]["role"] == "system":
            pending, messages = messages[0]["content"], messages[1:]
        elif self.system:
            pending = self.system
        for m in messages:
            if m["role"] == "user":
                pending += USER + m["content"] + ASSISTANT
            else:
                if m.get("reasoning") is not None:
                    body = f"{THINK_OPEN}{m['reasoning']}{THINK_CLOSE} {m['content']}"
                else:
                    body = m["content"]
                segments += [(pending, False), (body, True), (EOD, True)]
                pending = ""
        if pending:
            segments.append((pending, False))
        return segments

    def __repr__(self) -> str:
        return f"ChatTemplate(system={self.system!r})"


TEMPLATES: dict[str, type[Template]] = {"r1_zero": R1ZeroTemplate, "chat": ChatTemplate}


def template_names() -> list[str]:
    return sorted(TEMPLATES)


def get_template(name: str | Template, **options) -> Template:
    """A template by name ("r1_zero", "chat"); `options` go to its constructor (chat: system=...)."""
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; valid names: {', '.join(template_names())}")
    try:
        return TEMPLATES[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for template {name!r}: {e}") from e


def segments_text(segments: Sequence[Segment]) -> str:
    """The text of rendered segments, EOD left out."""
    return "".join(t for t, _ in segments if t is not EOD)
