"""Caches that make a second run with the same data and settings skip the slow steps.

- Tokenized datasets are cached by ``datasets`` itself: the map is given a fingerprint built from the raw data's
  fingerprint, the tokenizer's (``tokenizer_fingerprint``) and every setting that changes the ids
  (``PreferenceDataModule._tokenize_fingerprint``), so a run with the same three reuses the cache file and a
  change in any of them tokenizes again.
- A tokenizer trained on the data (``data.tokenizer: null``) is cached here, keyed by the training data's
  fingerprint and the vocabulary size, so it is not retrained (and hashes the same, so the map cache hits).

Both live under the ``datasets`` cache folder (``HF_DATASETS_CACHE``, default ``~/.cache/huggingface/datasets``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets.fingerprint import Hasher

from dpo_lightning.tokenizer import load_tokenizer, train_bpe_tokenizer

TOKENIZER_VERSION = 1  # bump when train_bpe_tokenizer changes, to retire cached tokenizers


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about a tokenizer that changes its ids: vocabulary, merges, normalisation,
    special tokens, chat template. Two loads of the same tokenizer directory hash equal."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else Hasher.hash(tokenizer),
        [getattr(tokenizer, f"{name}_token", None) for name in ("bos", "eos", "pad", "unk")],
        getattr(tokenizer, "chat_template", None),
    ]
    return Hasher.hash(parts)


def cache_dir(*parts: str) -> Path:
    """A folder under the ``datasets`` cache (``HF_DATASETS_CACHE``) for this package's own cached files."""
    path = Path(datasets.config.HF_DATASETS_CACHE, "dpo_lightning", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a record's value (message contents of chat rows included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)


def training_texts(
    dataset: datasets.Dataset, columns: tuple[str, ...] = ("prompt", "chosen", "rejected", "completion")
) -> Iterator[str]:
    """The text a tokenizer is trained on: the prompt/chosen/rejected (unpaired: completion) columns, messages
    included."""
    for column in columns:
        if column in dataset.column_names:
            for value in dataset[column]:
                yield from _strings(value)


def cached_bpe_tokenizer(dataset: datasets.Dataset, vocab_size: int) -> Any:
    """A byte-level BPE trained on ``dataset``'s text, or the one trained on the same data before.

    The tokenizer returned is always the one read back from the cache folder, so the first run and every later
    run use byte-identical tokenizers (and the same tokenized-dataset cache).
    """
    key = Hasher.hash([dataset._fingerprint, vocab_size, TOKENIZER_VERSION])
    path = cache_dir("tokenizers") / key
    if not (path / "tokenizer.json").exists():
        tokenizer = train_bpe_tokenizer(training_texts(dataset), vocab_size=vocab_size)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{key}-"))
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic; ranks of a multi-process run may race here
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(str(path))
