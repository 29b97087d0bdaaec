"""Sequence log-probabilities of responses under a causal LM.

A causal LM's logits at position t predict token t+1, so labels are shifted by one against logits. Tokens
whose label is ``IGNORE_INDEX`` (the prompt and the padding) contribute nothing.

``response_logps`` scores a model on a batch without computing the logits nobody reads: the output layer
(hidden -> vocabulary) runs only at positions whose next token is a response token. On HH pairs about one
position in six is one, and at small model sizes the output layer is most of the step, so this is the largest
single speed and memory lever we measured (reports/bench/README.md). With ``chunk_size`` set, those positions go
through the output layer and the log-softmax ``chunk_size`` at a time, each chunk recomputed in the backward
(:func:`chunked_token_logps`), so the (positions x vocabulary) logits never exist at once: at a large vocabulary they
are the step's largest tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpo_lightning.errors import ConfigError

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


def chunked_token_logps(
    project: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Per-position log p(target), (N,), of ``project(hidden)`` logits, ``chunk_size`` rows at a time.

    ``project`` maps hidden states (n, H) to logits (n, V) (the output layer). With gradients on, each chunk runs
    under ``torch.utils.checkpoint``: its logits are freed after the chunk's gather − logsumexp and recomputed in the
    backward, so neither pass holds more than one chunk's (chunk_size, V) logits. The maths per row is
    :func:`token_logps`'s (float32 gather − logsumexp).
    """

    def piece(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_logps(project(rows).unsqueeze(0), labels.unsqueeze(0)).squeeze(0)

    parts = []
    for start in range(0, max(len(hidden), 1), chunk_size):  # one (empty) chunk when nothing is scored
        rows, labels = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            parts.append(checkpoint(piece, rows, labels, use_reentrant=False))
        else:
            parts.append(piece(rows, labels))
    return torch.cat(parts)


@contextlib.contextmanager
def chunked_output_layer(
    model: nn.Module, positions: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the model's output layer scores ``hidden[:, :-1][positions]`` in chunks.

    Its forward is swapped for one that puts the per-position log-probs (N,) of ``targets`` (N,) in the yielded
    dict (``"per_token"``) and returns the logits of the first position only (``"probe"``, (1, V)), so the model's
    forward still runs its own steps after the output layer, on one row. The swap happens inside the model's
    forward, so under FSDP2 the layer's weights are gathered when it runs, in the forward and the recompute.
    """
    head = model.get_output_embeddings()
    own = head.__dict__.get("forward")  # an instance-level forward (e.g. an accelerate hook) to restore
    project = head.forward
    found: dict[str, torch.Tensor] = {}

    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = hidden[:, :-1][positions]  # position t predicts token t+1
        found["per_token"] = chunked_token_logps(lambda x: project(x, *args, **kwargs), rows, targets, chunk_size)
        with torch.no_grad():
            found["probe"] = project(rows[:1], *args, **kwargs)
        return found["probe"]

    head.forward = forward
    try:
        yield found
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def response_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    aggregation: Aggregation = "sum",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sequence log-probs (B,), as :func:`sequence_logps` of the model's logits, scoring response positions only.

    Args:
        model: a Hugging Face causal LM.
        input_ids, attention_mask: (B, T) model inputs.
        labels: (B, T) with prompt and padding set to ``IGNORE_INDEX``.
        aggregation: ``sum`` or ``mean`` over the response tokens, as in :func:`sequence_logps`.
        chunk_size: ``None`` projects all response positions at once; a number projects them that many at a time
            (:func:`chunked_output_layer`), the same log-probs with one chunk's logits in memory.
    """
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"logp_aggregation must be 'sum' or 'mean', got {aggregation!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"model.logp_chunk_size must be a positive integer or null, got {chunk_size!r}")
    targets = labels[:, 1:]  # (B, T-1)
    positions = targets != IGNORE_INDEX
    found: dict[str, torch.Tensor] = {}
    if chunk_size is None:
        with output_layer_on(model, positions):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (N, V)
    else:
        with chunked_output_layer(model, positions, targets[positions], chunk_size) as found:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (1, V): the probe
    if logits.dim() == 3:  # the model did not pass its hidden states through the output layer: full logits came back
        return sequence_logps(logits, labels, aggregation)[0]
    if chunk_size is None:
        per_token = token_logps(logits.unsqueeze(0), targets[positions].unsqueeze(0)).squeeze(0)  # (N,)
    elif torch.equal(logits.detach().float(), found["probe"].float()):
        per_token = found["per_token"]
    else:
        raise ConfigError(
            f"model.logp_chunk_size: {type(model).__name__}'s forward changes the logits after its output layer "
            "(e.g. softcapping or scaling), which the chunked head would skip; set model.logp_chunk_size: null"
        )
    totals = per_token.new_zeros(targets.shape[0]).index_add(0, positions.nonzero()[:, 0], per_token)
    if aggregation == "mean":
        totals = totals / positions.sum(-1).clamp(min=1)
    return totals
