"""`make reproduce` Part 1, on-policy claims (``dpo_lightning/reproduce/bandit_onpolicy.py``).

python -m pytest -q tests/test_online_claims.py
"""

from __future__ import annotations

import pytest
import torch

from dpo_lightning.losses import LOSSES
from dpo_lightning.reproduce import bandit_onpolicy
from dpo_lightning.reproduce.bandit import make_bandit

GROUPS = {fn.__name__: fn for _, fn in bandit_onpolicy.ONPOLICY_GROUPS}


@pytest.fixture(scope="module")
def claims():
    return {name: fn(0) for name, fn in GROUPS.items()}


def test_every_group_passes(claims):
    failed = [(c.id, c.claim) for group in claims.values() for c in group if not c.passed]
    assert not failed, failed
    ids = [c.id for group in claims.values() for c in group]
    assert len(ids) == len(set(ids)) == 5


def test_standard_errors_match_a_monte_carlo_spread():
    """The closed-form SE of π̂ (Fisher information, delta method) against the spread of 40 sampled-DPO
    minimisers of 2000 pairs each: the ratio of the empirical to predicted SD is within 0.6–1.5 per action (a
    40-sample SD has relative error ≈ 11%). Planted bug: p(1 − p) replaced by p -> the ratio falls below 0.6."""
    from dpo_lightning.reproduce.bandit_helpers import minimise

    bandit = make_bandit(3)
    r, mu, k = bandit["rewards"], bandit["mu"], 6
    target = bandit_onpolicy.optimum(bandit)
    n, runs = 2000, []
    g = torch.Generator().manual_seed(0)
    upper = torch.triu_indices(k, k, 1)
    for _ in range(40):
        pair = torch.multinomial(mu[upper[0], upper[1]], n, replacement=True, generator=g)
        i, j = upper[0][pair], upper[1][pair]
        first = torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(r[i] - r[j])
        chosen, rejected = torch.where(first, i, j), torch.where(first, j, i)
        logp = minimise("dpo", bandit["log_ref"], chosen, rejected, torch.full((n,), 1.0 / n, dtype=torch.float64),
                        bandit_onpolicy.BETA)  # fmt: skip
        runs.append(logp.exp())
    spread = torch.stack(runs).std(0)
    ratio = spread / bandit_onpolicy.pi_standard_errors(target, r, mu, bandit_onpolicy.BETA, n)
    assert ((ratio > 0.6) & (ratio < 1.5)).all(), ratio


def _beta_doubled(fn):
    def planted(*args, beta, **kwargs):
        return fn(*args, beta=2 * beta, **kwargs)

    return planted


@pytest.mark.parametrize("group", ["sampled_dpo_claims", pytest.param("online_dpo_claims", marks=pytest.mark.slow)])
def test_a_wrong_dpo_loss_fails_the_claim(monkeypatch, group):
    """DPO registered with β doubled: its optimum is π_ref·exp(r/(2β)), many standard errors from π*."""
    monkeypatch.setitem(LOSSES, "dpo", _beta_doubled(LOSSES["dpo"]))
    claims = GROUPS[group](0)
    assert not claims[0].passed, claims[0].claim


def test_best_of_n_claims_fail_for_a_wrong_pick(monkeypatch):
    """Keep the lowest-reward sample instead: the sampled KL is that of worst-of-N, far from its best-of-N value
    under the exact best-of-N distribution (the log-ratio of the kept responses is negative)."""
    monkeypatch.setattr(bandit_onpolicy, "best_index", lambda rewards: rewards.argmin(-1))
    claims = {c.id: c for c in bandit_onpolicy.best_of_n_claims(0)}
    assert claims["onpolicy.best_of_n.kl_exact"].passed
    assert not claims["onpolicy.best_of_n.kl_sampled"].passed
    assert all(m < 0 for m in claims["onpolicy.best_of_n.kl_sampled"].measured)
