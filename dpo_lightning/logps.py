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

Every head reads the scored tokens as (source, target, sequence) triples: the position whose logits predict, the
token, the sequence it counts for. A padded batch's triples come from its labels (:func:`score_triples`); a packed
or prompt-shared batch (``data/packing.py``) carries its own, and :func:`layout_inputs` builds the attention mask
its kernel takes from its group and branch ids. :func:`batch_logps` dispatches on the batch.
"""

from __future__ import annotations

import contextlib
import inspect
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


def score_triples(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The padded batch's scored tokens as (source, target, sequence) triples, each (N,): position t of row b
    (flat index b·T + t) predicts labels[b, t + 1] of sequence b, for every label that is not ``IGNORE_INDEX``;
    in row-major order, so the selected hidden states are those ``hidden[:, :-1][mask]`` selects, in its order."""
    width = labels.shape[1]
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows, columns = scored.nonzero(as_tuple=True)
    return rows * width + columns, targets[scored], rows


@contextlib.contextmanager
def output_layer_on(model: nn.Module, source: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's output layer sees ``hidden.flatten(0, 1)[source]`` (N, H), not (R, L, H).

    A forward pre-hook does the selection inside the model's own forward, so it works for any Hugging Face causal
    LM whose logits are ``get_output_embeddings()(hidden)`` followed by element-wise steps, and under FSDP2 (the
    layer's weights are gathered when the hook runs).
    """
    head = model.get_output_embeddings()

    def select(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].flatten(0, 1)[source], *args[1:])

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
    model: nn.Module, source: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the model's output layer scores ``hidden.flatten(0, 1)[source]`` in chunks.

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
        rows = hidden.flatten(0, 1)[source]
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


def sum_by_sequence(
    per_token: torch.Tensor, sequence: torch.Tensor, sequences: int, aggregation: Aggregation = "sum"
) -> torch.Tensor:
    """(sequences,) sums (or means) of per-token log-probs (N,) by their sequence ids (N,)."""
    totals = per_token.new_zeros(sequences).index_add(0, sequence, per_token)
    if aggregation == "mean":
        totals = totals / torch.bincount(sequence, minlength=sequences).clamp(min=1)
    return totals


def gathered_logps(
    logits: torch.Tensor,
    triples: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sequences: int,
    aggregation: Aggregation = "sum",
) -> torch.Tensor:
    """Sequence log-probs (sequences,) from full logits (R, L, V), read at the triples' source positions."""
    source, target, sequence = triples
    per_token = token_logps(logits.flatten(0, 1)[source].unsqueeze(0), target.unsqueeze(0)).squeeze(0)
    return sum_by_sequence(per_token, sequence, sequences, aggregation)


def triple_logps(
    model: nn.Module,
    inputs: dict[str, Any],
    triples: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sequences: int,
    aggregation: Aggregation = "sum",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sequence log-probs (sequences,) of the scored tokens ``triples`` = (source, target, sequence), the output
    layer run only at the ``source`` positions (flat indices into the model's (R, L) positions), at once or
    ``chunk_size`` at a time (:func:`chunked_output_layer`). ``inputs`` are the model's keyword inputs. A model
    whose forward bypassed its output layer's input (full (R, L, V) logits came back) is scored on those."""
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"logp_aggregation must be 'sum' or 'mean', got {aggregation!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"model.logp_chunk_size must be a positive integer or null, got {chunk_size!r}")
    source, target, sequence = triples
    found: dict[str, torch.Tensor] = {}
    if chunk_size is None:
        with output_layer_on(model, source):
            logits = model(**inputs).logits  # (N, V)
    else:
        with chunked_output_layer(model, source, target, chunk_size) as found:
            logits = model(**inputs).logits  # (1, V): the probe
    if logits.dim() == 3:
        return gathered_logps(logits, triples, sequences, aggregation)
    if chunk_size is None:
        per_token = token_logps(logits.unsqueeze(0), target.unsqueeze(0)).squeeze(0)  # (N,)
    elif torch.equal(logits.detach().float(), found["probe"].float()):
        per_token = found["per_token"]
    else:
        raise ConfigError(
            f"model.logp_chunk_size: {type(model).__name__}'s forward changes the logits after its output layer "
            "(e.g. softcapping or scaling), which the chunked head would skip; set model.logp_chunk_size: null"
        )
    return sum_by_sequence(per_token, sequence, sequences, aggregation)


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
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    return triple_logps(model, inputs, score_triples(labels), labels.shape[0], aggregation, chunk_size)


# --------------------------------------------------------------------------- laid-out batches (data/packing.py)
LAYOUT_ATTENTION = ("sdpa", "eager", "flex_attention")  # the kernels that take a 4D mask or a BlockMask


def attention_kernel(model: nn.Module) -> str:
    """The model's attention implementation, when it can run a packed / prompt-shared batch: its forward takes
    ``position_ids`` and its kernel a 4D mask (transformers passes a 4D mask or a BlockMask through as it is);
    else a ConfigError naming the keys."""
    base = model
    while True:  # through a LoRA policy (peft's get_base_model) and its adapters-off reference (its .policy)
        inner = base.get_base_model() if hasattr(base, "get_base_model") else base.__dict__.get("policy")
        if not isinstance(inner, nn.Module) or inner is base:
            break
        base = inner
    kernel = str(getattr(base.config, "_attn_implementation", None) or "eager")
    if kernel not in LAYOUT_ATTENTION:
        raise ConfigError(
            f"data.packing / data.share_prompt need an attention that takes a block mask ({', '.join(LAYOUT_ATTENTION)}"
            f"); the model runs {kernel!r}: set model.attn_implementation: sdpa, or turn both data keys off"
        )
    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise ConfigError(
            f"data.packing / data.share_prompt: {type(base).__name__}.forward takes no position_ids, so positions "
            "cannot restart per sequence; turn both data keys off for this model"
        )
    return kernel


def layout_allowed(group_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """(R, 1, L, L) bool, True where query q may attend key k: same group, k ≤ q, and the key is a prompt (or
    plain) token or on the query's own branch (data/packing.py)."""
    width = group_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=group_ids.device).tril()
    same = group_ids[:, :, None] == group_ids[:, None, :]
    key, query = branch_ids[:, None, :], branch_ids[:, :, None]
    return (same & causal & ((key == 0) | (key == query)))[:, None]


def layout_mask_mod(group_ids: torch.Tensor, branch_ids: torch.Tensor) -> Callable[..., Any]:
    """:func:`layout_allowed`'s rule as a FlexAttention ``mask_mod(b, h, q, k)``."""

    def allowed(b: Any, h: Any, q: Any, k: Any) -> Any:
        key = branch_ids[b, k]
        return (group_ids[b, q] == group_ids[b, k]) & (k <= q) & ((key == 0) | (key == branch_ids[b, q]))

    return allowed


def layout_block_mask(group_ids: torch.Tensor, branch_ids: torch.Tensor) -> Any:
    """:func:`layout_allowed` as a FlexAttention BlockMask (for ``attn_implementation: flex_attention``)."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = group_ids.shape
    return create_block_mask(layout_mask_mod(group_ids, branch_ids), rows, None, width, width, device=group_ids.device)


def layout_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model's keyword inputs for a laid-out batch: ids, explicit position ids, and the mask its kernel takes:
    bool (True = attend) for sdpa, additive (0 / dtype min) for eager, a BlockMask for flex_attention."""
    kernel = attention_kernel(model)
    group_ids, branch_ids = batch["group_ids"], batch["branch_ids"]
    if kernel == "flex_attention":
        if group_ids.device.type == "cpu" and torch.is_grad_enabled():
            raise ConfigError(
                "model.attn_implementation: flex_attention has no backward on CPU (torch "
                f"{torch.__version__}); with data.packing / data.share_prompt on CPU use sdpa"
            )
        mask = layout_block_mask(group_ids, branch_ids)
    else:
        mask = layout_allowed(group_ids, branch_ids)
        if kernel == "eager":
            dtype = model.get_output_embeddings().weight.dtype  # a LoRA reference wrapper owns no parameters
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": mask}


def batch_logps(
    model: nn.Module, batch: dict[str, torch.Tensor], response_only: bool = True, chunk_size: int | None = None
) -> torch.Tensor:
    """Sequence log-prob sums (2B,) of a collated batch, padded (``labels``) or laid out (``score_source``)."""
    if "score_source" not in batch:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if response_only:
            return response_logps(model, ids, mask, labels, "sum", chunk_size)
        return sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels, "sum")[0]  # (2B, T, V)
    inputs = layout_inputs(model, batch)
    triples = (batch["score_source"], batch["score_target"], batch["score_sequence"])
    sequences = batch["response_lengths"].shape[0]
    if response_only:
        return triple_logps(model, inputs, triples, sequences, "sum", chunk_size)
    return gathered_logps(model(**inputs).logits, triples, sequences)


def batch_response_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(2B,) response tokens per sequence of a padded or laid-out batch."""
    return batch["response_lengths"] if "score_source" in batch else response_lengths(batch["labels"])
