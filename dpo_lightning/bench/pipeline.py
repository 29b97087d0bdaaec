"""Data pipeline throughput: preference pairs per second through ``PreferenceDataModule.setup()``, cold and cached.

    python -m dpo_lightning.bench.pipeline SPEC.json OUT.json

Cold: a copy of the data file at a new path, so nothing of it is in the ``datasets`` cache (read, parse, tokenize,
truncate, audit). Cached: a second data module on the same path (the tokenized pairs come from the cache). HH
pairs are short dialogues; the IMDb pairs are built from whole reviews (two reviews of the same film-length
text each), the size of the DPO paper's sentiment task.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any


def imdb_pairs(source: str | Path, out: Path, n: int) -> Path:
    """``n`` explicit pairs from IMDb reviews: the prompt is a review's first 8 words, chosen its rest, rejected
    the rest of the next review."""
    texts = []
    with gzip.open(source, "rt") as f:
        for line in f:
            texts.append(json.loads(line)["text"].replace("<br />", " "))
            if len(texts) == n + 1:
                break
    with gzip.open(out, "wt") as f:
        for i in range(len(texts) - 1):
            words, other = texts[i].split(), texts[i + 1].split()
            row = {
                "prompt": " ".join(words[:8]),
                "chosen": " " + " ".join(words[8:]),
                "rejected": " " + " ".join(other[8:]),
            }
            f.write(json.dumps(row) + "\n")
    return out


def time_setup(data_file: str, fmt: str, spec: dict[str, Any]) -> dict[str, Any]:
    from dpo_lightning.data import PreferenceDataModule

    dm = PreferenceDataModule(
        data_file,
        format=fmt,
        tokenizer=spec["tokenizer_dir"],
        max_length=spec["max_length"],
        max_prompt_length=spec["max_prompt_length"],
        max_rows=spec.get("max_rows"),
        on_bad_row="skip",
    )
    start = time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    pairs = sum(len(dm.datasets[k]) for k in ("train", "val"))
    return {
        "seconds": seconds,
        "pairs": pairs,
        "pairs_per_s": pairs / seconds,
        "from_cache": dict(getattr(dm, "from_cache", {})) or None,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    work = Path(spec["work"])
    out: dict[str, Any] = {}
    for name, source, fmt in (("hh", spec["hh_file"], "hh"), ("imdb", spec["imdb_file"], "explicit")):
        fresh = work / uuid.uuid4().hex[:8]
        fresh.mkdir(parents=True)
        copy = fresh / Path(source).name
        shutil.copy(source, copy)
        cold = time_setup(str(copy), fmt, spec)
        cached = time_setup(str(copy), fmt, spec)
        out[name] = {"cold": cold, "cached": cached, "file": str(source)}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_file, out_file = argv
    result = run(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
