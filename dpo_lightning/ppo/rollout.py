"""PPO's rollouts: sample responses, score them, and lay out the per-token quantities the updates read.

    batch = pack(prompts, continuations, pad_token_id)             # right-padded prompt + response rows
    out = policy_outputs(policy, value_head, batch)                 # per-token log-probs, values, entropies

Sampling itself is :func:`dpo_lightning.sampling.sample` (the project's one sampling path); this file only packs
its output. A packed row is [prompt | response | pad], so default position ids are right; the model runs its
output layer (and the value head reads the hidden state) only at the positions that predict a response token,
the trick :func:`dpo_lightning.logps.response_logps` uses. Results are in *response space* (B, L): row b's
response tokens in columns 0 .. len_b − 1, as :mod:`dpo_lightning.ppo.functions` expects.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from dpo_lightning.logps import token_logps
from dpo_lightning.ppo.functions import entropy_from_logits

Tensor = torch.Tensor


class ValueHead(nn.Module):
    """V(state) = w·h + b on the policy's last hidden state h (the one its output layer reads).

    Shares the policy's trunk, as in Ziegler et al. 2019's released code and TRL's value-head models. Starts at
    w = 0, b = 0 (every value 0), so the first advantages are GAE of the rewards alone (the rewards-to-go at λ = 1).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., H) -> (...)."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


@dataclass
class Packed:
    """Prompt + response rows, right-padded: the input of :func:`policy_outputs`."""

    input_ids: Tensor  # (B, T) long
    attention_mask: Tensor  # (B, T) long
    prompt_lengths: Tensor  # (B,) long
    response_lengths: Tensor  # (B,) long, >= 1

    @property
    def response_mask(self) -> Tensor:
        """(B, L) bool, L = the longest response: true at response tokens (response space)."""
        width = int(self.response_lengths.max())
        return torch.arange(width, device=self.input_ids.device) < self.response_lengths.unsqueeze(-1)

    def predicting(self) -> Tensor:
        """(B, T − 1) bool: positions t whose next token t + 1 is a response token."""
        t = torch.arange(self.input_ids.shape[1] - 1, device=self.input_ids.device)
        start = (self.prompt_lengths - 1).unsqueeze(-1)
        return (t >= start) & (t < start + self.response_lengths.unsqueeze(-1))

    def to(self, device: torch.device | str) -> Packed:
        return Packed(*(getattr(self, f.name).to(device) for f in fields(self)))

    def select(self, rows: Tensor) -> Packed:
        """The given rows, trimmed to their own longest sequence."""
        lengths = self.prompt_lengths[rows] + self.response_lengths[rows]
        width = int(lengths.max())
        return Packed(self.input_ids[rows, :width], self.attention_mask[rows, :width], self.prompt_lengths[rows],
                      self.response_lengths[rows])  # fmt: skip


def pack(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int) -> Packed:
    """Right-padded [prompt | response] rows; every response must hold at least one token."""
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token (sample with max_new_tokens >= 1)")
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[i, : len(p) + len(r)] = 1
    return Packed(ids, mask, torch.tensor([len(p) for p in prompts]), torch.tensor([len(r) for r in responses]))


def to_response_space(flat: Tensor, mask: Tensor) -> Tensor:
    """(N,) values of the response positions, in row-major order, laid out as (B, L) under ``mask``."""
    out = flat.new_zeros(mask.shape)
    out[mask] = flat
    return out


def policy_outputs(model: nn.Module, value_head: nn.Module | None, batch: Packed) -> dict[str, Tensor]:
    """Per-token ``logps``, ``entropy`` and (with a value head) ``values`` of the responses, each (B, L).

    One forward pass of ``model``; its output layer, and the value head, see only the hidden states at the
    positions that predict a response token (a forward pre-hook on the output layer selects them).
    """
    positions = batch.predicting()  # (B, T-1)
    head = model.get_output_embeddings()
    captured: list[Tensor] = []

    def select(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0][:, :-1][positions]  # (N, H): position t predicts token t+1
        captured.append(hidden)
        return (hidden, *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (N, V)
    finally:
        handle.remove()
    if logits.dim() != 2:
        raise RuntimeError(f"{type(model).__name__}: its logits do not come from its output embeddings")
    targets = batch.input_ids[:, 1:][positions]  # (N,)
    mask = batch.response_mask
    out = {
        "logps": to_response_space(token_logps(logits.unsqueeze(0), targets.unsqueeze(0)).squeeze(0), mask),
        "entropy": to_response_space(entropy_from_logits(logits), mask),
    }
    if value_head is not None:
        out["values"] = to_response_space(value_head(captured[0]).float(), mask)
    return out


@dataclass
class Rollout:
    """One rollout batch of one rank, everything the PPO epochs over it read (kept in checkpoints)."""

    batch: Packed
    old_logps: Tensor  # (B, L) under the policy that sampled
    old_values: Tensor  # (B, L)
    advantages: Tensor  # (B, L), whitened
    returns: Tensor  # (B, L) value targets
    stats: dict[str, float]  # reward, kl, kl_coef, ... of the whole rollout batch (all ranks)
    index: int  # which rollout batch of the run this is

    def state_dict(self) -> dict:
        tensors = {f.name: getattr(self.batch, f.name).cpu() for f in fields(self.batch)}
        for name in ("old_logps", "old_values", "advantages", "returns"):
            tensors[name] = getattr(self, name).cpu()
        return {"tensors": tensors, "stats": dict(self.stats), "index": self.index}

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout.from_state_dict(self.state_dict(), device)

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str) -> Rollout:
        t = {k: v.to(device) for k, v in state["tensors"].items()}
        batch = Packed(t["input_ids"], t["attention_mask"], t["prompt_lengths"], t["response_lengths"])
        return cls(batch, t["old_logps"], t["old_values"], t["advantages"], t["returns"], dict(state["stats"]),
                   int(state["index"]))  # fmt: skip
