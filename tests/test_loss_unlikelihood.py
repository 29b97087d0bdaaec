"""The unlikelihood loss (Welleck et al. 2019, as the DPO paper's baseline) against its closed form, on per-token means.

python -m pytest -q tests/test_loss_unlikelihood.py      # ~5 s (one tiny `fit` through the command line)

Closed form (see ``losses/reference_free.py``): with m = S/l the per-token mean log-prob (S the response's summed
log-prob, l its length), L = −m_c − α log(1 − e^{m_r}); ∂L/∂m_c = −1, ∂L/∂m_r = α/(e^{−m_r} − 1). Through
``compute_loss`` on sums: ∂L/∂S_c = −1/l_c, ∂L/∂S_r = α/(l_r (e^{−m_r} − 1)), the reference never read.

Each check is a function that returns what it found wrong, so that the tests below can also plant a bug (a sign,
sequence-level sums instead of per-token means, a naive log(1 − e^m), α ignored) and see the check catch it.
"""

import math

import pytest
import torch

from dpo_lightning.losses import LOSSES, SPECS, compute_loss, unlikelihood_loss
from dpo_lightning.losses.registry import LossSpec

from helpers import cli_main, fit_argv

f64 = torch.float64
# (S_c, S_r, l_c, l_r): sums and lengths whose means m = S/l span likely and unlikely responses
ROWS = [(-6.0, -14.0, 3.0, 7.0), (-20.0, -1.0, 5.0, 2.0), (-0.3, -0.05, 1.0, 4.0), (-13.2, -30.0, 6.0, 6.0)]
ALPHA = 0.7


def closed(sc: float, sr: float, lc: float, lr: float, alpha: float) -> tuple[float, float, float]:
    """(L, ∂L/∂S_c, ∂L/∂S_r) in plain math: m = S/l, L = −m_c − α log(1 − e^{m_r}).

    E.g. row 0: m_c = −2, m_r = −2, L = 2 − 0.7 log(1 − e^{−2}) = 2 + 0.7·0.14541 = 2.10179;
    ∂S_c = −1/3, ∂S_r = 0.7/(7(e² − 1)) = 0.015652."""
    mc, mr = sc / lc, sr / lr
    return -mc - alpha * math.log(1 - math.exp(mr)), -1 / lc, alpha / (lr * (math.exp(-mr) - 1))


def _through_compute_loss(**params):
    data = torch.tensor(ROWS, dtype=f64)
    sums = data[:, :2].clone().requires_grad_(True)
    refs = torch.randn(len(ROWS), 2, dtype=f64, requires_grad=True)  # must never matter
    losses, rc, rr = compute_loss(
        "unlikelihood", policy_chosen_logps=sums[:, 0], policy_rejected_logps=sums[:, 1],
        reference_chosen_logps=refs[:, 0], reference_rejected_logps=refs[:, 1], chosen_lengths=data[:, 2],
        rejected_lengths=data[:, 3], beta=0.5, **params,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(losses.sum(), [sums])
    return losses, grad, (rc, rr), refs


def closed_form_errors(alpha: float = ALPHA) -> list[str]:
    """What disagrees with :func:`closed` at ``ROWS`` (values, gradients, rewards β·m, reference ignored)."""
    params = {} if alpha == 1.0 else {"unlikelihood_alpha": alpha}
    losses, grad, (rc, rr), refs = _through_compute_loss(**params)
    errors = []
    for i, (sc, sr, lc, lr) in enumerate(ROWS):
        value, gc, gr = closed(sc, sr, lc, lr, alpha)
        if losses[i].item() != pytest.approx(value, rel=1e-10):
            errors.append(f"row {i}: loss {losses[i].item()} != {value}")
        if grad[i].tolist() != pytest.approx([gc, gr], rel=1e-9):
            errors.append(f"row {i}: gradient {grad[i].tolist()} != {[gc, gr]}")
        if (rc[i].item(), rr[i].item()) != pytest.approx((0.5 * sc / lc, 0.5 * sr / lr), rel=1e-12):
            errors.append(f"row {i}: rewards are not β·m")
    if refs.grad is not None or losses.grad_fn is None:
        errors.append("the reference was read")
    return errors


def stability_errors(fn=None) -> list[str]:
    """``fn`` (default: the registered loss) in float32 near m_r = 0, where 1 − e^{m_r} cancels: at m_r = −1e-6,
    −log(1 − e^{m_r}) = −log(1e-6 − 5e-13 + ...) = 13.8155 (to 5 digits); at m_r = 0 (a rejected
    response of probability 1) the loss and gradient stay finite."""
    errors = []
    m_r = torch.tensor([-1e-6, 0.0], dtype=torch.float32, requires_grad=True)
    losses, _, _ = (fn or LOSSES["unlikelihood"])(torch.zeros(2), m_r, None, None, beta=0.1)
    (grad,) = torch.autograd.grad(losses.sum(), [m_r])
    if not (torch.isfinite(losses).all() and torch.isfinite(grad).all()):
        errors.append(f"non-finite: loss {losses.tolist()}, gradient {grad.tolist()}")
    elif losses[0].item() != pytest.approx(-math.log(1e-6), rel=1e-4):
        errors.append(f"loss at m_r = −1e-6 is {losses[0].item()}, not {-math.log(1e-6):.4f}")
    return errors


def test_matches_closed_form_on_per_token_means():
    assert closed_form_errors() == []
    assert closed_form_errors(alpha=1.0) == []  # the default α is Welleck et al.'s 1
    assert SPECS["unlikelihood"] == LossSpec("unlikelihood", reference=False, per_token=True)


def test_numerically_stable_near_probability_one():
    assert stability_errors() == []
    assert stability_errors(unlikelihood_loss) == []  # the exported function is the registered one


def test_a_step_pushes_rejected_down_and_chosen_up():
    """One gradient step on (m_c, m_r) raises m_c (∂L/∂m_c = −1 < 0) and lowers m_r (∂L/∂m_r > 0), and lowers L."""
    m = torch.tensor([[-3.0, -1.5], [-0.5, -4.0]], dtype=f64, requires_grad=True)
    before, _, _ = unlikelihood_loss(m[:, 0], m[:, 1], None, None, beta=0.1)
    (grad,) = torch.autograd.grad(before.sum(), [m])
    after, _, _ = unlikelihood_loss(*(m - 0.1 * grad).detach().unbind(1), None, None, beta=0.1)
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()
    assert (after < before.detach()).all()


def test_alpha_zero_is_sft_and_negative_alpha_is_an_error():
    sums = torch.tensor(ROWS, dtype=f64)
    zeros = torch.zeros(len(ROWS), dtype=f64)
    inputs = dict(
        policy_chosen_logps=sums[:, 0],
        policy_rejected_logps=sums[:, 1],
        reference_chosen_logps=zeros,
        reference_rejected_logps=zeros,
        chosen_lengths=sums[:, 2],
        rejected_lengths=sums[:, 3],
        beta=0.5,
    )
    zero, _, _ = compute_loss("unlikelihood", **inputs, unlikelihood_alpha=0.0)
    sft, _, _ = compute_loss("sft", **inputs)
    assert torch.equal(zero, sft)
    with pytest.raises(ValueError, match="unlikelihood_alpha must be >= 0"):
        compute_loss("unlikelihood", **inputs, unlikelihood_alpha=-0.1)


def _planted(kind: str):
    def fn(pc, pr, rc, rr, *, beta, unlikelihood_alpha=1.0):
        alpha = 1.0 if kind == "alpha ignored" else unlikelihood_alpha
        if kind == "naive log(1 − e^m)":
            term = torch.log(1 - torch.exp(pr.clamp(max=-torch.finfo(pr.dtype).eps)))
        else:
            term = torch.log(-torch.expm1(pr.clamp(max=-torch.finfo(pr.dtype).eps)))
        sign = -1.0 if kind == "sign" else 1.0
        return -pc - sign * alpha * term, beta * pc.detach(), beta * pr.detach()

    return fn


@pytest.mark.parametrize("kind", ["sign", "alpha ignored", "naive log(1 − e^m)", "sequence sums"])
def test_the_checks_catch_a_planted_bug(monkeypatch, kind):
    """The same checks fail on a loss with the unlikelihood term's sign flipped, α ignored, log(1 − e^m) computed
    naively (float32 loses it near m = 0), or registered on sequence sums (per_token=False: log(1 − π(y_l|x)) of
    the sums, the ≈ 0 term the per-token mean avoids). The correct form with the same helper passes."""
    monkeypatch.setitem(LOSSES, "unlikelihood", _planted("none"))
    assert closed_form_errors() == [] and stability_errors() == []
    if kind == "sequence sums":
        monkeypatch.setitem(SPECS, "unlikelihood", LossSpec("unlikelihood", reference=False, per_token=False))
    else:
        monkeypatch.setitem(LOSSES, "unlikelihood", _planted(kind))
    assert closed_form_errors() + stability_errors(), kind


def test_trains_from_the_command_line(assets, tmp_path):
    """`dpo-lightning fit --model.loss unlikelihood` with α from ``model.loss_params``: 2 steps, no reference."""
    argv = fit_argv(
        assets,
        tmp_path / "run",
        "--model.loss",
        "unlikelihood",
        "--model.loss_params",
        "{unlikelihood_alpha: 0.5}",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
    )
    result = cli_main(*argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unlikelihood" in (tmp_path / "run" / "config.yaml").read_text()
