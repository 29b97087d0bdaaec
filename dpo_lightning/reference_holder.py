"""How PreferenceModule holds its frozen reference: outside its registered children, yet moved and cast with it.

The reference is never in the optimizer, a state dict or a checkpoint (it is rebuilt from its source on resume,
and checked against a fingerprint of its config and weights, :func:`dpo_lightning.reference.model_fingerprint`),
yet ``.to``, precision plugins and ``train()`` reach it. With ``model.precompute_reference`` its log-probs come
from tables computed once (:func:`dpo_lightning.reference.prepare_splits`), keyed by the data they were computed
on, and, when fitting, it then leaves memory.

:class:`FrozenReference` is a mixin placed before ``pl.LightningModule`` in the bases; the module provides
``concatenated_logps(model, batch)`` and ``hparams.precompute_reference``, and its ``__init__`` calls
``_set_reference`` and sets ``reference_fingerprint = None`` and ``_reference_tables = {}``. The part without
log-probs, :class:`ReferenceHolder`, is PPOModule's too.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import nn

from dpo_lightning import reference as ref_store
from dpo_lightning.errors import ConfigError


class ReferenceHolder:
    """The reference property, its device/dtype/mode handling and its fingerprint: what every module with a frozen
    reference needs (PreferenceModule through :class:`FrozenReference`, PPOModule directly). The module's
    ``__init__`` calls ``_set_reference`` and sets ``reference_fingerprint = None``."""

    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference model (``None`` when reference-free or after precomputing its log-probs)."""
        return self.__dict__.get("_frozen_reference")

    def _set_reference(self, model: nn.Module | None) -> None:
        self.__dict__["_frozen_reference"] = model  # bypasses nn.Module registration on purpose

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Device moves and dtype casts (``.to``, precision plugins) reach the unregistered reference too."""
        super()._apply(fn, *args, **kwargs)
        if self.reference is not None:
            self.reference._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> Any:
        """Lightning switches the whole module to train mode each epoch; the reference must stay in eval."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    def setup(self, stage: str) -> None:
        if self.reference is not None and self.reference_fingerprint is None:
            self.reference_fingerprint = ref_store.model_fingerprint(self.reference)  # before sharding

    def check_reference_fingerprint(self, saved: str | None) -> None:
        """On resume: the reference rebuilt for this run must be the one the checkpoint was trained with."""
        if saved and self.reference_fingerprint and saved != self.reference_fingerprint:
            raise ConfigError(
                "the reference rebuilt for this run differs from the one the checkpoint was trained with "
                f"(weights fingerprint {self.reference_fingerprint} != {saved}). The reference is not stored in "
                "checkpoints: resume with the same model.policy/model.reference and, for a model built from "
                "model.policy_config, the same seed_everything."
            )


class FrozenReference(ReferenceHolder):
    """PreferenceModule's reference: the holder plus its log-probs, per step or from precomputed tables."""

    def reference_logps(self, batch: dict[str, torch.Tensor], split: str = "train") -> torch.Tensor:
        """Reference log-probs (2B,): from the precomputed store when there is one, else a no-grad forward."""
        if split in self._reference_tables:
            return self._reference_tables[split].lookup(batch["index"])
        if self.hparams.precompute_reference and self.reference is None:
            raise RuntimeError(f"no precomputed reference log-probs for the {split} split")
        if self.reference is None:
            return torch.zeros(2 * batch["index"].shape[0], device=self.device)  # 2B sequences, in any layout
        with torch.no_grad():
            return self.concatenated_logps(self.reference, batch)

    def _prepare_reference_logps(self, splits: tuple[str, ...]) -> None:
        """Load (or compute once and store) the reference log-probs of ``splits``; when fitting, then drop the
        reference from memory."""
        if not self.hparams.precompute_reference:
            return
        self._reference_tables.update(ref_store.prepare_splits(self, splits, self._reference_tables))  # by data key
        # a LoRA policy's reference (adapters off) holds no weights of its own: it stays
        holds_weights = self.reference is not None and next(self.reference.parameters(), None) is not None
        if self.trainer.state.fn == "fit" and holds_weights:
            self._set_reference(None)  # training runs the policy alone from here
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self._prepare_reference_logps(("val",))

    def on_test_start(self) -> None:
        self._prepare_reference_logps(("test",))
