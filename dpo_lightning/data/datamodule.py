"""PreferenceDataModule: preference data -> tokenized pairs (or unpaired rows) -> audited -> batches of 2B sequences.

    dpo-lightning fit --config experiments/tiny_cpu.yaml       # data.* keys are this class's arguments
    dpo-lightning audit --config experiments/tiny_cpu.yaml     # the same checks, as a report (audit.py)

Data flows one way: records (``sources``: files, folders, hub) -> (prompt, chosen, rejected) strings
(``formats``/``chat``) -> token ids with truncation and per-pair statistics (``tokenize``, cached by
``datasets``) -> audit thresholds checked at setup (``audit``) -> length-grouped, rank-sharded, resumable
batches (``sampler``, ``loaders``) -> padded concatenated batches (``PairCollator``), or with ``data.packing`` /
``data.share_prompt`` packed / prompt-shared ones (``packing``).

Unpaired data (KTO): ``data.format: unpaired`` rows ``{prompt, completion, label}``, or any paired format with
``data.unpair: true`` (each pair -> a desirable and an undesirable row), are tokenized into rows
``{prompt_input_ids, completion_input_ids, label, index, record}`` (``tokenize.tokenize_unpaired_rows``) and
collated by ``UnpairedCollator``: 2B sequences, the B matched rows, then B mismatched ones (prompt_i +
completion_{(i+1) mod B}) for KTO's KL reference point. What changes for them:

- ``index`` is a row id unique in the split (the record, or with ``unpair`` 2·record and 2·record + 1), so
  reference tables and guards keyed by ``batch["index"]`` work; ``record`` is the source record, named by errors.
- The validation split (``val_fraction``) is drawn by record and ``label_noise`` flips the labels of records
  (``splits``, the home of the train/val split and label noise of both kinds).
- Length grouping uses prompt + completion; the audit reports prompt/completion lengths, the desirable share
  and the desirable-minus-undesirable completion length gap; ``max_truncation_rate`` checks the completions.
- ``identical``: two rows of a pair (``unpair``) that are identical after truncation carry opposite labels for
  one text; they are counted (in rows) and dropped with ``drop_identical``, as identical pairs are.
- Train and val must both be paired or both unpaired (``unpair`` makes both unpaired; ``splits``).

Resuming the data order mid-epoch (for exact resume):

- The training order is a pure function of (``data.seed``, epoch, data-parallel rank and world size,
  ``batch_size``, the Trainer's ``accumulate_grad_batches``, the data); ``train_dataloader()`` returns a
  ``ResumableDataLoader`` whose sampler (``PreferenceSampler``, a ``DistributedSampler``) has ``set_epoch``.
  Lightning calls ``set_epoch`` at every epoch start and leaves the sampler in place under DDP/FSDP (it already
  is a distributed sampler).
- ``state_dict()`` of the data module returns ``{"seed", "train_order": {"epoch", "batches", ...}}``, where
  ``batches`` counts the batches handed out in the current epoch; ``load_state_dict()`` makes the next
  iteration of that epoch skip them (without loading them). Lightning saves both this and the loader's own
  ``state_dict()`` (the fit loop stores stateful train loaders' states) in every checkpoint and restores them
  before iterating, so ``trainer.fit(..., ckpt_path=...)`` from a mid-epoch checkpoint feeds exactly the
  batches an uninterrupted run would have received. Without Lightning: ``dm.load_state_dict(state)`` before
  or after ``dm.train_dataloader()``, then ``loader.sampler.set_epoch(epoch)`` and iterate.
"""

from __future__ import annotations

import collections
import inspect
from typing import Any, Literal

import datasets
import lightning.pytorch as pl
import numpy as np
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dpo_lightning.data import audit, chat, formats, tokenize
from dpo_lightning.data.cache import cached_bpe_tokenizer, tokenizer_fingerprint
from dpo_lightning.data.chat import PLAIN_TURN, ChatRenderer
from dpo_lightning.data.formats import UNPAIRED, FormatName, apply_columns, detect_format, make_parser
from dpo_lightning.data.loaders import PairLoaders
from dpo_lightning.data.packing import LayoutCollator, check_layout
from dpo_lightning.data.sampler import ResumableDataLoader
from dpo_lightning.data.sources import Source
from dpo_lightning.data.splits import check_same_kind, flip_pair_labels, flip_unpaired_labels, hold_out, is_unpaired
from dpo_lightning.data.tokenize import (
    BAD_COLUMNS,
    STAT_COLUMNS,
    UNPAIRED_STAT_COLUMNS,
    PairCollator,
    TruncationMode,
    UnpairedCollator,
)
from dpo_lightning.data.train_order import TrainOrderState
from dpo_lightning.errors import ConfigError, DataError
from dpo_lightning.tokenizer import load_tokenizer

LOADER_COLUMNS = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "index"]
UNPAIRED_LOADER_COLUMNS = ["prompt_input_ids", "completion_input_ids", "label", "index"]
# the code that turns records into ids: a change to it retires the tokenized-dataset cache
CODE_VERSION = Hasher.hash([inspect.getsource(m) for m in (formats, chat, tokenize)])


class PreferenceDataModule(PairLoaders, TrainOrderState, pl.LightningDataModule):  # loaders: loaders.py
    def __init__(
        self,
        train_files: str | list[str] | dict[str, Any],
        val_files: str | list[str] | dict[str, Any] | None = None,
        val_fraction: float = 0.05,
        format: FormatName = "auto",
        unpair: bool = False,
        hub_fallback: dict[str, Any] | None = None,
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
        columns: dict[str, str] | None = None,
        chat_template: str | None = None,
        chat_turn: str = PLAIN_TURN,
        max_field_chars: int | None = 250_000,
        drop_identical: bool = True,
        group_by_length: bool = True,
        mega_batch: int = 50,
        max_bad_row_rate: float | None = None,
        max_truncation_rate: float | None = None,
        max_identical_rate: float | None = None,
        packing: bool = False,
        share_prompt: bool = False,
    ):
        """Preference pairs from files, folders or a hub dataset, tokenized, audited and batched for DPO.

        Args:
            train_files: file(s) or folder(s) of JSONL/JSON/Parquet/CSV (gzip too), or ``load_dataset`` kwargs
                of a hub dataset, e.g. ``{path: Anthropic/hh-rlhf, data_dir: harmless-base, split: test}``.
            val_files: validation data, same forms; when absent, ``val_fraction`` of the training pairs is held out.
            val_fraction: fraction held out for validation (seeded) when there are no ``val_files``; 0 holds
                nothing out and turns validation off (no validation loop).
            format: ``explicit`` ({prompt, chosen, rejected} strings), ``hh`` (HH-RLHF transcripts), ``chat``
                (message lists), ``unpaired`` ({prompt, completion, label} rows, label true/1 = desirable; for
                KTO) or ``auto`` (from the column names and types).
            unpair: split each pair of a paired format into two unpaired rows, (prompt, chosen, desirable) and
                (prompt, rejected, undesirable), as TRL's ``unpair_preference_dataset`` does (for KTO on paired
                data); unpaired data is left as it is.
            hub_fallback: ``load_dataset`` kwargs used when the local training files are absent.
            tokenizer: a tokenizer directory (or hub name); ``None`` trains a byte-level BPE on the training text
                (cached, keyed by the data and the vocabulary size).
            tokenizer_vocab_size: vocabulary of the trained BPE when ``tokenizer`` is ``None``.
            max_length: longest prompt + response, in tokens.
            max_prompt_length: prompts are cut to this when prompt + response exceeds ``max_length``.
            truncation_mode: which end of a long prompt survives: ``keep_end`` (dialogue) or ``keep_start``.
            max_rows: read at most this many training records (quick runs); ``None`` reads them all.
            label_noise: fraction of training pairs whose chosen and rejected are swapped (seeded by ``seed``),
                to study robustness to noisy preferences (the setting cDPO is designed for). Validation is
                never flipped. Unpaired data: the label of that fraction of training records is flipped (with
                ``unpair``, both rows of the pair: the same as swapping chosen and rejected).
            on_bad_row: ``error`` stops at setup naming file, record and field; ``skip`` drops bad records and
                counts them by kind (printed at setup, listed with examples by the audit).
            batch_size: preference pairs (or unpaired rows) per training batch per process (the model sees 2x
                sequences).
            eval_batch_size: pairs per validation/test batch; defaults to ``batch_size``.
            num_workers: DataLoader worker processes.
            seed: seed of the validation split and of the training order (with the epoch).
            columns: our names -> the data's, for other column names: ``{prompt: instruction, chosen: better,
                rejected: worse}``, or for unpaired rows ``{completion: response, label: thumbs_up}``.
            chat_template: for ``chat`` rows: ``None`` uses the tokenizer's chat template when it has one, else
                the plain ``chat_turn``; ``plain`` always the plain one; any other string is a Jinja template.
            chat_turn: the plain template of one chat turn, with ``{role}`` (capitalised) and ``{content}``.
            max_field_chars: a text field longer than this is a bad record (a runaway row), ``None``: no limit.
            drop_identical: drop pairs whose chosen and rejected are identical after truncation (they carry
                zero gradient); they are counted either way.
            group_by_length: batch pairs of similar length together (mega-batch sort) to cut padding.
            mega_batch: optimizer steps per length-sorted mega-batch when ``group_by_length``. The groups are whole
                optimizer steps (``batch_size`` × ranks × the attached Trainer's ``accumulate_grad_batches``), so
                accumulation trains on the same steps as one larger batch.
            max_bad_row_rate: fail at setup when more than this fraction of records is bad (with ``skip``).
            max_truncation_rate: fail at setup when more than this fraction of chosen or of rejected responses
                is truncated.
            max_identical_rate: fail at setup when more than this fraction of pairs is identical after truncation.
            packing: bin-pack a batch's sequences into rows without padding, attention kept within each sequence
                (``packing.py``; unpaired rows too).
            share_prompt: lay out each pair as [prompt | chosen | rejected], the prompt computed once (pairs only).
        """
        super().__init__()
        if max_prompt_length >= max_length:
            raise ConfigError(
                f"data.max_prompt_length ({max_prompt_length}) must be smaller than data.max_length "
                f"({max_length}), or responses would be cut to nothing"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1) (0: no validation split), got {val_fraction}")
        if not 0.0 <= label_noise <= 1.0:
            raise ConfigError(f"data.label_noise must be in [0, 1], got {label_noise}")
        for key, rate in (
            ("max_bad_row_rate", max_bad_row_rate),
            ("max_truncation_rate", max_truncation_rate),
            ("max_identical_rate", max_identical_rate),
        ):
            if rate is not None and not 0.0 <= rate <= 1.0:
                raise ConfigError(f"data.{key} must be in [0, 1] (or null), got {rate}")
        if "{role}" not in chat_turn or "{content}" not in chat_turn:
            raise ConfigError(f"data.chat_turn must contain {{role}} and {{content}}, got {chat_turn!r}")
        self.train_files = train_files if isinstance(train_files, dict | list) else [train_files]
        self.val_files = [val_files] if isinstance(val_files, str) else (val_files or None)
        self.val_fraction = val_fraction
        self.format = format
        self.unpair = bool(unpair)
        self.hub_fallback = hub_fallback
        self.tokenizer_path = tokenizer
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.max_rows = max_rows
        self.label_noise = label_noise
        self.on_bad_row = on_bad_row
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.columns = dict(columns) if columns else None
        self.chat_template = chat_template
        self.chat_turn = chat_turn
        self.max_field_chars = max_field_chars
        self.drop_identical = drop_identical
        self.group_by_length = group_by_length
        self.mega_batch = mega_batch
        self.packing, self.share_prompt = bool(packing), bool(share_prompt)
        self.thresholds = {
            "max_bad_row_rate": max_bad_row_rate,
            "max_truncation_rate": max_truncation_rate,
            "max_identical_rate": max_identical_rate,
        }
        self._tokenizer = None
        self._sources: dict[str, Source] = {}
        self.datasets: dict[str, datasets.Dataset] = {}
        self.skipped: dict[str, collections.Counter] = {}  # split -> bad kind -> count
        self.bad_rows: dict[str, dict[str, dict[str, Any]]] = {}  # split -> kind -> {count, examples}
        self.rows: dict[str, int] = {}  # split -> records read
        # split -> STAT_COLUMNS of the good pairs (unpaired rows: UNPAIRED_STAT_COLUMNS and label)
        self.stats: dict[str, dict[str, np.ndarray]] = {}
        self.identical: dict[str, int] = {}  # split -> pairs identical after truncation
        self.formats: dict[str, str] = {}  # split -> format used
        self.from_cache: dict[str, bool] = {}  # split -> tokenized pairs came from the datasets cache
        self.report: dict[str, Any] | None = None  # the audit report built at setup
        self._train_loader: ResumableDataLoader | None = None
        self._order_state: dict[str, Any] | None = None

    # ---------------------------------------------------------------- sources and tokenizer
    def source(self, split: str) -> Source:
        """The raw records of ``train``/``val``, columns renamed to ours (``data.columns``)."""
        if split not in self._sources:
            spec = self.train_files if split == "train" else self.val_files
            source = Source(spec, split, self.hub_fallback if split == "train" else None)
            if split == "train" and self.max_rows is not None:
                source.dataset = source.dataset.select(range(min(self.max_rows, len(source.dataset))))
            try:
                source.dataset = apply_columns(source.dataset, self.columns, source.file())
            except ValueError as err:
                raise ConfigError(str(err)) from None
            self._sources[split] = source
        return self._sources[split]

    @property
    def tokenizer(self):
        """The tokenizer, loaded or trained on first use (the model reads its vocabulary size from it)."""
        if self._tokenizer is None:
            if self.tokenizer_path:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:
                self._tokenizer = cached_bpe_tokenizer(self.source("train").dataset, self.tokenizer_vocab_size)
        return self._tokenizer

    # ---------------------------------------------------------------- tokenization
    def _split_format(self, source: Source) -> str:
        if self.format != "auto":
            return self.format
        try:
            return detect_format(source.dataset.column_names, source.dataset.features)
        except ValueError as err:
            raise DataError(f"{source.file()}: {err}") from None

    @property
    def unpaired(self) -> bool:
        """Whether the splits hold unpaired rows (``data.format: unpaired``, or ``data.unpair``) rather than pairs:
        then batches come from ``UnpairedCollator``. Reads the training source to tell when the format is auto."""
        if self.unpair or self.format == UNPAIRED:
            return True
        fmt = self.formats.get("train") or self._split_format(self.source("train"))
        return is_unpaired(fmt, self.unpair)

    @property
    def loader_columns(self) -> list[str]:
        """The dataset columns the collator reads."""
        return UNPAIRED_LOADER_COLUMNS if self.unpaired else LOADER_COLUMNS

    def collator(self) -> PairCollator | UnpairedCollator | LayoutCollator:
        """The collate function of this data: ``UnpairedCollator`` for unpaired rows (mismatched rows cut at
        ``max_length`` as rows are), else ``PairCollator``; with ``packing``/``share_prompt`` a ``LayoutCollator``."""
        tok = self.tokenizer
        check_layout(self.packing, self.share_prompt, self.unpaired)
        if self.unpaired:
            rows = UnpairedCollator(
                tok.pad_token_id, self.max_length, self.max_prompt_length, self.truncation_mode, tok.bos_token_id
            )
            return LayoutCollator(tok.pad_token_id, True, False, rows.rows) if self.packing else rows
        if self.packing or self.share_prompt:
            return LayoutCollator(tok.pad_token_id, self.packing, self.share_prompt)
        return PairCollator(tok.pad_token_id)

    def _tokenize_fingerprint(self, raw: datasets.Dataset, fmt: str) -> str:
        """Everything the tokenized pairs depend on: data, tokenizer, settings, and this package's code."""
        settings = [fmt, self.columns, self.max_length, self.max_prompt_length, self.truncation_mode]
        settings += [self.unpair and fmt != UNPAIRED]
        settings += [self.max_field_chars, self.chat_template if fmt == "chat" else None]
        settings += [self.chat_turn if fmt == "chat" else None]
        return Hasher.hash([raw._fingerprint, tokenizer_fingerprint(self.tokenizer), settings, CODE_VERSION])

    def _prepare_split(self, split: str, enforce: bool = True) -> datasets.Dataset:
        source = self.source(split)
        raw = source.dataset
        fmt = self.formats[split] = self._split_format(source)
        unpaired = is_unpaired(fmt, self.unpair)
        renderer = ChatRenderer(self.tokenizer, self.chat_template, self.chat_turn) if fmt == "chat" else None
        calls = [0]
        fn_kwargs = {
            "parse": make_parser(fmt, renderer=renderer, max_chars=self.max_field_chars),
            "tokenizer": self.tokenizer,
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "truncation_mode": self.truncation_mode,
            "calls": calls,
        }
        if unpaired:
            fn_kwargs["unpair"] = fmt != UNPAIRED
        tokenized = raw.map(
            tokenize.tokenize_unpaired_rows if unpaired else tokenize.tokenize_rows,
            fn_kwargs=fn_kwargs,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            new_fingerprint=self._tokenize_fingerprint(raw, fmt),
            desc=f"tokenizing {split}",
        )
        self.from_cache[split] = calls[0] == 0
        self.rows[split] = len(raw)
        bad, self.skipped[split], self.bad_rows[split] = audit.collect_bad_rows(tokenized, source.where)
        if bad and self.on_bad_row == "error" and enforce:
            summary = ", ".join(f"{k}: {n}" for k, n in self.skipped[split].most_common())
            first = tokenized[bad[0]]
            field = f", field {first['bad_field']!r}" if first["bad_field"] else ""
            where = source.where(first.get("record", bad[0]))  # unpaired rows name their record
            raise DataError(
                f"{where}{field}: {first['bad_message']}. {len(bad)} bad record(s) in {split} "
                f"({summary}). Fix the data, or set data.on_bad_row=skip to skip them with a count."
            )
        if bad:
            tokenized = tokenized.select(sorted(set(range(len(tokenized))) - set(bad)))
        tokenized = tokenized.remove_columns(list(BAD_COLUMNS))
        stat_columns = [*UNPAIRED_STAT_COLUMNS, "label"] if unpaired else list(STAT_COLUMNS)
        self.stats[split] = tokenized.with_format("numpy", columns=stat_columns)[:]
        identical = np.flatnonzero(self.stats[split]["identical"])
        self.identical[split] = len(identical)
        if self.drop_identical and len(identical):
            tokenized = tokenized.select(np.flatnonzero(~self.stats[split]["identical"]))
        if len(tokenized) == 0:
            raise DataError(
                f"{source.file()}: no usable {'rows' if unpaired else 'pairs'} in {split} "
                f"({len(raw)} records, "
                f"{len(bad)} bad, {len(identical)} identical after truncation)"
            )
        return tokenized

    def prepare(self, enforce_thresholds: bool = True) -> None:
        """Read, tokenize (or load from cache), split and audit the data. ``setup`` calls it; ``audit`` calls it
        with ``enforce_thresholds=False`` to report what ``fit`` would stop on."""
        if self.datasets:
            return
        train = self._prepare_split("train", enforce_thresholds)
        unpaired = is_unpaired(self.formats["train"], self.unpair)
        if self.val_files:
            val = self._prepare_split("val", enforce_thresholds)
            check_same_kind(self.formats, self.unpair)
            self.datasets["train"], self.datasets["val"] = train, val
        else:
            self.datasets["train"], self.datasets["val"] = hold_out(train, self.val_fraction, self.seed, unpaired)
        self.datasets["test"] = self.datasets["val"]
        if self.label_noise > 0:
            flip = flip_unpaired_labels if unpaired else flip_pair_labels
            self.datasets["train"] = flip(self.datasets["train"], self.label_noise, self.seed)
        if unpaired and self.batch_size < 2:
            rank_zero_warn(
                "data.batch_size 1 with unpaired rows: a batch has no other completion to mismatch with, so the "
                "KL reference point (KTO's z0) is estimated from each row's own completion; use data.batch_size >= 2"
            )
        self.report = audit.build_report(self)
        rank_zero_info(audit.summary_line(self.report))
        crossed = audit.violations(self.report)
        if crossed and enforce_thresholds:
            self.datasets.clear()
            raise DataError(
                "data audit: " + "; ".join(crossed) + ". Adjust the data or max_length, or the threshold; "
                "`dpo-lightning audit --config <the same config>` prints the full report."
            )

    def setup(self, stage: str | None = None) -> None:
        self.prepare(enforce_thresholds=True)
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero and trainer.loggers and self.report is not None:
            # the run folder as Trainer.log_dir finds it, without its broadcast (a collective only rank 0 would join)
            logger = trainer.loggers[0]
            if folder := getattr(logger, "log_dir", None) or logger.save_dir:
                audit.write_report(self.report, folder, self.stats.get("train"))

    # ---------------------------------------------------------------- checkpointed state
    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "train_order"}``; ``train_order`` is the training loader's position (see the module doc)."""
        return {"seed": self.seed, **self.train_order()}
