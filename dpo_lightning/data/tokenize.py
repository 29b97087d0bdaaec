"""Tokenize preference pairs (or unpaired rows) and collate them into one concatenated batch.

Response tokens are those of the whole text: ``prompt + response`` (or the rendered chat) is tokenized as one
string and cut at the prompt/response boundary (``joint_ids``). Tokenizing a response on its own is wrong for
SentencePiece/Metaspace tokenizers (Llama 2, Mistral, Gemma give it a dummy "▁" prefix it never has in context:
"\\n" + "Sure" is ``\\n``, ``Sure`` in context but ``▁Sure`` alone) and for any tokenizer whose pieces depend on
the text around them. The boundary, one documented rule for every family:

- the prompt's ids are the longest prefix that the prompt's own tokenization shares with the joint
  tokenizations of all its responses (chosen and rejected share it); the rest of each joint tokenization is
  that response. Where a tokenizer merges across the boundary ("Hello wor" + "ld" -> `` world``), the token
  across it goes to the response (it is scored), and the number of prompt tokens so moved is kept per pair
  (``boundary_moved``, counted by the audit), so prompt + response ids always equal the joint tokenization;
- BOS exactly once: the tokenizer's own special tokens lead (a BOS for tokenizers that add one), and a chat
  template that writes ``{{ bos_token }}`` as well does not make it two;
- a prompt with no tokens (an empty prompt with a tokenizer that adds no BOS, like GPT-2's or Qwen's) becomes
  one token, the BOS, or the EOS where there is no BOS (GPT-2 separates documents with it), so that something
  predicts the first response token and every response token is scored;
- each response ends with exactly one EOS (one written in the text, or added by the tokenizer, is not doubled);
- ``keep_end`` prompt truncation keeps a leading BOS (``truncate_pair``).

Unpaired rows (``data.format: unpaired``, or pairs split by ``data.unpair``; for KTO) are tokenized the same way
by ``tokenize_unpaired_rows`` (the completion is a response; the two rows of a pair share the pair's prompt
ids) and collated by ``UnpairedCollator``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, Literal

import torch

from dpo_lightning.data.formats import BadRow
from dpo_lightning.errors import ConfigError
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
    "boundary_moved",  # prompt tokens merged across the boundary into the responses (joint_ids)
)
# per-row statistics of unpaired rows: the completion takes the place of both responses
UNPAIRED_STAT_COLUMNS = (
    "prompt_tokens",  # before truncation
    "completion_tokens",
    "prompt_len",  # after truncation
    "completion_len",
    "identical",  # data.unpair only: the pair's two rows are identical after truncation (opposite labels, same text)
    "boundary_moved",  # prompt tokens merged across the boundary into the completion (joint_ids)
)
BAD_COLUMNS = ("bad_kind", "bad_field", "bad_message")


def prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt on its own with the tokenizer's leading special tokens (BOS), never a trailing EOS
    (what a generation prompt is; pairs and rows cut their prompt from the joint tokenization, ``joint_ids``).

    A prompt whose text already starts with the BOS token (chat templates often write ``{{ bos_token }}``)
    would get a second one from the tokenizer; one is dropped.
    """
    eos = tokenizer.eos_token_id
    out = []
    for seq in _encode(tokenizer, prompts):
        if eos is not None and seq and seq[-1] == eos and (eos != tokenizer.bos_token_id or len(seq) > 1):
            seq = seq[:-1]
        out.append(seq)
    return out


def response_ids(tokenizer: Any, responses: list[str]) -> list[list[int]]:
    """Token ids of each text tokenized on its own, no special tokens, then exactly one EOS. Right only for a text
    that nothing precedes in a byte-level tokenizer; a response that follows a prompt takes ``joint_ids``."""
    eos = _eos(tokenizer)
    return [
        _strip_eos(seq, eos) + [eos]
        for seq in tokenizer(responses, add_special_tokens=False, verbose=False)["input_ids"]
    ]


def joint_ids(
    tokenizer: Any, prompts: list[str], responses: list[list[str]]
) -> list[tuple[list[int], list[list[int]], int]]:
    """Per prompt and its responses (one, or chosen and rejected): (prompt ids, each response's ids ending in one
    EOS, prompt tokens the boundary moved into the responses). ``prompt ids + response ids`` is the tokenization of
    ``prompt + response`` (BOS once, trailing EOS made one; an empty prompt's one start token before it where the
    tokenizer writes no BOS); the rule is in the module docstring."""
    eos = _eos(tokenizer)
    alone = prompt_ids(tokenizer, prompts)
    joint = iter(_encode(tokenizer, [p + r for p, rs in zip(prompts, responses, strict=True) for r in rs]))
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    out = []
    for prompt, rs in zip(alone, responses, strict=True):
        full = [next(joint) for _ in rs]
        cut = len(prompt)
        for seq in full:
            cut = next(
                (i for i, (a, b) in enumerate(zip(prompt[:cut], seq, strict=False)) if a != b), min(cut, len(seq))
            )
        head = prompt[:cut] or [start]  # an empty prompt: a token that predicts the first response token
        out.append((head, [_strip_eos(seq[cut:], eos) + [eos] for seq in full], len(prompt) - cut))
    return out


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Ids with the tokenizer's special tokens, a BOS doubled by a template that writes one too made one."""
    bos = tokenizer.bos_token_id
    out: list[list[int]] = []
    for seq in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else []:  # [] raises
        if bos is not None and len(seq) >= 2 and seq[0] == bos and seq[1] == bos:
            seq = seq[1:]
        out.append(seq)
    return out


def _eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos_token; set one so responses can be terminated")
    return tokenizer.eos_token_id


def _strip_eos(seq: list[int], eos: int) -> list[int]:
    while seq and seq[-1] == eos:
        seq = seq[:-1]
    return seq


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode = "keep_end",
    bos_token_id: int | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Fit prompt + the longer response into ``max_length`` tokens.

    First the prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its last tokens, right for dialogue
    where the last turns matter, after its first token when that is ``bos_token_id``; ``keep_start`` its first),
    then, if still too long, both responses are cut at their end to ``max_length − len(prompt)``. A response cut
    this way loses its EOS, as it should: it did not end there.
    """
    if len(prompt) + max(len(chosen), len(rejected)) > max_length and len(prompt) > max_prompt_length:
        if truncation_mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        elif bos_token_id is not None and prompt[0] == bos_token_id:
            prompt = prompt[:1] + prompt[len(prompt) - max_prompt_length + 1 :]
        else:
            prompt = prompt[-max_prompt_length:]
    budget = max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget]


def truncate_row(
    prompt: list[int],
    completion: list[int],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode = "keep_end",
    bos_token_id: int | None = None,
) -> tuple[list[int], list[int]]:
    """``truncate_pair``'s rule for one completion: prompt cut first (to ``max_prompt_length``, only when prompt +
    completion exceed ``max_length``; ``keep_end`` keeps a leading ``bos_token_id``), then the completion to what
    is left of ``max_length``."""
    prompt, completion, _ = truncate_pair(
        prompt,
        completion,
        completion,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        bos_token_id=bos_token_id,
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
    encoded = joint_ids(tokenizer, prompts, [[c, r] for c, r in zip(chosens, rejecteds, strict=True)])
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length, "truncation_mode": truncation_mode}
    for (p, (c, r), moved), idx in zip(encoded, indices, strict=True):
        tp, tc, tr = truncate_pair(p, c, r, **limits, bos_token_id=tokenizer.bos_token_id)
        out["prompt_input_ids"].append(tp)
        out["chosen_input_ids"].append(tc)
        out["rejected_input_ids"].append(tr)
        out["index"].append(idx)
        for column, value in zip(
            STAT_COLUMNS, (len(p), len(c), len(r), len(tp), len(tc), len(tr), tc == tr, moved), strict=True
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
    completions: list[list[str]] = [[] for _ in prompts]  # the rows of one record share its prompt ids
    for unit in units:
        completions[unit[0]].append(unit[1])
    encoded = joint_ids(tokenizer, prompts, completions)
    c_ids = [c for _, cs, _ in encoded for c in cs]  # in the order of units
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length, "truncation_mode": truncation_mode}
    truncated = []
    for (prompt_number, _, label, index, record), c in zip(units, c_ids, strict=True):
        p, _, moved = encoded[prompt_number]
        tp, tc = truncate_row(p, c, **limits, bos_token_id=tokenizer.bos_token_id)
        truncated.append((tp, tc))
        out["prompt_input_ids"].append(tp)
        out["completion_input_ids"].append(tc)
        out["label"].append(label)
        out["index"].append(index)
        out["record"].append(record)
        for column, value in zip(UNPAIRED_STAT_COLUMNS[:4], (len(p), len(c), len(tp), len(tc)), strict=True):
            out[column].append(value)
        out["identical"].append(False)
        out["boundary_moved"].append(moved)
    if unpair:  # the two rows of a pair, next to each other: identical after truncation?
        for j in range(len(units) - 1):
            if units[j][4] == units[j + 1][4] and units[j][2] and truncated[j] == truncated[j + 1]:
                out["identical"][j] = out["identical"][j + 1] = True
    return dict(out)


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
    ``max_prompt_length``, keeping a leading ``bos_token_id``, then the completion), so no sequence exceeds
    ``max_length``.

    Output keys: ``input_ids``, ``attention_mask`` and ``labels`` (2B, T), labels with prompt and padding set to
    ``IGNORE_INDEX``; ``desirable`` (B,) bool, the rows' labels; ``index`` (B,) long, the rows' ids.
    """

    def __init__(
        self,
        pad_token_id: int,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        truncation_mode: TruncationMode = "keep_end",
        bos_token_id: int | None = None,
    ):
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.max_length = max_length
        self.max_prompt_length = max_length if max_prompt_length is None else max_prompt_length
        self.truncation_mode = truncation_mode

    def rows(self, features: list[dict[str, Any]]) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]]:
        """The 2B (prompt, completion) rows, matched then mismatched, and ``desirable`` (B,): what ``__call__``
        pads, and what ``packing.LayoutCollator`` packs."""
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
                    bos_token_id=self.bos_token_id,
                )
                for p, c in mismatched
            ]
        desirable = torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool)
        return list(zip(prompts, completions, strict=True)) + mismatched, {"desirable": desirable}

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows, extra = self.rows(features)
        batch = {**pad_rows(rows, self.pad_token_id), **extra}
        batch["index"] = torch.tensor([int(f.get("index", -1)) for f in features], dtype=torch.long)
        return batch
