"""Supervised fine-tuning (SFT): next-token loss on responses, or on whole texts, as a LightningModule.

    dpo-lightning sft --config experiments/tiny_sft.yaml --run.dir runs/tiny_sft        # writes runs/tiny_sft/export
    dpo-lightning fit --config experiments/tiny_cpu.yaml --model.policy_config null --model.policy runs/tiny_sft/export

``sft`` is ``fit`` for this module and SFTDataModule (``model.*``, ``data.*``, ``trainer.*`` and ``run.*`` keys;
the run folder and loggers are fit's); the run ends by writing ``<run folder>/export``, a Hugging Face directory
(model + tokenizer) that ``model.policy`` of a DPO run loads, its reference defaulting to the same model. In code:

    dm = SFTDataModule.from_texts(reviews, tokenizer=tok, max_length=64, batch_size=32)
    module = SFTModule(policy_config={"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4},
                       lr=1e-3, warmup_steps=50, save_dir="runs/sft/model", tokenizer=tok)
    lightning.Trainer(max_steps=500, logger=False, enable_checkpointing=False).fit(module, dm)

Two uses in this project: the SFT stage that makes the reference model (DPO assumes preference data sampled
from, or close to, π_ref = π_SFT), and the Preferred-FT baseline, SFT on the chosen responses of preference
pairs. A record is plain text (every token is a target), a chat conversation, or a preference pair (its prompt
is context, its chosen response the target): ``data.sft_rows`` has the formats. Prompt and response are
tokenized as the preference data is (``dpo_lightning.data.tokenize``) and cut by the same rule
(``truncate_row``), so a response seen in SFT and in DPO is the same token sequence.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from dpo_lightning.data.sft_data import SFTCollator, SFTDataModule, tokenize_sft
from dpo_lightning.errors import ConfigError
from dpo_lightning.eval_means import EvalMeans
from dpo_lightning.logps import IGNORE_INDEX
from dpo_lightning.models import Attention, DType, build_causal_lm
from dpo_lightning.models import disable_dropout as zero_dropout
from dpo_lightning.progress import step_progress_bar
from dpo_lightning.schedule import lr_factor as sft_lr_factor

__all__ = ["SFTCollator", "SFTDataModule", "SFTModule", "sft_lr_factor", "tokenize_sft"]  # data: data/sft_data.py


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
        torch_dtype: DType = "float32",
        attn_implementation: Attention = "sdpa",
        trust_remote_code: bool = False,
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
                directory, the form ``model.policy`` of a DPO run loads; ``None``: ``<run folder>/export`` when
                the run has a log folder (``dpo-lightning sft`` always has one), else nowhere.
            torch_dtype, attn_implementation, trust_remote_code: how ``policy`` is loaded, as in ``fit``
                (:func:`dpo_lightning.models.build_causal_lm`): weights' dtype, attention kernel, and whether a
                model directory may run its own code (off unless asked for).
            tokenizer: sizes a model built from ``policy_config`` (set by the CLI from the data module).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        if lr <= 0:
            raise ConfigError(f"model.lr must be > 0, got {lr}")
        self.policy = build_causal_lm(
            policy, policy_config, tokenizer, torch_dtype=torch_dtype, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        if disable_dropout:
            zero_dropout(self.policy)
        self.tokenizer = tokenizer
        # val/test loss: a per-token mean over the epoch, repeats of a distributed sampler left out, NaN an error
        self.eval_means = EvalMeans(["loss"])
        self._batch_start = 0.0

    def row_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) summed NLL of each row's target tokens and (B,) their number (cross-entropy's ``ignore_index``
        leaves prompt and padding out, never multiplying by a mask)."""
        logits = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]  # position t predicts token t+1
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(labels.shape)  # (B, T-1), 0 where ignored
        return nll.sum(-1), (labels != IGNORE_INDEX).sum(-1)

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean NLL over the batch's target tokens, number of target tokens)."""
        sums, counts = self.row_losses(batch)
        n_tokens = counts.sum()
        return sums.sum() / n_tokens.clamp(min=1), n_tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self.model_step(batch)
        self.log("train/loss", loss.detach(), batch_size=batch["input_ids"].shape[0], prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str) -> None:
        sums, counts = self.row_losses(batch)
        per_token = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
        index = batch.get("index", torch.arange(sums.shape[0], device=sums.device))
        # weighted by target tokens, so the epoch value is a per-token mean over the split
        self.eval_means.update(self, stage, {"loss": (per_token, counts)}, batch_idx, index)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self.eval_means.check_finite(self, "val")

    def on_test_epoch_end(self) -> None:
        self.eval_means.check_finite(self, "test")

    def configure_callbacks(self) -> list[pl.Callback]:
        return step_progress_bar(self.trainer)  # `Epoch 0/-2` -> optimizer steps out of max_steps

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._batch_start
        tokens = batch["attention_mask"].sum().item()
        self.log("train/tokens_per_sec", tokens / max(elapsed, 1e-9), on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def _run_folder(self) -> str | None:
        """The run's log folder (``run.dir``), or ``None`` without a logger (then ``log_dir`` is the cwd)."""
        return self.trainer.log_dir if self.trainer.loggers else None

    def on_fit_start(self) -> None:
        """Save the tokenizer with the run, as ``fit`` does (``<run folder>/tokenizer``)."""
        folder = self._run_folder()
        if self.tokenizer is not None and folder and self.trainer.is_global_zero:
            self.tokenizer.save_pretrained(Path(folder) / "tokenizer")

    def on_train_end(self) -> None:
        """Write the trained model and its tokenizer as a Hugging Face directory (``save_dir`` or the run's
        ``export/``)."""
        folder = self._run_folder()
        out = self.hparams.save_dir or (str(Path(folder) / "export") if folder else None)
        if out and self.trainer.is_global_zero:
            self.policy.save_pretrained(out)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(out)
            rank_zero_info(f"sft: model and tokenizer written to {out}")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: sft_lr_factor(step, hp.warmup_steps, total, hp.lr_schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
