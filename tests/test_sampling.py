"""Batched sampling: shapes, EOS stops, seeded determinism, KV cache == no cache, returned log-probs == re-scoring.

python -m pytest -q tests/test_sampling.py      # ~5 s on 2 CPU cores
"""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dpo_lightning.models import build_causal_lm
from dpo_lightning.sampling import _cache_kwarg, label_pairs, sample, sample_preference_pairs, sequence_logprob

from helpers import TINY_GPT2

EOS = 0
PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [3, 4], [7, 7, 7, 7]]  # ragged: left padding is exercised


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS, eos_token_id=EOS
    )
    return GPT2LMHeadModel(config).eval()


def _draw(model, prompts=PROMPTS, seed=1, **kw):
    kw.setdefault("max_new_tokens", 12)
    return sample(model, prompts, eos_token_id=kw.pop("eos", None), generator=torch.Generator().manual_seed(seed), **kw)


def test_shapes_and_lengths(model):
    out = _draw(model)
    assert len(out.continuations) == len(PROMPTS)
    assert out.logps.shape == (len(PROMPTS),) and out.logps.dtype == torch.float32
    assert out.finished.shape == (len(PROMPTS),) and not out.finished.any()  # no EOS given: never stops
    assert all(len(c) == 12 for c in out.continuations)
    assert torch.all(out.logps < 0)


def test_eos_stops_a_row_and_is_kept(model):
    """With EOS made the likeliest token by a bias on its logit, rows stop early and end with EOS."""
    bias = torch.nn.functional.one_hot(torch.tensor(EOS), 40).float() * 3.0  # lm_head is tied: add, don't edit
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    try:
        out = _draw(model, eos=EOS, max_new_tokens=30)
    finally:
        handle.remove()
    assert out.finished.any()
    for cont, done in zip(out.continuations, out.finished.tolist(), strict=True):
        assert (EOS in cont) == done
        if done:
            assert cont.index(EOS) == len(cont) - 1  # nothing after EOS


def test_same_seed_same_samples_other_seed_differs(model):
    a, b, c = _draw(model, seed=3), _draw(model, seed=3), _draw(model, seed=4)
    assert a.continuations == b.continuations and torch.equal(a.logps, b.logps)
    assert a.continuations != c.continuations


def test_kv_cache_equals_no_cache(model):
    """Same seed, same tokens and the same log-probs whether keys/values are cached or recomputed."""
    cached = _draw(model, eos=EOS, use_cache=True)
    full = _draw(model, eos=EOS, use_cache=False)
    assert cached.continuations == full.continuations
    torch.testing.assert_close(cached.logps, full.logps, atol=1e-5, rtol=1e-5)


def test_kv_cache_logits_equal_full_forward(model):
    """Step-by-step logits with the cache equal the logits of one forward pass over the whole sequence."""
    ids = torch.tensor([[4, 9, 2, 7, 7, 1, 3]])
    full = model(input_ids=ids).logits
    out = model(input_ids=ids[:, :3], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    steps = [out.logits[:, -1]]
    for t in range(3, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{_cache_kwarg(model): cache})
        cache = getattr(out, "cache", None) or out.past_key_values
        steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 2:], atol=1e-5, rtol=1e-5)


def test_logps_equal_rescoring(model):
    """The log-prob accumulated while sampling (left-padded batch) equals scoring the tokens afterwards
    (right-padded, through dpo_lightning.logps.sequence_logps)."""
    out = _draw(model, eos=EOS, temperature=0.7, top_k=10)  # logps are at temperature 1 whatever the sampling
    rescored = sequence_logprob(model, PROMPTS, out.continuations, batch_size=2)
    torch.testing.assert_close(out.logps, rescored, atol=1e-4, rtol=1e-5)


def test_batching_does_not_change_a_row(model):
    """A prompt sampled greedily alone or inside a padded batch gives the same continuation."""
    batch = _draw(model, temperature=0.0)
    for prompt, cont in zip(PROMPTS, batch.continuations, strict=True):
        assert _draw(model, prompts=[prompt], temperature=0.0).continuations[0] == cont


def test_top_k_one_is_greedy(model):
    assert _draw(model, top_k=1).continuations == _draw(model, temperature=0.0).continuations


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, [[1]], max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="continuations"):
        sequence_logprob(model, [[1]], [[2], [3]])


def test_label_pairs_all_six_higher_reward_chosen():
    responses = [" a", " b", " c", " d"]
    pairs = label_pairs("P", responses, np.array([0.5, 2.0, -1.0, 1.0]))
    assert len(pairs) == 6
    reward = dict(zip(responses, [0.5, 2.0, -1.0, 1.0], strict=True))
    assert all(reward[p["chosen"]] > reward[p["rejected"]] and p["prompt"] == "P" for p in pairs)
    assert sum(p["chosen"] == " b" for p in pairs) == 3  # the best sample wins all three of its pairs


def test_label_pairs_drops_ties_duplicates_and_empty():
    pairs = label_pairs("P", [" a", " a", "  ", " b"], np.array([1.0, 2.0, 3.0, 1.0]))
    # (a, a) identical, (a, '  ') and ('  ', b) empty, (a #0, b) tie at 1.0: only (a #1, b) is left
    assert pairs == [{"prompt": "P", "chosen": " a", "rejected": " b"}]


def test_sample_preference_pairs(tiny_tokenizer):
    """3 prompts × 4 samples: up to 6 pairs each, chosen always the longer text under a length reward."""

    torch.manual_seed(0)
    policy = build_causal_lm(None, TINY_GPT2, tiny_tokenizer)
    prompts = ["Review 1: The film was", "Review 2: This book was", "Review 3: Our trip was"]
    reward = lambda texts: [float(len(t)) for t in texts]  # noqa: E731
    pairs, rewards = sample_preference_pairs(policy, tiny_tokenizer, prompts, reward, max_new_tokens=6, seed=3)
    assert rewards.shape == (12,) and 0 < len(pairs) <= 18
    assert all(len(p["chosen"]) > len(p["rejected"]) for p in pairs)
    assert {p["prompt"] for p in pairs} <= set(prompts)
    again, _ = sample_preference_pairs(policy, tiny_tokenizer, prompts, reward, max_new_tokens=6, seed=3)
    assert again == pairs
