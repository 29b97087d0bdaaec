"""SFT records -> (prompt, response) strings: plain text, chat conversations, or the chosen side of preference data.

Formats (``data.format`` of ``dpo-lightning sft``; ``auto`` picks one from the columns, see :func:`detect_sft_format`):

- ``text``: ``{text}`` (the field is ``data.response_field``): every token is a target; with
  ``data.prompt_field`` set, that field is context (not a target) and the text field the response.
- ``messages``: ``{messages: [{role, content}, ...]}`` conversations ending in an assistant message: the
  conversation before it, rendered with the chat template and its generation prompt, is the prompt; that last
  assistant message is the response (rendered by the same ``chat.ChatRenderer`` as the ``chat`` preference format).
- ``explicit``, ``hh``, ``chat``: preference pairs, read exactly as ``fit`` reads them (``formats``/``chat``); SFT
  trains on the prompt and the chosen response (Preferred-FT; the SFT stage of the DPO paper on HH).

A record that cannot be used raises ``formats.BadRow`` (kind, field, message), as in the preference data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import datasets

from dpo_lightning.data.chat import ChatRenderer, _messages
from dpo_lightning.data.formats import UNPAIRED, BadRow, check_load_error, detect_format, make_parser, string_field

SFTFormat = Literal["auto", "text", "messages", "explicit", "hh", "chat"]
SFTParser = Callable[[Mapping[str, Any]], tuple[str, str]]


def detect_sft_format(columns: list[str], features: datasets.Features | None, response_field: str = "text") -> str:
    """``messages`` for a ``messages`` column, ``text`` for a ``response_field`` column, else the preference format
    ``formats.detect_format`` finds (unpaired rows are not SFT data: an error)."""
    if "messages" in columns:
        return "messages"
    if response_field in columns:
        return "text"
    try:
        fmt = detect_format(columns, features)
    except ValueError:
        raise ValueError(
            f"cannot tell the SFT data format from columns {sorted(columns)}: expected {{{response_field}}} (text, "
            "the field is data.response_field), {messages} (chat conversations) or preference pairs (explicit, hh, "
            "chat); set data.format, or map other names with data.columns"
        ) from None
    if fmt == UNPAIRED:
        raise ValueError("unpaired {prompt, completion, label} rows are KTO data, not SFT data; use data.format text")
    return fmt


def parse_messages(row: Mapping[str, Any], renderer: ChatRenderer, max_chars: int | None = None) -> tuple[str, str]:
    """``{messages}`` -> (rendered conversation before the last message + generation prompt, last assistant turn)."""
    check_load_error(row)
    messages = _messages(row.get("messages"), "messages", max_chars)
    if messages[-1]["role"] != "assistant":
        raise BadRow("no_assistant_turn", "messages", "the conversation does not end with an assistant message")
    if not messages[-1]["content"].strip():
        raise BadRow("empty_response", "messages", "the last assistant message is empty")
    if len(messages) < 2:
        raise BadRow("missing_field", "messages", "the conversation has no message before the assistant's answer")
    return renderer.render(messages[:-1], messages[-1:])


def make_sft_parser(
    fmt: str,
    *,
    renderer: ChatRenderer | None = None,
    response_field: str = "text",
    prompt_field: str | None = None,
    max_chars: int | None = None,
) -> SFTParser:
    """The (prompt, response) parser of an SFT format; ``messages`` and ``chat`` need a ``ChatRenderer``."""
    if fmt == "text":

        def parse_text(row: Mapping[str, Any]) -> tuple[str, str]:
            check_load_error(row)
            prompt = string_field(row, prompt_field, allow_empty=True, max_chars=max_chars) if prompt_field else ""
            return prompt, string_field(row, response_field, max_chars=max_chars)

        return parse_text
    if fmt == "messages":
        if renderer is None:
            raise ValueError("the messages format needs a ChatRenderer")
        return lambda row: parse_messages(row, renderer, max_chars)
    if fmt == UNPAIRED:
        raise ValueError("data.format unpaired is KTO data, not SFT data; use text, messages, explicit, hh or chat")
    pair = make_parser(fmt, renderer=renderer, max_chars=max_chars)  # ValueError names the formats for a wrong one
    return lambda row: pair(row)[:2]  # (prompt, chosen)
