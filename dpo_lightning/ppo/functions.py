"""PPO's pure pieces: KL-penalised rewards, GAE, whitening, the clipped objectives and the KL controllers.

Every tensor here is in *response space*: (B, L), row b holding its response tokens left-aligned in columns
``0 .. len_b - 1`` and ``mask`` (B, L) marking them; column t is the state before response token t was chosen.
Nothing here touches a model, so each piece can be checked by hand (``tests/test_ppo_functions.py``).

References: Schulman et al. 2017, *Proximal Policy Optimization Algorithms* (arXiv 1707.06347), Eq. 7 (clipped
surrogate), Eq. 11-12 (GAE, from Schulman et al. 2016, arXiv 1506.02438); Ziegler et al. 2019, *Fine-Tuning
Language Models from Human Preferences* (arXiv 1909.08593), §2.2 (the reward r(x, y) − β log π/ρ and the adaptive
β of Eq. 2); Stiennon et al. 2020 (arXiv 2009.01325), Eq. 1 (the same per-token KL penalty).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_penalised_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (B, L): −β (log π − log π_ref) at every response token, plus the score at the last one.

    The sum over a row is R(x, y) = r(x, y) − β log π(y|x)/π_ref(y|x), the reward Ziegler et al. 2019 (§2.2) and
    Stiennon et al. 2020 (Eq. 1) maximise; spreading the KL term over tokens gives GAE a dense signal.

    Args:
        scores: (B,) the reward model's score of each (prompt, response).
        logps, ref_logps: (B, L) log-probs of the sampled tokens under the rollout policy and the reference.
        mask: (B, L) true at response tokens; every row must have at least one.
        kl_coef: β.
    """
    mask = mask.bool()
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = mask.sum(-1) - 1  # (B,) column of each row's last response token
    if (last < 0).any():
        raise ValueError("every row needs at least one response token")
    return rewards.scatter_add(1, last.unsqueeze(-1), scores.to(rewards.dtype).unsqueeze(-1))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and value targets, both (B, L) (Schulman et al. 2017, Eq. 11-12).

    δ_t = r_t + γ V_{t+1} − V_t and A_t = δ_t + γλ A_{t+1}, with V and A taken as 0 after a row's last token (the
    episode ends there). The value target is the λ-return A_t + V_t. Positions outside ``mask`` are 0.
    """
    mask = mask.to(rewards.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def whiten(
    x: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """(x − mean) / std over the masked positions; 0 elsewhere. ``shift_mean=False`` keeps the mean.

    ``reduce`` sums the statistics [Σx, Σx², n] over processes (e.g. an all-reduce), so every rank whitens with
    the statistics of the whole rollout batch. The variance is the population one (÷ n), as in Ziegler et al.'s
    released code (TRL divides by n − 1; at rollout-batch sizes the two barely differ).
    """
    m = mask.to(x.dtype)
    stats = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])
    if reduce is not None:
        stats = reduce(stats)
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = (stats[1] / n - mean * mean).clamp(min=0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, clip: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, as a loss: mean over tokens of max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)), ρ = π/π_old.

    Schulman et al. 2017, Eq. 7 (L^CLIP, negated to be minimised). Returns the loss and detached statistics:
    ``clipfrac`` (share of tokens where the clipped term is the one used) and ``approx_kl``, the estimate
    (ρ − 1) − log ρ of KL(π_old ‖ π), non-negative and unbiased (Schulman's "k3" estimator).
    """
    log_ratio = logps - old_logps
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float) -> Tensor:
    """½ mean over tokens of max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, −c, c).

    The clipped value objective of the PPO reference implementation (OpenAI baselines' ppo2), used by Ziegler
    et al. 2019's code: a value estimate moves at most ``clip`` from its rollout-time value per update.
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension: logsumexp(z) − Σ softmax(z)·z."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


# ---------------------------------------------------------------------------------------------------- KL coefficient
class FixedKLController:
    """β held constant."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, kl: float, n_samples: int) -> float:
        """Nothing changes; returns β."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, Eq. 2: e_t = clip(KL_t / KL_target − 1, −0.2, 0.2), β_{t+1} = β_t (1 + K_β e_t).

    The paper uses K_β = 0.1 per batch. ``horizon`` gives TRL's variant instead, K_β = n_samples / horizon, so
    the adaptation rate does not depend on the batch size.
    """

    def __init__(self, value: float, target: float, k_beta: float = 0.1, horizon: int | None = None):
        super().__init__(value)
        if target <= 0:
            raise ValueError(f"the KL target must be > 0, got {target}")
        self.target, self.k_beta, self.horizon = float(target), float(k_beta), horizon

    def update(self, kl: float, n_samples: int) -> float:
        """Move β after a rollout batch whose mean sequence KL was ``kl``; returns the new β."""
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        k_beta = n_samples / self.horizon if self.horizon else self.k_beta
        self.value *= 1.0 + k_beta * error
        return self.value
