"""The one reward interface: load_reward on each kind of spec, and the checks on what a reward returns.

python -m pytest -q tests/test_reward_interface.py        # ~3 s
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from dpo_lightning.reward import CheckedReward, RewardError, SentimentClassifier, load_reward

from helpers import BAD_WORDS, GOOD_WORDS

PROMPTS = ["The film was", "This book is", "Our trip felt", "The meal was", "Overall it was"]
COMPLETIONS = [" great superb", " awful dull", " lovely fine", " boring weak", " excellent charming"]


def _classifier() -> SentimentClassifier:
    texts = [" ".join(GOOD_WORDS[i % 8 : i % 8 + 3]) for i in range(20)] + [
        " ".join(BAD_WORDS[i % 8 : i % 8 + 3]) for i in range(20)
    ]
    return SentimentClassifier.fit(texts, [1] * 20 + [0] * 20, min_df=1)


def test_npz_reward_scores_prompt_plus_completion_by_default(tmp_path):
    clf = _classifier()
    path = clf.save(tmp_path / "reward.npz")
    reward = load_reward(str(path), batch_size=2)  # 5 items in batches of 2, 2, 1
    scores = reward(PROMPTS, COMPLETIONS)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    joined = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    np.testing.assert_allclose(scores.numpy(), clf(joined).astype(np.float32), rtol=1e-6)
    only = load_reward({"path": str(path), "text": "completion"})(PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(only.numpy(), clf(COMPLETIONS).astype(np.float32), rtol=1e-6)
    # the prompt is read in the default mode: a negative prompt moves the score, completion-only it does not
    bad_prompts = ["awful dull boring"] * 5
    assert not torch.allclose(reward(bad_prompts, COMPLETIONS), scores)
    assert (scores[[0, 2, 4]] > 0).all() and (scores[[1, 3]] < 0).all()


def test_import_path_and_factory(monkeypatch):
    module = types.ModuleType("fake_rewards")
    module.length = lambda prompts, completions: [float(len(c)) for c in completions]
    module.make_scaled = lambda scale: lambda prompts, completions: [scale * len(p) for p in prompts]
    monkeypatch.setitem(sys.modules, "fake_rewards", module)
    assert load_reward("fake_rewards:length")(PROMPTS, COMPLETIONS).tolist() == [len(c) for c in COMPLETIONS]
    scaled = load_reward({"path": "fake_rewards:make_scaled", "kwargs": {"scale": 2.0}})(PROMPTS, COMPLETIONS)
    assert scaled.tolist() == [2.0 * len(p) for p in PROMPTS]
    with pytest.raises(RewardError, match="cannot import"):
        load_reward("fake_rewards:missing")


def test_sequence_classification_directory(tmp_path, tiny_tokenizer):
    """A tiny GPT-2 reward model saved with its tokenizer: batched scores equal one-at-a-time scores (padding does
    not change a row's score) and equal the head's logit computed by hand on the unpadded text."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tiny_tokenizer), num_labels=1,
                        pad_token_id=tiny_tokenizer.pad_token_id)  # fmt: skip
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    reward = load_reward(str(tmp_path / "rm"), batch_size=3)
    scores = reward(PROMPTS, COMPLETIONS)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    one = torch.cat(
        [load_reward(str(tmp_path / "rm"), batch_size=1)([p], [c]) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    )
    torch.testing.assert_close(scores, one, rtol=1e-5, atol=1e-5)
    model = GPT2ForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids = torch.tensor([tiny_tokenizer(PROMPTS[1] + COMPLETIONS[1])["input_ids"]])
    with torch.no_grad():
        by_hand = model.score(model.transformer(ids).last_hidden_state[0, -1])[0]
    torch.testing.assert_close(scores[1], by_hand, rtol=1e-5, atol=1e-5)
    assert scores.std() > 0  # different texts, different scores

    GPT2ForSequenceClassification(GPT2Config(**{**config.to_dict(), "num_labels": 2})).save_pretrained(tmp_path / "two")
    tiny_tokenizer.save_pretrained(tmp_path / "two")
    with pytest.raises(RewardError, match="2 outputs; set 'label'"):
        load_reward(str(tmp_path / "two"))
    two = GPT2ForSequenceClassification.from_pretrained(tmp_path / "two").eval()
    with torch.no_grad():  # both logits of the unpadded text of item 1
        logits = two.score(two.transformer(ids).last_hidden_state[0, -1])
    for label, column in ((1, 1), (0, 0), ("LABEL_1", 1)):  # by index, or by name (the config's label2id)
        picked = load_reward({"path": str(tmp_path / "two"), "label": label})(PROMPTS, COMPLETIONS)
        torch.testing.assert_close(picked[1], logits[column], rtol=1e-5, atol=1e-5)
    with pytest.raises(RewardError, match="label 'positive' is not one of the head's"):
        load_reward({"path": str(tmp_path / "two"), "label": "positive"})


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda n: [0.0] * n + [1.0], r"shape \(3,\) for 2 completions"),
        (lambda n: [0.0, float("nan"), 0.0][:n], r"non-finite score\(s\), first nan at item 4"),
        (lambda n: [float("inf")] * n, r"first inf at item 3"),
        (lambda n: ["a"] * n, "not numbers"),
    ],
)
def test_bad_scores_name_the_batch(returned, message):
    """Batches of 3 over 5 items: the second call (batch 1, items 3-4) is the one that goes wrong."""
    calls = []

    def reward(prompts, completions):
        calls.append(len(prompts))
        return [0.0] * len(prompts) if len(calls) == 1 else returned(len(prompts))

    checked = CheckedReward(reward, name="'planted'", batch_size=3)
    with pytest.raises(
        RewardError, match=r"reward 'planted', batch 1 \(items 3-4, first prompt 'The meal was'\)"
    ) as err:
        checked(PROMPTS, COMPLETIONS)
    assert err.match(message)


def test_column_and_tensor_scores_accepted_and_bad_specs_refused(tmp_path):
    column = load_reward(lambda p, c: torch.ones(len(p), 1, dtype=torch.float64))(PROMPTS, COMPLETIONS)
    assert column.dtype == torch.float32 and column.tolist() == [1.0] * 5
    with pytest.raises(RewardError, match="2 prompts but 1 completions"):
        load_reward(lambda p, c: [0.0] * len(p))(PROMPTS[:2], COMPLETIONS[:1])
    with pytest.raises(RewardError, match="no such file"):
        load_reward(str(tmp_path / "missing.npz"))
    with pytest.raises(RewardError, match="not a .npz file, an existing model directory"):
        load_reward(str(tmp_path / "nowhere"))
    with pytest.raises(RewardError, match=r"unknown option\(s\) \['label'\]"):
        load_reward({"path": str(_classifier().save(tmp_path / "r.npz")), "label": 1})
    with pytest.raises(RewardError, match="needs a 'path' key"):
        load_reward({"text": "completion"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match="not a sequence-classification model directory"):
        load_reward(str(tmp_path / "empty"))
