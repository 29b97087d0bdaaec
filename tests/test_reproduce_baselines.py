"""Part 2's baselines: best-of-N records and their KL estimate, and PPO-GT runs, at toy size.

python -m pytest -q tests/test_reproduce_baselines.py      # ~15 s on 2 CPU cores

Best-of-N: the estimator's exact mean (``bon_kl_estimate_mean``) against a hand-computed case; ``bon_records`` on
a tiny random GPT-2 with a continuous stand-in reward (a hash of the text, uniform in [0, 1)), so that the
bias-corrected KL estimate must match log N − (N − 1)/N within its sampling error; and with the reward replaced
by a tied (constant) one, or with the worst sample kept, the same check fails. PPO-GT: a 3-step run of the
library's PPO evaluated as method runs are, its records relabelled in PPO steps; ``ppo_job`` hands the method's
β and the settings' sizes through.
"""

import hashlib
import math

import pytest
import torch
from test_ppo import one_thread  # noqa: F401  (autouse: tiny models run one intra-op thread)

from dpo_lightning.best_of_n import bon_kl, bon_kl_estimate_mean
from dpo_lightning.models import build_causal_lm
from dpo_lightning.reproduce import sentiment_bon
from dpo_lightning.reproduce.sentiment_bon import bon_claim_data, bon_records

from helpers import BAD_WORDS, GOOD_WORDS, TINY_GPT2, synthetic_pairs


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_tokenizer):
    """A tiny random GPT-2 saved with its tokenizer (a policy directory), and 24 prompts' token ids."""
    path = tmp_path_factory.mktemp("baselines") / "sft"
    torch.manual_seed(0)
    build_causal_lm(None, TINY_GPT2, tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    prompts = [tiny_tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in synthetic_pairs(24)]
    return path, prompts


def hashed(texts):
    """A continuous stand-in reward: each distinct text gets its own pseudo-random value in [0, 1)."""
    return [int(hashlib.sha256(t.encode()).hexdigest()[:13], 16) / 16**13 for t in texts]


def test_estimator_mean_at_a_hand_computed_case():
    """N = 2, M = 1: U = F(R_best) has density 2u, B | U ~ Bernoulli(U), so P(B = 1) = E[U] = 2/3 and
    E[term] = log 2 + (1/3) log(½/2) + (2/3) log(1½/2) = log 2 + (1/3) log ¼ + (2/3) log ¾ = 0.03101.
    N = 1: the term is log 1 + 0 = 0 whatever M. Large M: the bias vanishes (M = 4000 within 0.2% at N = 16)."""
    want = math.log(2) + math.log(0.25) / 3 + 2 * math.log(0.75) / 3
    assert bon_kl_estimate_mean(2, 1) == pytest.approx(want, rel=1e-12)
    assert bon_kl_estimate_mean(1, 7) == 0.0
    assert bon_kl_estimate_mean(16, 4000) == pytest.approx(bon_kl(16), rel=2e-3)
    assert bon_kl_estimate_mean(64, 64) / bon_kl(64) - 1 == pytest.approx(-0.153, abs=1e-3)  # quoted in docs


def _records(toy, tiny_tokenizer, reward=hashed, **kwargs):
    path, prompts = toy
    model = build_causal_lm(str(path), None, tiny_tokenizer).eval()
    settings = {"ns": (2, 8), "max_new_tokens": 6, "seed": 3, "extra_base": 8, **kwargs}
    return bon_records(model, tiny_tokenizer, prompts, reward, **settings)


def estimate_errors(records) -> list[str]:
    """Where the bias-corrected estimate misses log N − (N − 1)/N by more than 4 standard errors."""
    return [
        f"N={r['n']:g}: {r['kl_estimate']:.3f} ± {r['kl_estimate_sem']:.3f} vs {r['kl']:.3f}"
        for r in records
        if abs(r["kl_estimate"] - bon_kl(int(r["n"]))) > 4 * r["kl_estimate_sem"]
    ]


def test_bon_records_estimate_the_formula_and_keep_the_best(toy, tiny_tokenizer):
    """24 prompts × (8 + 8) draws. Records: one per N, per-prompt lists aligned with the prompts; ``kl`` is the
    formula; the corrected estimate matches it within 4 s.e.; the raw one is the corrected one plus the known bias;
    the kept reward of N = 8 is at least the mean over its groups of 2 (a group's best is below the best of 8)."""
    records = _records(toy, tiny_tokenizer)
    assert [r["n"] for r in records] == [2.0, 8.0]
    for r in records:
        n = int(r["n"])
        assert len(r["rewards"]) == len(r["kl_terms"]) == len(r["kl_terms_raw"]) == 24
        assert r["kl"] == bon_kl(n) and r["base_samples"] == 16 - n and r["groups"] == 8 // n
        assert r["kl_estimate_raw"] == pytest.approx(r["kl_estimate"] + r["kl_bias"], rel=1e-9)
        assert r["kl_bias"] == pytest.approx(bon_kl_estimate_mean(n, 16 - n) - bon_kl(n), rel=1e-12)
        assert r["length"] <= 6 and 0 <= r["eos_rate"] <= 1 and len(r["samples"]) == 3
    assert estimate_errors(records) == []
    assert all(b >= a - 1e-12 for a, b in zip(records[0]["rewards"], records[1]["rewards"], strict=True))
    assert records[1]["reward"] > records[0]["reward"] > 0.5  # uniform rewards: E[max of 2] = 2/3, of 8 = 8/9
    claim = bon_claim_data(records)
    assert [c["n"] for c in claim] == [2, 8] and claim[1]["terms"] == records[1]["kl_terms"]
    assert claim[1]["formula"] == bon_kl(8) and claim[1]["measured"] == records[1]["kl_estimate"]


@pytest.mark.parametrize("bug", ["tied reward", "worst kept"])
def test_the_estimate_check_catches_a_planted_bug(toy, tiny_tokenizer, monkeypatch, bug):
    """A constant reward (every draw ties: F̂ = ½ for all, the estimate collapses below the formula) or keeping the
    lowest reward instead of the highest: the same 4-s.e. check fails."""
    if bug == "tied reward":
        records = _records(toy, tiny_tokenizer, reward=lambda texts: [0.5] * len(texts))
    else:
        monkeypatch.setattr(sentiment_bon, "best_index", lambda rewards: torch.argmin(rewards, dim=-1))
        records = _records(toy, tiny_tokenizer)
    assert estimate_errors(records) != []


def test_bon_rejects_ns_that_do_not_nest(toy, tiny_tokenizer):
    with pytest.raises(ValueError, match="divide the largest"):
        _records(toy, tiny_tokenizer, ns=(3, 8))


# ---------------------------------------------------------------------------------------------------- PPO-GT
def words(texts):
    """Evaluation's reward: texts -> (good − bad) word counts (the PPO run's reward is the same lexicon)."""
    good, bad = set(GOOD_WORDS), set(BAD_WORDS)
    return [float(sum(w in good for w in t.split()) - sum(w in bad for w in t.split())) for t in texts]


def test_ppo_run_is_evaluated_in_ppo_steps(toy, tiny_tokenizer):
    """3 PPO steps of 8 prompts (4 updates each), evaluated at PPO steps 0, 2 and 3 (5 is past the end and skipped),
    with the evaluation's own reference: step 0 is the SFT model itself (KL 0 up to float noise), later steps moved."""
    from dpo_lightning.reproduce.sentiment_ppo import PPO_EPOCHS, PPO_MINIBATCHES, train_ppo

    path, prompts = toy
    reference = build_causal_lm(str(path), None, tiny_tokenizer).eval()
    reward = {"path": "dpo_lightning.reward:WordListReward", "kwargs": {"positive": GOOD_WORDS, "negative": BAD_WORDS}}
    evaluation = {"reference": reference, "prompts": prompts[:12], "reward_fn": words, "max_new_tokens": 6, "seed": 1}
    policy, history = train_ppo(path, reward, prompts, kl_coef=0.1, steps=3, rollout_prompts=8, lr=3e-3,
                                max_new_tokens=6, seed=0, evaluation=evaluation, eval_steps=(0, 2, 3, 5))  # fmt: skip
    assert PPO_EPOCHS * PPO_MINIBATCHES == 4
    assert [h["step"] for h in history] == [0.0, 2.0, 3.0]
    assert abs(history[0]["kl"]) < 1e-5 and abs(history[-1]["kl"]) > 1e-3  # float noise: cached vs full forward
    assert {"reward", "reward_sem", "kl", "kl_sem", "length", "eos_rate"} <= set(history[-1])
    moved = any(not torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters(), strict=True))
    assert moved


def test_ppo_job_hands_the_method_and_sizes_through(monkeypatch, tmp_path):
    """ppo_job reads the work folder and calls train_ppo with β = method.kl_coef, the settings' sizes, evaluation
    kwargs of every method run, and cfg.ppo_eval_steps (no step 0: the pipeline shares the SFT model's evaluation);
    a method that is not PPO is a ConfigError."""
    import json

    from dpo_lightning.errors import ConfigError
    from dpo_lightning.reproduce import sentiment_ppo
    from dpo_lightning.reproduce.sentiment_methods import eval_kwargs
    from dpo_lightning.reproduce.sentiment_settings import QUICK, Method

    (tmp_path / "train_prompts.json").write_text(json.dumps([[1, 2], [3, 4]]))
    seen = {}
    monkeypatch.setattr(sentiment_ppo, "train_ppo", lambda *a, **kw: (seen.update(args=a, **kw), (None, ["h"]))[1])
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: torch.nn.Linear(1, 1))
    monkeypatch.setattr("dpo_lightning.reward.SentimentClassifier.load", lambda path: "classifier")
    method = Method("PPO-GT", "ppo", kind="ppo", kl_coef=0.37)
    assert sentiment_ppo.ppo_job(QUICK, method, tmp_path, [[5]], seed=4) == ["h"]
    assert seen["args"] == (tmp_path / "sft", tmp_path / "reward.npz", [[1, 2], [3, 4]])
    assert seen["kl_coef"] == 0.37 and seen["steps"] == QUICK.ppo_steps and seen["lr"] == QUICK.ppo_lr
    assert seen["rollout_prompts"] == QUICK.ppo_rollout_prompts and seen["seed"] == 4
    assert seen["eval_steps"] == tuple(QUICK.ppo_eval_steps) and 0 not in seen["eval_steps"]
    ev = seen["evaluation"]
    assert ev["prompts"] == [[5]] and ev["reward_fn"] == "classifier"
    assert {k: ev[k] for k in eval_kwargs(QUICK, 4)} == eval_kwargs(QUICK, 4)
    with pytest.raises(ConfigError, match="PPO-GT"):
        sentiment_ppo.ppo_job(QUICK, Method("DPO", "dpo", 0.1), tmp_path, [[5]], seed=4)
