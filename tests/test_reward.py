"""The sentiment reward: matches scikit-learn's own pipeline, saves without pickle, and reads IMDb sentiment.

python -m pytest -q tests/test_reward.py                  # fast: ~10 s (IMDb subsample)
python -m pytest -q tests/test_reward.py -m slow          # full IMDb, ≥ 85% test accuracy: ~30-60 s
"""

import numpy as np
import pytest

from dpo_lightning.reward import SentimentClassifier

from helpers import BAD_WORDS, GOOD_WORDS, SHARED_DATA

IMDB = SHARED_DATA / "imdb"
needs_imdb = pytest.mark.skipif(not (IMDB / "train.jsonl.gz").exists(), reason="../shared/data/imdb is absent")


def _toy_corpus(n=200, seed=0):
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        words = GOOD_WORDS if i % 2 else BAD_WORDS
        filler = ["the", "film", "was", "and", "plot", "acting"]
        texts.append(" ".join(rng.choice(words + filler, size=8)))
        labels.append(i % 2)
    return texts, labels


def test_logits_equal_sklearn_pipeline():
    """Our sparse TF-IDF transform + w·x + b equals TfidfVectorizer + LogisticRegression.decision_function."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts, labels = _toy_corpus()
    clf = SentimentClassifier.fit(texts, labels, min_df=1, C=1.0)
    vec = TfidfVectorizer(min_df=1, sublinear_tf=True)
    lr = LogisticRegression(C=1.0, max_iter=1000).fit(vec.fit_transform(texts), labels)
    probe = texts[:20] + ["great great great film", "an awful dull plot", "words never seen before"]
    np.testing.assert_allclose(clf(probe), lr.decision_function(vec.transform(probe)), atol=1e-9)


def test_reward_sign_follows_sentiment():
    clf = SentimentClassifier.fit(*_toy_corpus(), min_df=1)
    good, bad = clf([" ".join(GOOD_WORDS), " ".join(BAD_WORDS)])
    assert good > 0 > bad
    assert clf.accuracy(*_toy_corpus(seed=1)) > 0.9


def test_save_load_round_trip_without_pickle(tmp_path):
    clf = SentimentClassifier.fit(*_toy_corpus(), ngram_range=(1, 2), min_df=1)
    path = clf.save(tmp_path / "reward.npz")
    with np.load(path, allow_pickle=False) as data:  # every array loads with pickle refused
        assert {"terms", "idf", "coef", "settings"} <= set(data.files)
    loaded = SentimentClassifier.load(path)
    probe = _toy_corpus(seed=2)[0]
    np.testing.assert_array_equal(loaded(probe), clf(probe))
    assert loaded.ngram_range == (1, 2)


def test_rejects_one_class_labels():
    with pytest.raises(ValueError, match="both classes"):
        SentimentClassifier.fit(["a b", "c d"], [1, 1])


@needs_imdb
def test_imdb_subsample_accuracy():
    """Fast variant: 4,000 training reviews, 2,000 test reviews (seeded subsamples, seed 0).

    Where the numbers come from: this exact run measured 0.859 (2026-12, unigram TF-IDF, min_df 2, C 4); the
    full 25k/25k data gives 0.888 (README, `make reproduce`), and a sixth of the training data costs a few points.
    The bound 0.80 leaves 2,000 test reviews' sampling error (σ ≈ √(0.86·0.14/2000) ≈ 0.008) many times over,
    while a broken classifier (labels or tokens mixed up) falls to chance, 0.5. The 0.85 gate of Part 2's claim
    is checked on the full data by the slow test below."""
    from dpo_lightning.reproduce.sentiment import load_imdb

    train_texts, train_labels = load_imdb(IMDB, "train", limit=4000, seed=0)
    test_texts, test_labels = load_imdb(IMDB, "test", limit=2000, seed=0)
    assert 0.3 < np.mean(train_labels) < 0.7  # the subsample mixes both classes
    clf = SentimentClassifier.fit(train_texts, train_labels)
    assert 0.80 <= clf.accuracy(test_texts, test_labels) < 0.95  # above 0.95 would mean test leaked into train


@needs_imdb
@pytest.mark.slow
def test_imdb_full_accuracy_at_least_85():
    """All 25,000 training reviews, all 25,000 test reviews (unigrams: ≈ 0.888 measured)."""
    from dpo_lightning.reproduce.sentiment import load_imdb

    clf = SentimentClassifier.fit(*load_imdb(IMDB, "train"))
    assert clf.accuracy(*load_imdb(IMDB, "test")) >= 0.85
