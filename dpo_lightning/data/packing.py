"""Padding-free and prompt-shared batches: the 2B sequences of a batch laid out in rows, scored by explicit triples.

    dpo-lightning fit --config experiments/tiny_cpu.yaml --data.packing true --data.share_prompt true

The padded batch (``tokenize.PairCollator``) holds the B chosen and the B rejected sequences, each prompt +
response, one per row, right-padded to the longest. Two layouts remove work from it:

- ``packing``: sequences are bin-packed (first-fit decreasing, deterministic) into rows whose capacity is the
  longest sequence of the batch, so short ones share a row instead of padding to the long one. Capacity stays that
  of the longest sequence (not one row of the whole batch): attention with a dense mask costs the square of a row.
- ``share_prompt``: a pair is one unit [prompt | chosen | rejected]; the rejected tokens' position ids continue
  from the prompt's end (P..P+R-1, what the padded row gives them) and they attend to the prompt and to
  themselves, never to the chosen. The prompt is computed once per pair. Without ``packing`` a unit is one row.

A laid-out batch is described by per-token ids, from which the model side (``logps.layout_inputs``) builds the
attention mask: query q attends key k iff they are in the same row and ``group``, k ≤ q, and ``branch[k]`` is 0
(prompt, or any token of a plain sequence) or equal to ``branch[q]`` (1 chosen, 2 rejected). Scoring does not
shift labels by one (the first rejected token is predicted from the last prompt position, not from the token
before it in the row): each scored token is a triple (``score_source``: flat index into R·L of the position whose
logits predict it, ``score_target``: the token, ``score_sequence``: chosen i → i, rejected i → B + i).

Keys of a laid-out batch (R rows of L tokens, N scored tokens, B pairs):
``input_ids``, ``position_ids``, ``group_ids``, ``branch_ids`` (R, L) long (padding: group −1, branch 0, position
0, the pad token); ``score_source``, ``score_target``, ``score_sequence`` (N,); ``response_lengths`` (2B,);
``real_tokens`` () the tokens of chosen + rejected with the prompt counted in both (the padded batch's
``attention_mask.sum()``); ``index`` (B,); unpaired rows (packing only) also ``desirable`` (B,). A batch is a
laid-out one iff it has ``score_source`` (:func:`is_laid_out`); the module dispatches on that, not on flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_lightning.errors import ConfigError

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # branch ids
PAD_GROUP = -1


def is_laid_out(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` is a packed / prompt-shared one (scored by triples) rather than a padded one."""
    return "score_source" in batch


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens of chosen + rejected, the prompt counted in both, as the padded batch's ``attention_mask.sum()``."""
    return batch["real_tokens"] if is_laid_out(batch) else batch["attention_mask"].sum()


@dataclass
class Unit:
    """One piece a row holds: its tokens with their position ids and branches, and what it scores, as
    (offset in the unit of the predicting position, target token, sequence) triples."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    scores: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, ids: list[int], branch: int, start: int) -> None:
        self.tokens += ids
        self.positions += range(start, start + len(ids))
        self.branches += [branch] * len(ids)


def plain_unit(prompt: list[int], response: list[int], sequence: int) -> Unit:
    """prompt + response, positions 0.., branch 0; response token j is predicted at position len(prompt) − 1 + j."""
    unit = Unit()
    unit.add(prompt + response, PROMPT, 0)
    unit.scores = [(len(prompt) - 1 + j, token, sequence) for j, token in enumerate(response)]
    return unit


def shared_unit(prompt: list[int], chosen: list[int], rejected: list[int], pair: int, pairs: int) -> Unit:
    """[prompt | chosen | rejected]: the rejected positions continue from the prompt's end; rejected token 0 is
    predicted at the last prompt position, token j ≥ 1 at the rejected token before it."""
    p, c = len(prompt), len(chosen)
    unit = Unit()
    unit.add(prompt, PROMPT, 0)
    unit.add(chosen, CHOSEN, p)
    unit.add(rejected, REJECTED, p)
    unit.scores = [(p - 1 + j, token, pair) for j, token in enumerate(chosen)]
    unit.scores += [(p - 1 if j == 0 else p + c + j - 1, token, pairs + pair) for j, token in enumerate(rejected)]
    return unit


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Unit numbers per row: longest first (ties by number), each into the first row it fits in."""
    rows: list[list[int]] = []
    room: list[int] = []
    for unit in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((r for r, free in enumerate(room) if free >= lengths[unit]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(unit)
        room[slot] -= lengths[unit]
    return rows


def lay_out(units: list[Unit], sequences: int, pad_token_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Units -> the laid-out batch's tensors (module docstring): bin-packed rows, or one unit per row."""
    lengths = [len(u.tokens) for u in units]
    width = max(lengths)
    rows = first_fit_decreasing(lengths, width) if packing else [[i] for i in range(len(units))]
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    group_ids = torch.full(shape, PAD_GROUP, dtype=torch.long)
    branch_ids = torch.zeros(shape, dtype=torch.long)
    triples: list[tuple[int, int, int]] = []
    for r, members in enumerate(rows):
        offset = 0
        for number in members:
            unit, end = units[number], offset + lengths[number]
            input_ids[r, offset:end] = torch.tensor(unit.tokens)
            position_ids[r, offset:end] = torch.tensor(unit.positions)
            branch_ids[r, offset:end] = torch.tensor(unit.branches)
            group_ids[r, offset:end] = number
            triples += [(r * width + offset + at, token, seq) for at, token, seq in unit.scores]
            offset = end
    triples.sort(key=lambda t: (t[2], t[0]))  # by sequence, then position: each sum adds in the padded path's order
    source, target, sequence = torch.tensor(triples, dtype=torch.long).reshape(-1, 3).unbind(1)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "group_ids": group_ids,
        "branch_ids": branch_ids,
        "score_source": source.contiguous(),
        "score_target": target.contiguous(),
        "score_sequence": sequence.contiguous(),
        "response_lengths": torch.bincount(sequence, minlength=sequences),
    }


def check_layout(packing: bool, share_prompt: bool, unpaired: bool) -> None:
    """``share_prompt`` needs pairs: a ConfigError for unpaired rows (KTO), naming the keys."""
    if share_prompt and unpaired:
        raise ConfigError(
            "data.share_prompt lays out each pair as [prompt | chosen | rejected]; unpaired rows (data.format: "
            "unpaired or data.unpair, for KTO) have no pair to share a prompt: set data.share_prompt false "
            "(data.packing works for them)"
        )


class LayoutCollator:
    """Tokenized pairs (or, with ``packing`` only, unpaired rows as ``UnpairedCollator.rows`` pairs them) -> one
    laid-out batch (module docstring). ``rows_of`` turns the features into the 2B (prompt, response) sequences, chosen
    then rejected, and any extra keys (``desirable``); for pairs it is :meth:`pair_rows`."""

    def __init__(self, pad_token_id: int, packing: bool, share_prompt: bool, rows_of: Any = None):
        if not (packing or share_prompt):
            raise ValueError("LayoutCollator is for data.packing or data.share_prompt; PairCollator pads")
        check_layout(packing, share_prompt, unpaired=rows_of is not None)
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.share_prompt = share_prompt
        self.rows_of = rows_of or self.pair_rows

    @staticmethod
    def pair_rows(features: list[dict[str, Any]]) -> tuple[list[tuple[list[int], list[int]]], dict[str, Any]]:
        rows = [(list(f["prompt_input_ids"]), list(f[k])) for k in ("chosen_input_ids", "rejected_input_ids")
                for f in features]  # fmt: skip
        return rows, {}

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(features)
        rows, extra = self.rows_of(features)
        if self.share_prompt:
            units = [shared_unit(rows[i][0], rows[i][1], rows[n + i][1], i, n) for i in range(n)]
        else:
            units = [plain_unit(prompt, response, s) for s, (prompt, response) in enumerate(rows)]
        batch = lay_out(units, 2 * n, self.pad_token_id, self.packing)
        batch["real_tokens"] = torch.tensor(sum(len(p) + len(r) for p, r in rows), dtype=torch.long)
        batch["index"] = torch.tensor([int(f.get("index", -1)) for f in features], dtype=torch.long)
        return {**batch, **extra}
