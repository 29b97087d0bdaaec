"""Part 1 of `make reproduce`, the loss family: per-pair optima (hinge, sppo_hard, exo_pair, simpo).

Setting, notation (Δ_a, h, w_c, w_r, the *free* bandit) and tolerances: :mod:`dpo_lightning.reproduce.bandit_helpers`.
The population optima of the other losses are in :mod:`dpo_lightning.reproduce.bandit_populations`, whose
:data:`FAMILY_GROUPS` lists the groups of both modules for :func:`dpo_lightning.reproduce.bandit.run_part1`.

Claim groups (each function takes the base seed and returns ``list[Claim]``):

- :func:`hinge_claims` — SLiC-HF's hinge: SGD reaches β h ≥ 1 on every pair, loss exactly 0, then stops.
- :func:`sppo_hard_claims` — SPPO, hard labels: Δc = 1/(2β), Δr = −1/(2β); population Δ_a = t (w_c − w_r)/(w_c + w_r).
- :func:`exo_claims` — EXO (pairwise): σ(β h*) = 1 − ε, loss 0; population β h* = (2p − 1) log((1 − ε)/ε).
- :func:`simpo_claims` — SimPO: loss ln 2 at per-token margin γ/β; a deterministic pair pushes past it; the
  population optimum solves a quadratic; no reference is read.
"""

from __future__ import annotations

import itertools
import math

import torch

from dpo_lightning.reproduce.bandit import BETAS, _claim, _one_thread, _round, make_bandit
from dpo_lightning.reproduce.bandit_helpers import (
    F64,
    FLIP_RATES,
    TOL_EVAL,
    TOL_LBFGS,
    bt_pairs,
    check_fits,
    free_delta,
    make_free_bandit,
    minimise,
    pair_losses,
    win_weights,
)
from dpo_lightning.reproduce.claims import Claim

HINGE_SGD = {"steps": 600, "lr_beta2": 0.05}  # full-batch SGD, lr = lr_beta2/β²; θ compared at steps/2 and steps
SIMPO_SETTINGS = ((2.0, 1.0), (2.5, 1.375), (10.0, 5.0))  # (β, γ) in the range of SimPO's settings (γ/β 0.5–0.55)
SIMPO_LENGTHS = (3, 5)  # token counts of the two responses (chosen, rejected): the margin is per token
SIMPO_ADAM = {"steps": 2000, "lr": 0.05}

SLIC = "Zhao et al. 2023, SLiC-HF, arXiv 2305.10425, Eq. 1 (calibration loss, margin δ = 1/β on h)"
SPPO = "Wu et al. 2024, SPPO, arXiv 2405.00675, Eq. 4.7 with hard labels P̂ = 1, 0 and η = 1/β"
EXO = "Ji et al. 2024, EXO, arXiv 2402.00856, Eq. 16 (pairwise EXO, label smoothing ε)"
SIMPO = "Meng et al. 2024, SimPO, arXiv 2405.14734, Eq. 6"


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
