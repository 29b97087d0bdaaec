"""PPO for RLHF (Schulman et al. 2017, in the form of Ziegler et al. 2019 and Stiennon et al. 2020).

    dpo-lightning ppo --config experiments/tiny_ppo.yaml

- ``functions.py`` — the pure pieces: KL-penalised rewards, GAE, whitening, clipped losses, KL controllers.
- ``rollout.py``   — the value head, packing samples into rows, per-token log-probs/values, the rollout buffer.
- ``module.py``    — :class:`PPOModule`, the LightningModule (rollout, then one update per training step).
- ``data.py``      — :class:`PromptDataModule`: prompts, each batch served once per update of its rollout.
- ``cli.py``       — the ``ppo`` command.
"""

from typing import Any

__all__ = ["PPOModule", "PromptDataModule"]


def __getattr__(name: str) -> Any:
    """Lazy: ``functions`` alone (Part 1's bandit claim) must not import Lightning and transformers."""
    if name == "PPOModule":
        from dpo_lightning.ppo.module import PPOModule

        return PPOModule
    if name == "PromptDataModule":
        from dpo_lightning.ppo.data import PromptDataModule

        return PromptDataModule
    raise AttributeError(name)
