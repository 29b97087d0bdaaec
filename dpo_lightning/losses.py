"""Preference losses as small pure functions, plus the registry a config picks from.

Every loss has one signature::

    fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
       *, beta, **params) -> (losses, chosen_rewards, rejected_rewards)

All four inputs are per-example sequence log-probabilities of shape (B,). The outputs are per-example too,
shape (B,): the caller takes the mean. Rewards are the implicit rewards of DPO, β·(log π − log π_ref), detached
so that logging them never touches the graph.

Throughout, h is the log-ratio margin

    h = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)).

Adding a variant is writing one function with this signature and adding it to ``LOSSES``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


def _margin_and_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return h (with grad) and the detached rewards β·(log π − log π_ref) for chosen and rejected."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios
    return h, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Direct Preference Optimization, https://arxiv.org/abs/2305.18290 (Rafailov et al. 2023).

    Eq. 7:  L = −log σ(β h).

    ``F.logsigmoid`` is used rather than ``log(sigmoid(.))``: it stays finite (and so does its gradient,
    −β σ(−β h)) for |β h| far beyond 1e4.

    Args:
        policy_chosen_logps: (B,) log π(y_c|x).
        policy_rejected_logps: (B,) log π(y_r|x).
        reference_chosen_logps: (B,) log π_ref(y_c|x).
        reference_rejected_logps: (B,) log π_ref(y_r|x).
        beta: strength of the KL constraint to the reference (β > 0).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each of shape (B,).
    """
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = -F.logsigmoid(beta * h)  # Eq. 7 of arXiv 2305.18290
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Identity Preference Optimization, https://arxiv.org/abs/2310.12036 (Azar et al. 2023).

    Eq. 17:  L = (h − 1/(2τ))², with β in the role of the paper's τ. The per-pair optimum is h* = 1/(2β):
    unlike DPO, IPO does not push the margin to infinity on deterministic preferences.

    Args and returns as in :func:`dpo_loss`.
    """
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = (h - 1.0 / (2.0 * beta)) ** 2  # Eq. 17 of arXiv 2310.12036
    return losses, chosen_rewards, rejected_rewards


def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO").

    Eq. 3:  L = −(1 − ε) log σ(β h) − ε log σ(−β h), where ε is the probability that a label is flipped.
    Its per-pair minimiser is finite, β h* = log((1 − ε)/ε), where the loss equals the binary entropy H(ε).
    With ε = 0 it is exactly :func:`dpo_loss`.

    Args:
        label_smoothing: ε in [0, 0.5). Other args and returns as in :func:`dpo_loss`.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"cdpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    # Eq. 3 of the cDPO note
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards, rejected_rewards


LossFn = Callable[..., LossOutput]

LOSSES: dict[str, LossFn] = {"dpo": dpo_loss, "ipo": ipo_loss, "cdpo": cdpo_loss}


def get_loss(name: str) -> LossFn:
    """Look a loss up by name; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses are: {', '.join(sorted(LOSSES))}") from None


def loss_params(fn: LossFn, params: dict[str, float]) -> dict[str, float]:
    """Keep only the keyword parameters ``fn`` declares (beyond ``beta``), so one settings dict serves all."""
    accepted = {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "beta"
    }
    return {k: v for k, v in params.items() if k in accepted}
