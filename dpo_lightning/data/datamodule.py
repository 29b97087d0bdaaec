"""PreferenceDataModule: preference files -> tokenized pairs -> batches of 2B sequences.

Data flows one way: raw records (``datasets``) -> (prompt, chosen, rejected) strings (``formats``) -> token
ids with truncation (``tokenize``) -> padded concatenated batches (``PairCollator``).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from dpo_lightning.data.formats import PARSERS, BadRow, FormatName, detect_format
from dpo_lightning.data.tokenize import (
    PairCollator,
    TruncationMode,
    prompt_ids,
    response_ids,
    truncate_pair,
)
from dpo_lightning.errors import ConfigError, DataError
from dpo_lightning.tokenizer import load_tokenizer, train_bpe_tokenizer

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _builder(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    if not suffixes or suffixes[-1] not in BUILDERS:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(BUILDERS)} (optionally .gz)")
    return BUILDERS[suffixes[-1]]


class Source:
    """The records of one split, concatenated from one or more files, remembering which row came from where."""

    def __init__(self, files: list[str], hub_fallback: dict[str, str] | None, what: str):
        self.offsets: list[tuple[int, str]] = []  # (first global row, file name)
        missing = [f for f in files if not Path(f).exists()]
        if missing and hub_fallback:
            rank_zero_info(f"{what}: {missing[0]} not found; loading the hub dataset {hub_fallback}")
            try:
                self.dataset = datasets.load_dataset(**hub_fallback)
            except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear message
                raise DataError(
                    f"{what}: {missing[0]} does not exist, and the hub fallback {hub_fallback} could not be "
                    f"loaded ({type(err).__name__}: {err}). Point data.{what}_files at local files."
                ) from None
            self.offsets = [(0, f"hub:{hub_fallback.get('path')}")]
            return
        if missing:
            raise DataError(f"{what}: data file {missing[0]} does not exist")
        parts = []
        for f in files:
            try:
                part = datasets.load_dataset(_builder(Path(f)), data_files=f, split="train")
            except DataError:
                raise
            except Exception as err:  # noqa: BLE001 - malformed files surface from pyarrow in many types
                raise DataError(
                    f"{f}: could not be read as {_builder(Path(f))} ({type(err).__name__}: {err})"
                ) from None
            if len(part) == 0:
                raise DataError(f"{f}: the file holds no records")
            self.offsets.append((sum(len(p) for p in parts), f))
            parts.append(part)
        self.dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    def where(self, row: int) -> str:
        """'file, record N' for a global row number (N counts from 0 within the file)."""
        start, name = max((o for o in self.offsets if o[0] <= row), key=lambda o: o[0])
        return f"{name}, record {row - start}"


class PreferenceDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        val_fraction: float = 0.05,
        format: FormatName = "auto",
        hub_fallback: dict[str, str] | None = None,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 4096,
        max_length: int = 512,
        max_prompt_length: int = 256,
        truncation_mode: TruncationMode = "keep_end",
        max_rows: int | None = None,
        label_noise: float = 0.0,
        on_bad_row: Literal["error", "skip"] = "error",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """Preference pairs from local files (JSONL/JSON/Parquet/CSV, gzip too), tokenized for DPO.

        Args:
            train_files: file or files holding the training pairs.
            val_files: validation file(s); when absent, ``val_fraction`` of the training pairs is held out.
            val_fraction: fraction held out for validation (seeded) when there are no ``val_files``.
            format: ``explicit`` ({prompt, chosen, rejected}), ``hh`` (HH-RLHF transcripts) or ``auto``.
            hub_fallback: ``datasets.load_dataset`` kwargs (path, data_dir, split, ...) used when the local
                training file is absent, e.g. ``{path: Anthropic/hh-rlhf, data_dir: harmless-base, split: test}``.
            tokenizer: a tokenizer directory (or hub name); ``None`` trains a byte-level BPE on the training text.
            tokenizer_vocab_size: vocabulary of the trained BPE when ``tokenizer`` is ``None``.
            max_length: longest prompt + response, in tokens.
            max_prompt_length: prompts are cut to this when prompt + response exceeds ``max_length``.
            truncation_mode: which end of a long prompt survives: ``keep_end`` (dialogue) or ``keep_start``.
            max_rows: read at most this many training records (quick runs); ``None`` reads them all.
            label_noise: fraction of training pairs whose chosen and rejected are swapped (seeded by ``seed``),
                to study robustness to noisy preferences (the setting cDPO is designed for). Validation is
                never flipped.
            on_bad_row: ``error`` stops at setup naming file, record and field; ``skip`` drops bad records and
                prints how many of each kind.
            batch_size: preference pairs per training batch (the model sees 2x sequences).
            eval_batch_size: pairs per validation/test batch; defaults to ``batch_size``.
            num_workers: DataLoader worker processes.
            seed: seed of the validation split and of the training shuffle.
        """
        super().__init__()
        if max_prompt_length >= max_length:
            raise ConfigError(
                f"data.max_prompt_length ({max_prompt_length}) must be smaller than data.max_length "
                f"({max_length}), or responses would be cut to nothing"
            )
        self.train_files = [train_files] if isinstance(train_files, str) else list(train_files)
        self.val_files = [val_files] if isinstance(val_files, str) else (list(val_files) if val_files else None)
        self.val_fraction = val_fraction
        self.format = format
        self.hub_fallback = hub_fallback
        self.tokenizer_path = tokenizer
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.max_rows = max_rows
        if not 0.0 <= label_noise <= 1.0:
            raise ConfigError(f"data.label_noise must be in [0, 1], got {label_noise}")
        self.label_noise = label_noise
        self.on_bad_row = on_bad_row
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer = None
        self._sources: dict[str, Source] = {}
        self.datasets: dict[str, datasets.Dataset] = {}
        self.skipped: dict[str, collections.Counter] = {}

    # ---------------------------------------------------------------- sources and tokenizer
    def source(self, split: str) -> Source:
        if split not in self._sources:
            files = self.train_files if split == "train" else self.val_files
            source = Source(files, self.hub_fallback if split == "train" else None, split)
            if split == "train" and self.max_rows is not None:
                source.dataset = source.dataset.select(range(min(self.max_rows, len(source.dataset))))
            self._sources[split] = source
        return self._sources[split]

    @property
    def tokenizer(self):
        """The tokenizer, loaded or trained on first use (the model reads its vocabulary size from it)."""
        if self._tokenizer is None:
            if self.tokenizer_path:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:
                rows = self.source("train").dataset
                texts = (
                    str(v)
                    for col in ("prompt", "chosen", "rejected")
                    if col in rows.column_names
                    for v in rows[col]
                    if isinstance(v, str)
                )
                self._tokenizer = train_bpe_tokenizer(texts, vocab_size=self.tokenizer_vocab_size)
        return self._tokenizer

    # ---------------------------------------------------------------- tokenization
    def _tokenize_batch(self, rows: dict[str, list], indices: list[int], parse) -> dict[str, list]:
        keys = list(rows)
        out = collections.defaultdict(list)
        triples = []
        for i in range(len(indices)):
            row = {k: rows[k][i] for k in keys}
            try:
                triples.append(parse(row))
                out["bad_kind"].append("")
                out["bad_field"].append("")
                out["bad_message"].append("")
            except BadRow as bad:
                triples.append(("", "x", "y"))  # placeholder, dropped after the map
                out["bad_kind"].append(bad.kind)
                out["bad_field"].append(bad.field)
                out["bad_message"].append(bad.message)
        prompts, chosens, rejecteds = (list(t) for t in zip(*triples, strict=True)) if triples else ([], [], [])
        p_ids = prompt_ids(self.tokenizer, prompts)
        c_ids = response_ids(self.tokenizer, chosens)
        r_ids = response_ids(self.tokenizer, rejecteds)
        for p, c, r, idx in zip(p_ids, c_ids, r_ids, indices, strict=True):
            p, c, r = truncate_pair(
                p,
                c,
                r,
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
                truncation_mode=self.truncation_mode,
            )
            out["prompt_input_ids"].append(p)
            out["chosen_input_ids"].append(c)
            out["rejected_input_ids"].append(r)
            out["index"].append(idx)
        return dict(out)

    def _prepare_split(self, split: str) -> datasets.Dataset:
        source = self.source(split)
        raw = source.dataset
        fmt = self.format if self.format != "auto" else None
        try:
            fmt = fmt or detect_format(raw.column_names)
        except ValueError as err:
            raise DataError(f"{source.where(0).split(',')[0]}: {err}") from None
        tokenized = raw.map(
            self._tokenize_batch,
            fn_kwargs={"parse": PARSERS[fmt]},
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            desc=f"tokenizing {split}",
        )
        kinds = tokenized["bad_kind"]
        bad = [i for i, k in enumerate(kinds) if k]
        if bad:
            counts = collections.Counter(kinds[i] for i in bad)
            summary = ", ".join(f"{k}: {n}" for k, n in counts.most_common())
            if self.on_bad_row == "error":
                first = tokenized[bad[0]]
                raise DataError(
                    f"{source.where(first['index'])}, field {first['bad_field']!r}: {first['bad_message']}. "
                    f"{len(bad)} bad record(s) in {split} ({summary}). Fix the data, or set "
                    "data.on_bad_row=skip to skip them with a count."
                )
            self.skipped[split] = counts
            rank_zero_info(f"data: skipped {len(bad)} of {len(raw)} {split} records ({summary})")
            keep = sorted(set(range(len(tokenized))) - set(bad))
            tokenized = tokenized.select(keep)
        return tokenized.remove_columns(["bad_kind", "bad_field", "bad_message"])

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        train = self._prepare_split("train")
        if self.val_files:
            self.datasets["train"] = train
            self.datasets["val"] = self._prepare_split("val")
        else:
            split = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
            self.datasets["train"], self.datasets["val"] = split["train"], split["test"]
        self.datasets["test"] = self.datasets["val"]
        if self.label_noise > 0:
            self.datasets["train"] = self._flip_labels(self.datasets["train"])
        rank_zero_info(
            f"data: {len(self.datasets['train'])} train pairs, {len(self.datasets['val'])} val pairs "
            f"(max_length {self.max_length}, max_prompt_length {self.max_prompt_length})"
        )

    def _flip_labels(self, train: datasets.Dataset) -> datasets.Dataset:
        """Swap chosen and rejected in a seeded ``label_noise`` fraction of the training pairs."""
        n_flip = round(self.label_noise * len(train))
        generator = torch.Generator().manual_seed(self.seed + 1)
        flipped = set(torch.randperm(len(train), generator=generator)[:n_flip].tolist())

        def swap(row: dict[str, Any], i: int) -> dict[str, Any]:
            if i in flipped:
                row["chosen_input_ids"], row["rejected_input_ids"] = (
                    row["rejected_input_ids"],
                    row["chosen_input_ids"],
                )
            return row

        rank_zero_info(f"data: label_noise {self.label_noise}: swapped chosen/rejected in {n_flip} train pairs")
        return train.map(swap, with_indices=True, desc="flipping labels")

    # ---------------------------------------------------------------- loaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.datasets[split].with_format(None),
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=PairCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}
