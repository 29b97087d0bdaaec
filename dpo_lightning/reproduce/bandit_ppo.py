"""Part 1 of `make reproduce`, PPO: with a fixed KL coefficient β, PPO on a bandit converges to π* of Eq. 4.

    python -m dpo_lightning.reproduce --part 1          # this group runs after the on-policy ones (~1-2 s)

Setting: the K-action bandit of ``bandit.make_bandit`` (single-token responses, known reward r, known π_ref),
π_θ = softmax(θ) from θ = log π_ref, float64. The KL-regularised objective max_π E_π[r] − β KL(π ‖ π_ref) has the
optimum π* = π_ref·exp(r/β)/Z (Rafailov et al. 2023, Eq. 4; Ziegler et al. 2019 §2.2 optimise the same objective
with PPO), and its value is E_π*[r − β log π*/π_ref] = β log Z.

The algorithm is the library's PPO, its pure pieces from :mod:`dpo_lightning.ppo.functions` unchanged: each
iteration samples a rollout batch of actions from π_θ, forms the per-token reward r(a) − β log π_old(a)/π_ref(a)
(``kl_penalised_rewards``, one token), advantages and returns by ``gae`` with one step (A = R − V, V one learned
scalar: the bandit has one state), ``whiten``s the advantages, and takes ``PPO["epochs"] × PPO["minibatches"]`` Adam
steps on the clipped policy loss + ``vf_coef`` × the clipped value loss (``policy_loss``, ``value_loss``); the lr
is annealed linearly to 0, as Schulman et al. 2017 do for Atari. Why π* is the fixed point: at π* the return
r(a) − β log π*(a)/π_ref(a) = β log Z is the same for every action, so the whitened advantages, and with them the
update, vanish on every rollout batch (not only in expectation).

Tolerances, fixed before the first run: :data:`TOL_PI` = 0.02 on max_a |π(a) − π*(a)|, from a sampling-noise
argument (about 5 standard errors √(¼/N) of a frequency from the N ≈ 20,000 draws of the annealed last tenth of the
run first planned), and :data:`TOL_V` = 0.05 on |V − β log Z| (E_π[R] = β log Z − β KL(π ‖ π*), plus the value's
fitting noise). TOL_PI does not bound that KL term below TOL_V: on the seed-0 bandit a π at the edge of TOL_PI can
have β KL(π ‖ π*) up to 0.036 (β = 0.5) and 0.051 (β = 1, the worst vertex of the box ∩ simplex); at the measured π
(max |π − π*| ~ 1e-3) it is ≲ 1e-3, so V's error is its own. The pilot runs (seeds 1-10) then showed that the noise
argument is pessimistic: the update vanishes at π* on every batch, so the error shrinks with the annealed lr instead
of settling at a noise floor; the run was shortened to 150 rollout batches of 256 draws (worst over the pilots: max
|π − π*| = 1.0e-3, |V − β log Z| = 1.0e-3, against 2.7e-3 and 1.2e-3 with 100 batches). The tolerances were kept as
fixed, not tuned to those results, so they are loose; for the claim to still mean something, a companion claim
checks that the wrong answers nearest to π* (π_ref, and the optima at 2β and β/2) are each more than 2 × TOL_PI away
from it.
"""

from __future__ import annotations

import math

import torch

from dpo_lightning.ppo.functions import gae, kl_penalised_rewards, policy_loss, value_loss, whiten
from dpo_lightning.reproduce.bandit import _claim, _one_thread, _round, make_bandit
from dpo_lightning.reproduce.claims import Claim

F64 = torch.float64
EQ4 = "Rafailov et al. 2023, Eq. 4 (π* = π_ref·exp(r/β)/Z); Schulman et al. 2017 (PPO); Ziegler et al. 2019, §2.2"
PPO_BETAS = (0.5, 1.0)  # r ~ N(0, 1): π* neither uniform nor collapsed at these β
PPO = {"iterations": 150, "batch": 256, "epochs": 2, "minibatches": 2, "lr": 0.02, "clip": 0.2, "value_clip": 1.0,
       "vf_coef": 0.5}  # fmt: skip
TOL_PI = 0.02
TOL_V = 0.05


def optimum(log_ref: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """π* = softmax(log π_ref + r/β) (Eq. 4)."""
    return torch.softmax(log_ref + r / beta, 0)


@_one_thread()
def train_ppo_bandit(log_ref: torch.Tensor, r: torch.Tensor, betas: tuple[float, ...], seed: int,
                     **settings: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """PPO with fixed β on the bandit, one replica per β (independent parameters, one optimiser, one generator).

    Returns (π, V): the final policies (R, K) and values (R,).
    """
    cfg = {**PPO, **settings}
    n_rep, k = len(betas), len(r)
    theta = log_ref.expand(n_rep, k).clone().requires_grad_(True)  # π_θ = π_ref at the start
    value = torch.zeros(n_rep, dtype=F64, requires_grad=True)
    steps = cfg["iterations"] * cfg["epochs"] * cfg["minibatches"]
    optimizer = torch.optim.Adam([theta, value], lr=cfg["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    generator = torch.Generator().manual_seed(seed)
    n, ones = cfg["batch"], torch.ones(cfg["batch"], 1, dtype=torch.bool)
    for _ in range(cfg["iterations"]):
        with torch.no_grad():
            log_old = torch.log_softmax(theta, -1)  # (R, K)
            actions = torch.multinomial(log_old.exp(), n, replacement=True, generator=generator)  # (R, n)
            old_logps = log_old.gather(1, actions).unsqueeze(-1)  # (R, n, 1): one token per response
            old_values = value.detach()[:, None, None].expand(n_rep, n, 1)
            advantages, returns = [], []
            for i, beta in enumerate(betas):
                rewards = kl_penalised_rewards(r[actions[i]], old_logps[i], log_ref[actions[i]].unsqueeze(-1), ones,
                                               beta)  # fmt: skip
                adv, ret = gae(rewards, old_values[i], ones, gamma=1.0, lam=1.0)  # one step: A = R − V
                advantages.append(whiten(adv, ones))
                returns.append(ret)
        for _ in range(cfg["epochs"]):
            order = torch.randperm(n, generator=generator)
            for rows in torch.tensor_split(order, cfg["minibatches"]):
                logps = torch.log_softmax(theta, -1).gather(1, actions[:, rows]).unsqueeze(-1)  # (R, m, 1)
                loss = logps.new_zeros(())
                for i in range(n_rep):
                    mask = ones[rows]
                    pg, _ = policy_loss(logps[i], old_logps[i, rows], advantages[i][rows], mask, clip=cfg["clip"])
                    v = value[i].expand(len(rows), 1)
                    vf = value_loss(v, old_values[i, rows], returns[i][rows], mask, clip=cfg["value_clip"])
                    loss = loss + pg + cfg["vf_coef"] * vf
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return torch.softmax(theta.detach(), -1), value.detach()


def ppo_claims(seed: int = 0) -> list[Claim]:
    """π and V of PPO with fixed β against π* and β log Z, for each β; and that the tolerance separates π*."""
    bandit = make_bandit(seed)
    log_ref, r = bandit["log_ref"], bandit["rewards"]
    pis, values = train_ppo_bandit(log_ref, r, PPO_BETAS, seed)
    claims, gaps = [], []
    setting = (f"{len(r)}-action bandit, {PPO['iterations']} rollout batches of {PPO['batch']}, "
               f"{PPO['epochs']}×{PPO['minibatches']} clipped updates each")  # fmt: skip
    for i, beta in enumerate(PPO_BETAS):
        target = optimum(log_ref, r, beta)
        claims.append(_claim(
            f"ppo.fixed_kl.optimum.beta{beta}",
            f"PPO with fixed β={beta} ({setting}) converges to π* = π_ref·exp(r/β)/Z; tolerance {TOL_PI} on "
            "max |π − π*|, fixed before running from a sampling-noise bound (loose: the update vanishes at π*, "
            "pilot seeds 1-10 reached ≤ 1e-3; see bandit_ppo.py)", EQ4, target, pis[i], TOL_PI))  # fmt: skip
        log_z = float(torch.logsumexp(log_ref + r / beta, 0))
        claims.append(_claim(
            f"ppo.fixed_kl.value.beta{beta}",
            f"PPO's learned value (β={beta}) converges to the optimum's value β log Z = E_π*[r − β log π*/π_ref]; "
            f"tolerance {TOL_V}, fixed before running: E_π[R] = β log Z − β KL(π‖π*) (that term ≈ 0 at the measured "
            "π, though up to 0.05 at the edge of the policy tolerance) plus the value's fitting noise", EQ4,
            beta * log_z, float(values[i]), TOL_V))  # fmt: skip
        wrong = [log_ref.exp(), optimum(log_ref, r, 2 * beta), optimum(log_ref, r, beta / 2)]
        gaps.append(min(float((w - target).abs().max()) for w in wrong))
    claims.append(Claim(
        id="ppo.fixed_kl.tolerance_separates",
        claim=f"The tolerance {TOL_PI} separates π* from the nearest wrong answers (π_ref, the optima at 2β and β/2): "
        f"min over them of max |π − π*|, for β ∈ {list(PPO_BETAS)}",
        source="closed forms (Eq. 4), no run", expected=f"> {2 * TOL_PI:g} for every β", measured=_round(gaps),
        tolerance=f"> 2 × {TOL_PI:g}", passed=all(g > 2 * TOL_PI for g in gaps)))  # fmt: skip
    return claims


PPO_GROUPS = [("PPO with fixed β converges to π* and β log Z (Eq. 4; Ziegler et al.)", ppo_claims)]


def ppo_markdown(seed: int) -> str:
    """The report's paragraph on these claims (appended to Part 1's section)."""
    return f"""- **PPO** (`bandit_ppo.py`, seed {seed}, β ∈ {list(PPO_BETAS)}): the library's PPO pieces
  (`ppo/functions.py`: KL-penalised reward, one-step GAE with a learned scalar value, whitening, clipped policy and
  value losses) on the bandit above, {PPO["iterations"]} rollout batches of {PPO["batch"]} actions,
  {PPO["epochs"]} epochs × {PPO["minibatches"]} minibatches of Adam (lr {PPO["lr"]} annealed linearly to 0, clip
  {PPO["clip"]}); π compared with π* within {TOL_PI} and V with β log Z within {TOL_V} (tolerances fixed before
  running, see the module docstring).
"""


if __name__ == "__main__":  # pilot runs: python -m dpo_lightning.reproduce.bandit_ppo [seeds...]
    import sys
    import time

    for pilot in [int(s) for s in sys.argv[1:]] or range(1, 11):
        start = time.perf_counter()
        b = make_bandit(pilot)
        pi, v = train_ppo_bandit(b["log_ref"], b["rewards"], PPO_BETAS, pilot)
        errors = [
            float((pi[i] - optimum(b["log_ref"], b["rewards"], beta)).abs().max()) for i, beta in enumerate(PPO_BETAS)
        ]
        v_err = [abs(float(v[i]) - beta * math.log(float(torch.exp(b["log_ref"] + b["rewards"] / beta).sum())))
                 for i, beta in enumerate(PPO_BETAS)]  # fmt: skip
        print(f"seed {pilot}: max|π−π*| {errors}, |V − β log Z| {v_err} ({time.perf_counter() - start:.1f} s)")
