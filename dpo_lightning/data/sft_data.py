"""SFT data: records (text, chat conversations, or preference pairs' chosen side) -> token rows -> padded batches.

    dpo-lightning sft --config experiments/tiny_sft.yaml      # data.* keys are SFTDataModule's arguments

Records are read as ``fit`` reads preference data (``sources``: files, folders, hub specs; ``data.columns``; bad
records named by file, record and field, or skipped and counted), turned into (prompt, response) strings by the
formats of ``sft_rows``, tokenized as the preference data is (``tokenize``: the prompt is context, the response
ends with one EOS) and cut by the same rule (``truncate_row``). ``from_texts`` takes records held in memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from dpo_lightning.data.chat import PLAIN_TURN, ChatRenderer
from dpo_lightning.data.formats import BadRow, apply_columns
from dpo_lightning.data.sampler import PreferenceSampler, ResumableDataLoader
from dpo_lightning.data.sft_rows import SFTFormat, detect_sft_format, make_sft_parser
from dpo_lightning.data.sources import Source
from dpo_lightning.data.tokenize import TruncationMode, joint_ids, truncate_row
from dpo_lightning.data.train_order import TrainOrderState
from dpo_lightning.errors import ConfigError, DataError
from dpo_lightning.logps import IGNORE_INDEX
from dpo_lightning.tokenizer import load_tokenizer, train_bpe_tokenizer


def tokenize_sft(
    tokenizer: Any,
    responses: Sequence[str],
    prompts: Sequence[str] | None = None,
    *,
    max_length: int,
    add_eos: bool = True,
    max_prompt_length: int | None = None,
    truncation_mode: TruncationMode = "keep_end",
) -> list[dict[str, list[int]]]:
    """Token ids and labels per record: prompt ids (labels ignored) + response ids + EOS, cut to ``max_length``.

    The cut is the preference data's (``truncate_row``): the prompt first, to ``max_prompt_length`` (``None``: only
    a prompt longer than ``max_length`` is cut), when prompt + response is too long, then the response's end. A
    text cut at ``max_length`` loses its EOS, as it should: the text does not end there. ``add_eos=False`` is for
    responses that were themselves cut (e.g. samples stopped at a token budget): an EOS after them would teach the
    model to stop where the budget, not the text, ended.
    """
    texts = list(prompts) if prompts is not None else [""] * len(responses)  # "": the BOS (or EOS) leads
    encoded = joint_ids(tokenizer, texts, [[r] for r in responses])  # the preference data's prompt/response cut
    prompt_part, response_part = [p for p, _, _ in encoded], [rs[0] for _, rs, _ in encoded]
    if not add_eos:
        response_part = [r[:-1] for r in response_part]  # joint_ids always ends a response with the EOS
    keep = max_length if max_prompt_length is None else max_prompt_length
    rows = []
    for p, r in zip(prompt_part, response_part, strict=True):
        p, r = truncate_row(p, r, max_length=max_length, max_prompt_length=keep, truncation_mode=truncation_mode,
                            bos_token_id=tokenizer.bos_token_id)  # fmt: skip
        rows.append({"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r})
    return rows


class SFTCollator:
    """Right-pad records into ``input_ids``, ``attention_mask`` and ``labels`` (padding ignored), each (B, T), and
    ``index`` (B,), the records' rows in their split (named by errors)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
            mask[i, :n] = 1
        index = torch.tensor([int(r.get("index", i)) for i, r in enumerate(rows)], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "index": index}


class SFTDataModule(TrainOrderState, pl.LightningDataModule):
    def __init__(
        self,
        train_files: str | list[str] | dict[str, Any] | None = None,
        val_files: str | list[str] | dict[str, Any] | None = None,
        val_fraction: float = 0.05,
        format: SFTFormat = "auto",
        response_field: str = "text",
        prompt_field: str | None = None,
        columns: dict[str, str] | None = None,
        chat_template: str | None = None,
        chat_turn: str = PLAIN_TURN,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 4096,
        max_length: int = 512,
        max_prompt_length: int | None = None,
        truncation_mode: TruncationMode = "keep_end",
        add_eos: bool = True,
        max_rows: int | None = None,
        max_field_chars: int | None = 250_000,
        on_bad_row: Literal["error", "skip"] = "error",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """SFT records from files, folders or a hub dataset (read as ``fit`` reads them), or from memory.

        Args:
            train_files: file(s) or folder(s) of JSONL/JSON/Parquet/CSV (gzip too), or ``load_dataset`` kwargs.
            val_files: validation data, same forms; when absent, ``val_fraction`` of the training records is held out.
            val_fraction: fraction held out (seeded) when there are no ``val_files``; 0 turns validation off.
            format: ``text`` ({text}), ``messages`` (chat conversations), ``explicit``/``hh``/``chat`` (preference
                pairs: prompt and chosen response) or ``auto`` (from the columns); see ``data.sft_rows``.
            response_field: the text field of the ``text`` format.
            prompt_field: ``text`` format: a context field whose tokens are not targets; ``None`` for none.
            columns: our names -> the data's, as in ``fit`` (``{prompt: instruction, chosen: better, ...}``).
            chat_template: ``messages``/``chat`` rows: ``None`` the tokenizer's template (else the plain
                ``chat_turn``), ``plain``, or a Jinja template.
            chat_turn: the plain template of one chat turn, with ``{role}`` and ``{content}``.
            tokenizer: a tokenizer directory (or hub name); ``None`` trains a byte-level BPE on the training text.
            tokenizer_vocab_size: vocabulary of the trained BPE when ``tokenizer`` is ``None``.
            max_length: longest prompt + response, in tokens.
            max_prompt_length: prompts are cut to this when prompt + response exceeds ``max_length``; ``None``:
                only the response is cut (and a prompt longer than ``max_length``).
            truncation_mode: which end of a long prompt survives: ``keep_end`` (dialogue) or ``keep_start``.
            add_eos: end each response with EOS; ``False`` for responses that were cut, not ended.
            max_rows: read at most this many training records.
            max_field_chars: a text field longer than this is a bad record (a runaway row), ``None``: no limit.
            on_bad_row: ``error`` stops at setup naming file, record and field; ``skip`` drops bad records and
                prints their counts by kind.
            batch_size: records per training batch.
            eval_batch_size: records per validation batch; defaults to ``batch_size``.
            num_workers: DataLoader worker processes.
            seed: seed of the validation split and of the training shuffle.
        """
        super().__init__()
        if max_prompt_length is not None and max_prompt_length >= max_length:
            raise ConfigError(
                f"data.max_prompt_length ({max_prompt_length}) must be smaller than data.max_length ({max_length})"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1) (0: no validation split), got {val_fraction}")
        self.train_files = [train_files] if isinstance(train_files, str) else train_files
        self.val_files = [val_files] if isinstance(val_files, str) else val_files
        self.val_fraction = val_fraction
        self.format = format
        self.response_field = response_field
        self.prompt_field = prompt_field
        self.columns = dict(columns) if columns else None
        self.chat_template = chat_template
        self.chat_turn = chat_turn
        self.tokenizer_path = tokenizer
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation_mode = truncation_mode
        self.add_eos = add_eos
        self.max_rows = max_rows
        self.max_field_chars = max_field_chars
        self.on_bad_row = on_bad_row
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer = None
        self._records: dict[str, list[dict[str, str]]] = {}
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.skipped: dict[str, Counter] = {}  # split -> bad kind -> count (on_bad_row: skip)
        self._train_loader: ResumableDataLoader | None = None
        self._order_state: dict[str, Any] | None = None  # a checkpoint's loader position, before the loader exists

    @classmethod
    def from_texts(
        cls,
        responses: Sequence[str],
        *,
        tokenizer: Any,
        prompts: Sequence[str] | None = None,
        val_responses: Sequence[str] | None = None,
        val_prompts: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> SFTDataModule:
        """Records held in memory; ``tokenizer`` is a tokenizer object. Other kwargs as in ``__init__``."""
        dm = cls(prompt_field="prompt" if prompts is not None else None, **kwargs)
        dm._tokenizer = tokenizer
        dm._records["train"] = _records(responses, prompts)
        if val_responses is not None:
            dm._records["val"] = _records(val_responses, val_prompts)
        return dm

    @property
    def tokenizer(self):
        """The tokenizer, loaded or trained on first use (a model built from a config reads its vocabulary)."""
        if self._tokenizer is None:
            if self.tokenizer_path:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            else:  # trained on chat rows rendered with the plain template: a Jinja one needs the tokenizer
                texts = [r["prompt"] + r["response"] for r in self._train_records()]
                self._tokenizer = train_bpe_tokenizer(texts, vocab_size=self.tokenizer_vocab_size)
                if self.chat_template not in (None, "plain"):
                    self._records = {}  # read again, rendered with data.chat_template and the trained tokenizer
        return self._tokenizer

    def _train_records(self) -> list[dict[str, str]]:
        if "train" not in self._records:
            if not self.train_files:
                raise ConfigError("SFTDataModule needs data.train_files (or records passed to from_texts)")
            self._records["train"] = self._read(self.train_files, "train")
            if self.val_files:
                self._records["val"] = self._read(self.val_files, "val")
        return self._records["train"]

    def _read(self, spec: Any, split: str) -> list[dict[str, str]]:
        """The split's records as {prompt, response} strings; bad records stop the run or are counted."""
        source = Source(spec, split)
        data = source.dataset
        if split == "train" and self.max_rows is not None:
            data = data.select(range(min(self.max_rows, len(data))))
        first = source.file()
        try:
            data = apply_columns(data, self.columns, first)
            fmt = self.format if self.format != "auto" else detect_sft_format(data.column_names, data.features,
                                                                              self.response_field)  # fmt: skip
            if fmt == "text":
                for field in (self.response_field, self.prompt_field):
                    if field is not None and field not in data.column_names:
                        raise ValueError(f"no field {field!r} (fields: {', '.join(data.column_names)})")
            known = self._tokenizer is not None or self.tokenizer_path  # else the BPE is trained on these records
            template = self.chat_template if known else "plain"  # plain while the records train the tokenizer
            renderer = ChatRenderer(self.tokenizer if known else _NoTemplate, template, self.chat_turn)
            parse = make_sft_parser(fmt, renderer=renderer, response_field=self.response_field,
                                    prompt_field=self.prompt_field, max_chars=self.max_field_chars)  # fmt: skip
        except ValueError as err:
            raise DataError(f"{first}: {err}") from None
        out, bad = [], Counter()
        for i, row in enumerate(data):
            try:
                prompt, response = parse(row)
            except BadRow as err:
                if self.on_bad_row == "error":
                    raise DataError(
                        f"{source.where(i)}, field {err.field!r}: {err.message}. Fix the data, or set "
                        "data.on_bad_row=skip to skip bad records with a count."
                    ) from None
                bad[err.kind] += 1
                continue
            out.append({"prompt": prompt, "response": response})
        self.skipped[split] = bad
        if bad:
            kinds = ", ".join(f"{k}: {n}" for k, n in bad.most_common())
            rank_zero_info(f"sft data ({split}): skipped {sum(bad.values())} bad record(s) of {len(data)} ({kinds})")
        if not out:
            raise DataError(f"{first}: no usable records in {split} ({len(data)} records, {sum(bad.values())} bad)")
        return out

    def _tokenize(self, records: list[dict[str, str]], split: str) -> list[dict[str, Any]]:
        responses = [r["response"] for r in records]
        prompts = [r["prompt"] for r in records]
        rows = tokenize_sft(self.tokenizer, responses, prompts if any(prompts) else None, max_length=self.max_length,
                            add_eos=self.add_eos, max_prompt_length=self.max_prompt_length,
                            truncation_mode=self.truncation_mode)  # fmt: skip
        empty = sum(all(label == IGNORE_INDEX for label in row["labels"]) for row in rows)
        if empty:  # kept (they weigh nothing in the loss), but said: these records train nothing
            rank_zero_warn(
                f"sft data ({split}): {empty} of {len(rows)} record(s) have no target token left: the prompt "
                f"fills data.max_length ({self.max_length}); set data.max_prompt_length below it to keep some response"
            )
        return [{**row, "index": i} for i, row in enumerate(rows)]

    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        self.tokenizer  # noqa: B018 - first: training one may re-read the records (a Jinja chat template)
        train = self._train_records()
        train = train[: self.max_rows] if self.max_rows else train
        if "val" not in self._records and self.val_fraction > 0:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, int(round(self.val_fraction * len(train))))
            if n_val >= len(train):
                raise DataError(
                    f"sft data: data.val_fraction {self.val_fraction} of {len(train)} record(s) holds out "
                    f"{n_val}, leaving none to train on; add records, set data.val_files or data.val_fraction 0"
                )
            self._records["val"] = [train[i] for i in order[:n_val]]
            train = [train[i] for i in sorted(order[n_val:])]
        self.rows["train"] = self._tokenize(train, "train")
        self.rows["val"] = self._tokenize(self._records["val"], "val") if self._records.get("val") else []

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.rows[split],
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=SFTCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        """Seeded shuffle, sharded per rank, resumable mid-epoch (the preference data's ``PreferenceSampler`` without
        length grouping): a run resumed from a checkpoint trains on exactly the rest of the epoch."""
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        world, rank = (int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))) if kwargs else (1, 0)
        lengths = [len(r["input_ids"]) for r in self.rows["train"]]
        sampler = PreferenceSampler(lengths, batch_size=self.batch_size, num_replicas=world, rank=rank,
                                    seed=self.seed, group_by_length=False)  # fmt: skip
        collate = SFTCollator(self.tokenizer.pad_token_id)
        loader = ResumableDataLoader(
            self.rows["train"], sampler=sampler, collate_fn=collate, num_workers=self.num_workers
        )
        return self.resume_order(loader)

    def state_dict(self) -> dict[str, Any]:
        """``{"train_order"}``: the training loader's position in its epoch (saved in every checkpoint)."""
        return self.train_order()

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val") if self.rows.get("val") else []

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()


class _NoTemplate:
    """Stands in for the tokenizer while the records that train it are read: the plain chat template, no EOS."""

    chat_template = None
    eos_token = None


def _records(responses: Sequence[str], prompts: Sequence[str] | None) -> list[dict[str, str]]:
    if prompts is not None and len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [
        {"response": str(r), "prompt": str(prompts[i]) if prompts is not None else ""} for i, r in enumerate(responses)
    ]
