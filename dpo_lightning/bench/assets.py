"""What both sides of a comparison load: one tokenizer, one set of random weights, one list of tokenized pairs.

Everything is written once into a work folder and read back by each worker process, so ours and TRL start from
byte-identical weights and see the same token ids in the same order.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpo_lightning.bench.step import shape_config

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
HH_FILE = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
IMDB_FILE = SHARED / "imdb" / "train.jsonl.gz"
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"  # GPT-2's 50,257-token BPE


@dataclass
class Assets:
    tokenizer_dir: str
    model_dir: str
    pairs_file: str
    n_pairs: int
    vocab: int
    data_file: str
    pad_id: int


def hh_datamodule(data_file: str | Path, tokenizer: str | None, **kwargs: Any):
    """The package's own PreferenceDataModule on the HH file, as a user would configure it."""
    from dpo_lightning.data import PreferenceDataModule

    return PreferenceDataModule(str(data_file), format="hh", tokenizer=tokenizer, on_bad_row="skip", **kwargs)


def prepare(
    work: Path,
    *,
    data_file: str | Path = HH_FILE,
    vocab: int = 8192,
    shape: str = "L2-d128",
    max_length: int = 512,
    max_prompt_length: int = 256,
    max_rows: int | None = None,
) -> Assets:
    """Train the BPE tokenizer, save the random-init policy, tokenize the pairs; reuse them when already there."""
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir, pairs_file = work / "tokenizer", work / "pairs.json"
    meta = {"data_file": str(data_file), "vocab": vocab, "max_length": max_length, "max_rows": max_rows}
    meta_file = work / "assets.json"
    fresh = not meta_file.exists() or json.loads(meta_file.read_text()) != meta
    if fresh or not tokenizer_dir.exists():
        dm = hh_datamodule(data_file, None, tokenizer_vocab_size=vocab, max_rows=max_rows)
        dm.tokenizer.save_pretrained(tokenizer_dir)
    if fresh or not pairs_file.exists():
        dm = hh_datamodule(
            data_file,
            str(tokenizer_dir),
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            max_rows=max_rows,
        )
        dm.setup()
        rows = [
            {k: list(r[k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}
            for r in dm.datasets["train"]
        ]
        pairs_file.write_text(json.dumps(rows))
    n_pairs = len(json.loads(pairs_file.read_text()))
    if fresh and tokenizer_dir.exists():  # a new tokenizer: the saved policies were sized to the old one
        for old in work.glob("model-*-p*"):
            shutil.rmtree(old)
    model_dir = policy_dir(work, shape, tokenizer_dir, n_positions=max_length)
    meta_file.write_text(json.dumps(meta))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return Assets(
        str(tokenizer_dir),
        model_dir,
        str(pairs_file),
        n_pairs,
        len(tokenizer),
        str(data_file),
        tokenizer.pad_token_id,
    )


def saved_tokenizer(work: Path, source: str | Path) -> str:
    """A tokenizer directory (or hub name) loaded as the package loads it (a pad token added where missing) and
    saved under ``work``, so that both sides read the same files."""
    from dpo_lightning.tokenizer import load_tokenizer

    out = work / f"tokenizer-{Path(source).name}"
    if not out.exists():
        load_tokenizer(str(source)).save_pretrained(out)
    return str(out)


def policy_dir(work: Path, shape: str, tokenizer_dir: str | Path, *, n_positions: int) -> str:
    """A GPT-2 of ``shape`` with seeded random init, sized to the tokenizer, saved with ``save_pretrained`` (once
    per shape, vocabulary and length: the folder name holds them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dir = work / f"model-{shape}-v{len(tokenizer)}-p{n_positions}"
    if model_dir.exists():
        return str(model_dir)
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    settings = shape_config(shape, n_positions, vocab_size=len(tokenizer), **ids)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)  # TRL looks for a processing class next to the weights
    return str(model_dir)
