"""Reference-free losses: SimPO, ORPO, the chosen NLL (SFT) and unlikelihood. They never read the reference log-probs.

All four are registered ``reference=False, per_token=True``: ``compute_loss`` passes per-token mean log-probs,
m_c = log π(y_c|x)/|y_c| and m_r = log π(y_r|x)/|y_r|, and the module builds no reference model. The reference
arguments keep the common signature and are ignored (they may be ``None``). Rewards are β·m, detached, as TRL
logs them for SimPO and ORPO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpo_lightning.losses.registry import LossOutput, register

Tensor = torch.Tensor
__all__ = ["simpo_loss", "orpo_loss", "sft_loss", "unlikelihood_loss"]


def _rewards(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    return beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − e^x) for x < 0, without cancellation: log(−expm1 x) near 0, log1p(−e^x) below −log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _log_odds(mean_logps: Tensor) -> Tensor:
    """log odds(y|x) = log(P/(1 − P)) = m − log(1 − e^m), with P = e^m the geometric-mean token probability.

    m is capped at −ε (machine epsilon) so that a response of probability 1 (m = 0) gives a large finite log-odds
    rather than +inf.
    """
    m = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).eps)
    return m - _log1mexp(m)


@register("simpo", reference=False, per_token=True)
def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float,
    simpo_gamma: float = 0.5,
) -> LossOutput:
    """Simple Preference Optimization, https://arxiv.org/abs/2405.14734 (Meng et al. 2024), Eq. 6.

    L = −log σ(β m_c − β m_r − γ): the length-normalised reward β·m with a target reward margin γ =
    ``simpo_gamma``. Default γ = 0.5 is the authors' code default (β = 2.0 with γ/β = 0.25) and TRL's; the paper
    tunes γ per setting (Table 7). No finite optimum: L decreases in m_c − m_r; L = log 2 where β(m_c − m_r) = γ.
    Same as TRL's CPOTrainer ``loss_type="simpo"`` (with ``cpo_alpha=0``, ``label_smoothing=0``).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) per-token mean log-probs m_c, m_r.
        reference_chosen_logps, reference_rejected_logps: ignored.
        beta: reward scale β > 0.
        simpo_gamma: γ ≥ 0.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·m.
    """
    if simpo_gamma < 0:
        raise ValueError(f"simpo_loss: simpo_gamma must be >= 0, got {simpo_gamma}")
    margin = policy_chosen_logps - policy_rejected_logps
    losses = -F.logsigmoid(beta * margin - simpo_gamma)  # Eq. 6 of arXiv 2405.14734
    return losses, *_rewards(policy_chosen_logps, policy_rejected_logps, beta)


@register("orpo", reference=False, per_token=True)
def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float,
    orpo_lambda: float = 0.1,
) -> LossOutput:
    """Odds Ratio Preference Optimization, https://arxiv.org/abs/2403.07691 (Hong et al. 2024), Eq. 6 with the
    odds-ratio loss of Eq. 7 (odds as in Eq. 4).

    L = L_SFT + λ·L_OR = −m_c − λ log σ(log odds_c − log odds_r), log odds = m − log(1 − e^m), λ =
    ``orpo_lambda`` (the paper's 0.1). ORPO has no β: here β only scales the logged rewards β·m. TRL's
    ORPOTrainer uses its ``beta`` as λ, and its NLL is the token mean over prompt and response of the whole
    batch, where this L_SFT is the per-pair response mean −m_c.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) per-token mean log-probs m_c, m_r (< 0).
        reference_chosen_logps, reference_rejected_logps: ignored.
        beta: reward scale for logging only.
        orpo_lambda: λ ≥ 0.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·m.
    """
    if orpo_lambda < 0:
        raise ValueError(f"orpo_loss: orpo_lambda must be >= 0, got {orpo_lambda}")
    log_odds_ratio = _log_odds(policy_chosen_logps) - _log_odds(policy_rejected_logps)
    losses = -policy_chosen_logps - orpo_lambda * F.logsigmoid(log_odds_ratio)  # Eqs. 6-7 of arXiv 2403.07691
    return losses, *_rewards(policy_chosen_logps, policy_rejected_logps, beta)


@register("sft", reference=False, per_token=True)
def sft_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float,
) -> LossOutput:
    """Negative log-likelihood of the chosen response, per token: L = −m_c = −log π(y_c|x)/|y_c|.

    A component for mixtures (``[dpo, sft]`` is RPO with α = the weight, ``[dpo, bco_pair, sft]`` is MPO,
    https://arxiv.org/abs/2411.10442). TRL's ``sft`` averages over all chosen tokens of the batch (Σ NLL / Σ lc)
    rather than per pair; the two agree when the chosen lengths in a batch are equal.

    Args:
        policy_chosen_logps: (B,) per-token mean log-probs m_c. The other log-probs are not read (the rejected one
            only for the logged reward).
        beta: reward scale for logging only.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·m.
    """
    losses = -policy_chosen_logps  # the chosen NLL per token
    return losses, *_rewards(policy_chosen_logps, policy_rejected_logps, beta)


@register("unlikelihood", reference=False, per_token=True)
def unlikelihood_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float,
    unlikelihood_alpha: float = 1.0,
) -> LossOutput:
    """Unlikelihood training (Welleck et al. 2019, https://arxiv.org/abs/1908.04319, Eq. 4) as the DPO paper's
    baseline (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, Sec. 6: maximise the likelihood of y_w,
    minimise it for y_l, with a coefficient α on the unlikelihood term).

    L = −m_c − α log(1 − e^{m_r}), with m = log π(y|x)/|y| the per-token mean log-prob, so e^m is the
    geometric-mean token probability (the same per-token probability ORPO's odds use). Why not the sequence
    probability: π(y_l|x) of a 32-token response is ~e^{−100}, so log(1 − π(y_l|x)) ≈ −π(y_l|x) ≈ 0 and its
    gradient vanishes; Welleck's unlikelihood is per token, and a per-token mean is what this interface has
    (per-token log-probs are not passed to losses). Derivatives: ∂L/∂m_c = −1 and
    ∂L/∂m_r = α e^{m_r}/(1 − e^{m_r}) = α/(e^{−m_r} − 1) > 0, so a step lowers m_r and raises m_c. That second
    one is small where y_l is already unlikely (0.018α at m_r = −4) and grows as π raises it: the term stops the
    rejected responses' likelihood from rising with the chosen ones' rather than pushing it far down. L ≥ 0,
    with infimum 0 at m_c = 0, m_r → −∞. log(1 − e^m) is evaluated without cancellation (log1mexp); m_r is
    capped at −ε (machine epsilon), so a rejected response of probability 1 gives a large finite loss.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) per-token mean log-probs m_c, m_r (≤ 0).
        reference_chosen_logps, reference_rejected_logps: ignored.
        beta: reward scale for logging only.
        unlikelihood_alpha: α ≥ 0, the weight of the unlikelihood term (the DPO paper's α ∈ [0, 1]; default 1,
            Welleck et al.'s).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·m.
    """
    if unlikelihood_alpha < 0:
        raise ValueError(f"unlikelihood_loss: unlikelihood_alpha must be >= 0, got {unlikelihood_alpha}")
    m_r = policy_rejected_logps.clamp(max=-torch.finfo(policy_rejected_logps.dtype).eps)
    losses = -policy_chosen_logps - unlikelihood_alpha * _log1mexp(m_r)  # Eq. 4 of arXiv 1908.04319, on means
    return losses, *_rewards(policy_chosen_logps, policy_rejected_logps, beta)
