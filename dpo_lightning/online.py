"""Online DPO: each training step's pairs are sampled from the current policy and ranked by a reward.

    dpo-lightning fit --config experiments/tiny_online.yaml          # model.online: {reward: ..., ...}

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (arXiv 2402.04792), Algorithm 1:
for the prompts of a batch, draw responses from the policy being trained, let an annotator (here a reward, any
spec :func:`dpo_lightning.reward.load_reward` takes) pick the preferred one, and take a step of the
preference loss on those pairs. The pairs are on-policy at every step, where offline DPO trains on a fixed set.

The data module still supplies the batches: their prompt rows (as the data tokenized them) are all that is used
in training, the offline responses are ignored (validation still scores the data's pairs, the held-out
preference accuracy). One step, in :meth:`OnlineSampler.pair_batch`:

1. the prompts of the batch's chosen rows, ``samples_per_prompt`` samples each (``sampling.sample``, the
   project's one sampling path; the training step's RNG stream, so a resumed run draws the same samples);
2. prompts and samples decoded and scored by the reward;
3. one pair per prompt (:func:`pick_pairs`): ``best_worst`` takes the highest- and lowest-reward samples, as
   Guo et al. and the iterative-DPO papers do; ``bradley_terry`` (two samples) draws the label with probability
   σ(r₁ − r₂), the preference model DPO assumes, under which DPO's optimum is π* = π_ref·exp(r/β)/Z (Rafailov et
   al. 2023, Eq. 4) — best-vs-worst with a deterministic reward is a hard label and aims at the reward's
   argmax instead (see ``reproduce/bandit_onpolicy.py``);
4. the pairs collated by the data's ``PairCollator`` from the exact sampled token ids (not re-tokenized text,
   whose ids can differ from the sampled ones), then the run's loss, any registered one, as for offline pairs.

Logged: ``train/online/{reward_chosen,reward_rejected,reward_margin,reward_mean,ties,identical,length,
finished}``. Ties (equal rewards) keep the samples' order; identical samples give a zero DPO gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dpo_lightning.data.tokenize import PairCollator
from dpo_lightning.errors import ConfigError
from dpo_lightning.logps import IGNORE_INDEX
from dpo_lightning.sampling import sample
from dpo_lightning.strategy import is_fsdp

Labels = Literal["best_worst", "bradley_terry"]


@dataclass
class OnlineConfig:
    """``model.online``: how each step's pairs are sampled and labelled."""

    reward: str | dict[str, Any] | None = None
    """The reward: a sentiment ``.npz``, a sequence-classification model directory or ``module:callable``."""
    samples_per_prompt: int = 2
    """Samples drawn per prompt; the pair is the best and the worst of them."""
    labels: Labels = "best_worst"
    """``best_worst`` (higher reward chosen) or ``bradley_terry`` (chosen with probability σ(r₁ − r₂); 2 samples)."""
    max_new_tokens: int = 32
    """The most tokens sampled per response."""
    temperature: float = 1.0
    """Sampling temperature (1: the policy itself, as on-policy training assumes)."""
    top_k: int | None = None
    """Sample among the k most likely tokens only; null: the whole vocabulary."""
    reward_batch_size: int = 32
    """Texts per reward call."""
    sample_batch_size: int = 256
    """Prompts per sampling forward pass."""


def online_config(value: OnlineConfig | Mapping[str, Any] | None) -> OnlineConfig | None:
    """``model.online`` as an :class:`OnlineConfig` (None: offline training), its values checked."""
    if value is None or isinstance(value, OnlineConfig):
        config = value
    else:
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(OnlineConfig)})
        if unknown:
            fields = ", ".join(f.name for f in dataclasses.fields(OnlineConfig))
            raise ConfigError(f"model.online: unknown key(s) {', '.join(unknown)}; the keys are: {fields}")
        config = OnlineConfig(**value)
    if config is None:
        return None
    if config.reward is None:
        raise ConfigError(
            "model.online.reward: give the reward that ranks the samples (a .npz, a model dir or module:fn)"
        )
    if config.samples_per_prompt < 2:
        raise ConfigError(f"model.online.samples_per_prompt must be >= 2, got {config.samples_per_prompt}")
    if config.labels not in ("best_worst", "bradley_terry"):
        raise ConfigError(f"model.online.labels must be best_worst or bradley_terry, got {config.labels!r}")
    if config.labels == "bradley_terry" and config.samples_per_prompt != 2:
        raise ConfigError(
            "model.online.labels bradley_terry labels one pair of two samples: set samples_per_prompt: 2 "
            f"(got {config.samples_per_prompt})"
        )
    if config.max_new_tokens < 1:
        raise ConfigError(f"model.online.max_new_tokens must be >= 1, got {config.max_new_tokens}")
    if config.temperature <= 0:
        raise ConfigError(f"model.online.temperature must be > 0 (sampling), got {config.temperature}")
    return config


def online_sampler(value: OnlineConfig | Mapping[str, Any] | None, precompute_reference: bool, objective: Any):
    """``PreferenceModule``'s ``online`` argument as an :class:`OnlineSampler` (None: offline), or a ConfigError
    for the settings online DPO cannot run with."""
    config = online_config(value)
    if config is None:
        return None
    if precompute_reference:
        raise ConfigError(
            "model.online samples new responses every step, so there is nothing to precompute: "
            "model.precompute_reference must be false"
        )
    if objective.unpaired:
        raise ConfigError(
            f"model.online builds preference pairs; loss {objective.name!r} trains on unpaired rows: use a paired "
            "loss (dpo, ipo, ...) with model.online"
        )
    return OnlineSampler(config)


# ---------------------------------------------------------------------------------------------- pure pieces
def batch_prompts(batch: Mapping[str, torch.Tensor]) -> list[list[int]]:
    """The prompt ids of a collated batch's first B rows (the chosen, or the matched rows): each row's tokens
    before its first response label, i.e. the prompt as the data tokenized and truncated it."""
    n = batch["index"].shape[0]
    ids, labels = batch["input_ids"][:n].cpu(), batch["labels"][:n].cpu()
    out = []
    for row, lab in zip(ids, labels, strict=True):
        response = (lab != IGNORE_INDEX).nonzero()
        out.append(row[: int(response[0]) if len(response) else len(row)].tolist())
    return out


def pick_pairs(
    rewards: torch.Tensor, labels: Labels = "best_worst", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sample indices (B,) from rewards (B, k) of each prompt's k samples.

    ``best_worst``: the first highest and the last lowest reward in the samples' order, so a prompt whose
    rewards all tie still gets two different samples. ``bradley_terry`` (k = 2): sample 0 is chosen with
    probability σ(r₀ − r₁).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, samples >= 2), got shape {tuple(rewards.shape)}")
    if labels == "bradley_terry":
        if rewards.shape[1] != 2:
            raise ValueError("bradley_terry labels take exactly 2 samples per prompt")
        p_first = torch.sigmoid((rewards[:, 0] - rewards[:, 1]).double())
        first = torch.rand(p_first.shape, generator=generator, dtype=torch.float64) < p_first
        chosen = torch.where(first, 0, 1)
        return chosen, 1 - chosen
    if labels != "best_worst":
        raise ValueError(f"unknown labels {labels!r}")
    order = torch.sort(rewards, dim=1, descending=True, stable=True).indices
    return order[:, 0], order[:, -1]


@dataclass
class Scored:
    """Samples of B prompts, k each, in prompt-major order (rows i·k … i·k + k − 1 belong to prompt i)."""

    prompt_ids: list[list[int]]  # (B,)
    continuations: list[list[int]]  # (B·k,) sampled ids, EOS kept when emitted
    completions: list[str]  # (B·k,) decoded
    rewards: torch.Tensor  # (B, k) float32
    finished: torch.Tensor  # (B·k,) bool: the sample ended with EOS


def sample_and_score(
    policy: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    reward: Callable[[Sequence[str], Sequence[str]], torch.Tensor],
    *,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    prompt_texts: Sequence[str] | None = None,
) -> Scored:
    """Draw ``samples_per_prompt`` responses per prompt from ``policy`` and score them with ``reward``.

    The reward sees the prompt text (``prompt_texts``, else the decoded prompt ids) and the decoded response,
    special tokens skipped. Used by online DPO's step, iterative DPO's rounds and best-of-N.
    """
    k = samples_per_prompt
    rows = [list(p) for p in prompt_ids]
    out = sample(
        policy, [p for p in rows for _ in range(k)], max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        batch_size=batch_size, generator=generator,
    )  # fmt: skip
    if prompt_texts is None:
        prompt_texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    completions = tokenizer.batch_decode(out.continuations, skip_special_tokens=True)
    scores = reward([prompt_texts[i // k] for i in range(len(completions))], completions)
    return Scored(rows, out.continuations, completions, torch.as_tensor(scores).float().view(len(rows), k),
                  out.finished)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the step
class OnlineSampler:
    """The online part of a training step: replaces a batch's offline pairs with freshly sampled, ranked ones.

    Args:
        config: ``model.online``.
        reward: a ready :class:`dpo_lightning.reward.Reward`; ``None`` loads ``config.reward`` on first use,
            on the policy's device.
    """

    def __init__(self, config: OnlineConfig, reward: Callable | None = None):
        self.config = config
        self._reward = reward

    def reward(self, device: torch.device | None = None) -> Callable:
        """The checked reward (``load_reward`` of ``config.reward``, loaded on first use, on ``device`` when it is
        a model; a Python callable given as ``reward`` is wrapped the same way)."""
        if self._reward is None:
            from dpo_lightning.reward import load_reward

            self._reward = load_reward(self.config.reward, device=device, batch_size=self.config.reward_batch_size)
        return self._reward

    @torch.no_grad()
    def pairs(self, policy: nn.Module, tokenizer: Any, batch: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """(the new pair batch on the batch's device, the step's statistics as floats)."""
        c = self.config
        prompts = batch_prompts(batch)
        limit = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and max(map(len, prompts)) + c.max_new_tokens > limit:
            raise ConfigError(
                f"model.online: a prompt of {max(map(len, prompts))} tokens + max_new_tokens {c.max_new_tokens} "
                f"exceeds the policy's {limit} positions; lower data.max_prompt_length or model.online.max_new_tokens"
            )
        scored = sample_and_score(
            policy, tokenizer, prompts, self.reward(batch["input_ids"].device),
            samples_per_prompt=c.samples_per_prompt, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
            top_k=c.top_k, batch_size=c.sample_batch_size,
        )  # fmt: skip
        chosen, rejected = pick_pairs(scored.rewards, c.labels)
        k, rows = c.samples_per_prompt, torch.arange(len(scored.prompt_ids))
        features = [
            {
                "prompt_input_ids": p,
                "chosen_input_ids": scored.continuations[i * k + int(chosen[i])],
                "rejected_input_ids": scored.continuations[i * k + int(rejected[i])],
                "index": int(batch["index"][i]),
            }
            for i, p in enumerate(scored.prompt_ids)
        ]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        new = {key: value.to(batch["input_ids"].device) for key, value in PairCollator(pad)(features).items()}
        r_c, r_r = scored.rewards[rows, chosen], scored.rewards[rows, rejected]
        identical = [f["chosen_input_ids"] == f["rejected_input_ids"] for f in features]
        stats = {
            "reward_chosen": float(r_c.mean()),
            "reward_rejected": float(r_r.mean()),
            "reward_margin": float((r_c - r_r).mean()),
            "reward_mean": float(scored.rewards.mean()),
            "ties": float((r_c == r_r).float().mean()),
            "identical": sum(identical) / len(identical),
            "length": sum(len(s) for s in scored.continuations) / len(scored.continuations),
            "finished": float(scored.finished.float().mean()),
        }
        return new, stats

    def pair_batch(self, module: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The hook of ``PreferenceModule.training_step``: sample, rank, collate, log; returns the pair batch."""
        if module.tokenizer is None:
            raise ConfigError("model.online needs the tokenizer (the CLI passes data.tokenizer to the model)")
        if is_fsdp(module.trainer.strategy):  # ranks would sample different lengths and leave FSDP's collectives
            raise ConfigError("model.online: sampling under trainer.strategy fsdp is not supported; use ddp")
        new, stats = self.pairs(module.policy, module.tokenizer, batch)
        n = len(batch["index"])
        module.log_dict({f"train/online/{k}": v for k, v in stats.items()}, batch_size=n, sync_dist=True)
        return new
