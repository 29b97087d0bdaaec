"""Train/validation splits and label noise of tokenized data, for pairs and for unpaired rows (KTO).

``PreferenceDataModule.prepare`` tokenizes each split, then makes its train/val/test datasets here:

- With ``data.val_files``, train and val must both hold pairs or both unpaired rows (``check_same_kind``;
  ``data.unpair`` makes both unpaired); else a ``DataError``.
- Without, ``hold_out`` draws a seeded ``val_fraction`` for validation: of the pairs, or for unpaired rows of
  the source records (``split_by_record``), so the two rows of one pair (``data.unpair``) never straddle it.
  ``val_fraction: 0`` holds nothing out: the validation split is empty and the data module gives Lightning no
  validation loader (no validation loop).
- ``label_noise`` corrupts a seeded fraction of the training data (never validation): ``flip_pair_labels``
  swaps chosen and rejected of pairs; ``flip_unpaired_labels`` flips the label of the rows of records (with
  ``unpair``: both rows of the pair, the same noise as swapping chosen and rejected).
"""

from __future__ import annotations

import math
from typing import Any

import datasets
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from dpo_lightning.data.formats import UNPAIRED
from dpo_lightning.errors import DataError


def is_unpaired(fmt: str, unpair: bool) -> bool:
    """Whether data of format ``fmt`` is tokenized into unpaired rows: ``unpaired`` data, or any with ``unpair``."""
    return fmt == UNPAIRED or unpair


def check_same_kind(formats: dict[str, str], unpair: bool) -> None:
    """Raise a ``DataError`` unless the ``train`` and ``val`` formats both give pairs or both unpaired rows."""
    if is_unpaired(formats["val"], unpair) != is_unpaired(formats["train"], unpair):
        kinds = {s: "unpaired rows" if is_unpaired(f, unpair) else "pairs" for s, f in formats.items()}
        raise DataError(
            f"data.train_files hold {kinds['train']} (format {formats['train']}) but data.val_files "
            f"hold {kinds['val']} (format {formats['val']}); set data.unpair: true to split the pairs "
            "into unpaired rows, or give both splits data of one kind"
        )


def hold_out(
    data: datasets.Dataset, val_fraction: float, seed: int, unpaired: bool
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val): a seeded ``val_fraction`` of the pairs, or of the records of unpaired rows, goes to val
    (``val_fraction`` 0: all of it to train, val empty)."""
    if val_fraction == 0:
        return data, data.select([])
    if unpaired:
        return split_by_record(data, val_fraction, seed)
    split = data.train_test_split(test_size=val_fraction, seed=seed)
    return split["train"], split["test"]


def split_by_record(
    data: datasets.Dataset, val_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, val) of unpaired rows: a seeded ``val_fraction`` of the source records goes to val with all
    its rows (both rows of a pair split by ``unpair`` land on the same side)."""
    records = np.asarray(data["record"])
    unique = np.unique(records)
    n_val = math.ceil(val_fraction * len(unique))
    if not 0 < n_val < len(unique):
        raise DataError(
            f"data.val_fraction {val_fraction} of {len(unique)} records leaves {len(unique) - n_val} "
            f"for training and {n_val} for validation; both need at least one (or give data.val_files)"
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    in_val = np.isin(records, unique[order[:n_val]])
    return data.select(np.flatnonzero(~in_val)), data.select(np.flatnonzero(in_val))


def flip_unpaired_labels(train: datasets.Dataset, label_noise: float, seed: int) -> datasets.Dataset:
    """Flip the label of the rows of a seeded ``label_noise`` fraction of the training records (with ``unpair``
    both rows of a pair: the pair's chosen and rejected swapped, as ``flip_pair_labels`` does for pairs)."""
    records = np.unique(np.asarray(train["record"]))
    n_flip = round(label_noise * len(records))
    generator = torch.Generator().manual_seed(seed + 1)
    flipped = set(records[torch.randperm(len(records), generator=generator)[:n_flip].numpy()].tolist())

    def flip(row: dict[str, Any]) -> dict[str, Any]:
        if row["record"] in flipped:
            row["label"] = not row["label"]
        return row

    rank_zero_info(f"data: label_noise {label_noise}: flipped the labels of {n_flip} train records")
    return train.map(flip, desc="flipping labels")


def flip_pair_labels(train: datasets.Dataset, label_noise: float, seed: int) -> datasets.Dataset:
    """Swap chosen and rejected in a seeded ``label_noise`` fraction of the training pairs."""
    n_flip = round(label_noise * len(train))
    generator = torch.Generator().manual_seed(seed + 1)
    flipped = set(torch.randperm(len(train), generator=generator)[:n_flip].tolist())

    def swap(row: dict[str, Any], i: int) -> dict[str, Any]:
        if i in flipped:
            for a, b in (("chosen_input_ids", "rejected_input_ids"), ("chosen_len", "rejected_len")):
                row[a], row[b] = row[b], row[a]
            row["chosen_tokens"], row["rejected_tokens"] = row["rejected_tokens"], row["chosen_tokens"]
        return row

    rank_zero_info(f"data: label_noise {label_noise}: swapped chosen/rejected in {n_flip} train pairs")
    return train.map(swap, with_indices=True, desc="flipping labels")
