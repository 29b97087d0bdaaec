"""Tokenize preference pairs (or unpaired rows) and collate them into one concatenated batch.

Prompt and responses are tokenized separately and then concatenated, so the boundary between them is exact
(tokenizing ``prompt + response`` as one string can merge the last prompt token with the first response
token, and the response would bleed into the prompt). The prompt gets the tokenizer's own special tokens (a
BOS for tokenizers that use one, never a trailing EOS, and one BOS even when a chat template already wrote
one); each response gets none, and then exactly one EOS at its end.

Unpaired rows (``data.format: unpaired``, or pairs split by ``data.unpair``; for KTO) are tokenized the same way
by ``tokenize_unpaired_rows`` (the completion is a response) and collated by ``UnpairedCollator``.
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
# per-row statistics of unpaired rows: the completion takes the place of both responses
UNPAIRED_STAT_COLUMNS = (
    "prompt_tokens",  # before truncation
    "completion_tokens",
    "prompt_len",  # after truncation
    "completion_len",
    "identical",  # data.unpair only: the pair's two rows are identical after truncation (opposite labels, same text)
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


def truncate_row(
    prompt: list[int],
    completion: list[int],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode = "keep_end",
) -> tuple[list[int], list[int]]:
    """``truncate_pair``'s rule for one completion: prompt cut first (to ``max_prompt_length``, only when prompt +
    completion exceed ``max_length``), then the completion to what is left of ``max_length``."""
    prompt, completion, _ = truncate_pair(
        prompt,
        completion,
        completion,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
    )
    return prompt, completion


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


def tokenize_unpaired_rows(
    rows: dict[str, list],
    indices: list[int],
    *,
    parse: Callable[[dict[str, Any]], tuple[Any, ...]],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode,
    unpair: bool = False,
    calls: list[int] | None = None,
) -> dict[str, list]:
    """The batched ``datasets.map`` function of unpaired data: records -> unpaired rows with ids and statistics.

    ``parse`` gives (prompt, completion, label) per record (``data.format: unpaired``), or with ``unpair`` a
    pair's (prompt, chosen, rejected), which becomes two rows: (prompt, chosen, desirable) and (prompt, rejected,
    undesirable), as TRL's ``unpair_preference_dataset`` does. Each row is truncated on its own
    (``truncate_row``). Columns: ``prompt_input_ids``, ``completion_input_ids``, ``label`` (true = desirable),
    ``record`` (the source record), ``index`` (a row id unique in the split: the record, or with ``unpair``
    2·record for the desirable row and 2·record + 1 for the undesirable one; reference tables and error messages
    key on it), ``UNPAIRED_STAT_COLUMNS`` and ``BAD_COLUMNS``. A bad record becomes one placeholder row with its
    ``record`` and bad columns set, for the caller to report or drop (it may yield fewer rows than records, so
    rows are told apart by ``record``, not by position).
    """
    if calls is not None:
        calls[0] += 1
    keys = list(rows)
    out: dict[str, list] = collections.defaultdict(list)
    prompts: list[str] = []
    units: list[tuple[int, str, bool, int, int]] = []  # (prompt number, completion, label, index, record)
    for i, record in enumerate(indices):
        row = {k: rows[k][i] for k in keys}
        try:
            parsed = parse(row)
            bad = ("", "", "")
        except BadRow as err:
            parsed = ("", "x", "y") if unpair else ("", "x", False)  # placeholder, dropped after the map
            bad = (err.kind, err.field, err.message)
        prompts.append(parsed[0])
        if unpair:
            members = [(parsed[1], True, 2 * record), (parsed[2], False, 2 * record + 1)][: 1 if bad[0] else 2]
        else:
            members = [(parsed[1], bool(parsed[2]), record)]
        for completion, label, index in members:
            units.append((len(prompts) - 1, completion, label, index, record))
            for column, value in zip(BAD_COLUMNS, bad, strict=True):
                out[column].append(value)
    if not units:
        columns = ("prompt_input_ids", "completion_input_ids", "label", "index", "record")
        return {c: [] for c in (*columns, *UNPAIRED_STAT_COLUMNS, *BAD_COLUMNS)}
    p_ids = prompt_ids(tokenizer, prompts)
    c_ids = response_ids(tokenizer, [u[1] for u in units])
    truncated = []
    for (prompt_number, _, label, index, record), c in zip(units, c_ids, strict=True):
        p = p_ids[prompt_number]
        tp, tc = truncate_row(
            p, c, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode
        )
        truncated.append((tp, tc))
        out["prompt_input_ids"].append(tp)
        out["completion_input_ids"].append(tc)
        out["label"].append(label)
        out["index"].append(index)
        out["record"].append(record)
        for column, value in zip(UNPAIRED_STAT_COLUMNS[:4], (len(p), len(c), len(tp), len(tc)), strict=True):
            out[column].append(value)
        out["identical"].append(False)
    if unpair:  # the two rows of a pair, next to each other: identical after truncation?
        for j in range(len(units) - 1):
            if units[j][4] == units[j + 1][4] and units[j][2] and truncated[j] == truncated[j + 1]:
                out["identical"][j] = out["identical"][j + 1] = True
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
        rows = [
            (list(f["prompt_input_ids"]), list(f[key]))
            for key in ("chosen_input_ids", "rejected_input_ids")
            for f in features
        ]
        index = torch.tensor([int(f.get("index", -1)) for f in features], dtype=torch.long)
        return {**pad_rows(rows, self.pad_token_id), "index": index}


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """(prompt, response) id lists -> right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt and
    padding set to ``IGNORE_INDEX``), each (len(rows), longest row)."""
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    label_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
        label_ids[i, len(prompt) : n] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}


class UnpairedCollator:
    """Pad B unpaired rows into one batch of 2B sequences for KTO: the B matched rows, then B mismatched ones.

    Rows 0..B−1 are prompt_i + completion_i. Rows B..2B−1 are prompt_i + completion_{(i+1) mod B}: a completion
    that does not answer the prompt, from which the module estimates KTO's KL reference point z₀ ("mismatched
    pairs from the same batch", Ethayarajh et al. 2024, §4). With B = 1 the mismatched row is the matched row
    itself (there is no other completion in the batch), so z₀ then estimates the row's own KL term. The module
    scores both halves in one forward pass, as for pairs.

    A mismatched row can be longer than any row of the data (a long prompt with another row's long completion);
    with ``max_length`` set it is cut by the rule rows are cut by (``truncate_row``: the prompt first, to
    ``max_prompt_length``, then the completion), so no sequence exceeds ``max_length``.

    Output keys: ``input_ids``, ``attention_mask`` and ``labels`` (2B, T), labels with prompt and padding set to
    ``IGNORE_INDEX``; ``desirable`` (B,) bool, the rows' labels; ``index`` (B,) long, the rows' ids.
    """

    def __init__(
        self,
        pad_token_id: int,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        truncation_mode: TruncationMode = "keep_end",
    ):
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.max_prompt_length = max_length if max_prompt_length is None else max_prompt_length
        self.truncation_mode = truncation_mode

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(f["prompt_input_ids"]) for f in features]
        completions = [list(f["completion_input_ids"]) for f in features]
        n = len(features)
        mismatched = [(prompts[i], completions[(i + 1) % n]) for i in range(n)]
        if self.max_length is not None:
            mismatched = [
                truncate_row(
                    p,
                    c,
                    max_length=self.max_length,
                    max_prompt_length=self.max_prompt_length,
                    truncation_mode=self.truncation_mode,
                )
                for p, c in mismatched
            ]
        batch = pad_rows(list(zip(prompts, completions, strict=True)) + mismatched, self.pad_token_id)
        batch["desirable"] = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)
        batch["index"] = torch.tensor([int(f.get("index", -1)) for f in features], dtype=torch.long)
        return batch
