"""Tokenizers: load one from a local directory (or the hub), or train a small byte-level BPE offline.

A small vocabulary matters on CPU: for the tiny models we train here, the output layer over the vocabulary
dominates the step time (see ../shared/NOTES.md), so a 4k-token BPE trained on the data beats GPT-2's 50k.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKEN = "<|endoftext|>"


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with remote code off; a tokenizer without a pad token pads with EOS."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load a tokenizer from {name_or_path!r}: it is not a local tokenizer directory and "
            f"the Hugging Face hub could not provide it ({type(err).__name__}: {err})"
        ) from None
    return _with_padding(tokenizer)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) on ``texts``; ``<|endoftext|>`` is BOS, EOS and pad."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[SPECIAL_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,  # the underlying tokenizers.Tokenizer
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
    )
    return tokenizer


def _with_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # pad positions are masked out anyway
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> Path:
    """Save next to a run so the run can be reloaded and exported without retraining the tokenizer."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    return directory
