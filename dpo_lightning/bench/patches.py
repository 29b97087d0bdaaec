"""Proposed changes to the step, measured here before they go into ``module.py`` (see reports/bench/README.md).

``response_only_logps`` is a drop-in for ``PreferenceModule.concatenated_logps``: the output layer (hidden →
vocabulary) and the log-softmax run only at the positions whose next token is a response token, instead of at
all 2B·T positions. On HH pairs at max_length 512 about 1 position in 9 is one (the rest are prompt and padding),
and at these model sizes the output layer is most of the step, so the step does a fraction of the work and never
builds the (2B, T, V) logits. The sum is over the same tokens, so the log-probs are the same up to float
rounding (the matmul sees fewer rows).

It works for any Hugging Face causal LM whose logits are ``get_output_embeddings()(hidden)`` followed by
element-wise steps (GPT-2, Llama, Gemma's soft-capping): a forward pre-hook on the output layer hands it only
the selected rows, inside the model's own forward, so FSDP2 has gathered the head's weights when it runs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from dpo_lightning.logps import IGNORE_INDEX, sequence_logps, token_logps


@contextlib.contextmanager
def head_on_rows(model: nn.Module, rows: torch.Tensor):
    """Within the block, the model's output layer sees ``hidden[:, :-1][rows]`` (N, H) instead of (B, T, H)."""
    head = model.get_output_embeddings()

    def select(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        return (hidden[:, :-1][rows], *args[1:])  # position t predicts token t+1

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def response_only_logps(self: Any, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sequence log-probs (2B,) of the chosen-then-rejected rows, scoring only the response positions."""
    targets = batch["labels"][:, 1:]  # (2B, T-1)
    rows = targets != IGNORE_INDEX
    with head_on_rows(model, rows):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, V)
    if logits.dim() == 3:  # the model never called its output layer on the hidden states: it scored every position
        return sequence_logps(logits, batch["labels"], self.hparams.logp_aggregation)[0]
    per_token = token_logps(logits.unsqueeze(0), targets[rows].unsqueeze(0)).squeeze(0)  # (N,)
    row_of = rows.nonzero()[:, 0]
    logps = per_token.new_zeros(targets.shape[0]).index_add(0, row_of, per_token)
    if self.hparams.logp_aggregation == "mean":
        logps = logps / rows.sum(-1).clamp(min=1)
    return logps


@contextlib.contextmanager
def patched_head(name: str):
    """Run PreferenceModule with ``full`` (as shipped) or ``response_only`` (proposed) log-prob heads."""
    from dpo_lightning.module import PreferenceModule

    original = PreferenceModule.concatenated_logps
    if name == "response_only":
        PreferenceModule.concatenated_logps = response_only_logps
    elif name != "full":
        raise ValueError(f"unknown head {name!r}")
    try:
        yield
    finally:
        PreferenceModule.concatenated_logps = original
