"""Pairwise preference losses with a reference model, defined on the log-ratio margin h (DPO and its variants).

Throughout, with Δc = log π(y_c|x) − log π_ref(y_c|x) and Δr = log π(y_r|x) − log π_ref(y_r|x),
h = Δc − Δr is the log-ratio margin. Inputs are sequence log-probs of shape (B,) (sums over response tokens,
or per-token means when ``logp_aggregation: mean``; ``compute_loss`` does the division). Rewards are the
implicit rewards of DPO, β·Δ, detached. The losses that act on Δc and Δr separately are in ``anchored.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpo_lightning.losses.registry import LossOutput, register

Tensor = torch.Tensor
__all__ = [
    "dpo_loss",
    "ipo_loss",
    "cdpo_loss",
    "rdpo_loss",
    "hinge_loss",
    "exo_pair_loss",
    "fdpo_loss",
    "sigmoid_norm_loss",
    "rpo_loss",
]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
EXO_DEFAULT_EPSILON = 1e-3  # EXO's recommended ε, used when label_smoothing is 0 (as TRL < 1.0 did)


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


def _check_label_smoothing(fn: str, label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _exp_cap(dtype: torch.dtype) -> float:
    """Largest exponent fed to ``exp`` in f-DPO's scores: e^80 ≈ 5.5e34 (float32/bfloat16), e^11 (float16)."""
    return 11.0 if dtype == torch.float16 else 80.0


@register("dpo")
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


@register("ipo")
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
    unlike DPO, IPO does not push the margin to infinity on deterministic preferences. TRL's ``ipo`` divides
    the log-ratios by the response lengths first: that is this loss with ``logp_aggregation: mean``.

    Args and returns as in :func:`dpo_loss`.
    """
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = (h - 1.0 / (2.0 * beta)) ** 2  # Eq. 17 of arXiv 2310.12036
    return losses, chosen_rewards, rejected_rewards


@register("cdpo")
def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO",
    https://ericmitchell.ai/cdpo.pdf).

    Eq. 3:  L = −(1 − ε) log σ(β h) − ε log σ(−β h), where ε is the probability that a label is flipped.
    Its per-pair minimiser is finite, β h* = log((1 − ε)/ε), where the loss equals the binary entropy H(ε).
    With ε = 0 it is exactly :func:`dpo_loss`.

    Args:
        label_smoothing: ε in [0, 0.5). Other args and returns as in :func:`dpo_loss`.
    """
    _check_label_smoothing("cdpo_loss", label_smoothing)
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    # Eq. 3 of the cDPO note
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards, rejected_rewards


@register("rdpo")
def rdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO, https://arxiv.org/abs/2403.00409 (Chowdhury et al. 2024), Sec. 3, the de-biased loss.

    L = [(1 − ε) ℓ(h) − ε ℓ(−h)] / (1 − 2ε), with ℓ(h) = −log σ(β h) the DPO loss of the pair as labelled
    and ℓ(−h) that of the flipped pair; ε = ``label_smoothing`` is the flip rate. Unbiased: if each label is
    flipped with probability ε, (1 − ε) L(h) + ε L(−h) = ℓ(h), the clean DPO loss. Unlike cDPO it keeps DPO's
    missing finite optimum (L decreases in h). ε = 0 gives :func:`dpo_loss`. TRL's ``robust``.

    Args:
        label_smoothing: ε in [0, 0.5). Other args and returns as in :func:`dpo_loss`.
    """
    _check_label_smoothing("rdpo_loss", label_smoothing)
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    eps = label_smoothing
    # de-biased loss of arXiv 2403.00409, Sec. 3: [(1−ε)ℓ(h) − εℓ(−h)]/(1−2ε)
    losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    return losses, chosen_rewards, rejected_rewards


@register("hinge")
def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """SLiC's hinge (calibration) loss on the reference-normalised likelihood.

    SLiC-HF, https://arxiv.org/abs/2305.10425 (Zhao et al. 2023), Sec. 2, Eq. 1 (calibration term):
    max(0, δ − log π(y_c|x) + log π(y_r|x)); normalised by the reference and scaled, as the "hinge-norm" loss of
    RSO, https://arxiv.org/abs/2309.06657 (Liu et al. 2023):  L = max(0, 1 − β h), i.e. margin δ = 1/β on h.
    The loss is exactly 0 for every h ≥ 1/β. TRL's ``hinge``.

    Args and returns as in :func:`dpo_loss`.
    """
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = torch.relu(1.0 - beta * h)  # SLiC-HF Eq. 1 with δ = 1 on β-scaled log-ratios (RSO hinge-norm)
    return losses, chosen_rewards, rejected_rewards


@register("exo_pair")
def exo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """EXO, pairwise form, https://arxiv.org/abs/2402.00856 (Ji et al. 2024), Eq. 16.

    The reverse KL from the model's pair distribution (σ(βh), σ(−βh)) to the smoothed label (1 − ε, ε):
    L = σ(βh)(log σ(βh) − log(1 − ε)) + σ(−βh)(log σ(−βh) − log ε) ≥ 0, with equality exactly where
    σ(βh) = 1 − ε, i.e. β h* = log((1 − ε)/ε). ε = ``label_smoothing``; ε = 0 would make the target
    deterministic and log ε infinite, so ε = 0 means the paper's recommended ε = 1e-3 (TRL < 1.0 did the same;
    TRL 1.x raises instead). One settings dict serves every loss, so raising would break ``shadow/exo_pair`` on
    every run with the default ``label_smoothing: 0``.

    Args:
        label_smoothing: ε in [0, 0.5); 0 means 1e-3. Other args and returns as in :func:`dpo_loss`.
    """
    _check_label_smoothing("exo_pair_loss", label_smoothing)
    eps = label_smoothing if label_smoothing > 0 else EXO_DEFAULT_EPSILON
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    logits = beta * h
    log_q_w, log_q_l = F.logsigmoid(logits), F.logsigmoid(-logits)
    # Eq. 16 of arXiv 2402.00856: KL((q_w, q_l) ‖ (1−ε, ε))
    losses = log_q_w.exp() * (log_q_w - math.log1p(-eps)) + log_q_l.exp() * (log_q_l - math.log(eps))
    return losses, chosen_rewards, rejected_rewards


def _f_prime_score(logratio: Tensor, f_divergence: str, f_alpha: float) -> Tensor:
    """ψ(Δ) = f′(e^Δ) up to an additive constant (which cancels in ψ(Δc) − ψ(Δr)); arXiv 2309.16240, Table 1."""
    if f_divergence == "reverse_kl":  # f(u) = u log u, f′(u) = log u + 1
        return logratio
    if f_divergence == "forward_kl":  # f(u) = −log u, f′(u) = −1/u
        return -torch.exp(torch.clamp(-logratio, max=_exp_cap(logratio.dtype)))
    if f_divergence == "js":  # f′(u) = log(2u/(1 + u)) = log 2 + log σ(log u)
        return F.logsigmoid(logratio)
    # alpha: f(u) = (u^{1−α} − (1−α)u − α)/(α(α−1)), f′(u) = (1 − u^{−α})/α
    return (1.0 - torch.exp(torch.clamp(-f_alpha * logratio, max=_exp_cap(logratio.dtype)))) / f_alpha


@register("fdpo")
def fdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> LossOutput:
    """f-DPO, https://arxiv.org/abs/2309.16240 (Wang et al. 2023), Sec. 4 (the f-DPO loss) with f′ of Table 1.

    L = −log σ(β(ψ(Δc) − ψ(Δr))), ψ(Δ) = f′(π/π_ref) = f′(e^Δ), additive constants dropped:
    ``reverse_kl`` ψ = Δ (this is DPO), ``forward_kl`` ψ = −e^{−Δ}, ``js`` ψ = Δ − log(1 + e^Δ) = log σ(Δ),
    ``alpha`` ψ = (1 − e^{−αΔ})/α with α = ``f_alpha`` ∈ (0, 1) (→ reverse KL as α → 0, forward KL as α → 1).
    The exponent in e^{−Δ}, e^{−αΔ} is capped at 80 (11 in float16), as TRL does for ``alpha_divergence``, so
    the loss stays finite when π ≪ π_ref (its gradient is 0 beyond the cap). TRL's ``f_alpha_divergence_coef``
    is 1 − α in this parameterisation (f′(u) = (u^{a−1} − 1)/(a − 1)); the two coincide at the default 0.5.

    Args:
        f_divergence: one of ``reverse_kl``, ``forward_kl``, ``js``, ``alpha``.
        f_alpha: α of the α-divergence, in (0, 1). Other args and returns as in :func:`dpo_loss`.
    """
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"fdpo_loss: f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence!r}")
    if not 0.0 < f_alpha < 1.0:
        raise ValueError(f"fdpo_loss: f_alpha must be in (0, 1), got {f_alpha}")
    _, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    chosen_score = _f_prime_score(policy_chosen_logps - reference_chosen_logps, f_divergence, f_alpha)
    rejected_score = _f_prime_score(policy_rejected_logps - reference_rejected_logps, f_divergence, f_alpha)
    losses = -F.logsigmoid(beta * (chosen_score - rejected_score))  # f-DPO loss of arXiv 2309.16240, Sec. 4
    return losses, chosen_rewards, rejected_rewards


@register("sigmoid_norm", per_token=True)
def sigmoid_norm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Length-normalised DPO: the "DPO w/ LN" ablation of SimPO, https://arxiv.org/abs/2405.14734 (Meng et al.
    2024, Appendix), as used by Tülu 3, https://arxiv.org/abs/2411.15124 (Lambert et al. 2024, Sec. 4.3).

    L = −log σ(β(Δc/lc − Δr/lr)). Registered ``per_token``: ``compute_loss`` passes per-token means, so the
    inputs here are already pc/lc, pr/lr, rc/lc, rr/lr and the body is DPO's Eq. 7 on them. TRL's
    ``sigmoid_norm``. Rewards are β·Δ of the per-token means.

    Args and returns as in :func:`dpo_loss` (inputs are per-token means).
    """
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    losses = -F.logsigmoid(beta * h)  # DPO Eq. 7 on per-token means (Tülu 3, Sec. 4.3)
    return losses, chosen_rewards, rejected_rewards


@register("rpo")
def rpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    rpo_alpha: float = 1.0,
    chosen_lengths: Tensor | None = None,
    logp_aggregation: str = "sum",
) -> LossOutput:
    """Iterative Reasoning Preference Optimization's DPO + NLL loss, https://arxiv.org/abs/2404.19733 (Pang et al.
    2024, v3), Sec. 2, Eq. 1.

    L = −log σ(β h) + α · (−log π(y_c|x) / |y_c|): DPO plus the chosen response's NLL, normalised by its length,
    α = ``rpo_alpha`` (the paper's recommended 1.0). h uses the inputs as given (sums, or per-token means under
    ``logp_aggregation: mean``, when the inputs already are pc/lc and are not divided again). TRL expresses it as
    ``loss_type=["sigmoid", "sft"]``, whose NLL is the token mean over the whole batch (Σ NLL / Σ lc) rather
    than this per-pair mean; the two agree when the chosen lengths in a batch are equal.

    Args:
        rpo_alpha: α ≥ 0, the NLL weight.
        chosen_lengths: (B,) response token counts of y_c (needed with ``logp_aggregation: sum``).
        logp_aggregation: how the inputs were aggregated (``compute_loss`` passes it).
        Other args and returns as in :func:`dpo_loss`.
    """
    if rpo_alpha < 0:
        raise ValueError(f"rpo_loss: rpo_alpha must be >= 0, got {rpo_alpha}")
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    if logp_aggregation == "mean":
        chosen_mean_logps = policy_chosen_logps  # compute_loss already divided by the lengths
    elif chosen_lengths is None:
        raise ValueError("rpo_loss: chosen_lengths is required when the inputs are sums (logp_aggregation: sum)")
    else:
        chosen_mean_logps = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    losses = -F.logsigmoid(beta * h) - rpo_alpha * chosen_mean_logps  # Eq. 1 of arXiv 2404.19733 (v3)
    return losses, chosen_rewards, rejected_rewards
