"""Pairwise losses with a reference that act on each response's log-ratio Δ separately, not only on h.

Δc = log π(y_c|x) − log π_ref(y_c|x), Δr = log π(y_r|x) − log π_ref(y_r|x), h = Δc − Δr. Such losses anchor the
absolute likelihood of a response to the reference (DPO only sees the difference, so both likelihoods can fall
together). Inputs are sequence log-probs (B,) as in ``pairwise.py``; rewards are β·Δ, detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_lightning.losses.pairwise import _margin_and_rewards
from dpo_lightning.losses.registry import LossOutput, register

Tensor = torch.Tensor
__all__ = ["dpop_loss", "nca_pair_loss", "bco_pair_loss", "apo_zero_loss", "apo_down_loss", "sppo_hard_loss"]


def _logratios(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return Δc, Δr (with grad) and the detached rewards βΔc, βΔr."""
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    return chosen, rejected, beta * chosen.detach(), beta * rejected.detach()


@register("dpop")
def dpop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    dpop_lambda: float = 50.0,
) -> LossOutput:
    """DPO-Positive, https://arxiv.org/abs/2402.13228 (Pal et al. 2024, "Smaug"), Eq. 3.

    L = −log σ(β(h − λ·max(0, log π_ref(y_c|x) − log π(y_c|x)))): DPO, plus a penalty, inside the sigmoid, once
    the chosen response falls below its reference likelihood. λ = ``dpop_lambda``, the paper's 50. The bracketing
    (λ-term inside β(·)) is that of the paper as corrected in its July 2024 revision. TRL has no DPOP.

    Args:
        dpop_lambda: λ ≥ 0. Other args and returns as in :func:`dpo_lightning.losses.dpo_loss`.
    """
    if dpop_lambda < 0:
        raise ValueError(f"dpop_loss: dpop_lambda must be >= 0, got {dpop_lambda}")
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    penalty = torch.relu(reference_chosen_logps - policy_chosen_logps)  # max(0, −Δc)
    losses = -F.logsigmoid(beta * (h - dpop_lambda * penalty))  # Eq. 3 of arXiv 2402.13228
    return losses, chosen_rewards, rejected_rewards


@register("nca_pair")
def nca_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Noise Contrastive Alignment, https://arxiv.org/abs/2402.05369 (Chen et al. 2024), the NCA loss (Sec. 3)
    for K = 2 responses with a hard preference.

    L = −log σ(βΔc) − ½ log σ(−βΔc) − ½ log σ(−βΔr), with the paper's r_θ = β log(π/π_ref). Per pair, the chosen
    term is minimised at σ(βΔc) = 2/3, i.e. βΔc* = log 2; the rejected term decreases without bound as Δr → −∞.
    TRL's ``nca_pair``.

    Args and returns as in :func:`dpo_lightning.losses.dpo_loss`.
    """
    chosen, rejected, chosen_rewards, rejected_rewards = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    # NCA loss of arXiv 2402.05369 with K = 2
    losses = -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
    return losses, chosen_rewards, rejected_rewards


@register("bco_pair")
def bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    bco_delta: float | Tensor = 0.0,
) -> LossOutput:
    """Binary Classifier Optimization on pairs, https://arxiv.org/abs/2404.04656 (Jung et al. 2024), the BCO loss
    with reward shift δ (Sec. 3).

    L = −log σ(βΔc − δ) − log σ(−(βΔr − δ)): a logistic classifier with logit βΔ − δ that labels the chosen
    response 1 and the rejected 0. δ = ``bco_delta`` is the running mean of the rewards βΔ, which the module keeps
    (state) and passes in; it is detached here. TRL ≥ 1.0's ``bco_pair`` has no δ (it is this loss with
    δ = 0, the default); TRL before its DPO refactor kept the running mean, as the paper does.

    Args:
        bco_delta: δ, a float or a 0-dim tensor. Other args and returns as in :func:`dpo_lightning.losses.dpo_loss`.
    """
    chosen, rejected, chosen_rewards, rejected_rewards = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    delta = bco_delta.detach() if isinstance(bco_delta, Tensor) else bco_delta
    losses = -F.logsigmoid(beta * chosen - delta) - F.logsigmoid(-(beta * rejected - delta))  # BCO, Sec. 3
    return losses, chosen_rewards, rejected_rewards


@register("apo_zero")
def apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Anchored Preference Optimization, APO-zero, https://arxiv.org/abs/2408.06266 (D'Oosterlinck et al. 2024),
    Eq. 7.

    L = (1 − σ(βΔc)) + σ(βΔr): raise the chosen likelihood and lower the rejected one, each against the reference
    (for when the chosen responses are better than the model's own). Written, as in TRL's ``apo_zero``, with the
    constant 1 that keeps it in [0, 2]; an additive constant changes neither gradients nor minimisers.

    Args and returns as in :func:`dpo_lightning.losses.dpo_loss`.
    """
    chosen, rejected, chosen_rewards, rejected_rewards = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = torch.sigmoid(-beta * chosen) + torch.sigmoid(beta * rejected)  # Eq. 7; 1 − σ(x) = σ(−x)
    return losses, chosen_rewards, rejected_rewards


@register("apo_down")
def apo_down_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Anchored Preference Optimization, APO-down, https://arxiv.org/abs/2408.06266 (D'Oosterlinck et al. 2024),
    Eq. 8.

    L = σ(βΔc) + (1 − σ(βh)): lower the chosen likelihood, and the rejected one more (for when the model is
    already better than the chosen responses). Constant 1 as in :func:`apo_zero_loss` and TRL's ``apo_down``.

    Args and returns as in :func:`dpo_lightning.losses.dpo_loss`.
    """
    chosen, rejected, chosen_rewards, rejected_rewards = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = torch.sigmoid(beta * chosen) + torch.sigmoid(-beta * (chosen - rejected))  # Eq. 8 of arXiv 2408.06266
    return losses, chosen_rewards, rejected_rewards


@register("sppo_hard")
def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Self-Play Preference Optimization with hard probabilities, https://arxiv.org/abs/2405.00675 (Wu et al.
    2024), Algorithm 1, Eq. 4.7.

    SPPO regresses each log-ratio onto η(P̂(y ≻ π_t) − ½). With the hard estimate P̂ = 1 for the chosen and 0 for
    the rejected response and η = 1/β:  L = (Δc − 1/(2β))² + (Δr + 1/(2β))², minimised (to 0) at
    Δc = 1/(2β), Δr = −1/(2β). The paper's P̂ is a soft PairRM win rate and its π_t the previous iterate, not a
    fixed reference; TRL's ``sppo_hard`` is this loss.

    Args and returns as in :func:`dpo_lightning.losses.dpo_loss`.
    """
    chosen, rejected, chosen_rewards, rejected_rewards = _logratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    half_eta = 1.0 / (2.0 * beta)
    losses = (chosen - half_eta) ** 2 + (rejected + half_eta) ** 2  # Eq. 4.7 of arXiv 2405.00675, P̂ ∈ {1, 0}
    return losses, chosen_rewards, rejected_rewards
