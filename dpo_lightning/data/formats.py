"""Row formats: turn one raw record into a (prompt, chosen, rejected) triple of strings, or say why not.

Formats:
- ``explicit``: ``{prompt, chosen, rejected}`` strings.
- ``hh``: Anthropic HH-RLHF transcripts ``{chosen, rejected}``, each the full ``\\n\\nHuman: … \\n\\nAssistant: …``
  dialogue. The prompt is the text up to and including the last ``\\n\\nAssistant:`` of ``chosen``; ``rejected``
  must start with that same prompt (when it does not, the two transcripts diverge before the last assistant
  turn and the pair is not a preference over one prompt).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

FormatName = Literal["auto", "explicit", "hh"]
HH_ASSISTANT = "\n\nAssistant:"


class BadRow(ValueError):
    """A record that cannot become a preference pair. ``kind`` is a stable name used in counts and audits."""

    def __init__(self, kind: str, field: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.field = field
        self.message = message


def _string_field(row: Mapping[str, Any], field: str, *, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        raise BadRow("missing_field", field, f"field {field!r} is missing or null")
    value = row[field]
    if not isinstance(value, str):
        raise BadRow("not_a_string", field, f"field {field!r} should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow("empty_response", field, f"field {field!r} is empty")
    return value


def _check_responses(chosen: str, rejected: str) -> None:
    if chosen == rejected:
        raise BadRow("identical_responses", "chosen", "chosen and rejected are identical (zero gradient)")


def parse_explicit(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """``{prompt, chosen, rejected}`` -> (prompt, chosen, rejected). The prompt may be empty."""
    prompt = _string_field(row, "prompt", allow_empty=True)
    chosen = _string_field(row, "chosen")
    rejected = _string_field(row, "rejected")
    _check_responses(chosen, rejected)
    return prompt, chosen, rejected


def split_hh(transcript: str) -> tuple[str, str]:
    """Split an HH transcript at its last assistant turn: (prompt ending in ``\\n\\nAssistant:``, response)."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("no_assistant_turn", "chosen", "transcript has no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def parse_hh(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """``{chosen, rejected}`` HH transcripts -> (shared prompt, chosen response, rejected response)."""
    chosen_text = _string_field(row, "chosen")
    rejected_text = _string_field(row, "rejected")
    prompt, chosen = split_hh(chosen_text)
    if HH_ASSISTANT not in rejected_text:
        raise BadRow("no_assistant_turn", "rejected", "transcript has no '\\n\\nAssistant:' turn")
    if not rejected_text.startswith(prompt):
        raise BadRow(
            "hh_prompt_mismatch",
            "rejected",
            "rejected does not start with the chosen transcript's prompt (the dialogues diverge before "
            "the last assistant turn)",
        )
    rejected = rejected_text[len(prompt) :]
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRow("empty_response", field, f"the last assistant turn of {field!r} is empty")
    _check_responses(chosen, rejected)
    return prompt, chosen, rejected


PARSERS = {"explicit": parse_explicit, "hh": parse_hh}


def detect_format(columns: list[str]) -> str:
    """Pick the format from a dataset's column names, or raise ``ValueError`` saying what was expected."""
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return "explicit"
    if {"chosen", "rejected"} <= cols:
        return "hh"
    raise ValueError(
        f"cannot tell the data format from columns {sorted(cols)}: expected {{prompt, chosen, rejected}} "
        "(explicit) or {chosen, rejected} (HH transcripts)"
    )
