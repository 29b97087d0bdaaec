"""Batched sampling from a causal LM, scoring given continuations under any model, and preference data.

    from dpo_lightning.sampling import sample, sequence_logprob, sample_preference_pairs
    gen = torch.Generator().manual_seed(0)
    out = sample(policy, prompts, max_new_tokens=32, eos_token_id=tok.eos_token_id, generator=gen)
    ref_logps = sequence_logprob(reference, prompts, out.continuations)   # (N,)
    kl = (out.logps - ref_logps).mean()                                   # KL(π ‖ π_ref), sequence level
    pairs, rewards = sample_preference_pairs(policy, tok, prompt_texts, reward_fn, max_new_tokens=32)

Prompts are lists of token ids of any lengths. A batch is left-padded so every row's next token sits in the
last column; position ids are counted from each row's first real token, so a padded row sees exactly what it
would see alone. Rows stop at EOS (which is kept as the last token of their continuation); the loop stops when
every row has stopped or ``max_new_tokens`` is reached.

``Samples.logps`` is log π(y|x) under the model itself (temperature 1, no top-k), whatever the sampling
temperature: that is the quantity a KL estimate needs, and it equals :func:`sequence_logprob` on the same
tokens. Only at temperature 1 without top-k is it also the log-prob of the distribution actually sampled.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dpo_lightning.logps import IGNORE_INDEX, Aggregation, sequence_logps

TokenIds = Sequence[int] | torch.Tensor


@dataclass
class Samples:
    """What :func:`sample` returns, one entry per prompt, in the prompts' order."""

    continuations: list[list[int]]  # sampled token ids, EOS included when the row emitted it
    logps: torch.Tensor  # (N,) float32: log π(continuation | prompt), at temperature 1
    finished: torch.Tensor  # (N,) bool: the row emitted EOS before max_new_tokens


def _as_list(ids: TokenIds) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x calls the KV cache argument ``cache``; earlier releases ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, P), real tokens flush right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token; pads get 0 (they are masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    """Next token ids (B,) from last-position logits (B, V)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (B, 1) smallest logit kept
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if generator is not None and generator.device != probs.device:
        # draw where the generator lives, so a seed gives the same tokens whatever device the model is on
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _sample_batch(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    eos_token_id: int | None,
    pad_token_id: int,
    use_cache: bool,
    generator: torch.Generator | None,
    stop_when_done: bool = True,
) -> Samples:
    device = _model_device(model)
    ids, mask = _left_pad(prompts, pad_token_id, device)
    n = ids.shape[0]
    cache_name = _cache_kwarg(model)
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    new_tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(n, dtype=torch.float32, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    lengths = torch.zeros(n, dtype=torch.long, device=device)

    step_ids, cache = ids, None
    for t in range(max_new_tokens):
        kwargs = {"attention_mask": mask, "use_cache": use_cache}
        if use_cache:
            kwargs["position_ids"] = _positions(mask)[:, -step_ids.shape[1] :]
            kwargs[cache_name] = cache
        else:
            kwargs["position_ids"] = _positions(mask)
        if keep_last:
            kwargs["logits_to_keep"] = 1  # only the last position's logits are needed: skips V×T work
        out = model(input_ids=step_ids, **kwargs)
        logits = out.logits[:, -1, :].float()  # (B, V)
        if use_cache:
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)

        nxt = _draw(logits, temperature, top_k, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        token_logp = torch.log_softmax(logits, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        alive = ~finished
        logps += torch.where(alive, token_logp, torch.zeros_like(token_logp))
        lengths += alive.long()
        new_tokens[:, t] = nxt
        if eos_token_id is not None:
            finished |= alive & (nxt == eos_token_id)
        if stop_when_done and bool(finished.all()):
            break
        # stopped rows keep being fed pads; their outputs are discarded, masking them would only cost time
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_ids = nxt.unsqueeze(-1) if use_cache else torch.cat([step_ids, nxt.unsqueeze(-1)], dim=1)

    continuations = [new_tokens[i, : lengths[i]].tolist() for i in range(n)]
    return Samples(continuations, logps.cpu(), finished.cpu())


def sample(
    model: nn.Module,
    prompts: Sequence[TokenIds],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    batch_size: int = 256,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stop_when_done: bool = True,
) -> Samples:
    """Sample one continuation per prompt.

    Args:
        model: a Hugging Face causal LM (anything whose forward takes input_ids, attention_mask, position_ids
            and returns ``.logits``). It is put in eval mode for the call and restored afterwards.
        prompts: token ids per prompt (lists or 1-D tensors), each at least one token long. Repeat a prompt
            to draw several samples for it.
        max_new_tokens: the most tokens sampled per prompt.
        temperature: divides the logits before sampling; 0 means greedy.
        top_k: sample only among the k most likely tokens; ``None`` samples from the whole vocabulary.
        eos_token_id: a row stops after emitting it; ``None`` always samples ``max_new_tokens``.
        pad_token_id: fills the left padding and stopped rows; defaults to ``eos_token_id`` (or 0).
        batch_size: prompts per forward pass.
        use_cache: reuse keys and values of earlier positions (KV cache); ``False`` recomputes the whole
            sequence each step and gives the same tokens, slower. Kept for testing and for models without one.
        generator: a seeded ``torch.Generator`` makes the draws reproducible; ``None`` uses the global RNG.
        stop_when_done: end a batch's loop once every row has stopped; ``False`` always runs ``max_new_tokens``
            forward steps, as processes of a sharded (FSDP) model must make the same calls (the tokens of a
            single batch are the same; later batches draw from a generator that has been advanced further).

    Returns:
        :class:`Samples` with the continuations, their log-probs at temperature 1, and whether they ended.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rows = [_as_list(p) for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token (prepend a BOS token to empty prompts)")
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    was_training = model.training
    model.eval()
    try:
        parts = [
            _sample_batch(
                model,
                rows[i : i + batch_size],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                eos_token_id=eos_token_id,
                pad_token_id=pad,
                use_cache=use_cache,
                generator=generator,
                stop_when_done=stop_when_done,
            )
            for i in range(0, len(rows), batch_size)
        ]
    finally:
        model.train(was_training)
    return Samples(
        continuations=[c for p in parts for c in p.continuations],
        logps=torch.cat([p.logps for p in parts]) if parts else torch.zeros(0),
        finished=torch.cat([p.finished for p in parts]) if parts else torch.zeros(0, dtype=torch.bool),
    )


@torch.no_grad()
def sequence_logprob(
    model: nn.Module,
    prompt_ids: Sequence[TokenIds],
    continuation_ids: Sequence[TokenIds],
    *,
    batch_size: int = 64,
    aggregation: Aggregation = "sum",
    pad_token_id: int = 0,
) -> torch.Tensor:
    """log π(continuation | prompt) for each pair under ``model``, shape (N,), float32 on the CPU.

    Sequences are right-padded (so default positions are right) and scored with
    :func:`dpo_lightning.logps.sequence_logps`, the same function the training loss uses. An empty
    continuation scores 0.
    """
    if len(prompt_ids) != len(continuation_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(continuation_ids)} continuations")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            prompts = [_as_list(p) for p in prompt_ids[start : start + batch_size]]
            conts = [_as_list(c) for c in continuation_ids[start : start + batch_size]]
            width = max(len(p) + len(c) for p, c in zip(prompts, conts, strict=True))
            ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, (p, c) in enumerate(zip(prompts, conts, strict=True)):
                ids[i, : len(p) + len(c)] = torch.tensor(p + c)
                labels[i, len(p) : len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
                mask[i, : len(p) + len(c)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logps, _ = sequence_logps(logits.float(), labels.to(device), aggregation)
            out.append(logps.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------------------------------------------- pairs
def label_pairs(prompt: str, responses: Sequence[str], rewards: Sequence[float]) -> list[dict[str, str]]:
    """All pairs of one prompt's responses, the higher reward chosen; ties, identical or empty texts dropped."""
    pairs = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            a, b = responses[i], responses[j]
            if rewards[i] == rewards[j] or a == b or not a.strip() or not b.strip():
                continue  # no preference, or a pair the preference data loader rejects
            chosen, rejected = (a, b) if rewards[i] > rewards[j] else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def sample_preference_pairs(
    policy: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    reward_fn: Callable[[list[str]], Sequence[float]],
    *,
    samples_per_prompt: int = 4,
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[list[dict[str, str]], np.ndarray]:
    """Preference data from a policy and a reward, as in the DPO paper's sentiment experiment (App. C.1).

    Draws ``samples_per_prompt`` continuations per prompt, scores prompt + continuation with ``reward_fn``,
    and labels every pair of a prompt's samples (4 samples give 6 pairs). Prompts are tokenized the way
    the preference data loader tokenizes them, so the policy is conditioned on the same ids in both places.

    Returns:
        ({prompt, chosen, rejected} rows ready for a JSONL file, rewards (N·k,) of the samples in order).
    """
    from dpo_lightning.data.tokenize import prompt_ids

    k = samples_per_prompt
    ids = prompt_ids(tokenizer, list(prompts))
    out = sample(
        policy, [p for p in ids for _ in range(k)], max_new_tokens=max_new_tokens, temperature=temperature,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    responses = [tokenizer.decode(c, skip_special_tokens=True) for c in out.continuations]
    rewards = np.asarray(reward_fn([prompts[i // k] + r for i, r in enumerate(responses)]), dtype=np.float64)
    pairs = []
    for n, prompt in enumerate(prompts):
        pairs += label_pairs(prompt, responses[n * k : (n + 1) * k], rewards[n * k : (n + 1) * k])
    return pairs, rewards
