"""The loaders of PreferenceDataModule: its length-grouped, rank-sharded, resumable training loader and its
validation/test loaders, each with the data module's collate function (padded, packed or prompt-shared).

:class:`PairLoaders` is a mixin of ``PreferenceDataModule``: it reads ``datasets``, ``loader_columns``,
``collator()``, ``batch_size``, ``eval_batch_size``, ``num_workers``, ``seed``, ``group_by_length``, ``mega_batch``
and the attached ``trainer``, and passes the training loader through ``resume_order`` (``train_order.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from dpo_lightning.data.sampler import PreferenceSampler, ResumableDataLoader


class PairLoaders:
    """The loaders and what they are built from (pair lengths, data-parallel rank and world, accumulation)."""

    def pair_lengths(self, split: str = "train") -> np.ndarray:
        """Per pair, the longest sequence it puts in a batch: prompt + the longer response (tokens). Per unpaired
        row: prompt + completion (its matched row; its mismatched row depends on the batch)."""
        dataset = self.datasets[split]
        if "completion_len" in dataset.column_names:
            cols = dataset.with_format("numpy", columns=["prompt_len", "completion_len"])[:]
            return cols["prompt_len"] + cols["completion_len"]
        cols = dataset.with_format("numpy", columns=["prompt_len", "chosen_len", "rejected_len"])[:]
        return cols["prompt_len"] + np.maximum(cols["chosen_len"], cols["rejected_len"])

    def data_parallel(self) -> tuple[int, int]:
        """(world size, rank) of data parallelism: the Trainer's (DDP, FSDP, ModelParallel), else 1 process."""
        trainer = self.trainer
        kwargs = trainer.distributed_sampler_kwargs if trainer is not None else None
        if kwargs:
            return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def accumulation(self) -> int:
        """Batches per optimizer step: the attached Trainer's ``accumulate_grad_batches``, else 1. Length grouping
        groups whole optimizer steps, so ``batch_size`` B with accumulation k trains on the same steps as kB with 1
        (read when the training loader is built: a ``GradientAccumulationScheduler`` changing it later is not seen)."""
        return int(getattr(self.trainer, "accumulate_grad_batches", None) or 1)

    def train_sampler(
        self, group_by_length: bool | None = None, num_replicas: int = 1, rank: int = 0, accumulate: int = 1
    ):
        return PreferenceSampler(
            self.pair_lengths("train").tolist(),
            batch_size=self.batch_size,
            num_replicas=num_replicas,
            rank=rank,
            seed=self.seed,
            group_by_length=self.group_by_length if group_by_length is None else group_by_length,
            mega_batch=self.mega_batch,
            accumulate=accumulate,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        num_replicas, rank = self.data_parallel()
        loader = ResumableDataLoader(
            self.datasets["train"].select_columns(self.loader_columns).with_format(None),
            sampler=self.train_sampler(num_replicas=num_replicas, rank=rank, accumulate=self.accumulation()),
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )
        return self.resume_order(loader)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split].select_columns(self.loader_columns).with_format(None),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader; none (an empty list, so Lightning runs no validation loop) when the split is empty
        (``val_fraction: 0`` without ``val_files``)."""
        if self.datasets and len(self.datasets["val"]) == 0:
            return []
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
