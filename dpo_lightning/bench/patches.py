"""Bench switches of the step: the log-prob head (``response_only``, shipped, or ``full``, the path before it)
and how per-token log-probs are taken (``gather_lse``, shipped, or ``log_softmax``).

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

from dpo_lightning import logps
from dpo_lightning.logps import sequence_logps

HEADS = ("response_only", "full")


def full_logps(self: Any, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sequence log-probs (2B,) from the full (2B, T, V) logits: every position through the output layer."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"], "sum")[0]  # sums, as concatenated_logps returns


@contextlib.contextmanager
def _swapped(owner: Any, attribute: str, replacement: Any):
    """``owner.attribute`` replaced by ``replacement`` (None: left as it is) inside the block."""
    original = getattr(owner, attribute)
    if replacement is not None:
        setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def patched_head(name: str) -> contextlib.AbstractContextManager:
    """Run PreferenceModule with the ``response_only`` (shipped) or the ``full`` log-prob head."""
    from dpo_lightning.module import PreferenceModule

    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; one of {HEADS}")
    return _swapped(PreferenceModule, "concatenated_logps", full_logps if name == "full" else None)


def full_log_softmax_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook alternative to ``logps.token_logps``: build the (B, T, V) log-softmax, then gather."""
    return torch.gather(logits.log_softmax(-1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def logps_variant(name: str) -> contextlib.AbstractContextManager:
    """Swap how per-token log-probs are computed: ``gather_lse`` (the package's), ``log_softmax``."""
    if name not in ("gather_lse", "log_softmax"):
        raise ValueError(f"unknown logps variant {name!r}")
    return _swapped(logps, "token_logps", full_log_softmax_token_logps if name == "log_softmax" else None)
