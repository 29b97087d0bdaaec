"""Part 1 of `make reproduce`, the loss family: the setting, helpers and tolerances shared by its two modules.

The claims are in :mod:`dpo_lightning.reproduce.bandit_margins` (per-pair optima: hinge, sppo_hard, exo_pair,
simpo) and :mod:`dpo_lightning.reproduce.bandit_populations` (population optima: rdpo under flipped labels,
fdpo, sigmoid_norm, nca_pair, bco_pair, sft), which also lists every group in :data:`FAMILY_GROUPS`.

Same setting as :mod:`dpo_lightning.reproduce.bandit`: π_θ = softmax(θ) over a few actions, float64, no learned
model. Every loss is called through :func:`dpo_lightning.losses.compute_loss` by its registered name, so the
claims test the registered code (a loss replaced in ``LOSSES`` is the one trained). Each claim is measured by
training θ (L-BFGS to machine precision where the optimum is finite, SGD or Adam where the claim is about what
training does) and compared with a closed form derived in the docstring of its group.

Notation: Δ_a = log π_θ(a) − log π_ref(a), h = Δc − Δr for a pair (chosen c, rejected r), w_c(a) and w_r(a) the
total weight with which action a appears as the chosen and as the rejected one of the (population) dataset.
A *free* bandit has, besides its paired actions, one filler action that is in no pair and holds almost all of
π_ref's mass: the filler absorbs the normalisation Σ_a π_ref(a) e^{Δ_a} = 1, so the Δ of the paired actions are
free and any loss that is a sum of per-action terms is minimised action by action.

Tolerances are fixed from the optimiser, not from the results: L-BFGS (:func:`bandit._lbfgs`) stops at a
gradient of 1e-13 in float64, so a minimiser in O(1) units (π, β h, Δ) is expected to ~1e-9; the claims allow
:data:`TOL_LBFGS` = 1e-6, 1000× that, while a wrong formula is off by ≫ 1e-6. A loss value evaluated (not
trained) at a point is allowed :data:`TOL_EVAL` = 1e-12, a few hundred float64 rounding errors. Statements that
hold exactly in floating point (a hinge loss of 0, a θ that no longer moves) are checked with tolerance 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from dpo_lightning.losses import compute_loss
from dpo_lightning.reproduce.bandit import _lbfgs, make_bandit

Tensor = torch.Tensor
F64 = torch.float64

TOL_LBFGS = 1e-6  # minimisers found by L-BFGS (gradient test 1e-13, float64): ~1e-9 expected
TOL_EVAL = 1e-12  # a loss evaluated at a given point: float64 rounding only
FLIP_RATES = (0.1, 0.25)  # ε of rdpo / exo (label flip rate, label smoothing), as cDPO's claims use
FREE_MASS = 1e-4  # π_ref mass of the paired actions of a free bandit; the filler holds the rest


# --- helpers -------------------------------------------------------------------------------------------------


def pair_losses(
    name: str,
    logp: Tensor,
    log_ref: Tensor,
    chosen: Tensor,
    rejected: Tensor,
    beta: float,
    lengths: Tensor | None = None,
    **params: object,
) -> Tensor:
    """Per-pair losses (P,) of the registered loss ``name`` for actions ``chosen[p]`` ≻ ``rejected[p]``.

    ``logp`` and ``log_ref`` are (K,) log-probabilities of the K actions under π_θ and π_ref (an action's
    log-prob is the sum over its tokens); ``lengths`` (K,) are the actions' token counts (1 when None).
    """
    lengths = torch.ones(len(logp), dtype=torch.long) if lengths is None else lengths
    losses, _, _ = compute_loss(
        name,
        policy_chosen_logps=logp[chosen],
        policy_rejected_logps=logp[rejected],
        reference_chosen_logps=log_ref[chosen],
        reference_rejected_logps=log_ref[rejected],
        chosen_lengths=lengths[chosen],
        rejected_lengths=lengths[rejected],
        beta=beta,
        **params,
    )
    return losses


def minimise(
    name: str,
    log_ref: Tensor,
    chosen: Tensor,
    rejected: Tensor,
    weight: Tensor,
    beta: float,
    lengths: Tensor | None = None,
    theta0: Tensor | None = None,
    **params: object,
) -> Tensor:
    """argmin_θ Σ_p weight[p] · loss(pair p) by L-BFGS from θ = ``theta0`` (default log π_ref, i.e. π_θ = π_ref);
    returns log π_θ (K,) at the end."""
    theta = (log_ref if theta0 is None else theta0).clone().requires_grad_(True)

    def objective() -> Tensor:
        logp = torch.log_softmax(theta, 0)
        return (weight * pair_losses(name, logp, log_ref, chosen, rejected, beta, lengths, **params)).sum()

    _lbfgs(theta, objective)
    return torch.log_softmax(theta.detach(), 0)


def bt_pairs(bandit: dict[str, Tensor], flip: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Every ordered pair (i ≻ j) of ``bandit`` with its population weight μ_ij · P̃(i ≻ j).

    P̃(i ≻ j) = (1 − flip) σ(r_i − r_j) + flip σ(r_j − r_i): Bradley–Terry labels, each flipped with probability
    ``flip``. The weights sum to 1. Returns (chosen (P,), rejected (P,), weight (P,)).
    """
    r, mu = bandit["rewards"], bandit["mu"]
    ordered = torch.tensor(list(itertools.permutations(range(len(r)), 2)))
    i, j = ordered[:, 0], ordered[:, 1]
    p = torch.sigmoid(r[i] - r[j])
    return i, j, mu[i, j] * ((1 - flip) * p + flip * (1 - p))


def win_weights(chosen: Tensor, rejected: Tensor, weight: Tensor, n_actions: int) -> tuple[Tensor, Tensor]:
    """(w_c, w_r), each (n_actions,): the total weight of each action as the chosen and as the rejected one."""
    w_c = torch.zeros(n_actions, dtype=F64).index_add_(0, chosen, weight)
    w_r = torch.zeros(n_actions, dtype=F64).index_add_(0, rejected, weight)
    return w_c, w_r


def make_free_bandit(seed: int, n_paired: int) -> dict[str, Tensor]:
    """``make_bandit(seed, n_paired)`` plus a filler action (the last) that is in no pair.

    The paired actions keep the bandit's reference shape scaled to total mass :data:`FREE_MASS`; the filler holds
    the rest, so that any Δ the claims below need for the paired actions fits under Σ_a π_ref(a) e^{Δ_a} = 1.
    """
    b = make_bandit(seed, n_paired)
    log_ref = torch.cat([b["log_ref"] + math.log(FREE_MASS), torch.tensor([math.log1p(-FREE_MASS)], dtype=F64)])
    return {"log_ref": log_ref, "rewards": b["rewards"], "mu": b["mu"]}


def free_delta(logp: Tensor, log_ref: Tensor, n_paired: int) -> Tensor:
    """Δ of the paired actions of a free bandit."""
    return (logp - log_ref)[:n_paired]


def check_fits(log_ref: Tensor, delta: Tensor, what: str) -> None:
    """Raise when a closed-form Δ of the paired actions does not fit under the filler (a set-up error)."""
    mass = float((log_ref[: len(delta)] + delta).exp().sum())
    if not mass < 1.0:
        raise ValueError(f"{what}: the closed-form optimum needs π mass {mass:.3g} ≥ 1 on the paired actions")


def normalised_policy(log_ref: Tensor, delta_of: Callable[[float], Tensor], c_max: float) -> Tensor:
    """π = π_ref · e^{Δ(c)} for the c with Σ_a π_ref(a) e^{Δ_a(c)} = 1, by bisection (Σ increases with c).

    ``delta_of(c)`` gives Δ (K,) for a constant c < ``c_max`` (``math.inf`` when c is unbounded), and Σ → ∞ as
    c → c_max. Bisection to the last bit of float64: the closed form, not an optimisation of the loss.
    """

    def log_mass(c: float) -> float:
        return float(torch.logsumexp(log_ref + delta_of(c), 0))

    hi = c_max if math.isfinite(c_max) else 1.0
    while not math.isfinite(c_max) and log_mass(hi) <= 0:
        hi = 2 * hi
    step = 1.0
    lo = hi - step
    while log_mass(lo) >= 0:
        step *= 2
        lo = hi - step
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if log_mass(mid) < 0 else (lo, mid)
    return (log_ref + delta_of(lo)).exp()


def _lbfgs_tol() -> str:
    return f"{TOL_LBFGS:g} (L-BFGS to a 1e-13 gradient)"
