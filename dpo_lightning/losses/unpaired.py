"""Losses on unpaired rows, each desirable or undesirable: KTO.

Registered ``unpaired=True``: besides the four log-probs the loss takes ``chosen_mask`` / ``rejected_mask``.
With unpaired data the module passes each row's log-probs as both chosen and rejected, with
``chosen_mask = label`` and ``rejected_mask = ~label``; with paired data (both masks all True) each pair counts
as one desirable and one undesirable row.
"""

from __future__ import annotations

import torch

from dpo_lightning.losses.registry import LossOutput, register

Tensor = torch.Tensor
__all__ = ["kto_loss"]


@register("kto", unpaired=True)
def kto_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    kl_reference: float | Tensor = 0.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    chosen_mask: Tensor | None = None,
    rejected_mask: Tensor | None = None,
) -> LossOutput:
    """Kahneman-Tversky Optimization, https://arxiv.org/abs/2402.01306 (Ethayarajh et al. 2024), Eq. 7.

    L_KTO = λ_y − v(x, y) per row, with v = λ_D σ(β(Δ − z₀)) for a desirable y and λ_U σ(β(z₀ − Δ)) for an
    undesirable one; so per example
    L = chosen_mask·λ_D(1 − σ(β(Δc − z₀))) + rejected_mask·λ_U(1 − σ(β(z₀ − Δr))), in [0, λ_D + λ_U].
    z₀ = ``kl_reference`` is the reference point, a batch estimate of KL(π ‖ π_ref) from mismatched
    prompt/completion pairs, clamped at 0; the caller computes it (module state) and it is detached here.
    λ_D = ``desirable_weight``, λ_U = ``undesirable_weight`` (the paper keeps λ_D n_D / (λ_U n_U) in [1, 4/3]).
    TRL's KTOTrainer averages over rows, desirable and undesirable together: the same as the mean of this loss
    over unpaired rows, and half the mean over pairs when paired data is scored with both masks True.

    Args:
        kl_reference: z₀ ≥ 0, a float or a 0-dim tensor.
        desirable_weight, undesirable_weight: λ_D, λ_U ≥ 0.
        chosen_mask, rejected_mask: (B,) bools, which rows count as desirable / undesirable (None: all).
        Other args as in :func:`dpo_lightning.losses.dpo_loss`.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are β·Δ of every row, unmasked.
    """
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if weight < 0:
            raise ValueError(f"kto_loss: {name} must be >= 0, got {weight}")
    if not isinstance(kl_reference, Tensor) and kl_reference < 0:
        raise ValueError(f"kto_loss: kl_reference must be >= 0 (clamped by the caller), got {kl_reference}")
    z0 = kl_reference.detach() if isinstance(kl_reference, Tensor) else kl_reference
    chosen = policy_chosen_logps - reference_chosen_logps
    rejected = policy_rejected_logps - reference_rejected_logps
    # a row outside its mask is selected out with `where`, before the sigmoid: multiplying by 0 would turn a
    # non-finite log-prob of a row that does not count (−inf − −inf = NaN) into a NaN loss and NaN gradients
    kept_chosen = chosen if chosen_mask is None else torch.where(chosen_mask, chosen, z0)
    kept_rejected = rejected if rejected_mask is None else torch.where(rejected_mask, rejected, z0)
    # Eq. 7 of arXiv 2402.01306, with 1 − σ(x) = σ(−x)
    desirable = desirable_weight * torch.sigmoid(-beta * (kept_chosen - z0))
    undesirable = undesirable_weight * torch.sigmoid(-beta * (z0 - kept_rejected))
    if chosen_mask is not None:
        desirable = torch.where(chosen_mask, desirable, 0.0)
    if rejected_mask is not None:
        undesirable = torch.where(rejected_mask, undesirable, 0.0)
    return desirable + undesirable, beta * chosen.detach(), beta * rejected.detach()
