"""Part 1 of `make reproduce`, continued: a bandit claim for every loss of the family with a closed-form optimum.

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

Claim groups (each function takes the base seed and returns ``list[Claim]``); :data:`FAMILY_GROUPS` lists them
for :func:`dpo_lightning.reproduce.bandit.run_part1`:

- :func:`hinge_claims` — SLiC-HF's hinge: SGD reaches β h ≥ 1 on every pair, loss exactly 0, then stops.
- :func:`sppo_hard_claims` — SPPO, hard labels: Δc = 1/(2β), Δr = −1/(2β); population Δ_a = t (w_c − w_r)/(w_c + w_r).
- :func:`rdpo_claims` — robust DPO under flipped labels recovers clean DPO's π*; plain DPO does not.
- :func:`exo_claims` — EXO (pairwise): σ(β h*) = 1 − ε, loss 0; population β h* = (2p − 1) log((1 − ε)/ε).
- :func:`simpo_claims` — SimPO: loss ln 2 at per-token margin γ/β; a deterministic pair pushes past it; the
  population optimum solves a quadratic; no reference is read.
- :func:`fdpo_claims` — f-DPO: π* = π_ref · (f′)⁻¹(r/β + c) for reverse KL, forward KL, JS and α-divergence.
- :func:`sigmoid_norm_claims` — length-normalised DPO: π*(a) = π_ref(a) · exp(l_a (r_a/β + c)).
- :func:`nca_bco_claims` — NCA: β Δ_a = log(2 w_c/(w_c + w_r)); BCO: β Δ_a = δ + log(w_c/w_r).
- :func:`sft_claims` — per-token NLL of the chosen response: π*(a) ∝ w_c(a)/l_a.

Losses with no finite closed-form optimum on a bandit (dpop, rpo, orpo, apo_zero, apo_down, kto) have no claim
here: their training limits are unbounded or depend on the optimiser path; their formulas are tested in
``tests/test_losses.py``.

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
from dpo_lightning.reproduce.bandit import BETAS, _claim, _lbfgs, _one_thread, _round, make_bandit
from dpo_lightning.reproduce.claims import Claim

Tensor = torch.Tensor
F64 = torch.float64

TOL_LBFGS = 1e-6  # minimisers found by L-BFGS (gradient test 1e-13, float64): ~1e-9 expected
TOL_EVAL = 1e-12  # a loss evaluated at a given point: float64 rounding only
FLIP_RATES = (0.1, 0.25)  # ε of rdpo / exo (label flip rate, label smoothing), as cDPO's claims use
FREE_MASS = 1e-4  # π_ref mass of the paired actions of a free bandit; the filler holds the rest
HINGE_SGD = {"steps": 600, "lr_beta2": 0.05}  # full-batch SGD, lr = lr_beta2/β²; θ compared at steps/2 and steps
SIMPO_SETTINGS = ((2.0, 1.0), (2.5, 1.375), (10.0, 5.0))  # (β, γ) in the range of SimPO's settings (γ/β 0.5–0.55)
SIMPO_LENGTHS = (3, 5)  # token counts of the two responses (chosen, rejected): the margin is per token
SIMPO_ADAM = {"steps": 2000, "lr": 0.05}
BCO_BETAS = (0.5, 1.0, 2.0)  # BCO's optimum e^{βΔ} = e^δ·odds needs β ≳ 0.5 to fit a free bandit (see below)
BCO_DELTA = 0.3  # δ, the reward shift (the module's running mean of rewards), held fixed here
F_DIVERGENCES = (("reverse_kl", {}), ("forward_kl", {}), ("js", {}), ("alpha", {"f_alpha": 0.5}))

SLIC = "Zhao et al. 2023, SLiC-HF, arXiv 2305.10425, Eq. 1 (calibration loss, margin δ = 1/β on h)"
SPPO = "Wu et al. 2024, SPPO, arXiv 2405.00675, Eq. 4.7 with hard labels P̂ = 1, 0 and η = 1/β"
RDPO = "Chowdhury et al. 2024, Provably Robust DPO, arXiv 2403.00409, Sec. 3 (the de-biased rDPO loss)"
EXO = "Ji et al. 2024, EXO, arXiv 2402.00856, Eq. 16 (pairwise EXO, label smoothing ε)"
SIMPO = "Meng et al. 2024, SimPO, arXiv 2405.14734, Eq. 6"
FDPO = "Wang et al. 2023, f-DPO, arXiv 2309.16240, Sec. 4 and Table 1 (optimal policy π_ref·(f′)⁻¹(·) from KKT)"
NCA = "Chen et al. 2024, Noise Contrastive Alignment, arXiv 2402.05369, Sec. 3 (NCA loss, K = 2)"
BCO = "Jung et al. 2024, Binary Classifier Optimization, arXiv 2404.04656, Sec. 3 (BCO loss, reward shift δ)"
SIGMOID_NORM = "Meng et al. 2024, arXiv 2405.14734, the DPO w/ LN ablation (length-normalised DPO)"


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


# --- hinge (SLiC-HF) ---------------------------------------------------------------------------------------------


@_one_thread()
def hinge_claims(seed: int = 0) -> list[Claim]:
    """SLiC-HF's hinge loss max(0, 1 − β h): finite training to a zero loss, and no push beyond.

    Dataset: the 6-action bandit of ``make_bandit(seed)``, every pair once, the better action (higher r) chosen:
    a deterministic, transitive ranking. Full-batch SGD on Σ_pairs loss from θ = log π_ref (h = 0), with
    lr = 0.05/β², so that one step moves β h by the same amount whatever β (a pilot run at a fixed lr needed
    ~540 steps at β = 0.1 and ~10 at β = 1; at this lr every β needs 55–62 for seeds 0–5, and θ is compared
    at steps 300 and 600).

    Closed form. h = (θ_c − θ_r) − (log π_ref(c) − log π_ref(r)) is linear in θ (the log-softmax normaliser
    cancels), and the loss is piecewise linear: its gradient is −β ∂h/∂θ on a pair with β h < 1 and exactly 0 on
    a pair with β h ≥ 1. The set {β h_p ≥ 1 for every p} is non-empty (θ = log π_ref + M · (ranks) for large M)
    with interior, so the batch subgradient method is the perceptron with margin: it reaches the set after
    finitely many steps (perceptron convergence). There the loss is exactly 0, the gradient exactly 0, and SGD
    stops: θ no longer changes (unlike DPO, whose gradient −β σ(−β h) never vanishes).
    """
    bandit = make_bandit(seed)
    r, log_ref = bandit["rewards"], bandit["log_ref"]
    pairs = torch.tensor([(i, j) for i, j in itertools.permutations(range(len(r)), 2) if r[i] > r[j]])
    chosen, rejected = pairs[:, 0], pairs[:, 1]
    steps = HINGE_SGD["steps"]
    min_bh, max_loss, moved = [], [], []
    for beta in BETAS:
        theta = log_ref.clone().requires_grad_(True)
        opt = torch.optim.SGD([theta], lr=HINGE_SGD["lr_beta2"] / beta**2)
        half = theta.detach().clone()
        for step in range(1, steps + 1):
            loss = pair_losses("hinge", torch.log_softmax(theta, 0), log_ref, chosen, rejected, beta).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step == steps // 2:
                half = theta.detach().clone()
        logp = torch.log_softmax(theta, 0)
        losses = pair_losses("hinge", logp, log_ref, chosen, rejected, beta)
        (grad,) = torch.autograd.grad(losses.sum(), theta)
        delta = (logp - log_ref).detach()
        h = delta[chosen] - delta[rejected]
        min_bh.append(float((beta * h).min()))
        max_loss.append(float(losses.detach().max()))
        moved.append(max(float((theta.detach() - half).abs().max()), float(grad.abs().max())))
    lr_text = f"{HINGE_SGD['lr_beta2']}/β²"
    where = f"{len(pairs)} deterministic pairs (a ranking of 6 actions), full-batch SGD lr {lr_text}, {steps} steps"
    betas = list(BETAS)
    return [
        Claim(
            id="hinge.margin",
            claim=f"Hinge, {where}: every pair ends with β h ≥ 1 (min over pairs of β h, for β ∈ {betas})",
            source=SLIC,
            expected="≥ 1 for every β",
            measured=_round(min_bh),
            tolerance="≥ 1 − 1e-12 (float64 rounding of h)",
            passed=all(v >= 1 - 1e-12 for v in min_bh),
        ),
        _claim(
            "hinge.loss_zero",
            f"Hinge, {where}: the loss of every pair is exactly 0 at the end (max over pairs, for β ∈ {betas})",
            SLIC,
            [0.0] * len(BETAS),
            max_loss,
            0.0,
        ),
        _claim(
            "hinge.no_push",
            f"Hinge, {where}: once β h ≥ 1 the gradient is exactly 0 and training stops: "
            f"max(|θ_T − θ_T/2|, |∇θ|) for β ∈ {betas}",
            SLIC,
            [0.0] * len(BETAS),
            moved,
            0.0,
        ),
    ]


# --- sppo_hard -----------------------------------------------------------------------------------------------


@_one_thread()
def sppo_hard_claims(seed: int = 0) -> list[Claim]:
    """SPPO with hard labels: (Δc − 1/(2β))² + (Δr + 1/(2β))².

    Closed form. On a free bandit the Δ of the paired actions are free, and the loss summed over a dataset is
    Σ_a [w_c(a) (Δ_a − t)² + w_r(a) (Δ_a + t)²] with t = 1/(2β): one quadratic per action, minimised at
    Δ_a = t (w_c − w_r)/(w_c + w_r). One deterministic pair (a ≻ b): Δ_a = t, Δ_b = −t, the SPPO targets
    log(π/π_ref) = η (P − 1/2) with η = 1/β, P = 1 and 0. Population (4 paired actions, Bradley–Terry labels,
    pairs drawn from μ): w_c(a) = Σ_b μ_ab σ(r_a − r_b), w_r(a) = Σ_b μ_ab σ(r_b − r_a). (With two actions and
    no filler, π_c + π_r = 1 ties Δc to Δr and the targets cannot both be met.)
    """
    claims = []
    single = make_free_bandit(seed, 2)
    population = make_free_bandit(seed, 4)
    ci, ri, wi = bt_pairs(population)
    for beta in BETAS:
        t = 1 / (2 * beta)
        one = torch.tensor([0]), torch.tensor([1]), torch.ones(1, dtype=F64)
        expected = torch.tensor([t, -t], dtype=F64)
        check_fits(single["log_ref"], expected, "sppo_hard single pair")
        got = free_delta(minimise("sppo_hard", single["log_ref"], *one, beta), single["log_ref"], 2)
        claims.append(
            _claim(f"sppo_hard.pair.beta{beta}", f"SPPO-hard, one deterministic pair, 3 actions (β={beta}): training "
                   "reaches [Δc, Δr] = [1/(2β), −1/(2β)]", SPPO, expected, got, TOL_LBFGS)
        )  # fmt: skip
        w_c, w_r = win_weights(ci, ri, wi, 5)
        expected = (t * (w_c - w_r) / (w_c + w_r))[:4]
        check_fits(population["log_ref"], expected, "sppo_hard population")
        got = free_delta(minimise("sppo_hard", population["log_ref"], ci, ri, wi, beta), population["log_ref"], 4)
        claims.append(
            _claim(f"sppo_hard.population.beta{beta}", f"SPPO-hard, Bradley–Terry population on 4 actions + a filler "
                   f"(β={beta}): Δ_a = (w_c − w_r)/(w_c + w_r) / (2β)", SPPO, expected, got, TOL_LBFGS)
        )  # fmt: skip
    return claims


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


# --- exo_pair ---------------------------------------------------------------------------------------------------


@_one_thread()
def exo_claims(seed: int = 0) -> list[Claim]:
    """EXO (pairwise): σ(βh) log(σ(βh)/(1−ε)) + σ(−βh) log(σ(−βh)/ε) = KL(Bern(σ(βh)) ‖ Bern(1 − ε)).

    Closed form. With q = σ(β h), one pair (a ≻ b) has loss KL(Bern(q) ‖ Bern(1 − ε)) ≥ 0, zero exactly at
    q = 1 − ε, i.e. β h* = log((1 − ε)/ε). A population pair whose label says a ≻ b with probability p has
    expected loss p KL(q ‖ 1 − ε) + (1 − p) KL(1 − q ‖ 1 − ε); its derivative in q is
    logit(q) + p log(ε/(1 − ε)) + (1 − p) log((1 − ε)/ε) = logit(q) − (2p − 1) log((1 − ε)/ε), so
    β h* = (2p − 1) log((1 − ε)/ε) (the unique stationary point, q ↦ h monotone). Here p = σ(r_1 − r_2) from the
    bandit's first two actions; the policy is softmax over those two actions with their reference.
    """
    bandit = make_bandit(seed)
    two_ref = bandit["log_ref"][:2] - torch.logsumexp(bandit["log_ref"][:2], 0)
    p = float(torch.sigmoid(bandit["rewards"][0] - bandit["rewards"][1]))
    claims = []
    for eps in FLIP_RATES:
        sig, loss_at, pop = [], [], []
        for beta in BETAS:
            one = torch.tensor([0]), torch.tensor([1]), torch.ones(1, dtype=F64)
            logp = minimise("exo_pair", two_ref, *one, beta, label_smoothing=eps)
            h = float((logp - two_ref)[0] - (logp - two_ref)[1])
            sig.append(1 / (1 + math.exp(-beta * h)))
            loss_at.append(float(pair_losses("exo_pair", logp, two_ref, *one[:2], beta, label_smoothing=eps)[0]))
            both = torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([p, 1 - p], dtype=F64)
            logp = minimise("exo_pair", two_ref, *both, beta, label_smoothing=eps)
            pop.append(beta * float((logp - two_ref)[0] - (logp - two_ref)[1]))
        betas = list(BETAS)
        n = len(BETAS)
        claims += [
            _claim(f"exo.optimum.eps{eps}.sigma", f"EXO, one deterministic pair (ε={eps}): training ends at "
                   f"σ(β h*) = 1 − ε, for β ∈ {betas}", EXO, [1 - eps] * n, sig, TOL_LBFGS),
            _claim(f"exo.optimum.eps{eps}.loss", f"EXO, one deterministic pair (ε={eps}): the loss at the optimum is "
                   f"KL = 0, for β ∈ {betas}", EXO, [0.0] * n, loss_at, TOL_LBFGS),
            _claim(f"exo.population.eps{eps}", f"EXO, two actions, label a≻b with probability p = {p:.4f} (ε={eps}): "
                   f"β h* = (2p − 1) log((1−ε)/ε), for β ∈ {betas}", EXO,
                   [(2 * p - 1) * math.log((1 - eps) / eps)] * n, pop, TOL_LBFGS),
        ]  # fmt: skip
    return claims


# --- simpo ------------------------------------------------------------------------------------------------------


def simpo_population_margin(p: float, beta: float, gamma: float) -> float:
    """The per-token margin m* minimising p·ℓ(m) + (1 − p)·ℓ'(m) for SimPO (see :func:`simpo_claims`)."""
    g = math.exp(gamma)
    u = (g * (2 * p - 1) + math.sqrt(g * g * (2 * p - 1) ** 2 + 4 * p * (1 - p))) / (2 * (1 - p))
    return math.log(u) / beta


@_one_thread()
def simpo_claims(seed: int = 0) -> list[Claim]:
    """SimPO, −log σ(β m − γ) with the per-token margin m = pc/lc − pr/lr and no reference.

    Closed forms. (1) At m = γ/β the loss is −log σ(0) = ln 2. (2) One deterministic pair: the derivative
    −β σ(γ − β m) < 0 for every m, so no finite minimiser: training pushes m past γ/β (the loss below ln 2) and
    on. (3) Two actions of lengths (lc, lr), label 1 ≻ 2 with probability p: the expected loss is
    −p log σ(x − γ) − (1 − p) log σ(−x − γ) with x = β m (the reversed pair has margin −m); setting the
    derivative −p σ(γ − x) + (1 − p) σ(x + γ) to 0 with u = e^x, g = e^γ gives p (1 + u g) = (1 − p) u (u + g),
    i.e. (1 − p) u² − g (2p − 1) u − p = 0, whose positive root is
    u* = [g (2p − 1) + √(g² (2p − 1)² + 4p(1 − p))] / (2(1 − p)), so m* = log(u*)/β (γ = 0: m* = logit(p)/β; the
    loss is convex in x and m is monotone in θ_1 − θ_2 on two actions). (4) Reference-free: the minimiser is the
    same, to the bit, whatever reference log-probs are passed.
    """
    bandit = make_bandit(seed)
    p = float(torch.sigmoid(bandit["rewards"][0] - bandit["rewards"][1]))
    lengths = torch.tensor(SIMPO_LENGTHS)
    zero_ref = torch.zeros(2, dtype=F64)
    other_ref = bandit["log_ref"][:2].clone()  # any reference: SimPO must not read it
    lc, lr = SIMPO_LENGTHS
    settings = [f"(β={b}, γ={g})" for b, g in SIMPO_SETTINGS]
    # (1) the loss at m = γ/β, evaluated: pr/lr = −(1 + γ/β), pc/lc = −1
    at_margin = []
    for beta, gamma in SIMPO_SETTINGS:
        logp = torch.tensor([-1.0 * lc, -(1.0 + gamma / beta) * lr], dtype=F64)
        loss = pair_losses("simpo", logp, zero_ref, torch.tensor([0]), torch.tensor([1]), beta, lengths,
                           simpo_gamma=gamma)  # fmt: skip
        at_margin.append(float(loss[0]))
    claims = [
        _claim("simpo.loss_at_margin", f"SimPO's loss at per-token margin m = γ/β equals ln 2 (lengths {lc}, {lr}), "
               f"for {', '.join(settings)}", SIMPO, [math.log(2)] * len(SIMPO_SETTINGS), at_margin, TOL_EVAL)
    ]  # fmt: skip
    # (2) one deterministic pair, Adam from the uniform policy
    steps, lr_adam = SIMPO_ADAM["steps"], SIMPO_ADAM["lr"]
    quarters = [steps // 4, steps // 2, 3 * steps // 4, steps]
    rows, ok = [], True
    for beta, gamma in SIMPO_SETTINGS:
        theta = torch.zeros(2, dtype=F64, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=lr_adam)
        margins = []
        for step in range(1, steps + 1):
            logp = torch.log_softmax(theta, 0)
            loss = pair_losses("simpo", logp, zero_ref, torch.tensor([0]), torch.tensor([1]), beta, lengths,
                               simpo_gamma=gamma).sum()  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step in quarters:
                lp = torch.log_softmax(theta.detach(), 0)
                margins.append(float(lp[0] / lc - lp[1] / lr))
        rows.append(margins)
        ok &= margins[-1] > gamma / beta and all(b > a for a, b in zip(margins, margins[1:], strict=False))
    claims.append(
        Claim(
            id="simpo.deterministic.unbounded",
            claim=f"SimPO, one deterministic pair, Adam lr {lr_adam} from π uniform: the per-token margin passes γ/β "
            f"and keeps growing (m at steps {quarters}; one row per {', '.join(settings)})",
            source=SIMPO,
            expected=f"last > γ/β = {[round(g / b, 4) for b, g in SIMPO_SETTINGS]}, strictly increasing",
            measured=_round(rows, 3),
            tolerance="strict inequalities",
            passed=bool(ok),
        )
    )
    # (3) two-action population, and (4) no reference read
    both = torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([p, 1 - p], dtype=F64)
    expected, got, ref_moved = [], [], []
    for beta, gamma in SIMPO_SETTINGS:
        expected.append(simpo_population_margin(p, beta, gamma))
        start = torch.zeros(2, dtype=F64)  # the same start for both references: only the reference differs
        logp = minimise("simpo", zero_ref, *both, beta, lengths, start, simpo_gamma=gamma)
        got.append(float(logp[0] / lc - logp[1] / lr))
        logp_other = minimise("simpo", other_ref, *both, beta, lengths, start, simpo_gamma=gamma)
        ref_moved.append(float((logp_other - logp).abs().max()))
    claims += [
        _claim("simpo.population.margin", f"SimPO, two actions (lengths {lc}, {lr}), label 1≻2 with probability "
               f"p = {p:.4f}: m* = log(u*)/β, u* the positive root of (1−p)u² − e^γ(2p−1)u − p = 0, for "
               f"{', '.join(settings)}", f"{SIMPO}; root derived here", expected, got, TOL_LBFGS),
        _claim("simpo.reference_free", "SimPO reads no reference: the population minimiser with π_ref = "
               f"{_round(other_ref.exp(), 4)} equals the one with zeros, to the bit (max |Δ log π|)", SIMPO,
               [0.0] * len(SIMPO_SETTINGS), ref_moved, 0.0),
    ]  # fmt: skip
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
    return f"""- **Loss family** (`bandit_family.py`): every loss with a closed-form optimum, called by name through
  `compute_loss` (float64, π_θ = softmax(θ), seed {seed}). Finite optima are found by L-BFGS from π_θ = π_ref
  and compared with the closed form within {TOL_LBFGS:g}; populations are Bradley–Terry labels over the bandit
  above (flipped at rate ε ∈ {list(FLIP_RATES)} for rDPO). SPPO, NCA and BCO use a *free* bandit: paired actions
  with π_ref mass {FREE_MASS:g} plus one filler action in no pair, so each paired action's log-ratio is free.
  Hinge: full-batch SGD (lr {HINGE_SGD["lr_beta2"]}/β², {HINGE_SGD["steps"]} steps) on a full ranking; SimPO's
  deterministic pair: Adam (lr {SIMPO_ADAM["lr"]}, {SIMPO_ADAM["steps"]} steps), lengths {SIMPO_LENGTHS}.
  Losses with no finite optimum on a bandit (dpop, rpo, orpo, apo_zero, apo_down, kto) have no claim here.
"""
