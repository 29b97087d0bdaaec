"""A ground-truth reward for text: a TF-IDF + logistic-regression sentiment classifier.

    clf = SentimentClassifier.fit(train_texts, train_labels)      # labels: 1 = positive, 0 = negative
    clf.accuracy(test_texts, test_labels)                          # ≈ 0.89 on IMDb with unigrams
    rewards = clf(texts)                                           # (N,) positive-class logits
    clf.save("reward.npz"); SentimentClassifier.load("reward.npz")

The reward is the logit w·x + b of the positive class, not its probability: logits do not saturate, so a
policy that is already mostly positive can still show progress, and a difference of rewards is a log-odds
ratio. This plays the role of the DPO paper's sentiment classifier in its controlled sentiment generation
experiment (Rafailov et al. 2023, §6.1 and Appendix C.1).

Saving writes the vocabulary, idf weights and coefficients to one ``.npz`` of plain arrays; loading reads it
with ``allow_pickle=False`` and rebuilds the scorer, so a reward file never runs code when opened.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1


class SentimentClassifier:
    """TF-IDF features (sublinear tf, l2-normalised rows) and a linear logit; callable on a list of texts."""

    def __init__(
        self,
        vocabulary: dict[str, int],
        idf: np.ndarray,
        coef: np.ndarray,
        intercept: float,
        *,
        ngram_range: tuple[int, int] = (1, 1),
        lowercase: bool = True,
        sublinear_tf: bool = True,
    ):
        """Build a scorer from fitted parameters; :meth:`fit` and :meth:`load` are the usual ways in."""
        from sklearn.feature_extraction.text import CountVectorizer

        if not (len(vocabulary) == len(idf) == len(coef)):
            raise ValueError(f"vocabulary ({len(vocabulary)}), idf ({len(idf)}), coef ({len(coef)}) disagree")
        self.vocabulary = dict(vocabulary)
        self.idf = np.asarray(idf, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.ngram_range = (int(ngram_range[0]), int(ngram_range[1]))
        self.lowercase = lowercase
        self.sublinear_tf = sublinear_tf
        # a CountVectorizer with a fixed vocabulary needs no fitting: it only tokenizes and counts
        self._counter = CountVectorizer(vocabulary=self.vocabulary, ngram_range=self.ngram_range, lowercase=lowercase)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        labels: Sequence[int],
        *,
        ngram_range: tuple[int, int] = (1, 1),
        min_df: int = 2,
        max_features: int | None = None,
        C: float = 4.0,
        max_iter: int = 1000,
    ) -> SentimentClassifier:
        """Fit TF-IDF and an L2-regularised logistic regression (lbfgs, deterministic).

        Args:
            texts: training documents.
            labels: 1 for positive, 0 for negative.
            ngram_range: word n-grams used as features; unigrams reach ≈ 89% on IMDb and fit in seconds,
                bigrams add ≈ 1.5 points at about 2.5× the time.
            min_df: ignore terms in fewer documents than this.
            max_features: keep only the most frequent terms (``None``: all).
            C: inverse regularisation strength.
            max_iter: lbfgs iterations.
        """
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(labels, dtype=np.int64)
        if set(np.unique(y).tolist()) != {0, 1}:
            raise ValueError("labels must contain both classes, as 0 (negative) and 1 (positive)")
        vectorizer = TfidfVectorizer(
            ngram_range=ngram_range, min_df=min_df, max_features=max_features, sublinear_tf=True, lowercase=True
        )
        features = vectorizer.fit_transform(texts)
        model = LogisticRegression(C=C, max_iter=max_iter)
        model.fit(features, y)
        # classes_ is sorted, so coef_[0] is the weight vector of class 1, the positive class
        return cls(
            {term: int(i) for term, i in vectorizer.vocabulary_.items()},
            vectorizer.idf_,
            model.coef_[0],
            float(model.intercept_[0]),
            ngram_range=ngram_range,
        )

    # ------------------------------------------------------------------ scoring
    def features(self, texts: Sequence[str]):
        """Sparse TF-IDF rows (N, vocab), the same transform ``TfidfVectorizer`` applies."""
        from sklearn.preprocessing import normalize

        counts = self._counter.transform(texts).astype(np.float64).tocsr()
        if self.sublinear_tf:
            np.log(counts.data, out=counts.data)
            counts.data += 1.0
        counts.data *= self.idf[counts.indices]
        return normalize(counts, norm="l2", copy=False)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Positive-class logits (N,): the reward."""
        return np.asarray(self.features(list(texts)) @ self.coef + self.intercept, dtype=np.float64)

    __call__ = logits

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """1 where the positive class is more likely, else 0."""
        return (self.logits(texts) > 0).astype(np.int64)

    def accuracy(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        return float(np.mean(self.predict(texts) == np.asarray(labels, dtype=np.int64)))

    # ------------------------------------------------------------------ saving
    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` of plain arrays (terms as unicode, numbers as float64): no pickle involved."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        terms = np.empty(len(self.vocabulary), dtype=object)
        for term, i in self.vocabulary.items():
            terms[i] = term
        settings = {
            "format_version": FORMAT_VERSION,
            "ngram_range": list(self.ngram_range),
            "lowercase": self.lowercase,
            "sublinear_tf": self.sublinear_tf,
            "intercept": self.intercept,
        }
        with path.open("wb") as f:  # np.savez would append ".npz" to a path without it
            np.savez_compressed(
                f, terms=terms.astype(str), idf=self.idf, coef=self.coef, settings=np.array(json.dumps(settings))
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> SentimentClassifier:
        """Read a file written by :meth:`save`; refuses anything needing pickle."""
        with np.load(Path(path), allow_pickle=False) as data:
            settings: dict[str, Any] = json.loads(str(data["settings"]))
            if settings.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: reward file format {settings.get('format_version')} is not supported")
            vocabulary = {str(t): i for i, t in enumerate(data["terms"].tolist())}
            return cls(
                vocabulary,
                data["idf"],
                data["coef"],
                settings["intercept"],
                ngram_range=tuple(settings["ngram_range"]),
                lowercase=settings["lowercase"],
                sublinear_tf=settings["sublinear_tf"],
            )
