"""Row formats: turn one raw record into a (prompt, chosen, rejected) triple of strings, or a (prompt, completion,
label) row of unpaired data, or say why not.

Formats (``data.format``; ``auto`` picks one from the column names and types, see ``detect_format``):

- ``explicit``: ``{prompt, chosen, rejected}`` strings.
- ``hh``: Anthropic HH-RLHF transcripts ``{chosen, rejected}``, each the full ``\\n\\nHuman: … \\n\\nAssistant: …``
  dialogue. The prompt is the text up to and including the last ``\\n\\nAssistant:`` of ``chosen``; ``rejected``
  must start with that same prompt (when it does not, the two transcripts diverge before the last assistant
  turn and the pair is not a preference over one prompt).
- ``chat``: conversational rows, ``chosen``/``rejected`` lists of ``{role, content}`` messages and ``prompt`` a
  message list, a string, or absent (UltraFeedback-binarized style); rendered to text by ``chat.ChatRenderer``.
- ``unpaired``: ``{prompt, completion, label}`` rows of unpaired preference data (KTO): ``completion`` a string,
  ``label`` a JSON boolean or the number 0/1 (true/1 = desirable). Paired data of the other formats is split into
  such rows by ``data.unpair`` (one desirable row per chosen, one undesirable per rejected).

Any other column names are mapped onto these with ``data.columns`` (``{prompt: instruction, chosen: better,
rejected: worse}``, or ``{completion: response, label: thumbs_up}``), applied by ``apply_columns`` before the
format is detected.

A record that cannot become a pair (or an unpaired row) raises ``BadRow`` with a stable ``kind`` (counted by the
audit), the ``field`` at fault and a message. Problems found while reading a file (malformed JSON, bytes that are not
UTF-8) arrive here as a ``LOAD_ERROR`` column set by ``sources`` so that they are counted the same way.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal

import datasets

FormatName = Literal["auto", "explicit", "hh", "chat", "unpaired"]
Parser = Callable[[Mapping[str, Any]], tuple[Any, ...]]  # (prompt, chosen, rejected) or (prompt, completion, label)
PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")
FIELDS = (*PAIRED_FIELDS, "completion", "label")  # the names data.columns may map onto
UNPAIRED = "unpaired"
HH_ASSISTANT = "\n\nAssistant:"
LOAD_ERROR = "_load_error"  # "kind\tfield\tmessage" for records that could not be read (see sources.py)


class BadRow(ValueError):
    """A record that cannot become a preference pair. ``kind`` is a stable name used in counts and audits."""

    def __init__(self, kind: str, field: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.field = field
        self.message = message


def check_length(field: str, value: str, max_chars: int | None) -> None:
    """Reject a runaway field (a whole file pasted into one record) before it is tokenized."""
    if max_chars is not None and len(value) > max_chars:
        raise BadRow(
            "too_long",
            field,
            f"field {field!r} holds {len(value):,} characters, more than data.max_field_chars ({max_chars:,}); "
            "raise data.max_field_chars if such long texts are intended",
        )


def string_field(row: Mapping[str, Any], field: str, *, allow_empty: bool = False, max_chars: int | None = None) -> str:
    """``row[field]`` as a non-empty string, or ``BadRow`` saying what is wrong with it."""
    if field not in row or row[field] is None:
        raise BadRow("missing_field", field, f"field {field!r} is missing or null")
    value = row[field]
    if not isinstance(value, str):
        raise BadRow("not_a_string", field, f"field {field!r} should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow("empty_response", field, f"field {field!r} is empty")
    check_length(field, value, max_chars)
    return value


def check_responses(chosen: Any, rejected: Any) -> None:
    if chosen == rejected:
        raise BadRow("identical_responses", "chosen", "chosen and rejected are identical (zero gradient)")


def check_load_error(row: Mapping[str, Any]) -> None:
    """Re-raise a problem found while reading the file (the record's other fields are null)."""
    error = row.get(LOAD_ERROR)
    if error:
        kind, field, message = error.split("\t", 2)
        raise BadRow(kind, field, message)


def parse_explicit(row: Mapping[str, Any], max_chars: int | None = None) -> tuple[str, str, str]:
    """``{prompt, chosen, rejected}`` -> (prompt, chosen, rejected). The prompt may be empty."""
    check_load_error(row)
    prompt = string_field(row, "prompt", allow_empty=True, max_chars=max_chars)
    chosen = string_field(row, "chosen", max_chars=max_chars)
    rejected = string_field(row, "rejected", max_chars=max_chars)
    check_responses(chosen, rejected)
    return prompt, chosen, rejected


def split_hh(transcript: str, field: str = "chosen") -> tuple[str, str]:
    """Split an HH transcript at its last assistant turn: (prompt ending in ``\\n\\nAssistant:``, response)."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("no_assistant_turn", field, "transcript has no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def parse_hh(row: Mapping[str, Any], max_chars: int | None = None) -> tuple[str, str, str]:
    """``{chosen, rejected}`` HH transcripts -> (shared prompt, chosen response, rejected response)."""
    check_load_error(row)
    chosen_text = string_field(row, "chosen", max_chars=max_chars)
    rejected_text = string_field(row, "rejected", max_chars=max_chars)
    prompt, chosen = split_hh(chosen_text, "chosen")
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
    check_responses(chosen, rejected)
    return prompt, chosen, rejected


def label_field(row: Mapping[str, Any], field: str = "label") -> bool:
    """``row[field]`` as a bool: a JSON boolean, or the number 0 or 1 (true/1 = desirable); else ``BadRow``.

    Numbers are compared by value because a column of 0/1 that also holds one 0.5 is read as floats (1.0, 0.0).
    Strings ("true", "yes") are refused: their meaning is a guess. (In a JSON column whose records mix types,
    ``datasets`` itself decodes the strings "true"/"1" to true/1 before they get here.)
    """
    if field not in row or row[field] is None:
        raise BadRow("missing_field", field, f"field {field!r} is missing or null")
    value = row[field]
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and value in (0, 1):
        return bool(value)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise BadRow(
        "bad_label",
        field,
        f"field {field!r} should be true/false or 1/0 (desirable/undesirable), got {type(value).__name__} {shown}",
    )


def parse_unpaired(row: Mapping[str, Any], max_chars: int | None = None) -> tuple[str, str, bool]:
    """``{prompt, completion, label}`` -> (prompt, completion, desirable). The prompt may be empty."""
    check_load_error(row)
    prompt = string_field(row, "prompt", allow_empty=True, max_chars=max_chars)
    completion = string_field(row, "completion", max_chars=max_chars)
    return prompt, completion, label_field(row)


PARSERS: dict[str, Parser] = {"explicit": parse_explicit, "hh": parse_hh, UNPAIRED: parse_unpaired}


def make_parser(fmt: str, *, renderer: Any = None, max_chars: int | None = None) -> Parser:
    """The row parser of a format; ``chat`` needs a ``chat.ChatRenderer``, whose ``parse`` it calls (this module
    does not import ``chat``, which builds on it)."""
    if fmt == "chat":
        if renderer is None:
            raise ValueError("the chat format needs a ChatRenderer")
        return lambda row: renderer.parse(row, max_chars=max_chars)
    if fmt not in PARSERS:
        raise ValueError(f"unknown data format {fmt!r}; use one of auto, {', '.join([*PARSERS, 'chat'])}")
    parse = PARSERS[fmt]
    return lambda row: parse(row, max_chars=max_chars)


def _is_list(feature: Any) -> bool:
    return isinstance(feature, list | datasets.List | datasets.Sequence | datasets.LargeList)


def detect_format(columns: list[str], features: datasets.Features | None = None) -> str:
    """Pick the format from a dataset's columns (and their types), or raise ``ValueError`` saying what was expected.

    Message lists in ``chosen`` mean ``chat``; strings with a ``prompt`` column mean ``explicit``, without one
    ``hh``; ``{prompt, completion, label}`` means ``unpaired`` (columns of both kinds: ambiguous, an error).
    Columns whose types vary from record to record (``datasets`` reads them as JSON) count as strings.
    """
    cols = set(columns) - {LOAD_ERROR}
    paired, unpaired = {"chosen", "rejected"} <= cols, set(UNPAIRED_FIELDS) <= cols
    if paired and unpaired:
        raise ValueError(
            f"columns {sorted(cols)} hold both a pair (chosen, rejected) and an unpaired row (prompt, completion, "
            "label); set data.format (explicit, hh, chat or unpaired) to say which"
        )
    if unpaired:
        return UNPAIRED
    if paired:
        if features is not None and _is_list(features.get("chosen")):
            return "chat"
        return "explicit" if "prompt" in cols else "hh"
    raise ValueError(
        f"cannot tell the data format from columns {sorted(cols)}: expected {{prompt, chosen, rejected}} "
        "(explicit, or chat when they hold message lists), {chosen, rejected} (HH transcripts) or {prompt, "
        "completion, label} (unpaired); map other names with data.columns, e.g. {prompt: instruction, chosen: "
        "better, rejected: worse} or {completion: response, label: thumbs_up}"
    )


def apply_columns(dataset: datasets.Dataset, columns: Mapping[str, str] | None, where: str) -> datasets.Dataset:
    """Rename the user's columns to ``prompt``/``chosen``/``rejected`` or ``prompt``/``completion``/``label``
    (``columns`` maps ours -> theirs).

    Other columns that would clash with the new names are dropped first; a mapped column that does not exist is
    an error naming the columns there are.
    """
    if not columns:
        return dataset
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise ValueError(f"data.columns keys must be among {', '.join(FIELDS)}; got {', '.join(unknown)}")
    missing = [src for src in columns.values() if src not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{where}: data.columns maps to column {missing[0]!r}, which is not there; the columns are "
            f"{', '.join(dataset.column_names)}"
        )
    renames = {src: ours for ours, src in columns.items() if src != ours}
    clashes = [c for c in renames.values() if c in dataset.column_names and c not in renames]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns(renames) if renames else dataset
