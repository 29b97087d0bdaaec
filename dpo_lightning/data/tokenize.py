"""Tokenize preference pairs and collate them into one concatenated batch.

Prompt and responses are tokenized separately and then concatenated, so the boundary between them is exact
(tokenizing ``prompt + response`` as one string can merge the last prompt token with the first response
token). The prompt gets the tokenizer's own special tokens (a BOS for tokenizers that use one, never a
trailing EOS); each response gets none, and then exactly one EOS at its end.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from dpo_lightning.logps import IGNORE_INDEX

TruncationMode = Literal["keep_end", "keep_start"]


def prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's leading special tokens (BOS), never a trailing EOS."""
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return [seq[:-1] if eos is not None and seq and seq[-1] == eos else seq for seq in ids]


def response_ids(tokenizer: Any, responses: list[str]) -> list[list[int]]:
    """Token ids of each response, no special tokens, then one EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one so responses can be terminated")
    ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [seq + [tokenizer.eos_token_id] for seq in ids]


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: TruncationMode = "keep_end",
) -> tuple[list[int], list[int], list[int]]:
    """Fit prompt + the longer response into ``max_length`` tokens.

    First the prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its last tokens, right for dialogue
    where the last turns matter; ``keep_start`` its first), then, if still too long, both responses are cut at
    their end to ``max_length − len(prompt)``. A response cut this way loses its EOS, as it should: it did not
    end there.
    """
    if len(prompt) + max(len(chosen), len(rejected)) > max_length and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if truncation_mode == "keep_end" else prompt[:max_prompt_length]
    budget = max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget]


class PairCollator:
    """Pad a list of tokenized pairs into one batch of 2B sequences: the B chosen, then the B rejected.

    Putting both halves in one tensor lets the model score them in one forward pass. Output keys:
    ``input_ids`` and ``attention_mask`` (2B, T); ``labels`` (2B, T) with prompt and padding set to
    ``IGNORE_INDEX``; ``index`` (B,) the dataset rows, for error messages.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, labels = [], []
        for key in ("chosen_input_ids", "rejected_input_ids"):
            for f in features:
                prompt, response = list(f["prompt_input_ids"]), list(f[key])
                sequences.append(prompt + response)
                labels.append([IGNORE_INDEX] * len(prompt) + response)
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            label_ids[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(seq)] = 1
        index = torch.tensor([int(f.get("index", -1)) for f in features], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids, "index": index}
