"""Every registered loss against its closed form: value and the gradient with respect to each input.

The closed forms below are written out by hand in plain ``math`` (no torch), one function per loss, each with its
formula and its partial derivatives in the docstring. The tests feed the four log-probs (and the lengths, where a
loss reads them) as separate leaves with distinct values, so a loss that ignored a term, or flipped its sign, gets
a wrong value or a wrong partial derivative somewhere. Notation: Δc = pc − rc, Δr = pr − rr, h = Δc − Δr,
σ the logistic function, s(x) = σ(x)σ(−x) = σ′(x).
"""

import math

import pytest
import torch

from dpo_lightning.losses import (
    LOSSES,
    SPECS,
    cdpo_loss,
    compute_loss,
    compute_mixture,
    dpo_loss,
    exo_pair_loss,
    fdpo_loss,
    get_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    nca_pair_loss,
    rdpo_loss,
    sppo_hard_loss,
)
from dpo_lightning.losses.registry import declared_params

f64 = torch.float64


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def s(x: float) -> float:
    return sig(x) * sig(-x)


def margin(g: float) -> tuple[float, float, float, float]:
    """∂/∂(pc, pr, rc, rr) of a loss that depends on h only, from g = dL/dh."""
    return g, -g, -g, g


def anchored(gc: float, gr: float) -> tuple[float, float, float, float]:
    """∂/∂(pc, pr, rc, rr) of a loss of (Δc, Δr), from gc = dL/dΔc and gr = dL/dΔr."""
    return gc, gr, -gc, -gr


# ---------------------------------------------------------------------------------------------------------------
# Closed forms. Each returns (L, (∂pc, ∂pr, ∂rc, ∂rr, ∂lc, ∂lr)) at one point.
# ---------------------------------------------------------------------------------------------------------------


def closed_dpo(pc, pr, rc, rr, lc, lr, b):
    """L = −log σ(βh);  dL/dh = −β σ(−βh)."""
    h = (pc - rc) - (pr - rr)
    return -logsig(b * h), (*margin(-b * sig(-b * h)), 0.0, 0.0)


def closed_ipo(pc, pr, rc, rr, lc, lr, b):
    """L = (h − 1/(2β))²;  dL/dh = 2(h − 1/(2β))."""
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * b)) ** 2, (*margin(2 * (h - 1 / (2 * b))), 0.0, 0.0)


def closed_cdpo(pc, pr, rc, rr, lc, lr, b, eps=0.2):
    """L = −(1−ε) log σ(βh) − ε log σ(−βh);  dL/dh = −β[(1−ε) σ(−βh) − ε σ(βh)]."""
    h = (pc - rc) - (pr - rr)
    value = -(1 - eps) * logsig(b * h) - eps * logsig(-b * h)
    return value, (*margin(-b * ((1 - eps) * sig(-b * h) - eps * sig(b * h))), 0.0, 0.0)


def closed_rdpo(pc, pr, rc, rr, lc, lr, b, eps=0.15):
    """L = [(1−ε)(−log σ(βh)) − ε(−log σ(−βh))]/(1−2ε);  dL/dh = −β[(1−ε) σ(−βh) + ε σ(βh)]/(1−2ε)."""
    h = (pc - rc) - (pr - rr)
    value = ((1 - eps) * -logsig(b * h) - eps * -logsig(-b * h)) / (1 - 2 * eps)
    return value, (*margin(-b * ((1 - eps) * sig(-b * h) + eps * sig(b * h)) / (1 - 2 * eps)), 0.0, 0.0)


def closed_hinge(pc, pr, rc, rr, lc, lr, b):
    """L = max(0, 1 − βh);  dL/dh = −β where βh < 1, 0 where βh > 1."""
    h = (pc - rc) - (pr - rr)
    return max(0.0, 1 - b * h), (*margin(-b if b * h < 1 else 0.0), 0.0, 0.0)


def closed_exo_pair(pc, pr, rc, rr, lc, lr, b, eps=0.1):
    """L = q log(q/(1−ε)) + (1−q) log((1−q)/ε), q = σ(βh);
    dL/dh = β q(1−q) [log(q/(1−q)) − log((1−ε)/ε)] = β s(βh) (βh − log((1−ε)/ε))."""
    h = (pc - rc) - (pr - rr)
    q = sig(b * h)
    value = q * (math.log(q) - math.log(1 - eps)) + (1 - q) * (math.log(1 - q) - math.log(eps))
    return value, (*margin(b * s(b * h) * (b * h - math.log((1 - eps) / eps))), 0.0, 0.0)


def _closed_fdpo(psi, dpsi):
    def closed(pc, pr, rc, rr, lc, lr, b):
        """L = −log σ(β(ψ(Δc) − ψ(Δr)));  dL/dΔc = −β σ(−u) ψ′(Δc), dL/dΔr = +β σ(−u) ψ′(Δr)."""
        dc, dr = pc - rc, pr - rr
        u = b * (psi(dc) - psi(dr))
        return -logsig(u), (*anchored(-b * sig(-u) * dpsi(dc), b * sig(-u) * dpsi(dr)), 0.0, 0.0)

    return closed


ALPHA = 0.3
# ψ, ψ′ per f-divergence (f′(e^Δ) of arXiv 2309.16240 Table 1, constants dropped)
F_SCORES = {
    "reverse_kl": (lambda d: d, lambda d: 1.0),
    "forward_kl": (lambda d: -math.exp(-d), lambda d: math.exp(-d)),
    "js": (lambda d: d - math.log1p(math.exp(d)), lambda d: sig(-d)),
    "alpha": (lambda d: (1 - math.exp(-ALPHA * d)) / ALPHA, lambda d: math.exp(-ALPHA * d)),
}


def closed_sigmoid_norm(pc, pr, rc, rr, lc, lr, b):
    """Inputs are per-token means here; L = −log σ(βh) on them;  dL/dh = −β σ(−βh)."""
    return closed_dpo(pc, pr, rc, rr, lc, lr, b)


def closed_rpo(pc, pr, rc, rr, lc, lr, b, alpha=0.7):
    """L = −log σ(βh) − α pc/lc;
    ∂pc = −β σ(−βh) − α/lc, ∂pr = ∂rc = β σ(−βh), ∂rr = −β σ(−βh), ∂lc = α pc/lc², ∂lr = 0."""
    h = (pc - rc) - (pr - rr)
    g = -b * sig(-b * h)
    return -logsig(b * h) - alpha * pc / lc, (g - alpha / lc, -g, -g, g, alpha * pc / lc**2, 0.0)


def closed_dpop(pc, pr, rc, rr, lc, lr, b, lam=3.0):
    """L = −log σ(β(h − λ max(0, rc − pc))), u the argument of σ;
    ∂pc = −β σ(−u)(1 + λ[rc > pc]), ∂rc = +β σ(−u)(1 + λ[rc > pc]), ∂pr = β σ(−u), ∂rr = −β σ(−u)."""
    h = (pc - rc) - (pr - rr)
    below = 1.0 if rc > pc else 0.0
    u = b * (h - lam * max(0.0, rc - pc))
    w = b * sig(-u)
    return -logsig(u), (-w * (1 + lam * below), w, w * (1 + lam * below), -w, 0.0, 0.0)


def closed_nca_pair(pc, pr, rc, rr, lc, lr, b):
    """L = −log σ(βΔc) − ½ log σ(−βΔc) − ½ log σ(−βΔr);
    dL/dΔc = −β σ(−βΔc) + ½ β σ(βΔc), dL/dΔr = ½ β σ(βΔr)."""
    dc, dr = pc - rc, pr - rr
    value = -logsig(b * dc) - 0.5 * logsig(-b * dc) - 0.5 * logsig(-b * dr)
    return value, (*anchored(-b * sig(-b * dc) + 0.5 * b * sig(b * dc), 0.5 * b * sig(b * dr)), 0.0, 0.0)


def closed_bco_pair(pc, pr, rc, rr, lc, lr, b, delta=0.3):
    """L = −log σ(βΔc − δ) − log σ(δ − βΔr);  dL/dΔc = −β σ(δ − βΔc), dL/dΔr = β σ(βΔr − δ)."""
    dc, dr = pc - rc, pr - rr
    value = -logsig(b * dc - delta) - logsig(delta - b * dr)
    return value, (*anchored(-b * sig(delta - b * dc), b * sig(b * dr - delta)), 0.0, 0.0)


def closed_apo_zero(pc, pr, rc, rr, lc, lr, b):
    """L = 1 − σ(βΔc) + σ(βΔr);  dL/dΔc = −β s(βΔc), dL/dΔr = β s(βΔr)."""
    dc, dr = pc - rc, pr - rr
    return 1 - sig(b * dc) + sig(b * dr), (*anchored(-b * s(b * dc), b * s(b * dr)), 0.0, 0.0)


def closed_apo_down(pc, pr, rc, rr, lc, lr, b):
    """L = σ(βΔc) + 1 − σ(βh);  dL/dΔc = β s(βΔc) − β s(βh), dL/dΔr = β s(βh)."""
    dc, dr = pc - rc, pr - rr
    h = dc - dr
    value = sig(b * dc) + 1 - sig(b * h)
    return value, (*anchored(b * s(b * dc) - b * s(b * h), b * s(b * h)), 0.0, 0.0)


def closed_sppo_hard(pc, pr, rc, rr, lc, lr, b):
    """L = (Δc − 1/(2β))² + (Δr + 1/(2β))²;  dL/dΔc = 2(Δc − 1/(2β)), dL/dΔr = 2(Δr + 1/(2β))."""
    dc, dr = pc - rc, pr - rr
    k = 1 / (2 * b)
    return (dc - k) ** 2 + (dr + k) ** 2, (*anchored(2 * (dc - k), 2 * (dr + k)), 0.0, 0.0)


def closed_simpo(pc, pr, rc, rr, lc, lr, b, gamma=0.8):
    """Inputs are per-token means m; L = −log σ(β(mc − mr) − γ), u the argument;
    ∂mc = −β σ(−u), ∂mr = β σ(−u), ∂rc = ∂rr = 0 (no reference)."""
    u = b * (pc - pr) - gamma
    return -logsig(u), (-b * sig(-u), b * sig(-u), 0.0, 0.0, 0.0, 0.0)


def closed_orpo(pc, pr, rc, rr, lc, lr, b, lam=0.3):
    """Inputs are per-token means m < 0; lo(m) = m − log(1 − e^m), lo′(m) = 1/(1 − e^m), v = lo(mc) − lo(mr);
    L = −mc − λ log σ(v);  ∂mc = −1 − λ σ(−v)/(1 − e^mc), ∂mr = λ σ(−v)/(1 − e^mr), ∂rc = ∂rr = 0."""

    def lo(m):
        return m - math.log(1 - math.exp(m))

    v = lo(pc) - lo(pr)
    grads = (-1 - lam * sig(-v) / (1 - math.exp(pc)), lam * sig(-v) / (1 - math.exp(pr)), 0.0, 0.0, 0.0, 0.0)
    return -pc - lam * logsig(v), grads


def closed_sft(pc, pr, rc, rr, lc, lr, b):
    """Inputs are per-token means; L = −mc;  ∂mc = −1, all others 0."""
    return -pc, (-1.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def closed_unlikelihood(pc, pr, rc, rr, lc, lr, b, alpha=0.4):
    """Inputs are per-token means; L = −mc − α log(1 − e^{mr});  ∂mc = −1, ∂mr = α/(e^{−mr} − 1)."""
    return -pc - alpha * math.log(1 - math.exp(pr)), (-1.0, alpha / (math.exp(-pr) - 1), 0.0, 0.0, 0.0, 0.0)


def closed_kto(pc, pr, rc, rr, lc, lr, b, z0=0.25, wd=1.3, wu=0.8):
    """Both masks True (a pair as one desirable and one undesirable row); a = β(Δc − z₀), c = β(z₀ − Δr);
    L = λ_D σ(−a) + λ_U σ(−c);  dL/dΔc = −β λ_D s(a), dL/dΔr = +β λ_U s(c)."""
    dc, dr = pc - rc, pr - rr
    a, c = b * (dc - z0), b * (z0 - dr)
    return wd * sig(-a) + wu * sig(-c), (*anchored(-b * wd * s(a), b * wu * s(c)), 0.0, 0.0)


# name -> (keyword params of the loss, closed form)
CASES = {
    "dpo": ({}, closed_dpo),
    "ipo": ({}, closed_ipo),
    "cdpo": ({"label_smoothing": 0.2}, closed_cdpo),
    "rdpo": ({"label_smoothing": 0.15}, closed_rdpo),
    "hinge": ({}, closed_hinge),
    "exo_pair": ({"label_smoothing": 0.1}, closed_exo_pair),
    "fdpo": ({"f_divergence": "js"}, _closed_fdpo(*F_SCORES["js"])),
    "sigmoid_norm": ({}, closed_sigmoid_norm),
    "rpo": ({"rpo_alpha": 0.7}, closed_rpo),
    "dpop": ({"dpop_lambda": 3.0}, closed_dpop),
    "nca_pair": ({}, closed_nca_pair),
    "bco_pair": ({"bco_delta": 0.3}, closed_bco_pair),
    "apo_zero": ({}, closed_apo_zero),
    "apo_down": ({}, closed_apo_down),
    "sppo_hard": ({}, closed_sppo_hard),
    "simpo": ({"simpo_gamma": 0.8}, closed_simpo),
    "orpo": ({"orpo_lambda": 0.3}, closed_orpo),
    "sft": ({}, closed_sft),
    "unlikelihood": ({"unlikelihood_alpha": 0.4}, closed_unlikelihood),
    "kto": ({"kl_reference": 0.25, "desirable_weight": 1.3, "undesirable_weight": 0.8}, closed_kto),
}

# (pc, pr, rc, rr): distinct, negative (valid log-probs, and valid per-token means for ORPO), h of both signs, the
# chosen policy above and below its reference (DPOP's penalty on and off), βh on both sides of 1 (hinge).
POINTS = [(-1.3, -2.9, -1.7, -2.1), (-4.0, -0.6, -2.5, -1.9), (-0.4, -0.9, -0.35, -1.6), (-2.2, -2.0, -3.1, -1.4)]
LENGTHS = [(3.0, 7.0), (5.0, 2.0), (1.0, 4.0), (6.0, 6.0)]


def _leaves(rows):
    return [torch.tensor(col, dtype=f64, requires_grad=True) for col in zip(*rows, strict=True)]


def _call(name, leaves, lengths, beta, **params):
    """Call the registered function directly (per-token losses get their inputs as given)."""
    fn = LOSSES[name]
    extra = {"chosen_lengths": lengths[0], "rejected_lengths": lengths[1]}
    params = {**params, **{k: v for k, v in extra.items() if k in declared_params(fn)}}
    return fn(*leaves, beta=beta, **params)


def _grads(total, inputs):
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def test_every_registered_loss_has_a_closed_form():
    assert set(CASES) == set(LOSSES)


@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_gradients_match_closed_form(name, beta):
    """L and ∂L/∂(pc, pr, rc, rr, lc, lr) at four points, against the closed forms above (see their docstrings)."""
    params, closed = CASES[name]
    leaves = _leaves(POINTS)
    lengths = _leaves(LENGTHS)
    losses, _, _ = _call(name, leaves, lengths, beta, **params)
    grads = _grads(losses.sum(), [*leaves, *lengths])  # example i's loss depends on example i's inputs only
    for i, (point, (lc, lr)) in enumerate(zip(POINTS, LENGTHS, strict=True)):
        value, partials = closed(*point, lc, lr, beta)
        assert losses[i].item() == pytest.approx(value, rel=1e-10, abs=1e-12), (name, i)
        got = [g[i].item() for g in grads]
        assert got == pytest.approx(list(partials), rel=1e-9, abs=1e-12), (name, i)


@pytest.mark.parametrize("divergence", sorted(F_SCORES))
def test_fdpo_value_and_gradients_for_every_divergence(divergence):
    """f-DPO with each ψ of F_SCORES (``alpha`` at α = 0.3), through the closed form of ``_closed_fdpo``."""
    closed = _closed_fdpo(*F_SCORES[divergence])
    leaves = _leaves(POINTS)
    losses, _, _ = fdpo_loss(*leaves, beta=0.7, f_divergence=divergence, f_alpha=ALPHA)
    grads = _grads(losses.sum(), leaves)
    for i, point in enumerate(POINTS):
        value, partials = closed(*point, 1.0, 1.0, 0.7)
        assert losses[i].item() == pytest.approx(value, rel=1e-10)
        assert [g[i].item() for g in grads] == pytest.approx(list(partials[:4]), rel=1e-9, abs=1e-12)


def test_kto_masks_select_rows():
    """Unpaired rows: the same row's log-probs as chosen and rejected, chosen_mask = label, rejected_mask = ~label.
    A desirable row's loss is λ_D σ(−β(Δ − z₀)), an undesirable row's λ_U σ(−β(z₀ − Δ)); gradients follow."""
    beta, z0, wd, wu = 0.5, 0.25, 1.3, 0.8
    pc, _, rc, _ = _leaves(POINTS)
    label = torch.tensor([True, False, False, True])
    losses, rewards_c, rewards_r = kto_loss(
        pc, pc, rc, rc, beta=beta, kl_reference=torch.tensor(z0), desirable_weight=wd, undesirable_weight=wu,
        chosen_mask=label, rejected_mask=~label,
    )  # fmt: skip
    grad_p, grad_r = torch.autograd.grad(losses.sum(), [pc, rc])
    for i, (p, _, r, _) in enumerate(POINTS):
        d = p - r
        if label[i]:
            value, g = wd * sig(-beta * (d - z0)), -beta * wd * s(beta * (d - z0))
        else:
            value, g = wu * sig(-beta * (z0 - d)), beta * wu * s(beta * (z0 - d))
        assert losses[i].item() == pytest.approx(value, rel=1e-12)
        assert grad_p[i].item() == pytest.approx(g, rel=1e-12) and grad_r[i].item() == pytest.approx(-g, rel=1e-12)
        assert rewards_c[i].item() == pytest.approx(beta * d) and rewards_r[i].item() == pytest.approx(beta * d)


def test_kto_masked_out_rows_with_infinite_logps_stay_finite():
    """A row outside its mask does not count, whatever its log-probs: −inf log-probs there (−inf − −inf = NaN)
    leave the other rows' losses, and every gradient, finite; the masked row's loss and gradients are 0. Masking
    by multiplication gives NaN·0 = NaN."""
    beta, z0 = 0.5, 0.25
    inf = float("inf")
    pc = torch.tensor([-1.0, -inf], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-2.0, -inf], dtype=torch.float64)
    chosen_mask = torch.tensor([True, False])
    losses, _, _ = kto_loss(
        pc, pc, rc, rc, beta=beta, kl_reference=torch.tensor(z0), chosen_mask=chosen_mask, rejected_mask=chosen_mask,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(losses.sum(), [pc])
    d = -1.0 - -2.0
    assert losses[0].item() == pytest.approx(sig(-beta * (d - z0)) + sig(-beta * (z0 - d)), rel=1e-12)
    assert losses[1].item() == 0.0
    assert torch.isfinite(grad).all() and grad[1].item() == 0.0


def test_kto_reference_point_is_detached():
    """z₀ is a batch statistic of the policy, but KTO (Eq. 7) treats it as a constant: no gradient flows into it."""
    z0 = torch.tensor(0.4, requires_grad=True)
    losses, _, _ = kto_loss(*_leaves(POINTS), beta=0.5, kl_reference=z0)
    losses.sum().backward()
    assert z0.grad is None


# ---------------------------------------------------------------------------------------------------------------
# Through compute_loss: per-token division, logp_aggregation, parameter filtering, reference-free losses.
# ---------------------------------------------------------------------------------------------------------------

# every loss parameter at a non-default value, plus one no loss declares
ALL_PARAMS = {
    "label_smoothing": 0.1,
    "simpo_gamma": 0.8,
    "orpo_lambda": 0.3,
    "unlikelihood_alpha": 0.6,
    "rpo_alpha": 0.7,
    "dpop_lambda": 3.0,
    "bco_delta": 0.3,
    "f_divergence": "alpha",
    "f_alpha": 0.3,
    "kl_reference": 0.25,
    "desirable_weight": 1.3,
    "undesirable_weight": 0.8,
    "not_a_loss_parameter": object(),
}


def _sums_and_lengths():
    """Sequence sums = per-token means (POINTS) × lengths, so the per-token means are exactly POINTS."""
    lengths = torch.tensor(LENGTHS, dtype=f64)
    means = torch.tensor(POINTS, dtype=f64)
    sums = means * torch.stack([lengths[:, 0], lengths[:, 1], lengths[:, 0], lengths[:, 1]], dim=1)
    return sums, lengths


def _inputs(sums, lengths):
    return {
        "policy_chosen_logps": sums[:, 0],
        "policy_rejected_logps": sums[:, 1],
        "reference_chosen_logps": sums[:, 2],
        "reference_rejected_logps": sums[:, 3],
        "chosen_lengths": lengths[:, 0],
        "rejected_lengths": lengths[:, 1],
    }


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compute_loss_divides_what_the_loss_is_defined_on(name, aggregation):
    """Per-token losses always see sums/lengths; the others see sums under ``sum`` and sums/lengths under ``mean``.
    ``compute_loss`` passes each loss only the parameters it declares: the full ALL_PARAMS dict (with a key no loss
    knows) gives the same result as the loss's own parameters alone."""
    sums, lengths = _sums_and_lengths()
    out = compute_loss(name, **_inputs(sums, lengths), beta=0.5, logp_aggregation=aggregation, **ALL_PARAMS)
    fn = LOSSES[name]
    divided = SPECS[name].per_token or aggregation == "mean"
    given = torch.tensor(POINTS, dtype=f64) if divided else sums
    settings = {
        **ALL_PARAMS,
        "chosen_lengths": lengths[:, 0],
        "rejected_lengths": lengths[:, 1],
        "logp_aggregation": aggregation,
    }
    own = {k: v for k, v in settings.items() if k in declared_params(fn)}
    expected = fn(*given.unbind(1), beta=0.5, **own)
    for got, want in zip(out, expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), name


def _length_grads(name, aggregation="sum", **params):
    sums, lengths = _sums_and_lengths()
    sums.requires_grad_(True)
    lengths.requires_grad_(True)
    losses, _, _ = compute_loss(name, **_inputs(sums, lengths), beta=0.5, logp_aggregation=aggregation, **params)
    grad_sums, grad_lengths = torch.autograd.grad(losses.sum(), [sums, lengths])
    return losses, grad_sums, grad_lengths


def test_simpo_through_compute_loss_in_sums_and_lengths():
    """SimPO on sums S and lengths l: u = β(Sc/lc − Sr/lr) − γ, L = −log σ(u);
    ∂Sc = −β σ(−u)/lc, ∂Sr = β σ(−u)/lr, ∂lc = β σ(−u) Sc/lc², ∂lr = −β σ(−u) Sr/lr², reference: 0."""
    b, gamma = 0.5, 0.8
    losses, gs, gl = _length_grads("simpo", simpo_gamma=gamma)
    sums, _ = _sums_and_lengths()
    for i, (lc, lr) in enumerate(LENGTHS):
        sc, sr = sums[i, 0].item(), sums[i, 1].item()
        u = b * (sc / lc - sr / lr) - gamma
        assert losses[i].item() == pytest.approx(-logsig(u), rel=1e-12)
        w = b * sig(-u)
        assert gs[i].tolist() == pytest.approx([-w / lc, w / lr, 0.0, 0.0], rel=1e-10, abs=1e-14)
        assert gl[i].tolist() == pytest.approx([w * sc / lc**2, -w * sr / lr**2], rel=1e-10)


def test_sigmoid_norm_through_compute_loss_in_sums_and_lengths():
    """L = −log σ(u), u = β((Sc − Rc)/lc − (Sr − Rr)/lr);  ∂lc = β σ(−u)(Sc − Rc)/lc², ∂lr = −β σ(−u)(Sr − Rr)/lr²,
    ∂Sc = −β σ(−u)/lc = −∂Rc, ∂Sr = β σ(−u)/lr = −∂Rr."""
    b = 0.5
    losses, gs, gl = _length_grads("sigmoid_norm")
    sums, _ = _sums_and_lengths()
    for i, (lc, lr) in enumerate(LENGTHS):
        sc, sr, rc, rr = sums[i].tolist()
        u = b * ((sc - rc) / lc - (sr - rr) / lr)
        w = b * sig(-u)
        assert losses[i].item() == pytest.approx(-logsig(u), rel=1e-12)
        assert gs[i].tolist() == pytest.approx([-w / lc, w / lr, w / lc, -w / lr], rel=1e-10)
        assert gl[i].tolist() == pytest.approx([w * (sc - rc) / lc**2, -w * (sr - rr) / lr**2], rel=1e-10)


def test_sft_and_orpo_nll_are_per_token_means():
    """sft: L = −Sc/lc, so ∂Sc = −1/lc and ∂lc = Sc/lc²; nothing else moves it."""
    losses, gs, gl = _length_grads("sft")
    sums, _ = _sums_and_lengths()
    for i, (lc, _) in enumerate(LENGTHS):
        assert losses[i].item() == pytest.approx(-sums[i, 0].item() / lc, rel=1e-12)
        assert gs[i].tolist() == pytest.approx([-1 / lc, 0.0, 0.0, 0.0], abs=1e-14)
        assert gl[i].tolist() == pytest.approx([sums[i, 0].item() / lc**2, 0.0], rel=1e-12, abs=1e-14)
    orpo, _, _ = _length_grads("orpo", orpo_lambda=0.0)  # λ = 0 leaves ORPO's L_SFT alone
    assert torch.allclose(orpo, losses, rtol=1e-12)


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_rpo_nll_is_divided_once(aggregation):
    """RPO under ``sum``: L = −log σ(βh_S) − α Sc/lc (h on sums), ∂lc = α Sc/lc².
    Under ``mean`` the inputs are already Sc/lc: L = −log σ(βh_m) − α Sc/lc with h on means (no second division),
    ∂lc = β σ(−βh_m)(Sc − Rc)/lc² + α Sc/lc², ∂lr = −β σ(−βh_m)(Sr − Rr)/lr²."""
    b, alpha = 0.5, 0.7
    losses, _, gl = _length_grads("rpo", aggregation, rpo_alpha=alpha)
    sums, _ = _sums_and_lengths()
    for i, (lc, lr) in enumerate(LENGTHS):
        sc, sr, rc, rr = sums[i].tolist()
        if aggregation == "sum":
            h = (sc - rc) - (sr - rr)
            want_l = [alpha * sc / lc**2, 0.0]
        else:
            h = (sc - rc) / lc - (sr - rr) / lr
            w = b * sig(-b * h)
            want_l = [w * (sc - rc) / lc**2 + alpha * sc / lc**2, -w * (sr - rr) / lr**2]
        assert losses[i].item() == pytest.approx(-logsig(b * h) - alpha * sc / lc, rel=1e-12)
        assert gl[i].tolist() == pytest.approx(want_l, rel=1e-10, abs=1e-14)


def test_ipo_with_mean_aggregation_divides_the_log_ratios():
    """TRL's IPO convention: L = (Δc/lc − Δr/lr − 1/(2β))², which is ``ipo`` with ``logp_aggregation: mean``."""
    sums, lengths = _sums_and_lengths()
    losses, _, _ = compute_loss("ipo", **_inputs(sums, lengths), beta=0.5, logp_aggregation="mean")
    for i, (lc, lr) in enumerate(LENGTHS):
        sc, sr, rc, rr = sums[i].tolist()
        assert losses[i].item() == pytest.approx(((sc - rc) / lc - (sr - rr) / lr - 1.0) ** 2, rel=1e-12)


@pytest.mark.parametrize("name", sorted(n for n, spec in SPECS.items() if not spec.reference))
def test_reference_free_losses_never_read_the_reference(name):
    """simpo, orpo, sft: the same output whatever the reference log-probs, no gradient into them, and a direct call
    with ``None`` for both works."""
    sums, lengths = _sums_and_lengths()
    refs = torch.randn(4, 2, dtype=f64, requires_grad=True)
    inputs = _inputs(sums, lengths)
    with_refs = compute_loss(
        name, **{**inputs, "reference_chosen_logps": refs[:, 0], "reference_rejected_logps": refs[:, 1]}, beta=0.5
    )
    zero_refs = compute_loss(name, **{**inputs, "reference_chosen_logps": torch.zeros(4, dtype=f64)}, beta=0.5)
    for a, b in zip(with_refs, zero_refs, strict=True):
        assert torch.equal(a, b)
    assert not with_refs[0].requires_grad or torch.autograd.grad(with_refs[0].sum(), refs, allow_unused=True)[0] is None
    means = torch.tensor(POINTS, dtype=f64)
    direct = LOSSES[name](means[:, 0], means[:, 1], None, None, beta=0.5)
    assert torch.allclose(direct[0], zero_refs[0], rtol=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_rewards_are_beta_times_log_ratios_and_detached(name):
    """Losses with a reference: rewards β·Δ (of what the loss sees); reference-free ones: β × per-token mean logp."""
    sums, lengths = _sums_and_lengths()
    sums.requires_grad_(True)
    _, rc, rr = compute_loss(name, **_inputs(sums, lengths), beta=0.5, **ALL_PARAMS)
    seen = torch.tensor(POINTS, dtype=f64) if SPECS[name].per_token else sums.detach()
    if SPECS[name].reference:
        want_c, want_r = 0.5 * (seen[:, 0] - seen[:, 2]), 0.5 * (seen[:, 1] - seen[:, 3])
    else:
        want_c, want_r = 0.5 * seen[:, 0], 0.5 * seen[:, 1]
    assert torch.allclose(rc, want_c, rtol=1e-12) and torch.allclose(rr, want_r, rtol=1e-12)
    assert not rc.requires_grad and not rr.requires_grad


def test_loss_specs():
    """What each loss is defined on, as the module and the data pipeline read it."""
    assert {n for n, spec in SPECS.items() if not spec.reference} == {"simpo", "orpo", "sft", "unlikelihood"}
    per_token = {"simpo", "orpo", "sft", "unlikelihood", "sigmoid_norm"}
    assert {n for n, spec in SPECS.items() if spec.per_token} == per_token
    assert {n for n, spec in SPECS.items() if spec.unpaired} == {"kto"}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_docstring_cites_its_source(name):
    """Each loss names its paper (a link) and, except the plain NLL, the equation or section it implements."""
    doc = LOSSES[name].__doc__
    assert "https://" in doc, name
    assert name == "sft" or "Eq." in doc or "Sec." in doc, name


# ---------------------------------------------------------------------------------------------------------------
# Optima, equivalences and limits.
# ---------------------------------------------------------------------------------------------------------------


def _from_margin(h: torch.Tensor):
    """Log-probs whose margin is exactly h: policy_chosen = h, the other three 0."""
    zeros = torch.zeros_like(h)
    return h, zeros, zeros, zeros


def _argmin_1d(fn, lo: float, hi: float) -> tuple[float, float]:
    """Minimise a 1-D loss over [lo, hi]: a 10,001-point float64 grid, then a 10,001-point grid over the two cells
    around the coarse minimum (resolution (hi − lo)·2e-8)."""
    grid = torch.linspace(lo, hi, 10_001, dtype=f64)
    i = int(fn(grid).argmin())
    step = (hi - lo) / 10_000
    fine = torch.linspace(grid[i].item() - step, grid[i].item() + step, 10_001, dtype=f64)
    values = fn(fine)
    j = int(values.argmin())
    return fine[j].item(), values[j].item()


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_values_at_zero_margin(beta):
    """At h = 0: DPO = −log σ(0) = ln 2; cDPO = −(1−ε) ln σ(0) − ε ln σ(0) = ln 2 for any ε;
    IPO = (0 − 1/(2β))² = 1/(4β²). Rewards are β·0 = 0."""
    h = torch.zeros(3)
    dpo, rc, rr = dpo_loss(*_from_margin(h), beta=beta)
    assert torch.allclose(dpo, torch.full((3,), math.log(2)))
    assert torch.equal(rc, torch.zeros(3)) and torch.equal(rr, torch.zeros(3))
    cdpo, _, _ = cdpo_loss(*_from_margin(h), beta=beta, label_smoothing=0.2)
    assert torch.allclose(cdpo, torch.full((3,), math.log(2)))
    ipo, _, _ = ipo_loss(*_from_margin(h), beta=beta)
    assert torch.allclose(ipo, torch.full((3,), 1 / (4 * beta**2)))


def test_zero_smoothing_and_reverse_kl_are_dpo():
    """ε = 0 removes the ε-terms of cDPO's Eq. 3 and of rDPO (whose denominator is then 1), and f-DPO with reverse
    KL has ψ(Δ) = Δ: all three are DPO's Eq. 7 exactly."""
    torch.manual_seed(0)
    logps = [torch.randn(16, dtype=f64) * 3 for _ in range(4)]
    a = dpo_loss(*logps, beta=0.3)
    for b in (
        cdpo_loss(*logps, beta=0.3, label_smoothing=0.0),
        rdpo_loss(*logps, beta=0.3, label_smoothing=0.0),
        fdpo_loss(*logps, beta=0.3, f_divergence="reverse_kl"),
    ):
        for x, y in zip(a, b, strict=True):
            assert torch.allclose(x, y, rtol=1e-15, atol=0)


@pytest.mark.parametrize("eps", [0.1, 0.25])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_cdpo_minimum(beta, eps):
    """Setting the cDPO gradient to 0: (1−ε) σ(−βh) = ε σ(βh) ⇔ e^{βh} = (1−ε)/ε ⇔ βh* = log((1−ε)/ε).
    There the loss is −(1−ε) log(1−ε) − ε log ε = H(ε). We find the minimum on a fine grid."""
    best, value = _argmin_1d(
        lambda h: cdpo_loss(*_from_margin(h), beta=beta, label_smoothing=eps)[0], -30 / beta, 30 / beta
    )
    assert beta * best == pytest.approx(math.log((1 - eps) / eps), abs=1e-4)
    entropy = -(1 - eps) * math.log(1 - eps) - eps * math.log(eps)
    assert value == pytest.approx(entropy, abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_minimum(beta):
    """IPO's loss (h − 1/(2β))² is 0 exactly at h* = 1/(2β) and positive elsewhere: the grid's argmin is h* and
    the minimum value is 0 (issue 16: the value, not only the argmin)."""
    best, value = _argmin_1d(lambda h: ipo_loss(*_from_margin(h), beta=beta)[0], -20.0, 20.0)
    assert best == pytest.approx(1 / (2 * beta), abs=1e-6)
    assert value == pytest.approx(0.0, abs=1e-12)
    at_optimum, _, _ = ipo_loss(*_from_margin(torch.tensor([1 / (2 * beta)], dtype=f64)), beta=beta)
    assert at_optimum.item() == 0.0


def test_dpo_has_no_finite_minimum():
    """−log σ(βh) decreases strictly in h: a larger margin always lowers the loss. So does rDPO's, for ε < ½."""
    h = torch.linspace(-50, 50, 1001, dtype=f64)
    for losses in (
        dpo_loss(*_from_margin(h), beta=0.1)[0],
        rdpo_loss(*_from_margin(h), beta=0.1, label_smoothing=0.3)[0],
    ):
        assert torch.all(losses[1:] < losses[:-1])


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_hinge_is_zero_beyond_its_margin(beta):
    """max(0, 1 − βh) is exactly 0, with zero gradient, for every h ≥ 1/β, and 1 − βh > 0 below it."""
    h = (torch.tensor([1.0, 1.0001, 1.5, 10.0, 1e4], dtype=f64) / beta).requires_grad_(True)
    losses, _, _ = hinge_loss(*_from_margin(h), beta=beta)
    assert torch.all(losses == 0)
    (grad,) = torch.autograd.grad(losses.sum(), h)
    assert torch.all(grad[1:] == 0)
    below = torch.tensor([-3.0, 0.0, 0.5, 0.999], dtype=f64) / beta
    assert torch.allclose(hinge_loss(*_from_margin(below), beta=beta)[0], 1 - beta * below, rtol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sppo_hard_minimum(beta):
    """(Δc − 1/(2β))² + (Δr + 1/(2β))² is 0, with zero gradient, exactly at Δc = 1/(2β), Δr = −1/(2β), and positive
    at every other point of a grid around it (a convex quadratic: that is its unique minimiser)."""
    k = 1 / (2 * beta)
    pc = torch.tensor([k - 1.0], dtype=f64, requires_grad=True)
    pr = torch.tensor([-k + 2.0], dtype=f64, requires_grad=True)
    rc, rr = torch.tensor([-1.0], dtype=f64), torch.tensor([2.0], dtype=f64)  # Δc = k, Δr = −k
    losses, _, _ = sppo_hard_loss(pc, pr, rc, rr, beta=beta)
    assert losses.item() == 0.0
    assert all(g.item() == 0.0 for g in torch.autograd.grad(losses.sum(), [pc, pr]))
    dc, dr = torch.meshgrid(torch.linspace(-3, 3, 61, dtype=f64), torch.linspace(-3, 3, 61, dtype=f64), indexing="ij")
    dc, dr = (dc + k).flatten(), (dr - k).flatten()
    grid, _, _ = sppo_hard_loss(dc, dr, torch.zeros_like(dc), torch.zeros_like(dr), beta=beta)
    off = (dc - k).abs() + (dr + k).abs() > 1e-9
    assert torch.all(grid[off] > 0)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.4])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_rdpo_is_unbiased_under_flipped_labels(beta, eps):
    """If each label is flipped with probability ε, the expected rDPO loss (1−ε) L(h) + ε L(−h), where L(−h) is the
    loss of the flipped pair (chosen and rejected swapped), is the clean DPO loss −log σ(βh); so are its gradients:
    (1−ε)² − ε² = 1 − 2ε cancels the denominator."""
    leaves = _leaves(POINTS)
    pc, pr, rc, rr = leaves
    as_labelled, _, _ = rdpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    flipped, _, _ = rdpo_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps)
    expected = (1 - eps) * as_labelled + eps * flipped
    clean, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert torch.allclose(expected, clean, rtol=1e-12)
    for g, c in zip(_grads(expected.sum(), leaves), _grads(clean.sum(), leaves), strict=True):
        assert torch.allclose(g, c, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("eps", [1e-3, 0.1, 0.3])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_exo_minimum(beta, eps):
    """EXO's KL(Bern(σ(βh)) ‖ Bern(1−ε)) is ≥ 0 with equality exactly at σ(βh) = 1 − ε, βh* = log((1−ε)/ε); its
    gradient β s(βh)(βh − βh*) vanishes there. Checked on a fine grid and at h* itself."""
    star = math.log((1 - eps) / eps) / beta
    best, value = _argmin_1d(
        lambda h: exo_pair_loss(*_from_margin(h), beta=beta, label_smoothing=eps)[0], -30 / beta, 30 / beta
    )
    assert beta * best == pytest.approx(beta * star, abs=1e-4)
    assert value == pytest.approx(0.0, abs=1e-12)
    h = torch.tensor([star], dtype=f64, requires_grad=True)
    at_star, _, _ = exo_pair_loss(*_from_margin(h), beta=beta, label_smoothing=eps)
    assert at_star.item() == pytest.approx(0.0, abs=1e-14)
    assert torch.sigmoid(beta * h).item() == pytest.approx(1 - eps, rel=1e-12)
    (grad,) = torch.autograd.grad(at_star.sum(), h)
    assert grad.item() == pytest.approx(0.0, abs=1e-12)


def test_exo_zero_smoothing_means_the_recommended_epsilon():
    """label_smoothing = 0 would make log ε infinite; it stands for EXO's recommended ε = 1e-3."""
    logps = _leaves(POINTS)
    a, _, _ = exo_pair_loss(*logps, beta=0.5, label_smoothing=0.0)
    b, _, _ = exo_pair_loss(*logps, beta=0.5, label_smoothing=1e-3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_nca_chosen_term_minimum(beta):
    """NCA's chosen part −log σ(βΔc) − ½ log σ(−βΔc) has derivative β(−σ(−x) + ½σ(x)), x = βΔc: zero at σ(x) = 2/3,
    i.e. βΔc* = log 2, where it equals −log(2/3) − ½ log(1/3); the rejected part has no finite minimiser."""
    best, value = _argmin_1d(
        lambda d: nca_pair_loss(d, torch.full_like(d, -1e3), torch.zeros_like(d), torch.zeros_like(d), beta=beta)[0],
        -30 / beta,
        30 / beta,
    )
    assert beta * best == pytest.approx(math.log(2), abs=1e-4)
    assert value == pytest.approx(-math.log(2 / 3) - 0.5 * math.log(1 / 3), abs=1e-9)


def test_fdpo_alpha_limits():
    """α-divergence ψ = (1 − e^{−αΔ})/α → Δ (reverse KL) as α → 0 and → 1 − e^{−Δ} (forward KL, up to the constant)
    as α → 1."""
    logps = _leaves(POINTS)
    reverse, _, _ = fdpo_loss(*logps, beta=0.5, f_divergence="reverse_kl")
    forward, _, _ = fdpo_loss(*logps, beta=0.5, f_divergence="forward_kl")
    assert torch.allclose(fdpo_loss(*logps, beta=0.5, f_divergence="alpha", f_alpha=1e-7)[0], reverse, rtol=1e-5)
    assert torch.allclose(fdpo_loss(*logps, beta=0.5, f_divergence="alpha", f_alpha=1 - 1e-7)[0], forward, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Numerics, mixtures, errors.
# ---------------------------------------------------------------------------------------------------------------

# |βh| = 1e4 at β = 0.5, every log-prob ≤ 0: h = ±2e4 from the rejected side, the chosen side, and each reference
EXTREME = [
    (-1.0, -20001.0, -1.0, -1.0),  # Δc = 0, Δr = −2e4: h = +2e4
    (-20001.0, -1.0, -1.0, -1.0),  # Δc = −2e4: h = −2e4
    (-1.0, -1.0, -20001.0, -1.0),  # Δc = +2e4: h = +2e4
    (-1.0, -1.0, -1.0, -20001.0),  # Δr = +2e4: h = −2e4
]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_at_extreme_margins(name):
    """At |βh| = 1e4, log σ would underflow to log 0 = −inf and e^{|βh|} overflows; every loss (with every parameter
    at a non-default value) and its gradient with respect to each input must stay finite, in float32."""
    leaves = [torch.tensor(col, dtype=torch.float32, requires_grad=True) for col in zip(*EXTREME, strict=True)]
    lengths = torch.ones(4)
    losses, _, _ = _call(name, leaves, (lengths, lengths), 0.5, **CASES[name][0])
    assert torch.isfinite(losses).all(), name
    assert all(torch.isfinite(g).all() for g in _grads(losses.sum(), leaves)), name


@pytest.mark.parametrize("divergence", sorted(F_SCORES))
def test_fdpo_finite_at_extreme_margins(divergence):
    """e^{−Δ} at Δ = −2e4 overflows; f-DPO caps the exponent (at 80, as TRL) so loss and gradients stay finite."""
    leaves = [torch.tensor(col, dtype=torch.float32, requires_grad=True) for col in zip(*EXTREME, strict=True)]
    losses, _, _ = fdpo_loss(*leaves, beta=0.5, f_divergence=divergence, f_alpha=0.5)
    assert torch.isfinite(losses).all()
    assert all(torch.isfinite(g).all() for g in _grads(losses.sum(), leaves))


def test_orpo_finite_when_a_response_has_probability_one():
    """A per-token mean of 0 (every token certain) makes odds = P/(1 − P) infinite; ORPO caps m at −ε."""
    m = torch.tensor([0.0, -1e-12, -3.0], requires_grad=True)
    losses, _, _ = LOSSES["orpo"](m, torch.full((3,), -2.0), None, None, beta=0.5)
    (grad,) = torch.autograd.grad(losses.sum(), m)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()


def test_compute_mixture_is_the_weighted_sum_of_its_components():
    """[dpo, bco_pair, sft] with weights [0.8, 0.2, 1.0] (MPO): losses = Σ w_k loss_k per example; components are
    the unweighted losses, each as compute_loss gives it; the rewards are the first component's."""
    sums, lengths = _sums_and_lengths()
    inputs = {**_inputs(sums, lengths), "beta": 0.5, **ALL_PARAMS}
    names, weights = ["dpo", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    total, components, rc, rr = compute_mixture(names, weights, **inputs)
    singles = {n: compute_loss(n, **inputs) for n in names}
    assert list(components) == names
    for n in names:
        assert torch.equal(components[n], singles[n][0])
    assert torch.allclose(total, sum(w * singles[n][0] for n, w in zip(names, weights, strict=True)), rtol=1e-14)
    assert torch.equal(rc, singles["dpo"][1]) and torch.equal(rr, singles["dpo"][2])
    with pytest.raises(ValueError, match="3 losses but 2 weights"):
        compute_mixture(names, [1.0, 1.0], **inputs)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="apo_down, apo_zero, bco_pair, cdpo"):
        get_loss("not_a_loss")


def test_unknown_aggregation_is_rejected():
    sums, lengths = _sums_and_lengths()
    with pytest.raises(ValueError, match="logp_aggregation"):
        compute_loss("dpo", **_inputs(sums, lengths), beta=0.5, logp_aggregation="max")


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("cdpo", {"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ("rdpo", {"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ("exo_pair", {"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ("fdpo", {"f_divergence": "hellinger"}, "f_divergence must be one of reverse_kl, forward_kl, js, alpha"),
        ("fdpo", {"f_divergence": "alpha", "f_alpha": 1.0}, r"f_alpha must be in \(0, 1\)"),
        ("rpo", {"rpo_alpha": -1.0}, "rpo_alpha must be >= 0"),
        ("dpop", {"dpop_lambda": -1.0}, "dpop_lambda must be >= 0"),
        ("simpo", {"simpo_gamma": -0.5}, "simpo_gamma must be >= 0"),
        ("orpo", {"orpo_lambda": -0.1}, "orpo_lambda must be >= 0"),
        ("kto", {"desirable_weight": -1.0}, "desirable_weight must be >= 0"),
        ("kto", {"undesirable_weight": -1.0}, "undesirable_weight must be >= 0"),
        ("kto", {"kl_reference": -0.1}, "kl_reference must be >= 0"),
    ],
)
def test_out_of_range_parameters_are_rejected(name, params, match):
    sums, lengths = _sums_and_lengths()
    with pytest.raises(ValueError, match=match):
        compute_loss(name, **_inputs(sums, lengths), beta=0.5, **params)


def test_rpo_called_directly_on_sums_needs_the_lengths():
    with pytest.raises(ValueError, match="chosen_lengths is required"):
        LOSSES["rpo"](*_leaves(POINTS), beta=0.5)
