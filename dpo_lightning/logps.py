"""Sequence log-probabilities of responses under a causal LM.

A causal LM's logits at position t predict token t+1, so labels are shifted by one against logits. Tokens
whose label is ``IGNORE_INDEX`` (the prompt and the padding) contribute nothing.
"""

from __future__ import annotations

from typing import Literal

import torch

IGNORE_INDEX = -100
Aggregation = Literal["sum", "mean"]


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log p(label | prefix), shape (B, T), for logits (B, T, V) already aligned with labels (B, T).

    Computed as the gathered logit minus the logsumexp over the vocabulary, which never builds the
    (B, T, V) log-softmax tensor. For half-precision logits the logsumexp is taken one row at a time in
    float32, so the float32 copy is one sequence long, not the whole batch.
    """
    safe_labels = labels.clamp(min=0).unsqueeze(-1)  # IGNORE_INDEX -> 0; masked out by the caller
    picked = torch.gather(logits, -1, safe_labels).squeeze(-1).float()  # (B, T)
    if logits.dtype == torch.float32 or logits.dtype == torch.float64:
        lse = torch.logsumexp(logits, dim=-1)
    else:
        lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    return picked - lse


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    aggregation: Aggregation = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum (or per-token mean) of response-token log-probs per sequence.

    Args:
        logits: (B, T, V) model outputs for input ids of length T.
        labels: (B, T) the input ids with prompt and padding positions set to ``IGNORE_INDEX``.
        aggregation: ``"sum"`` gives log π(y|x), the quantity in the DPO paper; ``"mean"`` divides by the
            number of response tokens (some IPO implementations use it).

    Returns:
        (logps, n_tokens): both (B,); n_tokens counts the response tokens scored.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    logits = logits[:, :-1, :]  # position t predicts token t+1
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX  # (B, T-1)
    per_token = token_logps(logits, labels) * mask
    n_tokens = mask.sum(-1)
    total = per_token.sum(-1)
    if aggregation == "sum":
        return total, n_tokens
    if aggregation == "mean":
        return total / n_tokens.clamp(min=1), n_tokens
    raise ValueError(f"logp_aggregation must be 'sum' or 'mean', got {aggregation!r}")
