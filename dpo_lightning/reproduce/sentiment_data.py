"""Part 2's data: IMDb reviews, prompts cut at word boundaries, and the tuning / deciding evaluation prompts.

A test review belongs to the *tuning* set when the CRC-32 of its text is 0 mod 10 and to the *deciding* set when it
is 1 mod 10: disjoint by construction, whatever subsample of the test split a run loads (``--quick`` loads 2,000
reviews, the full run all 25,000). Development runs (``--quick``) evaluate on tuning prompts; only the full run
evaluates on deciding prompts, and the claims are decided there. Within each set the reviews are put in one fixed
order (:data:`PROMPT_ORDER_SEED`, not ``--seed``). No setting was chosen by looking at the deciding set.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from dpo_lightning.errors import DataError

HUB_DATASET = "stanfordnlp/imdb"
PROMPT_ORDER_SEED = 20231  # fixes the order of the test reviews, hence the tuning and deciding slices


def default_imdb_dir() -> Path:
    """``$DPO_IMDB_DIR``; else ``../shared/data/imdb`` from the working directory (the project root, under
    make), then from this source tree's root (an editable install run from elsewhere)."""
    if os.environ.get("DPO_IMDB_DIR"):
        return Path(os.environ["DPO_IMDB_DIR"])
    here = Path.cwd().parent / "shared" / "data" / "imdb"
    return here if here.exists() else Path(__file__).resolve().parents[3] / "shared" / "data" / "imdb"


def clean_review(text: str) -> str:
    """IMDb texts hold HTML line breaks; they become spaces, and runs of whitespace one space."""
    return " ".join(text.replace("<br />", " ").replace("<br/>", " ").split())


def load_imdb(
    data_dir: str | Path | None, split: str, *, limit: int | None = None, seed: int = 0
) -> tuple[list[str], list[int]]:
    """(cleaned texts, labels with 1 = positive) of one IMDb split, optionally a seeded subsample of ``limit``.

    Reads ``{data_dir}/{split}.jsonl.gz`` (labels "pos"/"neg"); when that file is absent, the hub dataset
    ``stanfordnlp/imdb`` (labels 1/0) through the same ``datasets.load_dataset``. The files are sorted by
    label, so a subsample is drawn at random (seeded), never taken from the top.
    """
    import datasets

    path = Path(data_dir or default_imdb_dir()) / f"{split}.jsonl.gz"
    try:
        if path.exists():
            table = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            table = datasets.load_dataset(HUB_DATASET, split=split)
    except Exception as err:  # noqa: BLE001 - a missing hub is one clear message, not a traceback
        what = (
            f"{path} could not be read"
            if path.exists()
            else (f"{path} does not exist and the hub dataset {HUB_DATASET} could not be loaded")
        )
        raise DataError(f"IMDb {split}: {what} ({type(err).__name__}: {str(err)[:200]}). Set DPO_IMDB_DIR to a "
                        f"folder with {split}.jsonl.gz (fields text, label).") from None  # fmt: skip
    if limit is not None and limit < len(table):
        order = np.random.default_rng(seed).permutation(len(table))[:limit]
        table = table.select(sorted(order.tolist()))
    labels = [int(v == "pos") if isinstance(v, str) else int(v) for v in table["label"]]
    return [clean_review(t) for t in table["text"]], labels


def make_prompts(tokenizer: Any, texts: list[str], rng: np.random.Generator, lo: int, hi: int) -> list[str]:
    """A prefix of each text that ends at a word boundary: the first k tokens (k uniform in [lo, hi], the paper's
    2–8 token prefixes), extended to the end of the word they stop in; where that would pass ``hi + 2`` tokens (a
    long word), cut back to the word boundary before instead (kept mid-word only when the first word alone is
    that long). A prompt is whole words, so the text that follows it starts with a space and tokenizes the same
    alone as after the prompt, and prompt + continuation stays within the model's positions."""
    if not texts:
        return []
    ids = tokenizer([t[: 20 * hi] for t in texts], add_special_tokens=False)["input_ids"]
    out = []
    for text, row in zip(texts, ids, strict=True):
        head = tokenizer.decode(row[: int(rng.integers(lo, hi + 1))])
        cut = text.find(" ", len(head.rstrip()))
        prompt = text if cut < 0 else text[:cut]
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > hi + 2:
            back = head.rstrip().rfind(" ")
            prompt = head[:back] if back > 0 else head
        out.append(prompt)
    return out


def review_set(text: str) -> int:
    """0: tuning, 1: deciding, else neither (CRC-32 of the text mod 10)."""
    return zlib.crc32(text.encode("utf-8")) % 10


def prompt_slices(tokenizer: Any, test_texts: list[str], tuning: int, deciding: int, lo: int, hi: int):
    """(tuning prompts, deciding prompts): the first ``tuning`` / ``deciding`` reviews of each set, in a fixed
    order, as word-boundary prefixes. A set with fewer reviews than asked for is a DataError."""
    rng = np.random.default_rng(PROMPT_ORDER_SEED)
    order = rng.permutation(len(test_texts))
    sets = {0: [], 1: []}
    for i in order:
        sets.get(review_set(test_texts[i]), []).append(test_texts[i])
    for key, want, name in ((0, tuning, "tuning"), (1, deciding, "deciding")):
        if len(sets[key]) < want:
            raise DataError(f"Part 2: {want} {name} prompts need that many {name} test reviews (CRC-32 ≡ {key} "
                            f"mod 10); the {len(test_texts)} loaded have {len(sets[key])}")  # fmt: skip
    return (
        make_prompts(tokenizer, sets[0][:tuning], rng, lo, hi),
        make_prompts(tokenizer, sets[1][:deciding], rng, lo, hi),
    )
