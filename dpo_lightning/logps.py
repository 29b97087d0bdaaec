"""Sequence log-probabilities of responses under a causal LM.

A causal LM's logits at position t predict token t+1, so labels are shifted by one against logits. Tokens
whose label is ``IGNORE_INDEX`` (the prompt and the padding) contribute nothing.

``response_logps`` scores a model on a batch without computing the logits nobody reads: the output layer
(hidden -> vocabulary) runs only at positions whose next token is a response token. On HH pairs about one
position in six is one, and at small model sizes the output layer is most of the step, so this is the largest
single speed and memory lever we measured (reports/bench/README.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

IGNORE_INDEX = -100
Aggregation = Literal["sum", "mean"]


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    """(B,) response tokens scored per row of ``labels`` (B, T): the counts the sums of :func:`sequence_logps`
    run over (position t predicts token t+1, so the first label is never scored)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log p(label | prefix), shape (B, T), for logits (B, T, V) already aligned with labels (B, T).

    Computed as the gathered logit minus the logsumexp over the vocabulary, which never builds the
    (B, T, V) log-softmax tensor. For half-precision logits the logsumexp is taken one row at a time in
    float32, so the float32 copy is one sequence long, not the whole batch.
    """
    safe_labels = labels.clamp(min=0).unsqueeze(-1)  # IGNORE_INDEX -> 0; the caller drops those with `where`
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
    # `where`, not `* mask`: a -inf log-prob at a prompt or padding position times 0 is NaN, not 0
    per_token = torch.where(mask, token_logps(logits, labels), 0.0)
    n_tokens = mask.sum(-1)
    total = per_token.sum(-1)
    if aggregation == "sum":
        return total, n_tokens
    if aggregation == "mean":
        return total / n_tokens.clamp(min=1), n_tokens
    raise ValueError(f"logp_aggregation must be 'sum' or 'mean', got {aggregation!r}")


@contextlib.contextmanager
def output_layer_on(model: nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's output layer sees ``hidden[:, :-1][positions]`` (N, H), not (B, T, H).

    A forward pre-hook does the selection inside the model's own forward, so it works for any Hugging Face causal
    LM whose logits are ``get_output_embeddings()(hidden)`` followed by element-wise steps, and under FSDP2 (the
    layer's weights are gathered when the hook runs).
    """
    head = model.get_output_embeddings()

    def select(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][:, :-1][positions], *args[1:])  # position t predicts token t+1

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def response_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    aggregation: Aggregation = "sum",
) -> torch.Tensor:
    """Sequence log-probs (B,), as :func:`sequence_logps` of the model's logits, scoring response positions only.

    Args:
        model: a Hugging Face causal LM.
        input_ids, attention_mask: (B, T) model inputs.
        labels: (B, T) with prompt and padding set to ``IGNORE_INDEX``.
        aggregation: ``sum`` or ``mean`` over the response tokens, as in :func:`sequence_logps`.
    """
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"logp_aggregation must be 'sum' or 'mean', got {aggregation!r}")
    targets = labels[:, 1:]  # (B, T-1)
    positions = targets != IGNORE_INDEX
    with output_layer_on(model, positions):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (N, V)
    if logits.dim() == 3:  # the model did not pass its hidden states through the output layer: full logits came back
        return sequence_logps(logits, labels, aggregation)[0]
    per_token = token_logps(logits.unsqueeze(0), targets[positions].unsqueeze(0)).squeeze(0)  # (N,)
    totals = per_token.new_zeros(targets.shape[0]).index_add(0, positions.nonzero()[:, 0], per_token)
    if aggregation == "mean":
        totals = totals / positions.sum(-1).clamp(min=1)
    return totals
