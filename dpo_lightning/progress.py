"""The training progress bar of a ``max_steps`` run: optimizer steps out of ``max_steps``, not ``Epoch 0/-2``.

A run bounded by ``trainer.max_steps`` has ``max_epochs = -1``, and Lightning's rich bar then reads
``Epoch 0/-2`` and counts the batches of one epoch. :class:`StepProgressBar` takes the place of Lightning's
default rich bar (through ``configure_callbacks`` of PreferenceModule and SFTModule) on such runs: one bar for
the whole run whose count is ``trainer.global_step`` out of ``max_steps``, described as ``Step``. Any other
run, a progress bar of the user's own class, or ``enable_progress_bar: false``, is left alone.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


def bounded_by_steps(trainer: Any) -> bool:
    """Whether the run ends at ``max_steps`` rather than after a number of epochs."""
    return trainer.max_epochs in (None, -1) and trainer.max_steps is not None and trainer.max_steps > 0


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting optimizer steps out of ``max_steps`` on a step-bounded run."""

    @property
    def total_train_batches(self) -> int | float:
        if bounded_by_steps(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not bounded_by_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"  # padded as Lightning pads "Epoch N"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # resets the bar at each epoch: count on from the step
        if bounded_by_steps(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if bounded_by_steps(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)
            self.refresh()


def step_progress_bar(trainer: Any) -> list[pl.Callback]:
    """``[StepProgressBar]`` with the settings of the Trainer's default rich bar, to replace it; else ``[]``."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if type(bar) is not RichProgressBar:  # no bar, a TQDM bar (no "-2" there), or the user's own class
        return []
    return [
        StepProgressBar(
            refresh_rate=bar.refresh_rate, leave=bar._leave, theme=bar.theme, console_kwargs=bar._console_kwargs
        )
    ]
