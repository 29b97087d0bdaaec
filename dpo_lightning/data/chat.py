"""Conversational preference rows: lists of ``{role, content}`` messages -> (prompt, chosen, rejected) text.

A row holds ``chosen`` and ``rejected`` message lists and, optionally, a ``prompt`` (a message list or a plain
string, taken as one user message). The prompt is the shared conversation before the assistant's answer:

- with a ``prompt``, chosen/rejected may repeat it at their start (UltraFeedback-binarized does) and it is
  stripped; what remains is the response;
- without one, the prompt is every message but the last, and chosen and rejected must agree on it.

The prompt ends with the template's generation prompt and the response is the assistant turn that follows, so
``prompt + response`` is the rendered conversation and only the assistant part is trained on. Rendering uses
the tokenizer's chat template when it has one (or ``data.chat_template``, a Jinja template), else the plain
``data.chat_turn`` template, ``"\\n\\n{role}: {content}"`` by default (``User``/``Assistant``, HH-like).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpo_lightning.data.formats import BadRow, check_length, check_load_error, check_responses

ROLES = ("system", "user", "assistant", "tool")
PLAIN_TURN = "\n\n{role}: {content}"


def _messages(value: Any, field: str, max_chars: int | None) -> list[dict[str, str]]:
    if value is None:
        raise BadRow("missing_field", field, f"field {field!r} is missing or null")
    if not isinstance(value, list) or not value:
        raise BadRow("not_a_message_list", field, f"field {field!r} should be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise BadRow("bad_message", where, f"message {where} should be a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRow(
                "unknown_role", f"{where}.role", f"message {where} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise BadRow("bad_message", f"{where}.content", f"message {where} has no string 'content'")
        check_length(f"{where}.content", content, max_chars)
        out.append({"role": role, "content": content})
    return out


def split_conversation(
    row: Mapping[str, Any], max_chars: int | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt messages, chosen response messages, rejected response messages), or ``BadRow``."""
    check_load_error(row)
    chosen = _messages(row.get("chosen"), "chosen", max_chars)
    rejected = _messages(row.get("rejected"), "rejected", max_chars)
    prompt_value = row.get("prompt")
    if prompt_value is None:
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            raise BadRow(
                "chat_prompt_mismatch",
                "rejected",
                "chosen and rejected differ before their last message, so they do not answer one prompt",
            )
    elif isinstance(prompt_value, str):
        check_length("prompt", prompt_value, max_chars)
        prompt = [{"role": "user", "content": prompt_value}]
    else:
        prompt = _messages(prompt_value, "prompt", max_chars)
    responses = []
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        response = messages[len(prompt) :] if messages[: len(prompt)] == prompt else messages
        if not response or response[0]["role"] != "assistant":
            raise BadRow(
                "no_assistant_turn", field, f"{field!r} has no assistant message after the prompt to learn from"
            )
        if not response[-1]["content"].strip():
            raise BadRow("empty_response", field, f"the last assistant message of {field!r} is empty")
        responses.append(response)
    if not prompt:
        raise BadRow("missing_field", "prompt", "the conversation has no prompt (no message before the answer)")
    check_responses(responses[0], responses[1])
    return prompt, responses[0], responses[1]


class ChatRenderer:
    """Render a prompt and a response as text whose concatenation is the whole conversation.

    Args:
        tokenizer: its ``chat_template`` is used when it has one (and ``template`` is ``None``).
        template: ``None`` (the tokenizer's template, else plain), ``"plain"``, or a Jinja chat template.
        plain_turn: the plain template of one turn, with ``{role}`` (capitalised) and ``{content}``.
    """

    def __init__(self, tokenizer: Any, template: str | None = None, plain_turn: str = PLAIN_TURN):
        if "{content}" not in plain_turn or "{role}" not in plain_turn:
            raise ValueError(f"data.chat_turn must contain {{role}} and {{content}}, got {plain_turn!r}")
        self.tokenizer = tokenizer
        self.plain_turn = plain_turn
        own = getattr(tokenizer, "chat_template", None)
        self.template = None if template == "plain" else (template or own)
        eos = getattr(tokenizer, "eos_token", None)
        self.eos_text = eos if isinstance(eos, str) and eos else None

    @property
    def mode(self) -> str:
        return "plain" if self.template is None else "template"

    def _turn(self, message: Mapping[str, str]) -> str:
        return self.plain_turn.format(role=message["role"].capitalize(), content=message["content"])

    def parse(self, row: Mapping[str, Any], max_chars: int | None = None) -> tuple[str, str, str]:
        """A conversational row -> (prompt, chosen, rejected) text (``parse_chat`` with this renderer)."""
        return parse_chat(row, self, max_chars)

    def render(self, prompt: list[dict[str, str]], response: list[dict[str, str]]) -> tuple[str, str]:
        if self.template is None:
            head = self.plain_turn.split("{content}")[0].format(role="Assistant")
            generation = head.rstrip()  # the space before the answer belongs to the answer, as in HH
            first = head[len(generation) :] + response[0]["content"]
            return "".join(map(self._turn, prompt)) + generation, first + "".join(map(self._turn, response[1:]))
        apply = self.tokenizer.apply_chat_template
        try:
            prompt_text = apply(prompt, chat_template=self.template, tokenize=False, add_generation_prompt=True)
            full = apply(prompt + response, chat_template=self.template, tokenize=False)
        except Exception as err:  # noqa: BLE001 - Jinja raises many types; name the template failure
            raise BadRow("chat_template_error", "chosen", f"the chat template failed: {err}") from None
        if not full.startswith(prompt_text):
            raise BadRow(
                "chat_template_mismatch",
                "chosen",
                "the chat template renders the conversation so that it does not start with the rendered prompt "
                "(set data.chat_template to a template whose generation prompt is a prefix of the answer)",
            )
        response_text = full[len(prompt_text) :]
        stripped = response_text.rstrip()
        if self.eos_text and stripped.endswith(self.eos_text):
            response_text = stripped[: -len(self.eos_text)]  # the tokenizer stage appends EOS exactly once
        return prompt_text, response_text


def parse_chat(row: Mapping[str, Any], renderer: ChatRenderer, max_chars: int | None = None) -> tuple[str, str, str]:
    """A conversational row -> (prompt, chosen, rejected) text, rendered by ``renderer``."""
    prompt, chosen, rejected = split_conversation(row, max_chars)
    prompt_text, chosen_text = renderer.render(prompt, chosen)
    prompt_again, rejected_text = renderer.render(prompt, rejected)
    if prompt_again != prompt_text:  # a template that looks at the answer when rendering the prompt
        raise BadRow("chat_template_mismatch", "rejected", "the chat template renders the prompt differently")
    return prompt_text, chosen_text, rejected_text
