"""A data module's training order in its checkpoints: where the training loader stands, saved and restored.

Both data modules with a :class:`~dpo_lightning.data.sampler.ResumableDataLoader` (preference pairs and PPO's
prompts) keep it here, so a resumed run continues at the exact batch. A position loaded before the loader exists
(Lightning restores the data module first) waits until :meth:`TrainOrderState.resume_order` is handed the loader.
"""

from __future__ import annotations

from typing import Any


class TrainOrderState:
    """Mixin for a ``LightningDataModule``: ``state_dict()["train_order"]`` is the training loader's position.

    The class sets ``self._train_loader = None`` and ``self._order_state = None`` in ``__init__`` and passes each
    training loader it builds through :meth:`resume_order`.
    """

    _train_loader: Any
    _order_state: dict[str, Any] | None

    def resume_order(self, loader: Any) -> Any:
        """Apply a position loaded before ``loader`` existed, keep ``loader`` as the one saved; returns it."""
        if self._order_state is not None:
            loader.load_state_dict(self._order_state)
            self._order_state = None
        self._train_loader = loader
        return loader

    def train_order(self) -> dict[str, Any]:
        """``{"train_order": position}`` (epoch, batches served, ...), or ``{}`` before there is one."""
        if self._train_loader is not None:
            return {"train_order": self._train_loader.state_dict()}
        return {"train_order": self._order_state} if self._order_state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        order = state_dict.get("train_order")
        if order is None:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(order)
        else:
            self._order_state = dict(order)
