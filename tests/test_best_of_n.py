"""Best-of-N (``dpo_lightning/best_of_n.py``): the exact distribution, the KL formula, the sampler on a tiny LM.

python -m pytest -q tests/test_best_of_n.py
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dpo_lightning.best_of_n import best_index, best_of_n, bon_kl, bon_kl_estimate, bon_probs
from dpo_lightning.models import build_causal_lm

from helpers import TINY_GPT2


def test_bon_kl_values():
    """log N − (N−1)/N by hand: N=1 → 0; N=2 → ln 2 − 1/2 = 0.193147; N=16 → ln 16 − 15/16 = 1.835089."""
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(0.1931471806, abs=1e-9)
    assert bon_kl(16) == pytest.approx(1.8350887222, abs=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_bon_probs_match_enumeration(n):
    """Every N-tuple of a 4-action policy enumerated, its best kept: the exact probabilities. Planted bug:
    (F − π)^N replaced by F^(N−1)·(F − π) -> mismatch for N ≥ 2."""
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    rewards = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    expected = torch.zeros(4, dtype=torch.float64)
    for draw in itertools.product(range(4), repeat=n):
        expected[max(draw, key=lambda a: rewards[a])] += math.prod(float(probs[a]) for a in draw)
    assert torch.allclose(bon_probs(probs, rewards, n), expected, atol=1e-15)


def test_bon_probs_refuses_ties():
    with pytest.raises(ValueError, match="distinct"):
        bon_probs(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), 2)


def test_best_index_first_on_ties():
    assert best_index(torch.tensor([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]])).tolist() == [1, 0]


def test_kl_estimate_from_rewards_matches_the_formula():
    """Continuous rewards (Gaussian): best of N from 4000 draws, F̂ from 400 further draws per prompt; the estimate
    is within 4 standard errors + the O(1/M) bias of F̂ (taken as (N−1)/M) of log N − (N−1)/N."""
    g = torch.Generator().manual_seed(0)
    p, m = 4000, 400
    for n in (2, 4, 16):
        best = torch.randn(p, n, generator=g, dtype=torch.float64).max(1).values
        base = torch.randn(p, m, generator=g, dtype=torch.float64)
        kl, se = bon_kl_estimate(best, base, n)
        assert abs(kl - bon_kl(n)) <= 4 * se + (n - 1) / m, (n, kl, se)


def test_best_of_n_keeps_the_highest_reward_sample(tiny_tokenizer):
    """On a tiny LM: N samples per prompt are scored, the kept one is the highest (by text length), and the same
    generator seed gives the same choice."""
    torch.manual_seed(0)
    policy = build_causal_lm(None, TINY_GPT2, tiny_tokenizer)
    calls = []

    def reward(prompts, completions):
        calls.append((list(prompts), list(completions)))
        return torch.tensor([float(len(c)) for c in completions])

    prompts = ["The film was", "Our trip was"]
    out = best_of_n(policy, tiny_tokenizer, prompts, reward, n=4, max_new_tokens=6,
                    generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert calls[0][0] == [p for p in prompts for _ in range(4)]
    assert out.all_rewards.shape == (2, 4)
    assert out.rewards.tolist() == out.all_rewards.max(1).values.tolist()
    assert [float(len(c)) for c in out.completions] == out.rewards.tolist()
    assert [tiny_tokenizer.decode(t, skip_special_tokens=True) for t in out.token_ids] == out.completions
    again = best_of_n(policy, tiny_tokenizer, prompts, reward, n=4, max_new_tokens=6,
                      generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert again.completions == out.completions
