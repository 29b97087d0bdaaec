"""Part 1 of `make reproduce`, the loss family: population optima (rdpo, fdpo, sigmoid_norm, nca_pair, bco_pair, sft).

Setting, notation (Δ_a, h, w_c, w_r, the *free* bandit) and tolerances: :mod:`dpo_lightning.reproduce.bandit_helpers`.
The per-pair optima (hinge, sppo_hard, exo_pair, simpo) are in :mod:`dpo_lightning.reproduce.bandit_margins`.

Claim groups (each function takes the base seed and returns ``list[Claim]``); :data:`FAMILY_GROUPS` lists them,
with those of :mod:`~dpo_lightning.reproduce.bandit_margins`, for :func:`dpo_lightning.reproduce.bandit.run_part1`:

- :func:`rdpo_claims` — robust DPO under flipped labels recovers clean DPO's π*; plain DPO does not.
- :func:`fdpo_claims` — f-DPO: π* = π_ref · (f′)⁻¹(r/β + c) for reverse KL, forward KL, JS and α-divergence.
- :func:`sigmoid_norm_claims` — length-normalised DPO: π*(a) = π_ref(a) · exp(l_a (r_a/β + c)).
- :func:`nca_bco_claims` — NCA: β Δ_a = log(2 w_c/(w_c + w_r)); BCO: β Δ_a = δ + log(w_c/w_r).
- :func:`sft_claims` — per-token NLL of the chosen response: π*(a) ∝ w_c(a)/l_a.

Losses with no finite closed-form optimum on a bandit (dpop, rpo, orpo, apo_zero, apo_down, kto) have no claim
here: their training limits are unbounded or depend on the optimiser path; their formulas are tested in
``tests/test_losses.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dpo_lightning.reproduce.bandit import BETAS, _claim, _one_thread, _round, make_bandit
from dpo_lightning.reproduce.bandit_helpers import (
    F64,
    FLIP_RATES,
    FREE_MASS,
    TOL_LBFGS,
    Tensor,
    bt_pairs,
    check_fits,
    free_delta,
    make_free_bandit,
    minimise,
    normalised_policy,
    win_weights,
)
from dpo_lightning.reproduce.bandit_margins import (
    HINGE_SGD,
    SIMPO_ADAM,
    SIMPO_LENGTHS,
    exo_claims,
    hinge_claims,
    simpo_claims,
    sppo_hard_claims,
)
from dpo_lightning.reproduce.claims import Claim

BCO_BETAS = (0.5, 1.0, 2.0)  # BCO's optimum e^{βΔ} = e^δ·odds needs β ≳ 0.5 to fit a free bandit (see below)
BCO_DELTA = 0.3  # δ, the reward shift (the module's running mean of rewards), held fixed here
F_DIVERGENCES = (("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("alpha", {"f_alpha": 0.5}))

RDPO = "Chowdhury et al. 2024, Provably Robust DPO, arXiv 2403.00409, Sec. 3 (the de-biased rDPO loss)"
FDPO = "Wang et al. 2023, f-DPO, arXiv 2309.16240, Sec. 4 and Table 1 (optimal policy π_ref·(f′)⁻¹(·) from KKT)"
NCA = "Chen et al. 2024, Noise Contrastive Alignment, arXiv 2402.05369, Sec. 3 (NCA loss, K = 2)"
BCO = "Jung et al. 2024, Binary Classifier Optimization, arXiv 2404.04656, Sec. 3 (BCO loss, reward shift δ)"
SIGMOID_NORM = "Meng et al. 2024, arXiv 2405.14734, the DPO w/ LN ablation (length-normalised DPO)"


# --- rdpo under flipped labels ---------------------------------------------------------------------------------


@_one_thread()
def rdpo_claims(seed: int = 0) -> list[Claim]:
    """Robust DPO, [(1−ε) ℓ(h) − ε ℓ(−h)]/(1 − 2ε) with ℓ(h) = −log σ(β h), on labels flipped at rate ε.

    Closed form. For a pair {i, j} with clean Bradley–Terry probability p = σ(r_i − r_j), the observed label says
    i ≻ j with p̃ = (1 − ε) p + ε (1 − p). The expected rDPO loss is p̃ ℓ_ε(h) + (1 − p̃) ℓ_ε(−h), and the
    coefficient of ℓ(h) in it is [(1 − ε) p̃ − ε (1 − p̃)]/(1 − 2ε) = (p̃ − ε)/(1 − 2ε) = p (that of ℓ(−h) is
    1 − p): exactly the clean DPO loss, whose minimiser over a K-action bandit is π* = softmax(log π_ref + r/β)
    (Rafailov et al. Eq. 4). Plain DPO on the flipped labels minimises the cross-entropy with p̃ instead: on two
    actions β h* = logit(p̃), a reward difference shrunk towards 0 (|logit p̃| < |r_i − r_j|), and on K actions a
    different policy, whose gap from π* the claims measure (a real bias must exceed the optimiser's tolerance by
    far: 1000 × :data:`TOL_LBFGS`).
    """
    bandit = make_bandit(seed)
    log_ref, r = bandit["log_ref"], bandit["rewards"]
    two_ref = log_ref[:2] - torch.logsumexp(log_ref[:2], 0)  # the bandit's first two actions, renormalised
    d = float(r[0] - r[1])
    p = 1 / (1 + math.exp(-d))
    claims = []
    for eps in FLIP_RATES:
        ci, ri, wi = bt_pairs(bandit, flip=eps)
        gaps = []
        for beta in BETAS:
            target = torch.softmax(log_ref + r / beta, 0)
            pi = minimise("rdpo", log_ref, ci, ri, wi, beta, label_smoothing=eps).exp()
            claims.append(
                _claim(f"rdpo.flipped.eps{eps}.beta{beta}", f"rDPO on Bradley–Terry labels flipped at rate ε={eps}, "
                       f"6 actions (β={beta}): the minimiser is clean DPO's π* = softmax(log π_ref + r/β)",
                       RDPO, target, pi, TOL_LBFGS)
            )  # fmt: skip
            pi_dpo = minimise("dpo", log_ref, ci, ri, wi, beta).exp()
            gaps.append(float((pi_dpo - target).abs().max()))
        bar = 1000 * TOL_LBFGS
        claims.append(
            Claim(
                id=f"dpo.flipped.eps{eps}.biased",
                claim=f"Plain DPO on the same flipped labels (ε={eps}) does not recover π*: max |π − π*| "
                f"for β ∈ {list(BETAS)}",
                source=f"{RDPO}; Rafailov et al. 2023, Eq. 4",
                expected=f"> {bar:g} for every β",
                measured=_round(gaps),
                tolerance=f"> {bar:g} (1000 × the optimiser tolerance)",
                passed=all(g > bar for g in gaps),
            )
        )
        # two actions: the implied reward difference β h*, robust (unbiased) and plain (shrunk)
        pair = torch.tensor([0, 1]), torch.tensor([1, 0])
        p_noisy = (1 - eps) * p + eps * (1 - p)
        w2 = torch.tensor([p_noisy, 1 - p_noisy], dtype=F64)
        for name, expected, what, kw in (
            ("rdpo", d, "rDPO recovers the clean reward difference β h* = r_1 − r_2", {"label_smoothing": eps}),
            ("dpo", math.log(p_noisy / (1 - p_noisy)), "plain DPO fits the shrunk β h* = logit(p̃), "
             "p̃ = (1−ε) σ(r_1 − r_2) + ε σ(r_2 − r_1)", {}),
        ):  # fmt: skip
            got = []
            for beta in BETAS:
                logp = minimise(name, two_ref, *pair, w2, beta, **kw)
                got.append(beta * float((logp - two_ref)[0] - (logp - two_ref)[1]))
            key = "unbiased" if name == "rdpo" else "shrunk"
            claims.append(
                _claim(f"{name}.flipped.eps{eps}.two_actions.{key}", f"Two actions, r_1 − r_2 = {d:.4f}, labels "
                       f"flipped at ε={eps}: {what} (for β ∈ {list(BETAS)})", RDPO, [expected] * len(BETAS), got,
                       TOL_LBFGS)
            )  # fmt: skip
    return claims


# --- fdpo and sigmoid_norm: DPO with a reparametrised margin ψ(Δc) − ψ(Δr) ----------------------------------------


def _psi_inverse(divergence: str, alpha: float = 0.5) -> tuple[Callable[[Tensor], Tensor], float]:
    """(ψ⁻¹, sup of ψ's range) for f-DPO's ψ(Δ) = f′(e^Δ) (up to an additive constant)."""
    if divergence == "reverse_kl":  # ψ = Δ
        return (lambda s: s), math.inf
    if divergence == "forward_kl":  # ψ = −e^{−Δ}
        return (lambda s: -torch.log(-s)), 0.0
    if divergence == "js":  # ψ = Δ − log(1 + e^Δ) = log σ(Δ)
        return (lambda s: s - torch.log(-torch.expm1(s))), 0.0
    if divergence == "alpha":  # ψ = (1 − e^{−αΔ})/α
        return (lambda s: -torch.log1p(-alpha * s) / alpha), 1.0 / alpha
    raise ValueError(f"unknown f-divergence {divergence!r}")


@_one_thread()
def fdpo_claims(seed: int = 0) -> list[Claim]:
    """f-DPO, −log σ(β (ψ(Δc) − ψ(Δr))) with ψ(Δ) = f′(e^Δ), on the 6-action Bradley–Terry bandit.

    Closed form. Per pair {i, j} the population loss is the cross-entropy between σ(r_i − r_j) and
    σ(β (ψ(Δ_i) − ψ(Δ_j))), minimised (to the entropy) exactly when β (ψ(Δ_i) − ψ(Δ_j)) = r_i − r_j for every
    pair, i.e. ψ(Δ_a) = r_a/β + c with one constant c. So π*(a) = π_ref(a) · e^{ψ⁻¹(r_a/β + c)} =
    π_ref(a) · (f′)⁻¹(r_a/β + c), the KKT solution of max E_π[r] − β D_f(π ‖ π_ref), with c fixed by
    Σ π* = 1. Each ψ⁻¹ is increasing, so Σ_a π_ref(a) e^{ψ⁻¹(r_a/β + c)} increases with c, from 0 to ∞ as
    r_a/β + c approaches the top of ψ's range (forward KL ψ = −e^{−Δ} < 0, ψ⁻¹(s) = −log(−s); JS ψ = log σ(Δ) < 0,
    ψ⁻¹(s) = s − log(1 − e^s); α-divergence ψ = (1 − e^{−αΔ})/α < 1/α, ψ⁻¹(s) = −log(1 − αs)/α; reverse KL
    ψ = Δ, which is DPO's π* = softmax(log π_ref + r/β)): a unique c, found by bisection.
    """
    bandit = make_bandit(seed)
    log_ref, r = bandit["log_ref"], bandit["rewards"]
    ci, ri, wi = bt_pairs(bandit)
    claims = []
    for divergence, kw in F_DIVERGENCES:
        inverse, sup = _psi_inverse(divergence, float(kw.get("f_alpha", 0.5)))
        for beta in BETAS:
            target = normalised_policy(
                log_ref, lambda c, b=beta, inv=inverse: inv(r / b + c), sup - float(r.max()) / beta
            )
            pi = minimise("fdpo", log_ref, ci, ri, wi, beta, f_divergence=divergence, **kw).exp()
            label = divergence + (f" (α={kw['f_alpha']})" if kw else "")
            claims.append(
                _claim(f"fdpo.{divergence}.beta{beta}", f"f-DPO, {label}, Bradley–Terry population on 6 actions "
                       f"(β={beta}): π* = π_ref · (f′)⁻¹(r/β + c)", FDPO, target, pi, TOL_LBFGS)
            )  # fmt: skip
    return claims


@_one_thread()
def sigmoid_norm_claims(seed: int = 0) -> list[Claim]:
    """Length-normalised DPO, −log σ(β (Δc/lc − Δr/lr)), on the 6-action bandit with response lengths l_a.

    Closed form. As for f-DPO with a per-action ψ_a(Δ) = Δ/l_a: the population cross-entropy is minimised when
    β (Δ_i/l_i − Δ_j/l_j) = r_i − r_j for every pair, so Δ_a = l_a (r_a/β + c) and
    π*(a) = π_ref(a) · exp(l_a (r_a/β + c)), c fixed by Σ π* = 1 (increasing in c: a unique root, by bisection).
    Longer responses are pushed harder: the log-ratio of an action grows with its length.
    """
    bandit = make_bandit(seed)
    log_ref, r = bandit["log_ref"], bandit["rewards"]
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4, (len(r),), generator=g)
    ci, ri, wi = bt_pairs(bandit)
    claims = []
    for beta in BETAS:
        target = normalised_policy(log_ref, lambda c, b=beta: lengths * (r / b + c), math.inf)
        pi = minimise("sigmoid_norm", log_ref, ci, ri, wi, beta, lengths).exp()
        claims.append(
            _claim(f"sigmoid_norm.optimum.beta{beta}", f"Length-normalised DPO, Bradley–Terry population on 6 "
                   f"actions of lengths {lengths.tolist()} (β={beta}): π*(a) = π_ref(a)·exp(l_a (r_a/β + c))",
                   SIGMOID_NORM, target, pi, TOL_LBFGS)
        )  # fmt: skip
    return claims


# --- nca_pair and bco_pair: per-action optima on a free bandit -------------------------------------------------


@_one_thread()
def nca_bco_claims(seed: int = 0) -> list[Claim]:
    """NCA (pairwise) and BCO (pairwise), Bradley–Terry population on 4 actions plus a filler.

    Both losses are a sum of a term in Δc and a term in Δr, so on a free bandit the population loss is
    Σ_a [w_c(a) ℓ_c(β Δ_a) + w_r(a) ℓ_r(β Δ_a)], minimised action by action (x = β Δ_a):

    - NCA, ℓ_c(x) = −log σ(x) − ½ log σ(−x), ℓ_r(x) = −½ log σ(−x): the derivative
      w_c (−σ(−x) + ½ σ(x)) + ½ w_r σ(x) = 0 gives e^x = 2 w_c/(w_c + w_r), i.e. β Δ_a = log(2 w_c/(w_c + w_r)),
      log 2 for an action that always wins, −∞ for one that never does (none here: every σ(·) > 0).
    - BCO, ℓ_c(x) = −log σ(x − δ), ℓ_r(x) = −log σ(δ − x): −w_c σ(δ − x) + w_r σ(x − δ) = 0 gives
      β Δ_a = δ + log(w_c/w_r), the reward shift plus the log-odds of the action's win rate.

    The filler holds 1 − :data:`FREE_MASS` of π_ref, so Σ π_ref e^{Δ} < 1 at these optima (checked); BCO's
    e^{Δ_a} = (e^δ w_c/w_r)^{1/β} grows fast as β falls, hence β ≥ 0.5 for it.
    """
    bandit = make_free_bandit(seed, 4)
    log_ref = bandit["log_ref"]
    ci, ri, wi = bt_pairs(bandit)
    w_c, w_r = (w[:4] for w in win_weights(ci, ri, wi, 5))
    claims = []
    for beta in BETAS:
        expected = torch.log(2 * w_c / (w_c + w_r)) / beta
        check_fits(log_ref, expected, "nca_pair")
        got = beta * free_delta(minimise("nca_pair", log_ref, ci, ri, wi, beta), log_ref, 4)
        claims.append(
            _claim(f"nca_pair.population.beta{beta}", f"NCA (pairwise), Bradley–Terry population on 4 actions + a "
                   f"filler (β={beta}): β Δ_a = log(2 w_c/(w_c + w_r))", NCA, beta * expected, got, TOL_LBFGS)
        )  # fmt: skip
    for beta in BCO_BETAS:
        expected = (BCO_DELTA + torch.log(w_c / w_r)) / beta
        check_fits(log_ref, expected, "bco_pair")
        got = beta * free_delta(minimise("bco_pair", log_ref, ci, ri, wi, beta, bco_delta=BCO_DELTA), log_ref, 4)
        claims.append(
            _claim(f"bco_pair.population.beta{beta}", f"BCO (pairwise, δ={BCO_DELTA}), Bradley–Terry population on 4 "
                   f"actions + a filler (β={beta}): β Δ_a = δ + log(w_c/w_r)", BCO, beta * expected, got, TOL_LBFGS)
        )  # fmt: skip
    return claims


# --- sft ----------------------------------------------------------------------------------------------------------


@_one_thread()
def sft_claims(seed: int = 0) -> list[Claim]:
    """SFT, −pc/lc (the per-token NLL of the chosen response), on the 6-action Bradley–Terry population.

    Closed form. The population loss is −Σ_a (w_c(a)/l_a) log π(a) (rejected responses and the reference play no
    part); by Gibbs' inequality its minimiser over the simplex is π*(a) = (w_c(a)/l_a) / Σ_b (w_c(b)/l_b): the
    chosen-response distribution, reweighted by 1/length because the loss is a per-token mean.
    """
    bandit = make_bandit(seed)
    log_ref, r = bandit["log_ref"], bandit["rewards"]
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(1, 6, (len(r),), generator=g)
    ci, ri, wi = bt_pairs(bandit)
    w_c, _ = win_weights(ci, ri, wi, len(r))
    target = (w_c / lengths) / (w_c / lengths).sum()
    pi = minimise("sft", log_ref, ci, ri, wi, 0.1, lengths).exp()
    return [
        _claim("sft.optimum", f"SFT (per-token NLL of the chosen), Bradley–Terry population on 6 actions of lengths "
               f"{lengths.tolist()}: π*(a) ∝ w_c(a)/l_a", "maximum likelihood (Gibbs' inequality); derived here",
               target, pi, TOL_LBFGS)
    ]  # fmt: skip


# --- the groups, for run_part1 ------------------------------------------------------------------------------------

FAMILY_GROUPS: list[tuple[str, Callable[[int], list[Claim]]]] = [
    ("hinge: zero loss in finite SGD steps, then no push (SLiC-HF)", hinge_claims),
    ("sppo_hard: Δ = ±1/(2β) and the population optimum (SPPO)", sppo_hard_claims),
    ("rdpo under flipped labels recovers DPO's π*; plain DPO does not (Chowdhury et al.)", rdpo_claims),
    ("exo_pair: σ(βh*) = 1 − ε and the population optimum (EXO)", exo_claims),
    ("simpo: ln 2 at γ/β, unbounded margin, population optimum (SimPO)", simpo_claims),
    ("fdpo: π* = π_ref·(f′)⁻¹(r/β + c) for four divergences (f-DPO)", fdpo_claims),
    ("sigmoid_norm: π* = π_ref·exp(l (r/β + c))", sigmoid_norm_claims),
    ("nca_pair and bco_pair: per-action optima on a free bandit", nca_bco_claims),
    ("sft: π* ∝ w_c/l", sft_claims),
]


def family_markdown(seed: int) -> str:
    """The report's paragraph on the family claims (appended to Part 1's section)."""
    return f"""- **Loss family** (`bandit_margins.py`, `bandit_populations.py`): every loss with a closed-form optimum,
  called by name through `compute_loss` (float64, π_θ = softmax(θ), seed {seed}). Finite optima are found by
  L-BFGS from π_θ = π_ref and compared with the closed form within {TOL_LBFGS:g}; populations are Bradley–Terry
  labels over the bandit above (flipped at rate ε ∈ {list(FLIP_RATES)} for rDPO). SPPO, NCA and BCO use a *free*
  bandit: paired actions with π_ref mass {FREE_MASS:g} plus one filler action in no pair, so each paired action's
  log-ratio is free. Hinge: full-batch SGD (lr {HINGE_SGD["lr_beta2"]}/β², {HINGE_SGD["steps"]} steps) on a full
  ranking; SimPO's deterministic pair: Adam (lr {SIMPO_ADAM["lr"]}, {SIMPO_ADAM["steps"]} steps), lengths
  {SIMPO_LENGTHS}. Losses with no finite optimum on a bandit (dpop, rpo, orpo, apo_zero, apo_down, kto) have no
  claim here.
"""
