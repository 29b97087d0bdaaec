"""Prompts for on-policy training: read, cut into prompts, and served so each rollout batch feeds several updates.

    dm = PromptDataModule("../shared/data/imdb/train.jsonl.gz", prompt_field="text", prefix_tokens=(2, 8),
                          max_prompts=2000, batch_size=16, updates_per_rollout=16)

A record's ``prompt_field`` is the prompt, or with ``prefix_tokens: [lo, hi]`` its first k tokens, k uniform in
[lo, hi] per record (seeded): the DPO paper's IMDb prompts are review prefixes of 2-8 tokens (Rafailov et al.
2023, §6.1 and App. C.1). Prompts are tokenized as the preference data is (``data.tokenize.prompt_ids``).

Order. Each epoch draws a permutation from ``seed + epoch``; global batches of ``batch_size × world size``
prompts are cut from it (a last incomplete one is dropped) and rank r takes the r-th slice of each, so the ranks'
rollouts are disjoint. Every batch is served ``updates_per_rollout`` times in a row (``phase`` 0, 1, ...): PPO
samples on phase 0 and takes one optimizer step per phase on the same rollout, so a checkpoint can fall between
two updates of one rollout batch. The loader is a ``ResumableDataLoader``: a resumed run continues at the exact
batch and phase.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import torch
from torch.utils.data import DistributedSampler

from dpo_lightning.data.sampler import ResumableDataLoader
from dpo_lightning.data.sources import builder_of
from dpo_lightning.data.tokenize import prompt_ids
from dpo_lightning.data.train_order import TrainOrderState
from dpo_lightning.errors import ConfigError, DataError
from dpo_lightning.tokenizer import load_tokenizer, train_bpe_tokenizer


class RolloutSampler(DistributedSampler):
    """Indices of one rank's prompts, batch by batch, each batch repeated ``repeats`` times.

    An index encodes (phase, prompt) as ``phase × n_prompts + prompt``. Has the attributes
    :class:`~dpo_lightning.data.sampler.ResumableDataLoader` reads (``start_batch``, ``lengths``, ...).
    """

    def __init__(self, n_prompts: int, *, batch_size: int, repeats: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0):  # fmt: skip
        super().__init__(range(n_prompts), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n_prompts, self.batch_size, self.repeats = n_prompts, batch_size, repeats
        self.lengths = range(n_prompts)  # only its length is read (the loader's state names the data size)
        self.group_by_length = False
        self.start_batch = 0
        self.n_batches = n_prompts // (batch_size * num_replicas)
        if self.n_batches == 0:
            raise ConfigError(
                f"data.batch_size: {n_prompts} prompts do not fill one rollout batch of {batch_size} × "
                f"{num_replicas} processes"
            )
        self.num_samples = self.n_batches * repeats * batch_size
        self.total_size = self.num_samples * num_replicas

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else epoch
        order = torch.randperm(self.n_prompts, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        size, out = self.batch_size * self.num_replicas, []
        for b in range(self.n_batches):
            mine = order[b * size + self.rank * self.batch_size : b * size + (self.rank + 1) * self.batch_size]
            out += [[phase * self.n_prompts + i for i in mine] for phase in range(self.repeats)]
        return out

    def __iter__(self):
        start, self.start_batch = self.start_batch, 0
        for batch in self.batches()[start:]:
            yield from batch

    def __len__(self) -> int:
        return self.num_samples


class _PhasedPrompts(torch.utils.data.Dataset):
    """Prompt ``i`` at phase ``k`` is item ``k × n + i``."""

    def __init__(self, ids: list[list[int]], repeats: int):
        self.ids, self.repeats = ids, repeats

    def __len__(self) -> int:
        return len(self.ids) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        phase, prompt = divmod(index, len(self.ids))
        return {"prompt_ids": self.ids[prompt], "index": prompt, "phase": phase}


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``prompt_ids``: lists of token ids (left as lists: they are sampled from, not stacked); ``index``: (B,)
    prompt numbers; ``phase``: the batch's update number within its rollout."""
    phases = {r["phase"] for r in rows}
    if len(phases) != 1:
        raise RuntimeError(f"a prompt batch mixes phases {sorted(phases)}")
    return {"prompt_ids": [r["prompt_ids"] for r in rows], "index": torch.tensor([r["index"] for r in rows]),
            "phase": torch.tensor(phases.pop())}  # fmt: skip


class PromptDataModule(TrainOrderState, pl.LightningDataModule):
    def __init__(
        self,
        train_files: str | list[str],
        prompt_field: str = "prompt",
        prefix_tokens: tuple[int, int] | None = None,
        max_prompt_length: int = 64,
        max_prompts: int | None = None,
        strip_html: bool = False,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 4096,
        batch_size: int = 8,
        updates_per_rollout: int = 1,
        seed: int = 0,
        num_workers: int = 0,
    ):
        """Prompts from local files (JSONL/JSON/Parquet/CSV, gzip too).

        Args:
            train_files: file or files of records.
            prompt_field: the field holding the prompt (``text`` for IMDb reviews cut by ``prefix_tokens``).
            prefix_tokens: ``[lo, hi]``: the prompt is the first k tokens of the field, k uniform in [lo, hi]
                (seeded); ``null``: the whole field.
            max_prompt_length: longer prompts keep their last this many tokens.
            max_prompts: read at most this many records (the first ones).
            strip_html: turn ``<br />`` into spaces and collapse whitespace (IMDb's raw text holds them).
            tokenizer: a tokenizer directory; ``null`` trains a byte-level BPE on the records' text.
            tokenizer_vocab_size: vocabulary of that BPE.
            batch_size: prompts per rollout batch on one process.
            updates_per_rollout: times each batch is served in a row; PPO needs ``ppo_epochs × num_minibatches``
                (the ``ppo`` command sets it from the model's settings).
            seed: seeds the prefix lengths and the order.
            num_workers: DataLoader workers.
        """
        super().__init__()
        self.train_files = [train_files] if isinstance(train_files, str) else list(train_files)
        if prefix_tokens is not None and not 1 <= prefix_tokens[0] <= prefix_tokens[1]:
            raise ConfigError(f"data.prefix_tokens must be [lo, hi] with 1 <= lo <= hi, got {prefix_tokens}")
        if batch_size < 1 or updates_per_rollout < 1:
            raise ConfigError("data.batch_size and data.updates_per_rollout must be >= 1")
        self.prompt_field, self.prefix_tokens = prompt_field, prefix_tokens
        self.max_prompt_length, self.max_prompts, self.strip_html = max_prompt_length, max_prompts, strip_html
        self.tokenizer_path, self.tokenizer_vocab_size = tokenizer, tokenizer_vocab_size
        self.batch_size, self.updates_per_rollout = batch_size, updates_per_rollout
        self.seed, self.num_workers = seed, num_workers
        self._texts: list[str] | None = None
        self._origins: list[str] = []  # "file, record N" (1-based) of each text, for messages
        self._tokenizer = None
        self.prompts: list[list[int]] = []
        self._train_loader: ResumableDataLoader | None = None
        self._order_state: dict[str, Any] | None = None

    def texts(self) -> list[str]:
        """The ``prompt_field`` of every record read, in file order."""
        if self._texts is None:
            texts: list[str] = []
            for f in self.train_files:
                if not Path(f).exists():
                    raise DataError(f"data.train_files: {f} does not exist")
                table = datasets.load_dataset(builder_of(Path(f)), data_files=str(f), split="train")
                if self.prompt_field not in table.column_names:
                    raise DataError(f"{f}: no field {self.prompt_field!r} (fields: {', '.join(table.column_names)})")
                for row, value in enumerate(table[self.prompt_field]):
                    if not isinstance(value, str) or not value.strip():
                        raise DataError(f"{f}, record {row + 1}, field {self.prompt_field!r}: empty or not text")
                    self._origins.append(f"{f}, record {row + 1}")
                    texts.append(" ".join(value.replace("<br />", " ").split()) if self.strip_html else value)
                    if self.max_prompts and len(texts) >= self.max_prompts:
                        break
                if self.max_prompts and len(texts) >= self.max_prompts:
                    break
            self._texts = texts
        return self._texts

    @property
    def tokenizer(self):
        """The tokenizer, loaded or trained on first use (a policy built from a config reads its vocabulary)."""
        if self._tokenizer is None:
            if self.tokenizer_path:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:
                self._tokenizer = train_bpe_tokenizer(self.texts(), vocab_size=self.tokenizer_vocab_size)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.prompts:
            return
        texts, tok = self.texts(), self.tokenizer
        if self.prefix_tokens is not None:
            lo, hi = self.prefix_tokens
            rng = random.Random(self.seed)
            heads = tok([t[: 20 * hi] for t in texts], add_special_tokens=False, verbose=False)["input_ids"]
            texts = [tok.decode(ids[: rng.randint(lo, hi)]) for ids in heads]
        self.prompts = [ids[-self.max_prompt_length :] for ids in prompt_ids(tok, texts)]
        empty = [i for i, ids in enumerate(self.prompts) if not ids]
        if empty:
            raise DataError(f"{self._origins[empty[0]]} ({len(empty)} in all) gives an empty prompt after tokenization")

    def data_parallel(self) -> tuple[int, int]:
        """(world size, rank) of data parallelism."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        if kwargs:
            return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
        return 1, 0

    def train_dataloader(self) -> ResumableDataLoader:
        world, rank = self.data_parallel()
        sampler = RolloutSampler(len(self.prompts), batch_size=self.batch_size, repeats=self.updates_per_rollout,
                                 num_replicas=world, rank=rank, seed=self.seed)  # fmt: skip
        prompts = _PhasedPrompts(self.prompts, self.updates_per_rollout)
        loader = ResumableDataLoader(prompts, sampler=sampler, collate_fn=collate_prompts, num_workers=self.num_workers)
        return self.resume_order(loader)

    def state_dict(self) -> dict[str, Any]:
        """``{"train_order"}``: the loader's position (epoch, batches served) when there is one."""
        return self.train_order()
