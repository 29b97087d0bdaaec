"""PPO's pure pieces against hand-computed values: value head + KL-penalised rewards + GAE, whitening, the clipped
losses, the KL controllers, and the per-token outputs of a real model.

python -m pytest -q tests/test_ppo_functions.py        # ~2 s
"""

from __future__ import annotations

import math

import pytest
import torch

from dpo_lightning.ppo.functions import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalised_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from dpo_lightning.ppo.rollout import ValueHead, pack, policy_outputs

F64 = torch.float64


def test_value_head_kl_rewards_and_gae_by_hand():
    """Two responses, of 3 and 2 tokens (row 1's third column is padding: hidden state 9s, log-probs 5s).

    Value head w = (0.5, −1), b = 0.1 on hidden states
        row 0: (2, 1), (0, −1), (1, 1)  ->  V = 1 − 1 + 0.1 = 0.1,  0 + 1 + 0.1 = 1.1,  0.5 − 1 + 0.1 = −0.4
        row 1: (1, 0), (0, 0)           ->  V = 0.6, 0.1
    Rewards, β = 0.2, r_t = −β (log π − log π_ref), plus the score at the last token:
        row 0: log π − log π_ref = (−1 + 1.5, −2 + 1, −0.5 + 0.5) = (0.5, −1, 0), score 1
               -> r = (−0.1, 0.2, 0 + 1) = (−0.1, 0.2, 1.0)
        row 1: (−0.3 + 0.1, −0.7 + 0.2) = (−0.2, −0.5), score −2  ->  r = (0.04, 0.1 − 2) = (0.04, −1.9)
    GAE, γ = 0.9, λ = 0.5 (γλ = 0.45), V = 0 after the last token:
        row 0: δ2 = 1.0 − (−0.4) = 1.4                    A2 = 1.4
               δ1 = 0.2 + 0.9·(−0.4) − 1.1 = −1.26         A1 = −1.26 + 0.45·1.4 = −0.63
               δ0 = −0.1 + 0.9·1.1 − 0.1 = 0.79            A0 = 0.79 + 0.45·(−0.63) = 0.5065
               returns A + V = (0.6065, 0.47, 1.0)
        row 1: δ1 = −1.9 − 0.1 = −2.0                      A1 = −2.0
               δ0 = 0.04 + 0.9·0.1 − 0.6 = −0.47           A0 = −0.47 + 0.45·(−2.0) = −1.37
               returns (−0.77, −1.9)
    """
    head = ValueHead(2).double()
    with torch.no_grad():
        head.summary.weight.copy_(torch.tensor([[0.5, -1.0]]))
        head.summary.bias.fill_(0.1)
    hidden = torch.tensor([[[2, 1], [0, -1], [1, 1]], [[1, 0], [0, 0], [9, 9]]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    values = head(hidden) * mask
    torch.testing.assert_close(values, torch.tensor([[0.1, 1.1, -0.4], [0.6, 0.1, 0.0]], dtype=F64))

    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 5.0]], dtype=F64)
    ref_logps = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -0.2, 5.0]], dtype=F64)
    rewards = kl_penalised_rewards(torch.tensor([1.0, -2.0], dtype=F64), logps, ref_logps, mask, 0.2)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 0.2, 1.0], [0.04, -1.9, 0.0]], dtype=F64))

    advantages, returns = gae(rewards, head(hidden), mask, gamma=0.9, lam=0.5)  # padding's value ignored
    torch.testing.assert_close(advantages, torch.tensor([[0.5065, -0.63, 1.4], [-1.37, -2.0, 0.0]], dtype=F64))
    torch.testing.assert_close(returns, torch.tensor([[0.6065, 0.47, 1.0], [-0.77, -1.9, 0.0]], dtype=F64))


def test_whiten_by_hand_and_across_ranks():
    """x = (1, 2, 3) and a pad: mean 2, population variance 2/3, so (x − 2)/√(2/3) = (−1.2247, 0, 1.2247).
    With ``reduce`` adding a second rank's (Σx, Σx², n) for x' = (5,): mean 11/4, var (1+4+9+25)/4 − 121/16."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    s = math.sqrt(1.5)
    torch.testing.assert_close(whiten(x, mask, eps=0.0), torch.tensor([[-s, 0.0, s, 0.0]], dtype=F64))
    torch.testing.assert_close(
        whiten(x, mask, eps=0.0, shift_mean=False), torch.tensor([[2 - s, 2, 2 + s, 0]], dtype=F64)
    )
    other = torch.tensor([5.0, 25.0, 1.0], dtype=F64)
    mean, var = 11 / 4, 39 / 4 - 121 / 16
    got = whiten(x, mask, eps=0.0, reduce=lambda stats: stats + other)
    expected = (torch.tensor([1.0, 2.0, 3.0], dtype=F64) - mean) / math.sqrt(var)
    torch.testing.assert_close(got[0, :3], expected)


def test_clipped_policy_loss_by_hand():
    """ρ = (1, 1.5, 0.5), A = (1, 2, −1), ε = 0.2; per token max(−Aρ, −A clip(ρ, 0.8, 1.2)):
        token 0: max(−1, −1) = −1 (unclipped);  token 1: max(−3, −2.4) = −2.4 (clipped);
        token 2: max(0.5, 0.8) = 0.8 (clipped); a 4th, masked token is ignored.
    loss = (−1 − 2.4 + 0.8)/3 = −0.86667, clipfrac 2/3, approx KL mean((ρ − 1) − log ρ)
    = (0 + 0.5 − ln 1.5 + ln 2 − 0.5)/3 = 0.095894; only token 0 passes a gradient: ∂/∂ log π_0 = −A_0 ρ_0 / 3."""
    logps = torch.tensor([[0.0, math.log(1.5), math.log(0.5), 3.0]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 4, dtype=F64)
    adv = torch.tensor([[1.0, 2.0, -1.0, 7.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = policy_loss(logps, old, adv, mask, clip=0.2)
    torch.testing.assert_close(loss, torch.tensor(-2.6 / 3, dtype=F64))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(2 / 3, dtype=F64))
    torch.testing.assert_close(stats["approx_kl"], torch.tensor((math.log(2) - math.log(1.5)) / 3, dtype=F64))
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1 / 3, 0.0, 0.0, 0.0]], dtype=F64))


def test_clipped_value_loss_by_hand():
    """V = (1, 0), V_old = (0.5, 0.5), R = (2, 0.2), c = 0.2 -> V_clip = (0.7, 0.3);
    token 0: max((1 − 2)², (0.7 − 2)²) = 1.69; token 1: max(0.04, 0.01) = 0.04; loss = ½ (1.69 + 0.04)/2 = 0.4325."""
    values = torch.tensor([[1.0, 0.0]], dtype=F64)
    loss = value_loss(values, torch.full((1, 2), 0.5, dtype=F64), torch.tensor([[2.0, 0.2]], dtype=F64),
                      torch.ones(1, 2, dtype=torch.bool), clip=0.2)  # fmt: skip
    torch.testing.assert_close(loss, torch.tensor(0.4325, dtype=F64))


def test_kl_controllers():
    """Ziegler et al. Eq. 2 with β = 0.1, target 6, K_β = 0.1: KL 12 -> e = clip(1) = 0.2, β × 1.02; KL 6.6 -> e = 0.1,
    × 1.01; KL 0 -> e = −0.2, × 0.98. TRL's horizon form, 512 samples / 10000: KL 12 -> × (1 + 0.0512·0.2)."""
    ctl = AdaptiveKLController(0.1, target=6.0, k_beta=0.1)
    assert ctl.update(12.0, 512) == pytest.approx(0.102)
    assert ctl.update(6.6, 512) == pytest.approx(0.102 * 1.01)
    assert ctl.update(0.0, 512) == pytest.approx(0.102 * 1.01 * 0.98)
    assert AdaptiveKLController(0.1, target=6.0, horizon=10000).update(12.0, 512) == pytest.approx(0.1 * 1.01024)
    fixed = FixedKLController(0.3)
    assert fixed.update(100.0, 512) == 0.3
    restored = AdaptiveKLController(0.5, target=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_entropy_from_logits():
    """p = (½, ¼, ¼): H = ½ ln 2 + 2·¼ ln 4 = 1.5 ln 2 (logits shifted by a constant change nothing)."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=F64)) + 3.0
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([1.5 * math.log(2)]))


def test_policy_outputs_match_the_models_own_forward(tiny_tokenizer):
    """On a real tiny GPT-2: per-token log-probs at the response positions equal the full forward's log-softmax, the
    value head reads the final hidden state at the position before each response token, padding is masked."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tiny_tokenizer)))
    model.eval()
    head = ValueHead(32)
    torch.nn.init.normal_(head.summary.weight)
    prompts, responses = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]]
    batch = pack(prompts, responses, pad_token_id=0)
    out = policy_outputs(model, head, batch)
    assert out["logps"].shape == (2, 4) and batch.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            full = model(ids, output_hidden_states=True)
        logp = torch.log_softmax(full.logits[0], -1)
        for j, token in enumerate(r):
            position = len(p) + j - 1  # the position whose logits predict response token j
            assert out["logps"][row, j].item() == pytest.approx(logp[position, token].item(), abs=1e-5)
            value = head(full.hidden_states[-1][0, position]).item()
            assert out["values"][row, j].item() == pytest.approx(value, abs=1e-5)
        assert (out["logps"][row, len(r) :] == 0).all()


def test_bandit_ppo_claim_fails_for_a_wrong_kl_coefficient(monkeypatch):
    """Part 1's PPO claims can fail: with the KL penalty's β doubled inside the rewards, PPO converges to the optimum
    at 2β, which ``ppo.fixed_kl.tolerance_separates`` puts more than 2 × TOL_PI from π*, so each β's optimum claim
    fails while the separation claim (closed forms, no run) still holds. Planted bug: ``kl_coef`` → 2 ``kl_coef``."""
    from dpo_lightning.reproduce import bandit_ppo

    def doubled(scores, logps, ref_logps, mask, kl_coef):
        return kl_penalised_rewards(scores, logps, ref_logps, mask, 2 * kl_coef)

    monkeypatch.setattr(bandit_ppo, "kl_penalised_rewards", doubled)
    claims = {c.id: c for c in bandit_ppo.ppo_claims(0)}
    for beta in bandit_ppo.PPO_BETAS:
        assert not claims[f"ppo.fixed_kl.optimum.beta{beta}"].passed, beta
    assert claims["ppo.fixed_kl.tolerance_separates"].passed


def test_sampling_without_early_stop_gives_the_same_tokens_in_max_new_tokens_steps():
    """``sample(stop_when_done=False)`` (PPO under FSDP, where every rank must make the same forward calls): one
    batch's continuations and log-probs equal those of the early-stopping loop under the same seed, and the model
    runs exactly ``max_new_tokens`` times (the early-stopping loop fewer: with 8 tokens, EOS = 1, every row ends
    long before 40). Planted bug: a stopped row's length still counting (lengths += 1) -> continuations differ."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo_lightning.sampling import sample

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=8, bos_token_id=1, eos_token_id=1)
    )
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    prompts = [[2, 3], [4], [5, 6, 7], [3]]
    runs = {}
    for stop in (True, False):
        calls.clear()
        out = sample(model, prompts, max_new_tokens=40, eos_token_id=1, pad_token_id=0, stop_when_done=stop,
                     generator=torch.Generator().manual_seed(3))  # fmt: skip
        runs[stop] = (out, len(calls))
    (early, n_early), (full, n_full) = runs[True], runs[False]
    assert early.continuations == full.continuations and early.finished.all()
    assert all(c[-1] == 1 for c in full.continuations)
    torch.testing.assert_close(early.logps, full.logps)
    assert n_full == 40 and n_early < 40
