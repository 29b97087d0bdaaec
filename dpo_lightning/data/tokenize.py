"""Tokenize preference pairs and collate them into one concatenated batch.

Prompt and responses are tokenized separately and then concatenated, so the boundary between them is exact
(tokenizing ``prompt + response`` as one string can merge the last prompt token with the first response
token, and the response would bleed into the prompt). The prompt gets the tokenizer's own special tokens (a
BOS for tokenizers that use one, never a trailing EOS, and one BOS even when a chat template already wrote
one); each response gets none, and then exactly one EOS at its end.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, Literal

import torch
from datasets.fingerprint import Hasher

from dpo_lightning.data.formats import BadRow
from dpo_lightning.logps import IGNORE_INDEX

TruncationMode = Literal["keep_end", "keep_start"]
# per-pair statistics written next to the ids (read by the audit and the length-grouped sampler)
STAT_COLUMNS = (
    "prompt_tokens",  # before truncation
    "chosen_tokens",
    "rejected_tokens",
    "prompt_len",  # after truncation
    "chosen_len",
    "rejected_len",
    "identical",  # chosen == rejected after truncation: zero gradient
)
BAD_COLUMNS = ("bad_kind", "bad_field", "bad_message")


def prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's leading special tokens (BOS), never a trailing EOS.

    A prompt whose text already starts with the BOS token (chat templates often write ``{{ bos_token }}``)
    would get a second one from the tokenizer; one is dropped.
    """
    ids = tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    out = []
    for seq in ids:
        if eos is not None and seq and seq[-1] == eos and (eos != bos or len(seq) > 1):
            seq = seq[:-1]
        if bos is not None and len(seq) >= 2 and seq[0] == bos and seq[1] == bos:
            seq = seq[1:]
        out.append(seq)
    return out


def response_ids(tokenizer: Any, responses: list[str]) -> list[list[int]]:
    """Token ids of each response, no special tokens, then exactly one EOS (an EOS written in the text is
    not doubled)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one so responses can be terminated")
    out = []
    for seq in tokenizer(responses, add_special_tokens=False, verbose=False)["input_ids"]:
        while seq and seq[-1] == eos:
            seq = seq[:-1]
        out.append(seq + [eos])
    return out


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode = "keep_end",
) -> tuple[list[int], list[int], list[int]]:
    """Fit prompt + the longer response into ``max_length`` tokens.

    First the prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its last tokens, right for dialogue
    where the last turns matter; ``keep_start`` its first), then, if still too long, both responses are cut at
    their end to ``max_length − len(prompt)``. A response cut this way loses its EOS, as it should: it did not
    end there.
    """
    if len(prompt) + max(len(chosen), len(rejected)) > max_length and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if truncation_mode == "keep_end" else prompt[:max_prompt_length]
    budget = max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget]


def tokenize_rows(
    rows: dict[str, list],
    indices: list[int],
    *,
    parse: Callable[[dict[str, Any]], tuple[str, str, str]],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode,
    calls: list[int] | None = None,
) -> dict[str, list]:
    """The batched ``datasets.map`` function: raw records -> ids, per-pair statistics and bad-row columns.

    A record that ``parse`` rejects keeps its place (so row numbers stay those of the file) with its
    ``bad_kind``/``bad_field``/``bad_message`` set; the caller drops or reports it. ``calls`` counts the
    batches actually tokenized, so a caller can tell a cache hit (no call) from a fresh run.
    """
    if calls is not None:
        calls[0] += 1
    keys = list(rows)
    out: dict[str, list] = collections.defaultdict(list)
    triples = []
    for i in range(len(indices)):
        row = {k: rows[k][i] for k in keys}
        try:
            triples.append(parse(row))
            bad = ("", "", "")
        except BadRow as err:
            triples.append(("", "x", "y"))  # placeholder, dropped after the map
            bad = (err.kind, err.field, err.message)
        for column, value in zip(BAD_COLUMNS, bad, strict=True):
            out[column].append(value)
    prompts, chosens, rejecteds = (list(t) for t in zip(*triples, strict=True)) if triples else ([], [], [])
    p_ids = prompt_ids(tokenizer, prompts)
    c_ids = response_ids(tokenizer, chosens)
    r_ids = response_ids(tokenizer, rejecteds)
    for p, c, r, idx in zip(p_ids, c_ids, r_ids, indices, strict=True):
        tp, tc, tr = truncate_pair(
            p, c, r, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode
        )
        out["prompt_input_ids"].append(tp)
        out["chosen_input_ids"].append(tc)
        out["rejected_input_ids"].append(tr)
        out["index"].append(idx)
        for column, value in zip(
            STAT_COLUMNS, (len(p), len(c), len(r), len(tp), len(tc), len(tr), tc == tr), strict=True
        ):
            out[column].append(value)
    return dict(out)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes its ids: vocabulary, merges, normalisation,
    special tokens, chat template. Two loads of the same tokenizer directory hash equal."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else Hasher.hash(tokenizer),
        [getattr(tokenizer, f"{name}_token", None) for name in ("bos", "eos", "pad", "unk")],
        getattr(tokenizer, "chat_template", None),
    ]
    return Hasher.hash(parts)


class PairCollator:
    """Pad a list of tokenized pairs into one batch of 2B sequences: the B chosen, then the B rejected.

    Putting both halves in one tensor lets the model score them in one forward pass. Output keys:
    ``input_ids`` and ``attention_mask`` (2B, T); ``labels`` (2B, T) with prompt and padding set to
    ``IGNORE_INDEX``; ``index`` (B,) the dataset rows, for error messages.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, labels = [], []
        for key in ("chosen_input_ids", "rejected_input_ids"):
            for f in features:
                prompt, response = list(f["prompt_input_ids"]), list(f[key])
                sequences.append(prompt + response)
                labels.append([IGNORE_INDEX] * len(prompt) + response)
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            label_ids[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(seq)] = 1
        index = torch.tensor([int(f.get("index", -1)) for f in features], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids, "index": index}
