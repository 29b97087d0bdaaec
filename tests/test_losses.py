"""Loss functions against their closed forms."""

import math

import pytest
import torch

from dpo_lightning.losses import LOSSES, cdpo_loss, dpo_loss, get_loss, ipo_loss


def _from_margin(h: torch.Tensor):
    """Log-probs whose margin is exactly h: policy_chosen = h, the other three 0."""
    zeros = torch.zeros_like(h)
    return h, zeros, zeros, zeros


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


def test_rewards_are_beta_times_logratios_and_detached():
    """chosen_reward = β(π_c − ref_c) = 0.5·(−1 − (−3)) = 1; rejected = 0.5·(−4 − (−2)) = −1."""
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    for fn in LOSSES.values():
        _, rc, rr = fn(pc, pr, torch.tensor([-3.0]), torch.tensor([-2.0]), beta=0.5)
        assert rc.item() == pytest.approx(1.0) and rr.item() == pytest.approx(-1.0)
        assert not rc.requires_grad and not rr.requires_grad


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.1), (2.0, 0.3)])
def test_gradients_match_analytic_forms(beta, eps):
    """d/dh of each loss:
    DPO  −log σ(βh):                    −β σ(−βh)
    IPO  (h − 1/(2β))²:                  2 (h − 1/(2β))
    cDPO −(1−ε) log σ(βh) − ε log σ(−βh): −β[(1−ε) σ(−βh) − ε σ(βh)]
    """
    h = torch.linspace(-5, 5, 11, requires_grad=True)
    cases = {
        "dpo": (lambda: dpo_loss(*_from_margin(h), beta=beta)[0], -beta * torch.sigmoid(-beta * h)),
        "ipo": (lambda: ipo_loss(*_from_margin(h), beta=beta)[0], 2 * (h - 1 / (2 * beta))),
        "cdpo": (
            lambda: cdpo_loss(*_from_margin(h), beta=beta, label_smoothing=eps)[0],
            -beta * ((1 - eps) * torch.sigmoid(-beta * h) - eps * torch.sigmoid(beta * h)),
        ),
    }
    for name, (loss_fn, expected) in cases.items():
        (grad,) = torch.autograd.grad(loss_fn().sum(), h)
        assert torch.allclose(grad, expected.detach(), atol=1e-6), name


def test_cdpo_with_zero_smoothing_is_dpo():
    """ε = 0 removes the second term of cDPO's Eq. 3, leaving DPO's Eq. 7 exactly."""
    torch.manual_seed(0)
    logps = [torch.randn(16) * 3 for _ in range(4)]
    a = dpo_loss(*logps, beta=0.3)
    b = cdpo_loss(*logps, beta=0.3, label_smoothing=0.0)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("eps", [0.1, 0.25])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_cdpo_minimum(beta, eps):
    """Setting the cDPO gradient to 0: (1−ε) σ(−βh) = ε σ(βh) ⇔ e^{βh} = (1−ε)/ε ⇔ βh* = log((1−ε)/ε).
    There the loss is −(1−ε) log(1−ε) − ε log ε = H(ε). We find the minimum on a fine grid."""
    grid = torch.linspace(-30, 30, 600_001, dtype=torch.float64) / beta
    losses, _, _ = cdpo_loss(*_from_margin(grid), beta=beta, label_smoothing=eps)
    best = grid[losses.argmin()]
    assert (beta * best).item() == pytest.approx(math.log((1 - eps) / eps), abs=1e-3)
    entropy = -(1 - eps) * math.log(1 - eps) - eps * math.log(eps)
    assert losses.min().item() == pytest.approx(entropy, abs=1e-9)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_minimum(beta):
    """IPO's loss (h − 1/(2β))² is 0 exactly at h* = 1/(2β) and positive elsewhere."""
    grid = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    losses, _, _ = ipo_loss(*_from_margin(grid), beta=beta)
    assert grid[losses.argmin()].item() == pytest.approx(1 / (2 * beta), abs=1e-4)


def test_dpo_has_no_finite_minimum():
    """−log σ(βh) decreases strictly in h: a larger margin always lowers the loss."""
    h = torch.linspace(-50, 50, 1001)
    losses, _, _ = dpo_loss(*_from_margin(h), beta=0.1)
    assert torch.all(losses[1:] < losses[:-1])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_at_extreme_margins(name):
    """At |βh| = 1e4, log σ would underflow to log 0 = −inf; every loss and gradient must stay finite."""
    beta = 0.5
    h = torch.tensor([2e4, -2e4], dtype=torch.float32, requires_grad=True)  # βh = ±1e4
    kwargs = {"label_smoothing": 0.1} if name == "cdpo" else {}
    losses, _, _ = get_loss(name)(*_from_margin(h), beta=beta, **kwargs)
    (grad,) = torch.autograd.grad(losses.sum(), h)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="cdpo, dpo, ipo"):
        get_loss("kto")


def test_cdpo_rejects_out_of_range_smoothing():
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        cdpo_loss(*_from_margin(torch.zeros(1)), beta=0.1, label_smoothing=0.5)
