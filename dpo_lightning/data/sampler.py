"""Training data order: length-grouped, seeded, sharded across ranks, and resumable mid-epoch.

``PreferenceSampler`` decides the order. Each epoch it draws a permutation from ``seed + epoch`` (as
``DistributedSampler`` does); with ``group_by_length`` it cuts the permutation into mega-batches of
``mega_batch`` optimizer steps, sorts each mega-batch by length (the common trainers' trick: similar lengths
share a batch, so little of it is padding) and shuffles the order of the steps again, putting the longest
first so a batch that does not fit in memory fails at step 1, not hours in. A step is ``batch_size ×
num_replicas × accumulate`` pairs, cut into ``accumulate`` global batches of ``batch_size × num_replicas``;
rank r takes the r-th slice of each, so ranks see disjoint pairs and every pair is seen once per epoch (when
the data does not divide evenly, the last global batch is padded with fewer than ``num_replicas`` repeated
pairs, as ``DistributedSampler`` pads). It is a ``DistributedSampler``, so Lightning neither replaces it under
DDP/FSDP nor forgets to call ``set_epoch``.

Grouping whole optimizer steps (not micro-batches) is what keeps gradient accumulation exact: ``batch_size`` B
with ``accumulate`` k forms every optimizer step from the same pairs, in the same order of steps, as
``batch_size`` kB with ``accumulate`` 1 (or any other split of the same global step over ranks and
micro-batches), so the runs follow the same curve. Without grouping the order is one permutation cut into
batches, whatever ``accumulate``.

``ResumableDataLoader`` counts the batches it has handed out in the current epoch. Its ``state_dict()`` /
``load_state_dict()`` are called by Lightning (the fit loop stores the states of stateful train loaders in
every checkpoint and restores them before iterating); a restored loader skips the batches already trained on
(without loading them) and yields exactly the rest of that epoch's batches. The order is a function of
(seed, epoch, rank, world size, batch size, accumulation, data), so nothing else needs saving.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class PreferenceSampler(DistributedSampler):
    """Indices of one rank's training pairs for one epoch, in batch order (consumed in ``batch_size`` chunks).

    Args:
        lengths: per pair, the longest sequence it adds to a batch (prompt + longer response), in tokens.
        batch_size: pairs per batch on one rank.
        num_replicas: data-parallel world size.
        rank: this process's data-parallel rank.
        seed: with the epoch, seeds the order; every rank must use the same seed.
        group_by_length: group pairs of similar length (less padding); ``False``: plain shuffle.
        mega_batch: optimizer steps per sorted mega-batch (larger: less padding, less randomness).
        accumulate: batches per optimizer step (the Trainer's ``accumulate_grad_batches``); with
            ``group_by_length`` the groups are whole steps, each split into ``accumulate`` consecutive batches.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_length: bool = True,
        mega_batch: int = 50,
        accumulate: int = 1,
    ):
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.mega_batch = mega_batch
        self.accumulate = int(accumulate)
        self.start_batch = 0  # batches to skip at the next __iter__ only (set by ResumableDataLoader)
        n, world = len(self.lengths), num_replicas
        tail = n % (batch_size * world)
        self.num_samples = (n // (batch_size * world)) * batch_size + math.ceil(tail / world)
        self.total_size = self.num_samples * world

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The epoch's global batches (``batch_size × num_replicas`` pairs each; the last may be smaller), each
        optimizer step's ``accumulate`` batches one after the other."""
        epoch = self.epoch if epoch is None else epoch
        n, size = len(self.lengths), self.batch_size * self.num_replicas
        step = size * self.accumulate
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        if self.group_by_length:
            chunk = step * self.mega_batch
            order = [i for start in range(0, n, chunk) for i in sorted(order[start : start + chunk], key=self._desc)]
        steps = [order[start : start + step] for start in range(0, n, step)]
        full = [s for s in steps if len(s) == step]
        tail = [s for s in steps if len(s) < step]
        if self.group_by_length and full:
            full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
            longest = max(range(len(full)), key=lambda i: self.lengths[full[i][0]])
            full[0], full[longest] = full[longest], full[0]
        batches = [s[start : start + size] for s in full + tail for start in range(0, len(s), size)]
        if batches and len(batches[-1]) < size:  # pad to a multiple of the world size, as DistributedSampler does
            short = self.total_size - (len(batches) - 1) * size - len(batches[-1])
            batches[-1] = batches[-1] + [order[i % n] for i in range(short)]
        return batches

    def _desc(self, i: int) -> int:
        return -self.lengths[i]

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for an epoch: its contiguous slice of every global batch."""
        out = []
        for batch in self.global_batches(epoch):
            per_rank = len(batch) // self.num_replicas
            out.append(batch[self.rank * per_rank : (self.rank + 1) * per_rank])
        return out

    def __iter__(self) -> Iterator[int]:
        start, self.start_batch = self.start_batch, 0
        for batch in self.batches()[start:]:
            yield from batch

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader over a ``PreferenceSampler`` whose position in the epoch can be saved and restored.

    ``state_dict()`` -> ``{"epoch", "batches", "seed", "batch_size", "num_replicas", "num_pairs",
    "group_by_length", "accumulate"}``, where ``batches`` counts the batches yielded so far in ``epoch``.
    ``load_state_dict(state)``: the next iteration of that epoch starts after those batches (an iteration of
    another epoch starts at its beginning; Lightning calls ``set_epoch`` before iterating).
    """

    sampler: PreferenceSampler

    def __init__(self, dataset: Any, *, sampler: PreferenceSampler, **kwargs: Any):
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, **kwargs)
        self._batches = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()  # a generator: the skip is decided at the first batch, after set_epoch

    def _iterate(self) -> Iterator[Any]:
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self.sampler.epoch:
            skip = min(self._resume["batches"], len(self))
        self._resume = None
        self.sampler.start_batch = skip
        self._batches = skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def _settings(self) -> dict[str, Any]:
        """What the order depends on besides the epoch (a sampler without ``accumulate`` has 1)."""
        sampler = self.sampler
        return {
            "seed": sampler.seed,
            "batch_size": sampler.batch_size,
            "num_replicas": sampler.num_replicas,
            "num_pairs": len(sampler.lengths),
            "group_by_length": sampler.group_by_length,
            "accumulate": getattr(sampler, "accumulate", 1),
        }

    def state_dict(self) -> dict[str, Any]:
        position = self._resume or {"epoch": self.sampler.epoch, "batches": self._batches}
        return {**position, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler = self.sampler
        batches = int(state["batches"])
        mine = self._settings()
        if not sampler.group_by_length:  # the accumulation changes only a grouped order
            mine.pop("accumulate")
        state = {"accumulate": 1, **state}  # a state saved before it was kept grouped per batch: accumulate 1
        changed = [f"{k} {state[k]} -> {v}" for k, v in mine.items() if k in state and state[k] != v]
        if changed:
            pairs_seen = batches * int(state.get("batch_size", sampler.batch_size)) * int(state.get("num_replicas", 1))
            batches = pairs_seen // (sampler.batch_size * sampler.num_replicas)
            warnings.warn(
                f"resuming the training data order with changed settings ({', '.join(changed)}): the rest of "
                f"epoch {state['epoch']} cannot be the batches an uninterrupted run would have seen; skipping "
                f"{batches} batches (the same number of pairs) instead",
                stacklevel=2,
            )
        self._resume = {"epoch": int(state["epoch"]), "batches": batches}


def repeated_rows(sampler: Any, start: int, count: int) -> torch.Tensor:
    """(count,) bool: which of the rows ``start .. start + count - 1`` that ``sampler`` hands this rank are repeats
    it added so every rank gets as many rows, to leave out of validation means.

    A ``DistributedSampler`` (``drop_last=False``; Lightning puts one on evaluation loaders under DDP/FSDP) pads its
    index list at the end, then rank r takes every ``num_replicas``-th index from r: the p-th row on rank r sits at
    position r + p·W of the padded list, a repeat when that is at or past the number of rows. Any other sampler
    (one process, or ``PreferenceSampler``'s training order) repeats nothing here.
    """
    positions = torch.arange(start, start + count)
    if not isinstance(sampler, DistributedSampler) or isinstance(sampler, PreferenceSampler) or sampler.drop_last:
        return torch.zeros(count, dtype=torch.bool)
    return sampler.rank + positions * sampler.num_replicas >= len(sampler.dataset)


def padding_fraction(
    prompt_len: Sequence[int], chosen_len: Sequence[int], rejected_len: Sequence[int], batches: list[list[int]]
) -> float:
    """Fraction of the token slots of the collated (2B, T) batches that are padding."""
    real = slots = 0
    for batch in batches:
        width = max(prompt_len[i] + max(chosen_len[i], rejected_len[i]) for i in batch)
        real += sum(2 * prompt_len[i] + chosen_len[i] + rejected_len[i] for i in batch)
        slots += 2 * len(batch) * width
    return 1.0 - real / slots if slots else 0.0


def unpaired_padding_fraction(
    prompt_len: Sequence[int],
    completion_len: Sequence[int],
    batches: list[list[int]],
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> float:
    """Fraction of the token slots of ``UnpairedCollator``'s (2B, T) batches that are padding: row i is prompt_i
    + completion_i, row B + i prompt_i + completion_{(i+1) mod B}, cut as the collator cuts it when ``max_length``
    is given."""

    def mismatched(p: int, c: int) -> int:
        if max_length is None or p + c <= max_length:
            return p + c
        if max_prompt_length is not None and p > max_prompt_length:
            p = max_prompt_length
        return p + min(c, max_length - p)

    real = slots = 0
    for batch in batches:
        n = len(batch)
        rows = [prompt_len[i] + completion_len[i] for i in batch]
        rows += [mismatched(prompt_len[batch[k]], completion_len[batch[(k + 1) % n]]) for k in range(n)]
        real += sum(rows)
        slots += len(rows) * max(rows)
    return 1.0 - real / slots if slots else 0.0
