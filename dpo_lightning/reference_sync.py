"""TR-DPO: a reference that follows the policy (Gorbatovski et al. 2024, https://arxiv.org/abs/2404.09656).

    model.reference_sync: {mode: soft, alpha: 0.6, every: 512}

Every ``every`` optimizer steps the reference is updated from the policy (§3 of the paper):

- soft: π_ref ← α·π_θ + (1 − α)·π_ref   (Eq. 4; α = 1 is a copy, α = 0 the frozen reference of DPO)
- hard: π_ref ← π_θ                       (Eq. 5)

The defaults α = 0.6, every = 512 are TRL's ``ref_model_mixup_alpha`` / ``ref_model_sync_steps`` (the paper
sweeps α ∈ [0.1, 0.8] and τ ∈ [32, 1024]). Parameters are updated shard by shard, so it works on an FSDP2-sharded
policy and reference alike. The synced reference is trained state: ``PreferenceModule`` saves it in checkpoints
(:meth:`ReferenceSync.full_state`) and loads it back at fit start (:meth:`ReferenceSync.load_full_state`), and
this callback's own state (the last step synced) rides in the checkpoint's callback states.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from dpo_lightning.errors import ConfigError


@dataclass
class SyncConfig:
    """How TR-DPO updates the reference from the policy."""

    mode: Literal["soft", "hard"] = "soft"
    """soft: π_ref ← α·π + (1 − α)·π_ref; hard: π_ref ← π."""
    alpha: float = 0.6
    """α of the soft update, in (0, 1]."""
    every: int = 512
    """Update every this many optimizer steps (τ in the paper)."""

    def __post_init__(self) -> None:
        if self.mode not in ("soft", "hard"):
            raise ConfigError(f"model.reference_sync.mode must be soft or hard, got {self.mode!r}")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"model.reference_sync.alpha must be in (0, 1], got {self.alpha}")
        if self.every < 1:
            raise ConfigError(f"model.reference_sync.every must be >= 1, got {self.every}")

    @classmethod
    def from_mapping(cls, settings: dict[str, Any]) -> SyncConfig:
        """``model.reference_sync`` as given in a config; a key other than mode, alpha, every is a ConfigError."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"model.reference_sync: unknown key(s) {unknown}; the keys are mode, alpha, every")
        return cls(**settings)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard, or the tensor itself


@torch.no_grad()
def sync_reference(policy: nn.Module, reference: nn.Module, alpha: float) -> None:
    """π_ref ← α·π + (1 − α)·π_ref, parameter by parameter (shard by shard under FSDP2)."""
    ref_params = dict(reference.named_parameters())
    for name, param in policy.named_parameters():
        if name not in ref_params:
            raise RuntimeError(f"reference_sync: the reference has no parameter {name!r}; policy and reference differ")
        target, source = _local(ref_params[name].data), _local(param.data)
        if target.shape != source.shape:
            raise RuntimeError(
                f"reference_sync: {name} is {tuple(source.shape)} in the policy, {tuple(target.shape)} in the reference"
            )
        target.lerp_(source.to(target.dtype), alpha)  # target + α (source − target)


class ReferenceSync(pl.Callback):
    """Applies :func:`sync_reference` after every ``every``-th optimizer step (before checkpoints are saved)."""

    def __init__(self, config: SyncConfig | dict[str, Any]):
        self.config = config if isinstance(config, SyncConfig) else SyncConfig.from_mapping(config)
        self.last_synced = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # optimizer steps done
        if step == self.last_synced or step % self.config.every:
            return
        alpha = 1.0 if self.config.mode == "hard" else self.config.alpha
        sync_reference(pl_module.policy, pl_module.reference, alpha)
        self.last_synced = step

    def state_dict(self) -> dict[str, Any]:
        return {"last_synced": self.last_synced}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_synced = int(state_dict.get("last_synced", 0))

    @staticmethod
    def full_state(reference: nn.Module) -> dict[str, torch.Tensor]:
        """The reference's parameters as full CPU tensors (gathers shards: every rank must call it)."""
        out = {}
        for name, param in reference.named_parameters():
            data = param.data.full_tensor() if hasattr(param.data, "full_tensor") else param.data
            out[name] = data.detach().to("cpu", copy=True)
        return out

    @staticmethod
    @torch.no_grad()
    def load_full_state(reference: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`full_state`: each rank copies its shard of the saved full tensors."""
        for name, param in reference.named_parameters():
            full = state[name]
            if hasattr(param.data, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                shard = distribute_tensor(
                    full.to(param.data.device, param.data.dtype), param.data.device_mesh, param.data.placements
                )
                param.data.to_local().copy_(shard.to_local())
            else:
                param.data.copy_(full.to(param.data.device, param.data.dtype))
