"""Validation and test means that are right across processes: every row counted once, and a NaN an error.

Two ways an epoch mean of torchmetrics goes quietly wrong, both fixed here for PreferenceModule and SFTModule:

- Under DDP/FSDP Lightning gives evaluation loaders a ``DistributedSampler``, which repeats rows so that every
  rank gets as many: with 5 pairs on 4 ranks, 3 pairs are scored twice. Those repeats get weight 0
  (``data.sampler.repeated_rows`` finds them from the sampler and the batch's position).
- ``MeanMetric``'s default ``nan_strategy`` drops a NaN with a warning, so one broken pair leaves the mean looking
  fine. Here the rows with a non-finite value are recorded as they come and, at the end of the epoch, every rank
  stops together with :class:`~dpo_lightning.guards.NonFiniteError` naming the metric and the dataset rows.
  (The metrics use ``nan_strategy="ignore"``, whose only effect is no warning before that error:
  ``"disable"`` would keep the NaN but, in torchmetrics 1.9, also replaces the weights with ones.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import MeanMetric

from dpo_lightning.data.sampler import repeated_rows
from dpo_lightning.guards import NonFiniteError
from dpo_lightning.strategy import all_gather_objects, any_rank

STAGES = ("val", "test")


def _key(metric: str) -> str:
    return metric.replace("/", "__")


def _loader(trainer: Any, stage: str) -> Any:
    """The evaluation DataLoader of ``stage`` as the Trainer holds it (with its distributed sampler), if one."""
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    return loaders if hasattr(loaders, "sampler") else None  # several loaders: no position to tell repeats by


def kept_rows(trainer: Any, stage: str, batch_idx: int, n: int) -> torch.Tensor:
    """(n,) bool: the rows of evaluation batch ``batch_idx`` that count (not a sampler's repeat of another row)."""
    loader = _loader(trainer, stage) if trainer is not None else None
    if loader is None or not loader.batch_size:
        return torch.ones(n, dtype=torch.bool)
    return ~repeated_rows(loader.sampler, batch_idx * loader.batch_size, n)


def _has(value: Any, bad: torch.Tensor) -> bool:
    values = value[0] if isinstance(value, tuple) else value
    return bool((~torch.isfinite(values) & bad).any())


class EvalMeans(nn.Module):
    """One ``MeanMetric`` per (stage, metric name), updated per batch and logged as epoch means.

    Args:
        names: metric names, e.g. ``loss``, ``rewards/margins`` (logged as ``{stage}/{name}``).
        prog_bar: the names also shown in the progress bar.
    """

    def __init__(self, names: list[str], prog_bar: tuple[str, ...] = ("loss",)):
        super().__init__()
        self.names = list(names)
        self.prog_bar = prog_bar
        self.metrics = nn.ModuleDict(
            {s: nn.ModuleDict({_key(m): MeanMetric(nan_strategy="ignore") for m in names}) for s in STAGES}
        )
        self._bad: dict[str, list[tuple[str, list[int]]]] = {s: [] for s in STAGES}

    def update(
        self,
        module: Any,
        stage: str,
        values: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
        batch_idx: int,
        index: torch.Tensor,
    ) -> None:
        """Add one batch: ``values`` maps a name to per-row values (B,) or (values, weights); ``index`` (B,) names
        the dataset rows in errors. Logs each metric (an epoch mean) through ``module.log``."""
        keep = kept_rows(module._trainer, stage, batch_idx, index.shape[0]).to(index.device)
        bad = torch.zeros_like(keep)
        for name, value in values.items():
            value, weight = value if isinstance(value, tuple) else (value, torch.ones_like(value))
            if value.shape != keep.shape:
                raise ValueError(f"{stage}/{name}: values {tuple(value.shape)} are not one per row ({keep.shape[0]})")
            if not weight.any():  # no row of this kind in the batch (e.g. no desirable row)
                continue
            weight = torch.where(keep, weight.float(), 0.0)
            counted = weight != 0
            non_finite = counted & ~torch.isfinite(value)
            bad |= non_finite
            # `where`: a row left out (weight 0) must not bring a NaN into the sum
            self.metrics[stage][_key(name)].update(torch.where(counted, value, 0.0), weight)
            module.log(
                f"{stage}/{name}",
                self.metrics[stage][_key(name)],
                on_step=False,
                on_epoch=True,
                prog_bar=name in self.prog_bar,
            )
        if bad.any():  # one host sync per batch
            first = next(name for name, value in values.items() if _has(value, bad))
            self._bad[stage].append((first, index[bad].tolist()))

    def check_finite(self, module: Any, stage: str) -> None:
        """At the end of an evaluation epoch: raise ``NonFiniteError`` on every rank when any rank saw a
        non-finite value (one all-reduce), naming the metric and the rows."""
        found, self._bad[stage] = self._bad[stage], []
        if not any_rank(bool(found), module.device):
            return
        everywhere = [item for rank_items in all_gather_objects(found) for item in rank_items]
        metric = everywhere[0][0]
        rows = sorted({r for _, rank_rows in everywhere for r in rank_rows})
        trainer = module._trainer
        step = trainer.global_step if trainer is not None else "?"
        raise NonFiniteError(
            f"non-finite {stage}/{metric} in the {stage} epoch at global step {step}: dataset rows (index) {rows}. "
            "A NaN is not dropped from the epoch means; inspect those rows (an empty response, an inf logit) or "
            "the model (lower model.lr, set trainer.gradient_clip_val)."
        )
