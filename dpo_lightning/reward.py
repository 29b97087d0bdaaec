"""Rewards for text: the one interface every on-policy trainer scores with, and a TF-IDF sentiment classifier.

    reward = load_reward("runs/reward.npz")            # or a model directory, or "my_pkg.rewards:length"
    scores = reward(prompts, completions)              # float32 (n,), checked: finite, one per completion

:func:`load_reward` turns a spec into a :class:`Reward` (PPO, online DPO and best-of-N all go through it).
The sentiment classifier below is the DPO paper's ground-truth reward, used directly:

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

import importlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dpo_lightning.errors import UserError

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


# ---------------------------------------------------------------------------------------------------- interface
class Reward(Protocol):
    """Anything that scores (prompt, completion) texts: ``reward(prompts, completions)`` -> float32 (n,)."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor: ...


class RewardError(UserError, ValueError):
    """A reward that cannot be loaded, or that returned scores that cannot be used (NaN/inf, wrong count)."""


TEXT_MODES = ("prompt+completion", "completion")


def reward_texts(prompts: Sequence[str], completions: Sequence[str], text: str) -> list[str]:
    if text not in TEXT_MODES:
        raise RewardError(f"reward text: {text!r} is not one of {TEXT_MODES}")
    return (
        [p + c for p, c in zip(prompts, completions, strict=True)] if text == "prompt+completion" else list(completions)
    )


class SentimentReward:
    """A :class:`SentimentClassifier` as a :class:`Reward`: the positive-class logit of each text.

    ``text="prompt+completion"`` (the default) scores the whole review, prompt and continuation together, as the
    DPO paper's sentiment experiment reads its samples (§6.1) and as :func:`sampling.sample_preference_pairs`
    does; ``"completion"`` scores the continuation alone.
    """

    def __init__(self, classifier: SentimentClassifier, *, text: str = "prompt+completion"):
        reward_texts([], [], text)  # validates text
        self.classifier, self.text = classifier, text

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return torch.as_tensor(self.classifier(reward_texts(prompts, completions, self.text)), dtype=torch.float32)


class CheckedReward:
    """Wraps any reward: scores in batches of ``batch_size`` and refuses unusable scores with a clear error.

    Each batch's scores must be ``batch`` finite numbers (a tensor, array or list of shape (batch,) or
    (batch, 1)); anything else raises :class:`RewardError` naming the reward, the batch (its index, the items
    it covers, its first prompt) and the first bad item. The result is float32 (n,) on the CPU.
    """

    def __init__(self, reward: Callable, *, name: str, batch_size: int = 32):
        if batch_size < 1:
            raise RewardError(f"reward batch_size must be >= 1, got {batch_size}")
        self.reward, self.name, self.batch_size = reward, name, int(batch_size)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise RewardError(f"reward {self.name}: {len(prompts)} prompts but {len(completions)} completions")
        parts = [torch.zeros(0, dtype=torch.float32)]
        for index, start in enumerate(range(0, len(prompts), self.batch_size)):
            batch_p, batch_c = prompts[start : start + self.batch_size], completions[start : start + self.batch_size]
            parts.append(self._check(self.reward(batch_p, batch_c), index, start, batch_p))
        return torch.cat(parts)

    def _check(self, scores: Any, index: int, start: int, prompts: list[str]) -> torch.Tensor:
        n = len(prompts)
        where = f"reward {self.name}, batch {index} (items {start}-{start + n - 1}, first prompt {prompts[0][:60]!r})"
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().float().cpu()
        try:
            values = torch.as_tensor(np.asarray(scores, dtype=np.float64), dtype=torch.float32)
        except (TypeError, ValueError) as err:
            raise RewardError(f"{where}: returned {type(scores).__name__}, not numbers ({err})") from None
        if values.dim() == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.dim() != 1 or values.shape[0] != n:
            raise RewardError(f"{where}: returned shape {tuple(values.shape)} for {n} completions, expected ({n},)")
        bad = (~torch.isfinite(values)).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            raise RewardError(
                f"{where}: {len(bad)} non-finite score(s), first {float(values[i])} at item {start + i} "
                f"(prompt {prompts[i][:60]!r})"
            )
        return values


def _import_callable(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise RewardError(f"reward {path!r}: cannot import it ({type(err).__name__}: {err})") from None
    if not callable(obj):
        raise RewardError(f"reward {path!r}: {type(obj).__name__} is not callable")
    return obj


def load_reward(
    spec: str | Mapping | Callable,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> Reward:
    """The one way in to a reward: returns a checked :class:`Reward` (float32 (n,) on the CPU).

    Args:
        spec: one of
            - ``"path/reward.npz"``: a :class:`SentimentClassifier` file, scoring prompt + completion;
            - ``"path/to/dir"``: a local ``AutoModelForSequenceClassification`` directory with its tokenizer
              (see :class:`dpo_lightning.reward_model.SequenceClassifierReward`), run on ``device``;
            - ``"package.module:name"``: a callable ``(prompts, completions) -> scores``;
            - a mapping ``{path: <one of the above>, ...options}``, options being ``text``
              (``"prompt+completion"`` or ``"completion"``: what the classifier or model reads), ``label`` and
              ``max_length`` (model directories), ``kwargs`` (import paths: the named object is a factory,
              called with these keyword arguments to build the reward);
            - a callable, used as it is.
        device: where a model reward runs (the policy's device); ``None``: the CPU.
        batch_size: texts per call of the underlying reward.
    """
    options: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        options = dict(spec)
        if "path" not in options:
            raise RewardError(f"reward: a mapping needs a 'path' key, got keys {sorted(options)}")
        spec = options.pop("path")
    if callable(spec) and not isinstance(spec, str):
        return CheckedReward(spec, name=getattr(spec, "__name__", type(spec).__name__), batch_size=batch_size)
    if not isinstance(spec, (str, Path)):
        raise RewardError(f"reward: expected a path, 'module:callable' or a callable, got {type(spec).__name__}")
    spec = str(spec)
    allowed = (
        {"text"} if spec.endswith(".npz") else ({"text", "label", "max_length"} if Path(spec).is_dir() else {"kwargs"})
    )
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise RewardError(f"reward {spec!r}: unknown option(s) {unknown}; this kind takes {sorted(allowed)}")
    if spec.endswith(".npz"):
        if not Path(spec).is_file():
            raise RewardError(f"reward {spec!r}: no such file")
        try:
            classifier = SentimentClassifier.load(spec)
        except (OSError, ValueError, KeyError) as err:
            raise RewardError(f"reward {spec!r}: not a sentiment classifier file ({err})") from None
        inner: Callable = SentimentReward(classifier, **options)
    elif Path(spec).is_dir():
        from dpo_lightning.reward_model import SequenceClassifierReward

        inner = SequenceClassifierReward(spec, device=device, batch_size=batch_size, **options)
    elif ":" in spec:
        inner = _import_callable(spec)
        if "kwargs" in options:
            inner = inner(**options["kwargs"])
            if not callable(inner):
                raise RewardError(f"reward {spec!r}: the factory returned {type(inner).__name__}, not a callable")
    else:
        raise RewardError(
            f"reward {spec!r}: not a .npz file, an existing model directory or a 'module:callable' import path"
        )
    return CheckedReward(inner, name=repr(spec), batch_size=batch_size)


class WordListReward:
    """A lexicon reward for examples and smoke runs: (number of positive − number of negative words) in the text.

    Words are lowercased runs of letters; ``text`` says what is read (``"completion"`` by default, so a prompt's
    own words do not count). Not a sentiment model: use :class:`SentimentClassifier` (or a reward model) for that.
    """

    def __init__(self, positive: Sequence[str], negative: Sequence[str] = (), *, text: str = "completion"):
        reward_texts([], [], text)
        self.positive, self.negative = {w.lower() for w in positive}, {w.lower() for w in negative}
        self.text = text

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        scores = []
        for t in reward_texts(prompts, completions, self.text):
            words = re.findall(r"[a-z]+", t.lower())
            scores.append(sum(w in self.positive for w in words) - sum(w in self.negative for w in words))
        return torch.tensor(scores, dtype=torch.float32)
