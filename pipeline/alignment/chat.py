"""Conversations as text: TRL's conversational records, read into gptpipe's (prompt,
completion) texts.

TRL's datasets hold either text (``"prompt": "The sky is"``, ``"completion": " blue."``)
or conversations: lists of messages, ``{"role": "user", "content": "..."}``. gptpipe's
models read plain text, so a conversation is written out one message per line, its role,
a colon and a space before its content, and a prompt ends where the assistant's answer
starts::

    user: What color is the sky?
    assistant: It is blue.

- :func:`chat_text` writes messages so (``add_generation_prompt`` ends the text with
  ``assistant:``, where the answer goes);
- a record's prompt is its prompt messages with that ending, and its completion is what
  writing the prompt and completion messages together adds after it: the answer with
  its leading space (``" It is blue."``), as every gptpipe completion that starts a word
  carries its space, so that the prompt ends on a token boundary of any gptpipe
  tokenizer; and any later messages on their own lines;
- :data:`CHAT_TEMPLATE` is the same writing as a Jinja chat template, with the
  tokenizer's start token first and its end token after an assistant's final message,
  where gptpipe puts ``<bos>`` and ``<eos>`` (a chat template writes its special tokens
  itself): hand it to TRL (``tokenizer.chat_template``) and TRL trains on gptpipe's very
  sequences (docs/trl.md).

Each message must be an object with a ``role`` (a text without line breaks) and a
``content`` (a text; TRL's multimodal content lists are refused); other keys are
ignored. A completion, chosen or rejected conversation starts with an assistant message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import GptpipeError

ASSISTANT = "assistant"

# chat_text as a chat template (Transformers' Jinja): the same characters between the
# start token and, after a final assistant message, the end token (gptpipe's <bos> and
# the <eos> it appends to an answer).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages -%}{{ '\\n' }}{%- endif -%}{{ 'assistant:' }}"
    "{%- elif messages and messages[-1]['role'] == 'assistant' -%}{{ eos_token }}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class Message:
    """One message of a conversation: who says it (``user``, ``assistant`` ...) and what."""

    role: str
    content: str


def chat_text(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """``messages`` written one per line as ``role: content``; with
    ``add_generation_prompt``, a last line ``assistant:`` opens the answer."""
    text = "\n".join(f"{m.role}: {m.content}" for m in messages)
    if add_generation_prompt:
        text += ("\n" if messages else "") + f"{ASSISTANT}:"
    return text


def is_conversation(value: Any) -> bool:
    """Whether a record's field holds messages (a list), not text."""
    return isinstance(value, list)


def messages(where: str, name: str, value: Any, may_be_empty: bool) -> list[Message]:
    """The messages of field ``name`` (a list of role/content objects), checked; a
    one-line error naming ``where`` and the message otherwise."""
    allowed = "a list of messages, objects with a role and a text content"
    if not isinstance(value, list) or (not value and not may_be_empty):
        raise GptpipeError(f"{where}: field '{name}' is {_shown(value)}; allowed: {allowed}"
                           f"{'' if may_be_empty else ', at least one'}")
    checked = []
    for index, message in enumerate(value):
        at = f"{where}: {name}[{index}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise GptpipeError(f"{at} is {_shown(message)}; allowed: an object with role and "
                               "content")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or not role.strip() or "\n" in role or "\r" in role:
            raise GptpipeError(f"{at}: role = {_shown(role)}; allowed: a non-empty text "
                               "without line breaks (user, assistant, system ...)")
        if not isinstance(content, str):
            raise GptpipeError(f"{at}: content is {_shown(content)}; allowed: a text (gptpipe "
                               "models read text only)")
        valid_unicode(at, "content", content)
        valid_unicode(at, "role", role)
        checked.append(Message(role, content))
    return checked


def prompt_and_completion(where: str, prompt: list[Message], completion: list[Message],
                          name: str = "completion", first: str = "") -> tuple[str, str]:
    """The texts of a conversational prompt and its completion (module docstring): the
    completion (field ``name``, whose first message errors call ``first``, by default
    ``name[0]``) must open with an assistant message."""
    first = first or f"{name}[0]"
    if completion[0].role != ASSISTANT:
        raise GptpipeError(f"{where}: {first} has role {completion[0].role!r}; allowed: "
                           f"'{ASSISTANT}' (the {name}'s answer is the assistant's)")
    prompt_text = chat_text(prompt, add_generation_prompt=True)
    # The whole opens with the prompt's text: its answer's line starts "assistant:", as
    # the generation prompt ends.
    completion_text = chat_text([*prompt, *completion])[len(prompt_text):]
    if not completion_text.strip():
        raise GptpipeError(f"{where}: {first} has an empty content; allowed: non-empty "
                           "text (the answer)")
    return prompt_text, completion_text


def conversational_example(where: str, record: dict[str, Any]) -> tuple[str, str]:
    """(prompt, completion) texts of TRL's conversational SFT records: ``messages`` (the
    last one the assistant's answer, the ones before it the prompt) or ``prompt`` and
    ``completion`` message lists."""
    if "messages" in record:
        conversation = messages(where, "messages", record["messages"], may_be_empty=False)
        return prompt_and_completion(where, conversation[:-1], conversation[-1:],
                                     "messages", "messages[-1]")
    for name in ("prompt", "completion"):
        if name not in record:
            raise GptpipeError(f"{where}: field '{name}' missing; allowed: messages, or "
                               "prompt and completion message lists")
    return prompt_and_completion(
        where, messages(where, "prompt", record["prompt"], may_be_empty=True),
        messages(where, "completion", record["completion"], may_be_empty=False))


def conversational_pair(where: str, record: dict[str, Any]) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts of TRL's conversational preference records: a
    ``prompt`` message list beside ``chosen`` and ``rejected`` ones, or no prompt and two
    conversations that share their first messages (the implicit prompt)."""
    for name in ("chosen", "rejected"):
        if name not in record:
            raise GptpipeError(f"{where}: field '{name}' missing; allowed: chosen and "
                               "rejected message lists (and a prompt one)")
    chosen = messages(where, "chosen", record["chosen"], may_be_empty=False)
    rejected = messages(where, "rejected", record["rejected"], may_be_empty=False)
    if "prompt" in record:
        prompt = messages(where, "prompt", record["prompt"], may_be_empty=True)
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        if not chosen or not rejected:
            raise GptpipeError(f"{where}: chosen and rejected hold the same messages, one "
                               "after the other's end; allowed: two different answers")
    prompt_text, chosen_text = prompt_and_completion(where, prompt, chosen, "chosen")
    return prompt_text, chosen_text, prompt_and_completion(where, prompt, rejected,
                                                           "rejected")[1]


def split_implicit_prompt(chosen: list[Message], rejected: list[Message]
                          ) -> tuple[list[Message], list[Message], list[Message]]:
    """(prompt, chosen, rejected) of two conversations that hold their prompt: their
    shared first messages, as TRL's ``extract_prompt`` splits them."""
    shared = 0
    while (shared < min(len(chosen), len(rejected))
           and chosen[shared] == rejected[shared]):
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def valid_unicode(where: str, name: str, text: str) -> None:
    """Refuse a text holding a lone surrogate escape (JSON allows ``\\ud800``; UTF-8
    does not), in one line."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise GptpipeError(f"{where}: field '{name}' holds a lone surrogate escape "
                           "(\\ud800-\\udfff); allowed: text that is valid Unicode") from None


def _shown(value: Any, limit: int = 40) -> str:
    """A short description of a JSON value for an error line."""
    text = repr(value)
    return f"a {type(value).__name__} {text if len(text) <= limit else text[:limit - 3] + '...'}"
