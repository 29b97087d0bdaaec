"""The log-prob head as a bench switch: ``response_only`` (the shipped default) or ``full`` (the path before it).

``PreferenceModule`` runs the output layer (hidden -> vocabulary) only at positions whose next token is a
response token (``model.score_response_only``, :func:`dpo_lightning.logps.response_logps`). The bench measures it
against ``full``, which projects every position onto the vocabulary and takes the log-softmax over all of them,
as the package did first (and as ``model.score_response_only: false`` still does).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from dpo_lightning.logps import sequence_logps

HEADS = ("response_only", "full")


def full_logps(self: Any, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sequence log-probs (2B,) from the full (2B, T, V) logits: every position through the output layer."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"], "sum")[0]  # sums, as concatenated_logps returns


@contextlib.contextmanager
def patched_head(name: str):
    """Run PreferenceModule with the ``response_only`` (shipped) or the ``full`` log-prob head."""
    from dpo_lightning.module import PreferenceModule

    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; one of {HEADS}")
    original = PreferenceModule.concatenated_logps
    if name == "full":
        PreferenceModule.concatenated_logps = full_logps
    try:
        yield
    finally:
        PreferenceModule.concatenated_logps = original
