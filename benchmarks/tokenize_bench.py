"""Tokenization throughput of the preference data pipeline (pairs/s), cold and cached.

    python benchmarks/tokenize_bench.py [--tokenizer ../shared/data/tokenizers/gpt2] [--json out.json]

Two data sets: the shared Anthropic HH harmless-base test split (2,312 multi-turn transcripts, format ``hh``) and
IMDb-sized text (the 25,000 IMDb training reviews as 12,500 explicit pairs, a positive review chosen over a
negative one). For each, a fresh ``datasets`` cache (a temporary folder) is used so the first
``PreferenceDataModule.prepare`` is cold (read the file, parse, tokenize, write the cache), and a second data
module with the same settings is timed against the warm cache (the tokenizing map is skipped). ``tokenize`` is
the time inside the map function (parse + tokenize + truncate), ``prepare`` the whole setup including reading
and the audit statistics.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def imdb_pairs(out: Path) -> Path:
    """12,500 explicit pairs from the IMDb training reviews: positive chosen over negative, prompt the request."""
    pos, neg = [], []
    with gzip.open(SHARED / "imdb" / "train.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            (pos if row["label"] == "pos" else neg).append(row["text"].replace("<br />", "\n"))
    with open(out, "w") as f:
        for chosen, rejected in zip(pos, neg, strict=False):
            f.write(json.dumps({"prompt": "Write a movie review:", "chosen": " " + chosen, "rejected": " " + rejected}))
            f.write("\n")
    return out


def run(name: str, data_file: Path, fmt: str, tokenizer: str, max_length: int, max_prompt_length: int) -> dict:
    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.data import tokenize as tok_module

    inner = tok_module.tokenize_rows
    spent = [0.0]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    tok_module.tokenize_rows = timed
    result = {"data": name}
    try:
        for phase in ("cold", "cached"):
            spent[0] = 0.0
            dm = PreferenceDataModule(
                str(data_file),
                format=fmt,
                tokenizer=tokenizer,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                on_bad_row="skip",
            )
            _ = dm.tokenizer  # load outside the timing
            start = time.perf_counter()
            dm.prepare(enforce_thresholds=False)
            total = time.perf_counter() - start
            pairs = dm.rows["train"]
            result[phase] = {
                "records": pairs,
                "prepare_s": round(total, 2),
                "tokenize_s": round(spent[0], 2),
                "pairs_per_s": round(pairs / total),
                "tokenize_pairs_per_s": round(pairs / spent[0]) if spent[0] else None,
                "from_cache": dm.from_cache["train"],
                "padding_grouped": dm.report["padding"]["grouped"],
                "padding_random": dm.report["padding"]["random"],
            }
    finally:
        tok_module.tokenize_rows = inner
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"), help="tokenizer directory")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "cache")  # a cold cache for this benchmark only
        import datasets

        datasets.config.HF_DATASETS_CACHE = os.environ["HF_DATASETS_CACHE"]
        datasets.disable_progress_bars()
        hh = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
        results = [
            run("hh-rlhf harmless-base test (hh)", hh, "hh", args.tokenizer, 512, 256),
            run(
                "imdb train, 12,500 pairs (explicit)",
                imdb_pairs(Path(tmp) / "imdb.jsonl"),
                "explicit",
                args.tokenizer,
                1024,
                128,
            ),
        ]
    print(f"tokenizer: {args.tokenizer}; {os.cpu_count()} CPUs")
    print(f"{'data':<38} {'phase':<7} {'records':>8} {'prepare s':>10} {'pairs/s':>9} {'tokenize pairs/s':>17}")
    for r in results:
        for phase in ("cold", "cached"):
            p = r[phase]
            tps = p["tokenize_pairs_per_s"] or "(skipped)"
            print(f"{r['data']:<38} {phase:<7} {p['records']:>8} {p['prepare_s']:>10} {p['pairs_per_s']:>9} {tps:>17}")
        print(
            f"{'':<38} padding {r['cold']['padding_grouped']:.1%} grouped vs {r['cold']['padding_random']:.1%} random"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
