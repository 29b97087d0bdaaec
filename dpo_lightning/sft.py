"""Supervised fine-tuning (SFT): next-token loss on responses, or on whole texts, as a LightningModule.

    dm = SFTDataModule.from_texts(reviews, tokenizer=tok, max_length=64, batch_size=32)
    module = SFTModule(policy_config={"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4},
                       lr=1e-3, warmup_steps=50, save_dir="runs/sft/model", tokenizer=tok)
    lightning.Trainer(max_steps=500, logger=False, enable_checkpointing=False).fit(module, dm)
    # runs/sft/model is a Hugging Face directory: the DPO policy and its reference start from it

Two uses in this project: the SFT stage that makes the reference model (DPO assumes preference data sampled
from, or close to, π_ref = π_SFT), and the Preferred-FT baseline, SFT on the chosen responses of preference
pairs. A record is either ``{text}`` (every token is a target) or ``{prompt, response}`` (only response tokens
are; the prompt is context). Prompt and response are tokenized separately, exactly as the preference data is
(``dpo_lightning.data.tokenize``), so a response seen in SFT and in DPO is the same token sequence.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from dpo_lightning.data.sources import builder_of
from dpo_lightning.data.tokenize import prompt_ids, response_ids
from dpo_lightning.errors import DataError
from dpo_lightning.logps import IGNORE_INDEX
from dpo_lightning.models import build_causal_lm
from dpo_lightning.models import disable_dropout as zero_dropout
from dpo_lightning.tokenizer import load_tokenizer, train_bpe_tokenizer


def sft_lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warmup to 1, then constant or cosine decay to 0 at ``total_steps`` (same shape as DPO's)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "cosine":
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


class SFTModule(pl.LightningModule):
    def __init__(
        self,
        policy: str | None = None,
        policy_config: dict[str, Any] | None = None,
        disable_dropout: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "cosine",
        save_dir: str | None = None,
        tokenizer: Any = None,
    ):
        """A causal LM trained with the mean next-token cross-entropy over target tokens.

        Args:
            policy: a local Hugging Face causal-LM directory (or hub name) to start from.
            policy_config: instead of ``policy``, a model config built with random init, e.g.
                ``{model_type: gpt2, n_layer: 4, n_embd: 128, n_head: 4, n_positions: 64}``; the vocabulary
                size and special-token ids come from the tokenizer.
            disable_dropout: set every dropout probability to 0.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW's decoupled weight decay.
            warmup_steps: linear warmup from 0 to ``lr`` over this many optimizer steps.
            lr_schedule: after warmup, ``constant`` or ``cosine`` decay to 0 at the last step.
            save_dir: at the end of training, save the model (and the tokenizer) here as a Hugging Face
                directory, the form ``model.policy`` of a DPO run loads.
            tokenizer: sizes a model built from ``policy_config`` (set by the CLI from the data module).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        self.policy = build_causal_lm(policy, policy_config, tokenizer)
        if disable_dropout:
            zero_dropout(self.policy)
        self.tokenizer = tokenizer
        self.val_loss = MeanMetric()
        self._batch_start = 0.0

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean NLL over target tokens, number of target tokens)."""
        logits = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]  # position t predicts token t+1
        n_tokens = (labels != IGNORE_INDEX).sum()
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return loss, n_tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.model_step(batch)
        self.log("train/loss", loss.detach(), batch_size=batch["input_ids"].shape[0], prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n_tokens = self.model_step(batch)
        self.val_loss.update(loss, weight=n_tokens)  # token-weighted, so the epoch value is a per-token mean
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._batch_start
        tokens = batch["attention_mask"].sum().item()
        self.log("train/tokens_per_sec", tokens / max(elapsed, 1e-9), on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def on_train_end(self) -> None:
        if self.hparams.save_dir and self.trainer.is_global_zero:
            self.policy.save_pretrained(self.hparams.save_dir)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(self.hparams.save_dir)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: sft_lr_factor(step, hp.warmup_steps, total, hp.lr_schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---------------------------------------------------------------------------------------------------- data
def tokenize_sft(
    tokenizer: Any,
    responses: Sequence[str],
    prompts: Sequence[str] | None = None,
    *,
    max_length: int,
    add_eos: bool = True,
) -> list[dict[str, list[int]]]:
    """Token ids and labels per record: prompt ids (labels ignored) + response ids + EOS, cut to max_length.

    A text cut at ``max_length`` loses its EOS, as it should: the text does not end there. ``add_eos=False``
    is for responses that were themselves cut (e.g. samples stopped at a token budget): an EOS after them
    would teach the model to stop where the budget, not the text, ended.
    """
    prompt_part = prompt_ids(tokenizer, list(prompts)) if prompts is not None else [[] for _ in responses]
    response_part = response_ids(tokenizer, list(responses))
    if not add_eos:
        response_part = [r[:-1] for r in response_part]  # response_ids always ends with the EOS
    rows = []
    for p, r in zip(prompt_part, response_part, strict=True):
        ids = (p + r)[:max_length]
        labels = ([IGNORE_INDEX] * len(p) + r)[:max_length]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class SFTCollator:
    """Right-pad records into ``input_ids``, ``attention_mask`` and ``labels`` (padding ignored), each (B, T)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class SFTDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        val_fraction: float = 0.05,
        response_field: str = "text",
        prompt_field: str | None = None,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 4096,
        max_length: int = 512,
        add_eos: bool = True,
        max_rows: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """SFT records from local files (JSONL/JSON/Parquet/CSV, gzip too), or from memory via :meth:`from_texts`.

        Args:
            train_files: file or files of training records.
            val_files: validation file(s); when absent, ``val_fraction`` of the training records is held out.
            val_fraction: fraction held out (seeded) when there are no ``val_files``; 0 turns validation off.
            response_field: the field trained on: ``text`` for whole documents, ``chosen`` for Preferred-FT
                on a ``{prompt, chosen, rejected}`` preference file.
            prompt_field: a context field whose tokens are not targets (e.g. ``prompt``); ``None`` for none.
            tokenizer: a tokenizer directory (or hub name); ``None`` trains a byte-level BPE on the training text.
            tokenizer_vocab_size: vocabulary of the trained BPE when ``tokenizer`` is ``None``.
            max_length: longest prompt + response, in tokens.
            add_eos: end each response with EOS; ``False`` for responses that were cut, not ended.
            max_rows: read at most this many training records.
            batch_size: records per training batch.
            eval_batch_size: records per validation batch; defaults to ``batch_size``.
            num_workers: DataLoader worker processes.
            seed: seed of the validation split and of the training shuffle.
        """
        super().__init__()
        self.train_files = [train_files] if isinstance(train_files, str) else train_files
        self.val_files = [val_files] if isinstance(val_files, str) else val_files
        self.val_fraction = val_fraction
        self.response_field = response_field
        self.prompt_field = prompt_field
        self.tokenizer_path = tokenizer
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.max_length = max_length
        self.add_eos = add_eos
        self.max_rows = max_rows
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer = None
        self._records: dict[str, list[dict[str, str]]] = {}
        self.rows: dict[str, list[dict[str, list[int]]]] = {}

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
            else:
                texts = (r["prompt"] + r["response"] for r in self._train_records())
                self._tokenizer = train_bpe_tokenizer(texts, vocab_size=self.tokenizer_vocab_size)
        return self._tokenizer

    def _train_records(self) -> list[dict[str, str]]:
        if "train" not in self._records:
            if not self.train_files:
                raise ValueError("SFTDataModule needs data.train_files (or records passed to from_texts)")
            self._records["train"] = self._read(self.train_files)
            if self.val_files:
                self._records["val"] = self._read(self.val_files)
        return self._records["train"]

    def _read(self, files: list[str]) -> list[dict[str, str]]:
        out = []
        for f in files:
            if not Path(f).exists():
                raise DataError(f"SFT data file {f} does not exist")
            table = datasets.load_dataset(builder_of(Path(f)), data_files=f, split="train")
            for field in (self.response_field, self.prompt_field):
                if field is not None and field not in table.column_names:
                    raise DataError(f"{f}: no field {field!r} (fields: {', '.join(table.column_names)})")
            prompts = table[self.prompt_field] if self.prompt_field else None
            out += _records(table[self.response_field], prompts)
        return out

    def _tokenize(self, records: list[dict[str, str]]) -> list[dict[str, list[int]]]:
        responses = [r["response"] for r in records]
        prompts = [r["prompt"] for r in records] if self.prompt_field else None
        return tokenize_sft(self.tokenizer, responses, prompts, max_length=self.max_length, add_eos=self.add_eos)

    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        train = self._train_records()
        train = train[: self.max_rows] if self.max_rows else train
        if "val" not in self._records and self.val_fraction > 0:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, int(round(self.val_fraction * len(train))))
            self._records["val"] = [train[i] for i in order[:n_val]]
            train = [train[i] for i in sorted(order[n_val:])]
        self.rows["train"] = self._tokenize(train)
        self.rows["val"] = self._tokenize(self._records["val"]) if self._records.get("val") else []

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.rows[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            collate_fn=SFTCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if self.rows.get("val") else []


def _records(responses: Sequence[str], prompts: Sequence[str] | None) -> list[dict[str, str]]:
    if prompts is not None and len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [
        {"response": str(r), "prompt": str(prompts[i]) if prompts is not None else ""} for i, r in enumerate(responses)
    ]
