"""Shared test set-up: CPU only, no network, no wandb, tiny models and tokenizers built here."""

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128}

GOOD_WORDS = ["great", "superb", "lovely", "wonderful", "brilliant", "fine", "excellent", "charming"]
BAD_WORDS = ["awful", "dreadful", "boring", "terrible", "clumsy", "dull", "poor", "weak"]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs where chosen and rejected differ systematically: chosen uses GOOD_WORDS, rejected BAD_WORDS."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(["The film", "This book", "The meal", "Our trip"])
        rows.append(
            {
                "prompt": f"Review {i}: {subject} was",
                "chosen": " " + " ".join(rng.choice(GOOD_WORDS) for _ in range(rng.randint(2, 5))) + ".",
                "rejected": " " + " ".join(rng.choice(BAD_WORDS) for _ in range(rng.randint(2, 5))) + ".",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from dpo_lightning.tokenizer import train_bpe_tokenizer

    texts = [r[k] for r in synthetic_pairs(300) for k in ("prompt", "chosen", "rejected")]
    return train_bpe_tokenizer(texts, vocab_size=300)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(96))
