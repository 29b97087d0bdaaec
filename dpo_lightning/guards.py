"""Stop a run at the first non-finite loss or gradient, before it can be saved.

PreferenceModule adds :class:`NonFiniteGuard` to every run (``model.guard_non_finite``). A NaN or inf loss, or
gradient, stops training with a message naming the global step and the dataset rows of the batch, before the
optimizer step; so the weights stay finite and the last checkpoint on disk is the last good one. As a last
line, a checkpoint is refused if any weight is non-finite. Every rank takes the same decision (one scalar
all-reduce per optimizer step), so a multi-process run stops together instead of hanging.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from dpo_lightning.errors import UserError
from dpo_lightning.strategy import all_gather_objects, any_rank


class NonFiniteError(UserError):
    """Training produced a NaN or inf; the message says where."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard on this rank


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    tensors = [_local(t) for t in tensors if t is not None]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class NonFiniteGuard(pl.Callback):
    """Raise :class:`NonFiniteError` on a non-finite loss or gradient, and never save non-finite weights."""

    def __init__(self) -> None:
        self._rows: list[int] = []  # dataset rows of the micro-batches since the last optimizer step
        self._bad_loss = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if isinstance(batch, dict) and "index" in batch:
            self._rows.extend(int(i) for i in batch["index"].tolist())

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._bad_loss = self._bad_loss or not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # fp16 with a gradient scaler produces infs by design and skips those steps itself
        check_grads = trainer.precision != "16-mixed"
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]] if check_grads else []
        bad_grad = not _all_finite(grads)
        bad_loss = any_rank(self._bad_loss, pl_module.device)
        bad_grad = any_rank(bad_grad, pl_module.device)
        if bad_loss or bad_grad:
            self._stop(trainer, "loss" if bad_loss else "gradient")
        self._rows, self._bad_loss = [], False  # this optimizer step's micro-batches were all finite

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if any_rank(not _all_finite(list(pl_module.parameters())), pl_module.device):
            self._stop(trainer, "weight", saving=True)

    def _stop(self, trainer: pl.Trainer, what: str, saving: bool = False) -> None:
        rows = sorted({r for rank_rows in all_gather_objects(self._rows) for r in rank_rows})
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written"
        action = "refusing to save a checkpoint" if saving else "stopping before the optimizer step"
        raise NonFiniteError(
            f"non-finite {what} at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"{action}. Batch rows (dataset index): {rows}. Last good checkpoint: {last}. "
            "Lower model.lr, set trainer.gradient_clip_val, or inspect those rows."
        )
