"""Tokenizers: load one from a local directory (or the hub), or train a small one offline.

A small vocabulary matters on CPU: for the tiny models we train here, the output layer over the vocabulary
dominates the step time (see ../shared/NOTES.md), so a 4k-token BPE trained on the data beats GPT-2's 50k.

``train_bpe_tokenizer`` trains the GPT-2-style byte-level BPE the runs use when ``data.tokenizer`` is null.
``train_family_tokenizer`` trains a small tokenizer built the way a model family's is, for tests of every family
without the hub: ``gpt2`` (byte-level, adds no BOS), ``llama3`` (byte-level, Llama 3's pre-tokenizer regex, adds
BOS), ``qwen2`` (byte-level, no BOS at all, ChatML tokens) and ``llama2`` (SentencePiece-style BPE like Llama 2's
and Mistral's: "▁" for spaces with a dummy prefix, byte fallback, adds BOS); ``CHAT_TEMPLATES`` holds a
Llama-3-style and a ChatML chat template for them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dpo_lightning.errors import ConfigError

SPECIAL_TOKEN = "<|endoftext|>"


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with remote code off; a tokenizer without a pad token pads with EOS. One
    that cannot be loaded is a ``ConfigError`` (the CLI prints it as one line, not a traceback)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"could not load a tokenizer from {name_or_path!r}: it is not a local tokenizer directory and "
            f"the Hugging Face hub could not provide it ({type(err).__name__}: {err})"
        ) from None
    return _with_padding(tokenizer)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, special_tokens: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) on ``texts``; ``<|endoftext|>`` is BOS, EOS and pad (and comes first
    among any other ``special_tokens``). Like GPT-2's, it writes no BOS before a text."""
    from tokenizers import ByteLevelBPETokenizer

    specials = list(dict.fromkeys([SPECIAL_TOKEN, *(special_tokens or [])]))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,  # the underlying tokenizers.Tokenizer
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
    )
    return tokenizer


# Llama 3's pre-tokenizer split (tokenizer.json of Meta-Llama-3): up to 3 digits, letters with one leading
# non-letter, runs of punctuation with their newlines
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
CHAT_TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}
TEMPLATE_TOKENS = {
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "chatml": ["<|im_start|>", "<|im_end|>"],
}
# family -> (bos, eos, pad, unk, default chat template); None: the family has no such token
FAMILIES = {
    "gpt2": (SPECIAL_TOKEN, SPECIAL_TOKEN, SPECIAL_TOKEN, SPECIAL_TOKEN, None),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", None, None, "llama3"),
    "qwen2": (None, "<|im_end|>", "<|endoftext|>", None, "chatml"),
    "llama2": ("<s>", "</s>", None, "<unk>", None),
}


def train_family_tokenizer(
    texts: Iterable[str], family: str, vocab_size: int = 1024, chat_template: str | None = "default"
) -> PreTrainedTokenizerFast:
    """A small tokenizer trained on ``texts`` and built like ``family``'s (see the module docstring), in about a
    second. ``chat_template``: ``"default"`` (the family's own, none for gpt2/llama2), ``None``, a name in
    ``CHAT_TEMPLATES`` (its special tokens are added to the vocabulary) or a Jinja template. Tokenizers without a
    pad token pad with EOS, as ``load_tokenizer`` makes them."""
    from tokenizers import processors

    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; use one of {', '.join(FAMILIES)}")
    bos, eos, pad, unk, default = FAMILIES[family]
    template = default if chat_template == "default" else chat_template
    specials = list(dict.fromkeys(t for t in (unk, bos, eos, pad, *TEMPLATE_TOKENS.get(template or "", [])) if t))
    if family == "gpt2":
        tokenizer = train_bpe_tokenizer(texts, vocab_size, specials).backend_tokenizer
    elif family == "llama2":
        tokenizer = _sentencepiece_bpe(texts, vocab_size, specials)
    else:
        tokenizer = _llama3_bpe(texts, vocab_size, specials)
    if bos is not None and family != "gpt2":  # the tokenizer writes BOS before every text
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk
    )
    out.chat_template = CHAT_TEMPLATES.get(template, template) if template else None
    return _with_padding(out)


def _llama3_bpe(texts: Iterable[str], vocab_size: int, specials: list[str]) -> Any:
    """A byte-level BPE with Llama 3's pre-tokenizer split (Qwen 2's is the same up to details)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    )
    return tokenizer


def _sentencepiece_bpe(texts: Iterable[str], vocab_size: int, specials: list[str]) -> Any:
    """A BPE laid out like Llama 2's SentencePiece model: specials, the 256 byte-fallback pieces <0x00>..<0xFF>,
    then pieces learned on words with a "▁" prefix (no piece spans two words); spaces become "▁" and a "▁" is
    prepended to the text (SentencePiece's dummy prefix), as Llama 2's tokenizer.json does it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=max(vocab_size - 256, 2 * len(specials)), special_tokens=specials)
    learner.train_from_iterator(texts, trainer)  # the 256 byte pieces count towards vocab_size
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate([*specials, *(f"<0x{b:02X}>" for b in range(256))])}
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=specials[0], byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(bpe)
    tokenizer.add_special_tokens(specials)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
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
