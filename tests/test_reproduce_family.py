"""`make reproduce` Part 1, the loss-family groups (``dpo_lightning/reproduce/bandit_margins.py`` and
``bandit_populations.py``, with ``bandit_helpers.py``).

    python -m pytest -q tests/test_reproduce_family.py        # ~15 s on 2 CPU cores

Every group must pass on the registered losses, and must fail when the loss it trains is replaced in ``LOSSES``
by one with a planted error (a sign flipped in one term): the claims call the losses by name through
``compute_loss``, so they test the registered code, not a copy.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict

import pytest
import torch

from dpo_lightning.losses import LOSSES
from dpo_lightning.reproduce import bandit, bandit_helpers, bandit_margins, bandit_populations
from dpo_lightning.reproduce.claims import Claim

GROUPS = {fn.__name__: fn for _, fn in bandit_populations.FAMILY_GROUPS}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def family_claims() -> dict[str, list[Claim]]:
    """Every family group at seed 0, as `make reproduce` runs them (each group once per module)."""
    return {name: fn(0) for name, fn in GROUPS.items()}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_group_passes_on_the_registered_losses(family_claims, group):
    """Each group's claims hold: the closed form in the group's docstring is what training reaches."""
    claims = family_claims[group]
    assert claims, f"{group} returned no claim"
    failed = [(c.id, c.expected, c.measured) for c in claims if not c.passed]
    assert not failed, failed


def test_claims_are_well_formed(family_claims):
    """Unique ids, a source for each, and tolerances fixed in the module (numbers or a stated criterion)."""
    claims = [c for group in family_claims.values() for c in group]
    ids = [c.id for c in claims]
    assert len(ids) == len(set(ids)), "duplicate claim ids"
    existing = {c.id for c in bandit.per_pair_optimum_claims() + bandit.dpo_optimum_claims(0)}
    assert not existing & set(ids), "a family claim reuses an id of bandit.py"
    for c in claims:
        assert c.source and c.claim
        assert isinstance(c.tolerance, str) or c.tolerance in (0.0, bandit_helpers.TOL_LBFGS, bandit_helpers.TOL_EVAL)
    # every loss with a closed-form optimum named in the issue has at least one claim
    for loss in ("hinge", "sppo_hard", "rdpo", "exo", "simpo", "fdpo", "sigmoid_norm", "nca_pair", "bco_pair", "sft"):
        assert any(i.startswith(loss + ".") for i in ids), loss


def test_closed_form_helpers():
    """The two closed forms solved numerically: SimPO's quadratic root and the normalising constant c."""
    # SimPO: γ = 0 gives m* = logit(p)/β; p = 1/2 gives m* = 0 whatever γ
    assert bandit_margins.simpo_population_margin(0.8, 2.0, 0.0) == pytest.approx(math.log(4) / 2, abs=1e-12)
    assert bandit_margins.simpo_population_margin(0.5, 2.0, 1.0) == pytest.approx(0.0, abs=1e-12)
    # the root solves p σ(γ − x) = (1 − p) σ(x + γ)
    p, beta, gamma = 0.7, 2.5, 1.375
    x = beta * bandit_margins.simpo_population_margin(p, beta, gamma)
    assert p * _sigmoid(gamma - x) == pytest.approx((1 - p) * _sigmoid(x + gamma), abs=1e-12)
    # normalised_policy with ψ = Δ (reverse KL) is DPO's softmax(log π_ref + r/β)
    b = bandit.make_bandit(0)
    pi = bandit_helpers.normalised_policy(b["log_ref"], lambda c: b["rewards"] / 0.5 + c, math.inf)
    assert torch.allclose(pi, torch.softmax(b["log_ref"] + b["rewards"] / 0.5, 0), atol=1e-12, rtol=0)
    assert float(pi.sum()) == pytest.approx(1.0, abs=1e-12)


# --- planted errors: each group must catch a sign error in the loss it trains -----------------------------------


def _flip_rejected(fn):
    """Δr → −Δr: the sign of the rejected log-ratio flipped (policy and reference rejected log-probs swapped)."""

    @functools.wraps(fn)  # keeps the signature, so compute_loss passes the same parameters
    def planted(pc, pr, rc, rr, **kw):
        return fn(pc, rr, rc, pr, **kw)

    return planted


def _negate_rejected(fn):
    """A reference-free loss with the rejected per-token log-prob's sign flipped: m = pc/lc + pr/lr."""

    @functools.wraps(fn)
    def planted(pc, pr, rc, rr, **kw):
        return fn(pc, -pr, rc, rr, **kw)

    return planted


def _rejected_as_chosen(fn):
    """SFT on the wrong response: the NLL of the rejected one."""

    @functools.wraps(fn)
    def planted(pc, pr, rc, rr, **kw):
        return fn(pr, pc, rr, rc, **kw)

    return planted


def _flip_bco_delta(fn):
    """BCO with the sign of the reward shift flipped: −log σ(βΔc + δ) − log σ(−(βΔr + δ)). (Flipping Δr here
    makes the population loss unbounded on a free bandit, which L-BFGS takes seconds to give up on.)"""

    @functools.wraps(fn)
    def planted(pc, pr, rc, rr, *, beta, bco_delta=0.0):
        return fn(pc, pr, rc, rr, beta=beta, bco_delta=-bco_delta)

    return planted


def _rdpo_plus_sign(fn):
    """rDPO with the sign of its ε term flipped: [(1−ε)ℓ(h) + εℓ(−h)]/(1−2ε), i.e. cDPO rescaled."""
    cdpo = LOSSES["cdpo"]

    @functools.wraps(fn)
    def planted(pc, pr, rc, rr, *, beta, label_smoothing=0.0):
        losses, chosen, rejected = cdpo(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
        return losses / (1 - 2 * label_smoothing), chosen, rejected

    return planted


PLANTED = [
    ("hinge_claims", "hinge", _flip_rejected),
    ("sppo_hard_claims", "sppo_hard", _flip_rejected),
    ("rdpo_claims", "rdpo", _rdpo_plus_sign),
    ("exo_claims", "exo_pair", _flip_rejected),
    ("simpo_claims", "simpo", _negate_rejected),
    ("fdpo_claims", "fdpo", _flip_rejected),
    ("sigmoid_norm_claims", "sigmoid_norm", _flip_rejected),
    ("nca_bco_claims", "nca_pair", _flip_rejected),
    ("nca_bco_claims", "bco_pair", _flip_bco_delta),
    ("sft_claims", "sft", _rejected_as_chosen),
]


def test_every_group_has_a_planted_error():
    assert {group for group, _, _ in PLANTED} == set(GROUPS)


@pytest.mark.parametrize(("group", "loss", "plant"), PLANTED, ids=[f"{g}-{n}" for g, n, _ in PLANTED])
def test_planted_sign_error_fails_a_claim(monkeypatch, group, loss, plant):
    """Replace the registered loss by one with a sign error: the group must report at least one failure."""
    monkeypatch.setitem(LOSSES, loss, plant(LOSSES[loss]))
    claims = GROUPS[group](0)
    assert any(not c.passed for c in claims), f"{group} did not notice a sign error in {loss}"
    # the failures are in the claims of the planted loss: the other loss of a shared group is untouched
    others = [c for c in claims if not c.id.startswith(loss + ".")]
    if group == "nca_bco_claims":
        assert others and all(c.passed for c in others), [c.id for c in others if not c.passed]


def test_run_part1_includes_the_family(part1_cli_run, family_claims):
    """The reproduce command's Part 1 (the session's run) holds every family group's claims, with the verdicts and
    measured values the groups give on their own, and its report has the family's section."""
    rc, out = part1_cli_run
    assert rc == 0
    by_id = {row["id"]: row for row in json.loads((out / "claims.json").read_text())}
    for group in family_claims.values():
        for c in group:
            written = json.loads(json.dumps(asdict(c), default=float))
            assert by_id[c.id]["passed"] == c.passed and by_id[c.id]["measured"] == written["measured"], c.id
    assert "Loss family" in (out / "README.md").read_text()
