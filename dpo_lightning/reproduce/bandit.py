"""Part 1 of `make reproduce`: exact claims about DPO, IPO and cDPO, checked on bandits against closed forms.

    python -m dpo_lightning.reproduce --part 1 --out reports/reproduce     # ~15 s on 2 CPU cores

No learned model is involved: the policy is π_θ = softmax(θ) over a handful of actions, and every claim has a
closed form to compare with. The losses are those of :mod:`dpo_lightning.losses`, used unchanged.

Claim groups (each function returns ``list[Claim]``):

1. :func:`dpo_optimum_claims` — Rafailov et al. 2023, Eq. 4 / Theorem 1: the population DPO loss on a K-action
   bandit with Bradley–Terry preferences is minimised by π* = softmax(log π_ref + r/β).
2. :func:`d1_claims` — Azar et al. 2023 (arXiv 2310.12036) §5.4, dataset D1 = {a≻b, b≻c, a≻c}: Adam on
   minibatches drives DPO to the greedy policy (1, 0, 0) and IPO to softmax([2, 1, 0]/(3τ)).
3. :func:`two_action_claims` — same paper §5.3.1: one deterministic preference y1≻y2; DPO → π(y1) = 1,
   IPO → σ(1/(2τ)); and DPO's margin never stops growing.
4. :func:`per_pair_optimum_claims` — Mitchell 2023 (cDPO note): β h* = log((1−ε)/ε), loss there = H(ε);
   IPO's h* = 1/(2β).
5. The rest of the loss family (hinge, sppo_hard, rdpo, exo_pair, simpo, fdpo, sigmoid_norm, nca_pair, bco_pair,
   sft): one group per loss with a closed-form optimum, in :mod:`dpo_lightning.reproduce.bandit_margins` (per-pair
   optima) and :mod:`dpo_lightning.reproduce.bandit_populations` (population optima, and the list of groups).

Groups 2 and 3 share one Adam run (:func:`train_bandits`) in which every replica is a row of one tensor.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_lightning.losses import cdpo_loss, dpo_loss, ipo_loss
from dpo_lightning.reproduce.claims import Claim, within

Tensor = torch.Tensor
F64 = torch.float64

AZAR = "Azar et al. 2023, arXiv 2310.12036"
BETAS = (0.1, 0.5, 1.0)
SGD = {"steps": 18_000, "lr": 0.01, "batch_size": 9, "n_seeds": 10}  # §5.4 of Azar et al.
RECORD_EVERY = 10  # steps between recorded θ for the figures
LOSS_NAMES = ("dpo", "ipo")  # the leading axis of every θ tensor below
# The numbers as printed in Azar et al. §5.4 and §5.3.1; the closed forms are checked against them as well.
PAPER_D1_IPO = {0.1: (0.964, 0.034, 0.001), 0.5: (0.563, 0.289, 0.148), 1.0: (0.448, 0.321, 0.230)}
PAPER_TWO_IPO = {0.1: 0.9933, 0.5: 0.7311, 1.0: 0.6225, 2.0: 0.5622}


def _round(x: float | list | tuple | Tensor, nd: int = 6) -> float | list:
    """Plain Python numbers for claims.json, rounded for reading (pass/fail is decided at full precision)."""
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, list | tuple):
        return [_round(v, nd) for v in x]
    return round(float(x), nd)


def _claim(
    id: str, claim: str, source: str, expected: object, measured: object, tol: float, passed: bool | None = None
) -> Claim:
    """A numeric claim; it passes when every measured entry is within ``tol`` of the expected one."""
    passed = within(measured, expected, tol) if passed is None else passed
    return Claim(id=id, claim=claim, source=source, expected=_round(expected), measured=_round(measured),
                 tolerance=tol, passed=passed)  # fmt: skip


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads cost more than they save (measured 6x slower with 2 busy cores).

    A context manager, and (as ``@_one_thread()``) a decorator for the compute-heavy functions below.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@_one_thread()
def _lbfgs(param: Tensor, objective: Callable[[], Tensor]) -> float:
    """Minimise ``objective`` in float64 to machine precision; returns the final value."""
    # tolerance_change=0 so LBFGS stops on the gradient test (or on max_iter), never on a stalled step
    opt = torch.optim.LBFGS(
        [param], max_iter=2000, tolerance_grad=1e-13, tolerance_change=0.0, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    return float(objective().detach())


# --- 1. DPO's optimum on a K-action bandit ---------------------------------------------------------------


def make_bandit(seed: int, n_actions: int = 6) -> dict[str, Tensor]:
    """A random bandit: non-uniform reference, rewards, and a non-uniform pair-sampling distribution μ."""
    g = torch.Generator().manual_seed(seed)
    log_ref = torch.log_softmax(torch.randn(n_actions, generator=g, dtype=F64), 0)
    rewards = torch.randn(n_actions, generator=g, dtype=F64)
    # μ over unordered pairs {i, j}: Theorem 1 holds for any μ that covers every pair, so make it lopsided
    mu = torch.rand(n_actions, n_actions, generator=g, dtype=F64) + 0.1
    mu = torch.triu(mu, 1) + torch.triu(mu, 1).T
    mu = mu / torch.triu(mu, 1).sum()
    return {"log_ref": log_ref, "rewards": rewards, "mu": mu}


def population_dpo_policy(bandit: dict[str, Tensor], beta: float) -> Tensor:
    """argmin_θ Σ_{i≠j} μ_ij P_BT(i≻j) · dpo_loss(chosen=i, rejected=j), as softmax(θ). Shape (K,)."""
    log_ref, r, mu = bandit["log_ref"], bandit["rewards"], bandit["mu"]
    ordered = torch.tensor([p for p in itertools.permutations(range(len(r)), 2)])  # (K(K−1), 2)
    i, j = ordered[:, 0], ordered[:, 1]
    weight = mu[i, j] * torch.sigmoid(r[i] - r[j])  # pair drawn with μ, label from Bradley–Terry; sums to 1
    theta = log_ref.clone().requires_grad_(True)  # start at π_θ = π_ref, as DPO training does

    def objective() -> Tensor:
        logp = torch.log_softmax(theta, 0)
        losses, _, _ = dpo_loss(logp[i], logp[j], log_ref[i], log_ref[j], beta=beta)
        return (weight * losses).sum()

    _lbfgs(theta, objective)
    return torch.softmax(theta.detach(), 0)  # the loss fixes θ only up to a constant; softmax removes it


def dpo_optimum_claims(seed: int = 0) -> list[Claim]:
    """Claim group 1: π* = softmax(log π_ref + r/β), β ∈ {0.1, 0.5, 1} (Rafailov et al. 2023, Eq. 4)."""
    bandit = make_bandit(seed)
    claims = []
    for beta in BETAS:
        target = torch.softmax(bandit["log_ref"] + bandit["rewards"] / beta, 0)  # Eq. 4 with Z(x) normalising
        pi = population_dpo_policy(bandit, beta)
        what = f"Minimising the population DPO loss on a {len(pi)}-action bandit (β={beta}) gives π* = "
        claims.append(
            _claim(f"bandit.dpo_optimum.beta{beta}", what + "softmax(log π_ref + r/β)",
                   "Rafailov et al. 2023, Eq. 4 and Theorem 1", target, pi, 1e-3)
        )  # fmt: skip
    return claims


# --- 2 and 3. Adam on minibatches: dataset D1 (three actions) and the two-action problem ---------------


@dataclass
class BanditProblem:
    """A preference dataset over ``n_actions`` actions, trained with a uniform reference."""

    name: str
    n_actions: int
    pairs: tuple[tuple[int, int], ...]  # (chosen, rejected) action indices
    taus: tuple[float, ...]
    n_seeds: int


D1 = BanditProblem("d1", 3, ((0, 1), (1, 2), (0, 2)), (0.1, 0.5, 1.0), SGD["n_seeds"])
TWO_ACTIONS = BanditProblem("two_actions", 2, ((0, 1),), (0.1, 0.5, 1.0, 2.0), 1)  # deterministic: one seed


def replica_seeds(problem: BanditProblem, seed: int) -> list[int]:
    """The seed of each of ``problem``'s replicas under base seed ``seed``."""
    return [seed * problem.n_seeds + k for k in range(problem.n_seeds)]


def minibatch_weights(problem: BanditProblem, *, seed: int, steps: int, batch_size: int) -> Tensor:
    """Per-step pair frequencies, shape (steps, seeds, P).

    A minibatch of ``batch_size`` pairs drawn uniformly with replacement has mean loss Σ_p (n_p/batch) ℓ_p, so
    the counts n_p carry all of its randomness. Replica k draws from its own generator, seeded
    seed · n_seeds + k, so the replicas of different base seeds never share a stream.
    """
    n_pairs = len(problem.pairs)
    weights = []
    for k in range(problem.n_seeds):
        g = torch.Generator().manual_seed(replica_seeds(problem, seed)[k])
        idx = torch.randint(0, n_pairs, (steps, batch_size), generator=g)
        weights.append(torch.nn.functional.one_hot(idx, n_pairs).sum(1).to(F64) / batch_size)
    return torch.stack(weights, 1)


@_one_thread()
def train_bandits(
    problems: list[BanditProblem], *, seed: int, steps: int, lr: float, batch_size: int
) -> list[tuple[Tensor, Tensor]]:
    """Adam on π_θ = softmax(θ) from θ = 0 (the uniform reference), every (problem, loss, τ, seed) at once.

    All replicas are rows of one θ of shape (L, rows, A), A the largest action count, and every pair of every
    problem is scored in every row, weighted by that row's minibatch frequencies (0 for pairs of other
    problems). A problem with fewer actions is padded with actions that occur in none of its pairs: the
    log-softmax gradient subtracts π · (the row's gradient sum), which is exactly 0 when each pair adds +g to
    its chosen and −g to its rejected action, so a padded logit gets gradient 0 and stays at 0; the real
    actions get exactly the gradients of the smaller softmax. One graph instead of one per problem halves the
    per-step overhead, which is all the cost here.

    Returns, per problem, (recorded steps (R,), recorded θ of shape (R, len(LOSS_NAMES), T, S, A_problem));
    θ is recorded at every step up to 10 · RECORD_EVERY, then every RECORD_EVERY steps, and at the last step.
    """
    n_actions = max(p.n_actions for p in problems)
    pairs = sorted({pair for p in problems for pair in p.pairs})
    weights, betas, refs, sizes = [], [], [], []
    for p in problems:
        w = torch.zeros(steps, len(p.taus), p.n_seeds, len(pairs), dtype=F64)
        cols = [pairs.index(pair) for pair in p.pairs]
        w[..., cols] = minibatch_weights(p, seed=seed, steps=steps, batch_size=batch_size)[:, None]  # every τ
        weights.append(w.flatten(1, 2))  # (steps, T·S, P)
        betas.append(torch.tensor(p.taus, dtype=F64).repeat_interleave(p.n_seeds))
        refs.append(torch.full((len(p.taus) * p.n_seeds,), -math.log(p.n_actions), dtype=F64))  # uniform π_ref
        sizes.append(len(p.taus) * p.n_seeds)
    weights = torch.cat(weights, 1)  # (steps, rows, P)
    beta = torch.cat(betas)[:, None]  # (rows, 1): the losses are plain arithmetic in β, so one call covers all
    ref = torch.cat(refs)[:, None].expand(-1, len(pairs))  # (rows, P)
    chosen_idx, rejected_idx = torch.tensor(pairs).T
    theta = torch.zeros(len(LOSS_NAMES), len(beta), n_actions, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    recorded_steps, records = [0], [theta.detach().clone()]
    for step in range(1, steps + 1):
        logp = torch.log_softmax(theta, -1)  # (L, rows, A)
        chosen, rejected = logp[..., chosen_idx], logp[..., rejected_idx]  # (L, rows, P)
        dpo, _, _ = dpo_loss(chosen[0], rejected[0], ref, ref, beta=beta)
        ipo, _, _ = ipo_loss(chosen[1], rejected[1], ref, ref, beta=beta)
        # a sum over rows, not a mean: each replica's gradient is then exactly its own minibatch gradient
        total = ((dpo + ipo) * weights[step - 1]).sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if step % RECORD_EVERY == 0 or step < 10 * RECORD_EVERY or step == steps:  # dense early: log-x plots
            recorded_steps.append(step)
            records.append(theta.detach().clone())
    steps_t, history = torch.tensor(recorded_steps), torch.stack(records)  # (R, L, rows, A)
    out = []
    for p, rows in zip(problems, history.split(sizes, dim=2), strict=True):
        if rows[..., p.n_actions :].any():  # cannot happen (see above); guards the padding argument
            raise RuntimeError(f"train_bandits: a padded action of {p.name!r} moved")
        out.append((steps_t, rows[..., : p.n_actions].unflatten(2, (len(p.taus), p.n_seeds))))
    return out


def d1_ipo_population_policy(tau: float) -> Tensor:
    """Minimiser of the IPO loss averaged over D1 (deterministic, no sampling), as softmax(θ). Shape (3,)."""
    theta = torch.zeros(3, dtype=F64, requires_grad=True)
    pr = torch.tensor(D1.pairs)
    ref = torch.full((len(D1.pairs),), -math.log(3), dtype=F64)

    def objective() -> Tensor:
        logp = torch.log_softmax(theta, 0)
        return ipo_loss(logp[pr[:, 0]], logp[pr[:, 1]], ref, ref, beta=tau)[0].mean()

    _lbfgs(theta, objective)
    return torch.softmax(theta.detach(), 0)


def d1_claims(theta: Tensor) -> list[Claim]:
    """Claim group 2 from the final θ of the D1 run, shape (L, T, S, 3).

    The IPO closed form: with x = θ_a − θ_b, y = θ_b − θ_c and c = 1/(2τ), the D1 loss is
    (x − c)² + (y − c)² + (x + y − c)²; setting both derivatives to 0 gives 2x + y = 2c = x + 2y, so
    x = y = 2c/3 = 1/(3τ) and π = softmax([2, 1, 0]/(3τ)). DPO's loss has no minimiser: it decreases as the
    margins grow, so π → (1, 0, 0).
    """
    mean_pi = torch.softmax(theta, -1).mean(2)  # (L, T, 3): mean final policy over seeds, as in the paper
    claims = []
    for t, tau in enumerate(D1.taus):
        closed = torch.softmax(torch.tensor([2.0, 1.0, 0.0], dtype=F64) / (3 * tau), 0)
        population = d1_ipo_population_policy(tau)
        paper = torch.tensor(PAPER_D1_IPO[tau], dtype=F64)
        what = f"The printed IPO policy on D1 (τ={tau}) minimises the population IPO loss: it is "
        claims.append(
            _claim(f"d1.ipo.population_optimum.tau{tau}", what + f"softmax([2,1,0]/(3τ)) = {_round(closed, 4)}",
                   f"{AZAR}, §5.4", paper, population, 1e-3,
                   passed=within(population, paper, 1e-3) and within(population, closed, 1e-9))
        )  # fmt: skip
        for li, name in enumerate(LOSS_NAMES):
            what = f"{name.upper()} on D1 (τ={tau}): mean final policy over {D1.n_seeds} seeds after "
            what += f"{SGD['steps']} Adam steps (lr {SGD['lr']}, minibatch {SGD['batch_size']})"
            expected = [1.0, 0.0, 0.0] if name == "dpo" else PAPER_D1_IPO[tau]
            claims.append(_claim(f"d1.{name}.tau{tau}", what, f"{AZAR}, §5.4", expected, mean_pi[li, t], 0.01))
    return claims


def two_action_claims(steps: Tensor, thetas: Tensor) -> list[Claim]:
    """Claim group 3 from the two-action run: θ recorded at ``steps``, shape (R, L, T, 1, 2).

    With h = θ_1 − θ_2, IPO's loss (h − 1/(2τ))² is minimised at h = 1/(2τ), where π(y1) = σ(1/(2τ)).
    DPO's −log σ(τ h) has derivative −τ σ(−τ h) < 0 for every finite h: no minimiser, so h must keep growing.
    """
    final_pi1 = torch.softmax(thetas[-1, :, :, 0], -1)[..., 0]  # (L, T)
    margin = thetas[:, 0, :, 0, 0] - thetas[:, 0, :, 0, 1]  # DPO's h over time, (R, T)
    claims = []
    for t, tau in enumerate(TWO_ACTIONS.taus):
        for li, name in enumerate(LOSS_NAMES):
            expected = 1.0 if name == "dpo" else PAPER_TWO_IPO[tau]
            closed = "1" if name == "dpo" else f"σ(1/(2τ)) = {1 / (1 + math.exp(-0.5 / tau)):.4f}"
            what = f"{name.upper()}, one deterministic preference y1≻y2 (τ={tau}): π(y1) → {closed} "
            what += f"(after {int(steps[-1])} Adam steps)"
            claims.append(
                _claim(f"two_actions.{name}.tau{tau}", what, f"{AZAR}, §5.3.1", expected, final_pi1[li, t], 0.01)
            )
    last = int(steps[-1])
    quarters = torch.searchsorted(steps, torch.tensor([last // 4, last // 2, 3 * last // 4, last]))
    h = margin[quarters]  # (4, T)
    claims.append(
        Claim(
            id="two_actions.dpo.margin_unbounded",
            claim="Plain DPO has no finite minimiser: its margin h keeps growing under training "
            f"(h at steps {[int(steps[q]) for q in quarters]}, one row per τ ∈ {list(TWO_ACTIONS.taus)})",
            source=f"{AZAR}, §4.2; Mitchell 2023, cDPO note",
            expected="strictly increasing, for every τ",
            measured=_round(h.T, 2),
            tolerance="strictly increasing",
            passed=bool((h[1:] > h[:-1]).all()),
        )
    )
    return claims


# --- 4. Per-pair optima: cDPO and IPO -----------------------------------------------------------------------


def per_pair_minimiser(loss_fn: Callable, beta: float, **params: float) -> tuple[float, float]:
    """(h*, loss(h*)) for one pair, by LBFGS over the scalar margin h (policy_chosen = h, the rest 0)."""
    h = torch.zeros(1, dtype=F64, requires_grad=True)
    zero = torch.zeros(1, dtype=F64)
    loss = _lbfgs(h, lambda: loss_fn(h, zero, zero, zero, beta=beta, **params)[0].sum())
    return float(h.detach()), loss


def per_pair_optimum_claims() -> list[Claim]:
    """Claim group 4. cDPO: d/dh[−(1−ε) log σ(βh) − ε log σ(−βh)] = −β[(1−ε) σ(−βh) − ε σ(βh)] = 0 gives
    σ(βh*) = 1 − ε, i.e. βh* = log((1−ε)/ε), and the loss there is −(1−ε) log(1−ε) − ε log ε = H(ε).
    IPO: (h − 1/(2β))² is 0 at h* = 1/(2β)."""
    claims = []
    for eps in (0.1, 0.25):
        found = [per_pair_minimiser(cdpo_loss, beta, label_smoothing=eps) for beta in BETAS]
        beta_h = [beta * h for beta, (h, _) in zip(BETAS, found, strict=True)]
        entropy = -(1 - eps) * math.log(1 - eps) - eps * math.log(eps)
        for key, what, exp, got in (
            ("beta_h", "β h* = log((1−ε)/ε)", math.log((1 - eps) / eps), beta_h),
            ("loss", "the loss at h* equals the binary entropy H(ε) (nats)", entropy, [v for _, v in found]),
        ):
            what = f"cDPO per-pair optimum (ε={eps}), for β ∈ {list(BETAS)}: {what}"
            exp = [exp] * len(BETAS)
            claims.append(_claim(f"cdpo.optimum.eps{eps}.{key}", what, "Mitchell 2023, cDPO note", exp, got, 1e-3))
    ipo_h = [per_pair_minimiser(ipo_loss, beta)[0] for beta in BETAS]
    expected = [1 / (2 * beta) for beta in BETAS]
    what = f"IPO per-pair optimum h* = 1/(2β), for β ∈ {list(BETAS)}"
    claims.append(_claim("ipo.optimum.h", what, f"{AZAR}, Eq. 17", expected, ipo_h, 1e-3))
    return claims


# --- figures and the Part 1 driver ---------------------------------------------------------------------


def plot_d1(steps: Tensor, thetas: Tensor, path: Path) -> Path:
    """Azar et al.'s figure for D1: action probabilities over steps, mean over seeds with a min–max band."""
    from dpo_lightning.reproduce.report import Panel, Series, line_figure

    pi = torch.softmax(thetas, -1)  # (R, L, T, S, 3)
    x = steps.clamp(min=1).numpy()  # step 0 drawn at 1 on the log axis
    colors = ("tab:blue", "tab:orange", "tab:green")
    panels = []
    for li, name in enumerate(LOSS_NAMES):
        for t, tau in enumerate(D1.taus):
            p = pi[:, li, t]  # (R, S, 3)
            series = [
                Series(f"π({a})", x, p[..., k].mean(1), p[..., k].amin(1), p[..., k].amax(1), color=colors[k])
                for k, a in enumerate("abc")
            ]
            ref = PAPER_D1_IPO[tau] if name == "ipo" else (1.0, 0.0, 0.0)
            panels.append(
                Panel(f"{name.upper()}, τ = {tau}", series, "step (log scale)", "action probability",
                      hlines=[(v, "paper's value") for v in ref], xlog=True, ylim=(-0.03, 1.03))
            )  # fmt: skip
    title = f"D1 = {{a≻b, b≻c, a≻c}}: Adam lr {SGD['lr']}, minibatch {SGD['batch_size']}, {D1.n_seeds} seeds"
    return line_figure(path, panels, ncols=len(D1.taus), title=title)


def plot_two_actions(steps: Tensor, thetas: Tensor, path: Path) -> Path:
    """π(y1) over steps for one deterministic preference y1≻y2: DPO heads to 1, IPO stops at σ(1/(2τ))."""
    from dpo_lightning.reproduce.report import Panel, Series, line_figure

    pi1 = torch.softmax(thetas[:, :, :, 0], -1)[..., 0]  # (R, L, T)
    x = steps.clamp(min=1).numpy()
    panels = [
        Panel(name.upper(), [Series(f"τ = {tau}", x, pi1[:, li, t]) for t, tau in enumerate(TWO_ACTIONS.taus)],
              "step (log scale)", "π(y1)", xlog=True, ylim=(0.45, 1.02),
              hlines=[(v, "σ(1/(2τ))") for v in PAPER_TWO_IPO.values()] if name == "ipo" else [(1.0, "1")])
        for li, name in enumerate(LOSS_NAMES)
    ]  # fmt: skip
    return line_figure(path, panels, ncols=2, title="Two actions, y1≻y2 always (Azar et al. §5.3.1)")


def run_part1(
    out_dir: Path, *, quick: bool = False, seed: int = 0, log: Callable[[str], None] = print
) -> tuple[list[Claim], dict]:
    """Every Part 1 claim group, with figures. ``quick`` changes nothing: Part 1 is always run in full.

    Returns (claims, {"figures": [paths relative to out_dir], "markdown": the report section}).
    """
    del quick  # the exact claims are cheap (~15 s); a shortened run would not test them
    out_dir = Path(out_dir)
    claims: list[Claim] = []

    def group(name: str, fn: Callable[[], list[Claim]]) -> None:
        start = time.perf_counter()
        new = fn()
        claims.extend(new)
        n_pass = sum(c.passed for c in new)
        log(f"[part 1] {name}: {n_pass}/{len(new)} pass ({time.perf_counter() - start:.1f} s)")

    with _one_thread():
        group("DPO optimum on a 6-action bandit (Rafailov et al., Eq. 4)", lambda: dpo_optimum_claims(seed))
        runs: list[tuple[Tensor, Tensor]] = []

        def d1() -> list[Claim]:  # the one Adam run serves D1 and the two-action problem
            sgd = {k: SGD[k] for k in ("steps", "lr", "batch_size")}
            runs.extend(train_bandits([D1, TWO_ACTIONS], seed=seed, **sgd))
            return d1_claims(runs[0][1][-1])

        group(f"IPO vs DPO on D1, Adam {SGD['steps']} steps, run with the next (Azar et al. §5.4)", d1)
        group("two actions, deterministic preference (Azar et al. §5.3.1)", lambda: two_action_claims(*runs[1]))
        group("per-pair optima of cDPO and IPO (Mitchell 2023)", per_pair_optimum_claims)
        from dpo_lightning.reproduce.bandit_populations import FAMILY_GROUPS, family_markdown  # imports this module

        for title, claims_of in FAMILY_GROUPS:
            group(title, lambda claims_of=claims_of: claims_of(seed))
        from dpo_lightning.reproduce.bandit_onpolicy import ONPOLICY_GROUPS, onpolicy_markdown

        for title, claims_of in ONPOLICY_GROUPS:
            group(title, lambda claims_of=claims_of: claims_of(seed))
        from dpo_lightning.reproduce.bandit_ppo import PPO_GROUPS, ppo_markdown

        for title, claims_of in PPO_GROUPS:
            group(title, lambda claims_of=claims_of: claims_of(seed))
    (s_d1, th_d1), (s_two, th_two) = runs
    figures = [
        plot_d1(s_d1, th_d1, out_dir / "bandit_d1_trajectories.png"),
        plot_two_actions(s_two, th_two, out_dir / "bandit_two_actions.png"),
    ]
    bandit = make_bandit(seed)
    ipo_std = torch.softmax(th_d1[-1, 1], -1).std(1).amax()  # spread of the final IPO policies across seeds
    markdown = f"""Exact claims on bandits, π_θ = softmax(θ), losses from `dpo_lightning.losses`, float64.

- **DPO optimum**: a {len(bandit["rewards"])}-action bandit drawn from seed {seed}: π_ref =
  {_round(bandit["log_ref"].exp(), 4)}, r = {_round(bandit["rewards"], 4)}, pairs {{i, j}} drawn from a
  non-uniform μ, labels from Bradley–Terry σ(r_i − r_j). The population loss is minimised with L-BFGS from
  π_θ = π_ref and compared with softmax(log π_ref + r/β) after normalising (the loss fixes θ only up to
  a constant).
- **D1 and two actions**: θ = 0 (the uniform reference) at the start; Adam, lr {SGD["lr"]},
  {SGD["steps"]} steps; D1 minibatches of {SGD["batch_size"]} pairs drawn uniformly with replacement, seed
  replicas with seeds {replica_seeds(D1, seed)} (one generator each), all replicas in one tensor. The IPO values
  printed in §5.4 are the closed form softmax([2, 1, 0]/(3τ)) rounded to 3 decimals (checked by the
  `population_optimum` rows); the largest standard deviation of a final IPO probability across seeds is
  {float(ipo_std):.4f}.
- **Per-pair optima**: L-BFGS over the scalar margin h for β ∈ {list(BETAS)}.
{family_markdown(seed)}{onpolicy_markdown(seed)}{ppo_markdown(seed)}"""
    return claims, {"figures": [str(f.relative_to(out_dir)) for f in figures], "markdown": markdown}
