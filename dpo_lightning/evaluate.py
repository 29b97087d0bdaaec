"""Reward and KL of a policy against a reference, measured on samples; and the reward–KL frontier plot.

    result = evaluate_policy(policy, reference, prompts, reward_fn, tokenizer, max_new_tokens=32, seed=0)
    result["reward"], result["kl"]     # mean ground-truth reward; KL(π ‖ π_ref) in nats per sequence

    callback = RewardKLCallback(reference, prompts, reward_fn, tokenizer, eval_steps=[0, 50, 100], max_new_tokens=32)
    lightning.Trainer(callbacks=[callback]).fit(module, datamodule)
    callback.history                    # one result dict per evaluated step, during training

The KL estimate is the plain Monte Carlo one the DPO paper plots against reward (§6.1, Fig. 2 left): draw
y ~ π(·|x) at temperature 1 and average log π(y|x) − log π_ref(y|x) over the samples. It is unbiased for the
sequence-level KL: single terms, and at a tiny KL even the mean, can be negative; its expectation cannot.

Evaluations draw from their own seeded generator, so they never disturb the training RNG, and every
evaluation of every run uses the same seed: differences between runs come from the policies, not the draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from dpo_lightning.sampling import TokenIds, sample, sequence_logprob

RewardFn = Callable[[list[str]], Sequence[float] | np.ndarray]


def _mean_sem(values: np.ndarray) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    sem = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), sem


def evaluate_policy(
    policy: nn.Module,
    reference: nn.Module | None,
    prompts: Sequence[TokenIds],
    reward_fn: RewardFn,
    tokenizer: Any,
    *,
    max_new_tokens: int,
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int = 0,
    reward_includes_prompt: bool = True,
    per_prompt: bool = False,
) -> dict[str, Any]:
    """Sample from ``policy`` on ``prompts``, score the samples with ``reward_fn`` and against ``reference``.

    Args:
        policy: the causal LM evaluated.
        reference: the model KL is measured against; ``None`` skips the KL.
        prompts: token ids per prompt.
        reward_fn: texts -> rewards, e.g. a :class:`dpo_lightning.reward.SentimentClassifier`.
        tokenizer: decodes samples to text (special tokens dropped).
        max_new_tokens: tokens sampled per prompt at most (EOS stops earlier).
        samples_per_prompt: draws per prompt.
        temperature: sampling temperature. The KL estimate is only unbiased at 1.
        batch_size: prompts per forward pass.
        seed: seed of the sampling generator.
        reward_includes_prompt: score prompt + continuation (the whole text, as a review is read) or the
            continuation alone.
        per_prompt: also return the per-prompt arrays a bootstrap over prompts needs (see Returns).

    Returns:
        ``reward``, ``reward_std``, ``reward_sem``, ``kl``, ``kl_sem`` (NaN without a reference), ``logp``
        (mean log π of the samples), ``length`` (mean sampled tokens), ``eos_rate`` and ``n`` (samples).
        With ``per_prompt``, also lists in prompt order, each the mean over that prompt's samples: ``rewards``,
        ``kls`` (log π − log π_ref of the sample), ``ref_nll`` (−log π_ref per sampled token: the reference's
        NLL, a fluency measure) and ``lengths``; ``distinct2`` (distinct bigrams / bigrams over all samples) and
        ``samples`` (the first three continuations, decoded).
    """
    rows = [p for p in prompts for _ in range(samples_per_prompt)]
    generator = torch.Generator().manual_seed(seed)
    out = sample(
        policy,
        rows,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        generator=generator,
    )
    texts = []
    for p, c in zip(rows, out.continuations, strict=True):
        ids = (list(p) if not isinstance(p, torch.Tensor) else p.tolist()) + c if reward_includes_prompt else c
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    rewards = np.asarray(reward_fn(texts), dtype=np.float64)
    result = {"n": float(len(rows))}
    result["reward"], result["reward_sem"] = _mean_sem(rewards)
    result["reward_std"] = float(rewards.std(ddof=1)) if len(rewards) > 1 else float("nan")
    result["logp"] = float(out.logps.mean())
    result["length"] = float(np.mean([len(c) for c in out.continuations]))
    result["eos_rate"] = float(out.finished.float().mean())
    if reference is not None:
        ref_logps = sequence_logprob(
            reference, rows, out.continuations, batch_size=batch_size, pad_token_id=tokenizer.pad_token_id
        )
        result["kl"], result["kl_sem"] = _mean_sem((out.logps - ref_logps).double().numpy())
    else:
        result["kl"] = result["kl_sem"] = float("nan")
    if per_prompt:
        result.update(_per_prompt(out, rewards, None if reference is None else ref_logps, samples_per_prompt))
        result["samples"] = [tokenizer.decode(c, skip_special_tokens=True) for c in out.continuations[:3]]
    return result


def distinct_n(sequences: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over ``sequences`` (Li et al. 2016); NaN when there are none.
    A policy that repeats itself (a reward hack) scores low."""
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def _per_prompt(out: Any, rewards: np.ndarray, ref_logps: torch.Tensor | None, k: int) -> dict[str, Any]:
    """Per-prompt means over each prompt's k consecutive samples (evaluate_policy's ``per_prompt``)."""
    lengths = np.asarray([len(c) for c in out.continuations], dtype=np.float64)

    def by_prompt(x: np.ndarray) -> list[float]:
        return [float(v) for v in np.asarray(x, dtype=np.float64).reshape(-1, k).mean(axis=1)]

    arrays: dict[str, Any] = {"rewards": by_prompt(rewards), "lengths": by_prompt(lengths)}
    if ref_logps is not None:
        ref = ref_logps.double().numpy()
        arrays["kls"] = by_prompt(out.logps.double().numpy() - ref)
        arrays["ref_nll"] = by_prompt(-ref / np.maximum(lengths, 1.0))
    arrays["distinct2"] = distinct_n(out.continuations, 2)
    return arrays


class RewardKLCallback(pl.Callback):
    """Run :func:`evaluate_policy` on the module's policy at chosen optimizer steps during ``fit``.

    Step 0 is evaluated at the start of training (before any update) and every other step in
    ``eval_steps`` right after that many optimizer steps; a step past the end of training never happens.
    Results accumulate in ``history`` (each dict gets ``step``) and are logged as ``eval/reward`` and
    ``eval/kl`` when the trainer has a logger.
    """

    def __init__(
        self,
        reference: nn.Module | None,
        prompts: Sequence[TokenIds],
        reward_fn: RewardFn,
        tokenizer: Any,
        *,
        eval_steps: Sequence[int],
        policy_attr: str = "policy",
        **eval_kwargs: Any,
    ):
        """``eval_kwargs`` go to :func:`evaluate_policy` (``max_new_tokens`` is required there)."""
        super().__init__()
        self.reference = reference
        self.prompts = list(prompts)
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        self.eval_steps = sorted(set(int(s) for s in eval_steps))
        self.policy_attr = policy_attr
        self.eval_kwargs = eval_kwargs
        self.history: list[dict[str, float]] = []

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step not in self.eval_steps or any(h["step"] == step for h in self.history):
            return
        policy = getattr(pl_module, self.policy_attr)
        result = evaluate_policy(
            policy, self.reference, self.prompts, self.reward_fn, self.tokenizer, **self.eval_kwargs
        )
        result["step"] = float(step)
        self.history.append(result)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"eval/reward": result["reward"], "eval/kl": result["kl"]}, step=step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._evaluate(trainer, pl_module)


# ---------------------------------------------------------------------------------------------------- frontier
def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The reward–KL frontier of a set of (kl, reward) points: their upper concave, non-decreasing envelope.

    Every point on it is achievable, not just the measured ones: a policy that picks policy A with
    probability λ and B otherwise has reward λ r_A + (1 − λ) r_B and, KL being convex, KL at most
    λ KL_A + (1 − λ) KL_B. So the frontier is the segments of the upper convex hull up to the best reward,
    then flat. Returns its vertices sorted by KL (non-finite points are ignored).
    """
    pts = sorted({(float(k), float(r)) for k, r in points if math.isfinite(k) and math.isfinite(r)})
    hull: list[tuple[float, float]] = []
    for k, r in pts:
        if hull and hull[-1][0] == k:  # same KL: keep the better reward only
            if r <= hull[-1][1]:
                continue
            hull.pop()
        # pop the last vertex while it lies on or below the chord from its predecessor to the new point
        while len(hull) >= 2:
            (k1, r1), (k2, r2) = hull[-2], hull[-1]
            if (r2 - r1) * (k - k1) <= (r - r1) * (k2 - k1):
                hull.pop()
            else:
                break
        hull.append((k, r))
    best = max(range(len(hull)), key=lambda i: hull[i][1], default=-1)
    return hull[: best + 1]


def frontier_reward(points: Sequence[tuple[float, float]], kl: float) -> float:
    """The frontier's reward at ``kl``: linear between its vertices, flat after the last; NaN below the first.

    "At matched KL, method A beats method B" then reads: at each of B's points (k, r), A's frontier reward at
    k is above r.
    """
    hull = frontier(points)
    if not hull or kl < hull[0][0]:
        return float("nan")
    for (k1, r1), (k2, r2) in zip(hull, hull[1:], strict=False):
        if kl <= k2:
            return r1 + (r2 - r1) * (kl - k1) / (k2 - k1)
    return hull[-1][1]


def plot_frontier(
    curves: dict[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str,
    reference_point: tuple[float, float] | None = None,
    reference_label: str = "SFT (reference)",
) -> Path:
    """Scatter each method's (KL, reward) points and draw its :func:`frontier`; one colour per method.

    Args:
        curves: method name -> list of (kl, reward) points (any order: several runs and checkpoints).
        path: PNG written here.
        title: figure title.
        reference_point: the (0, reward) of the reference model, drawn as a star; every method starts there,
            so it belongs to every frontier.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.8), dpi=120)
    colours = plt.get_cmap("tab10")
    for i, (name, points) in enumerate(curves.items()):
        pts = sorted((float(k), float(r)) for k, r in points if np.isfinite(k) and np.isfinite(r))
        if not pts:
            continue
        ks, rs = zip(*pts, strict=True)
        ax.scatter(ks, rs, s=14, alpha=0.45, color=colours(i % 10))
        hull = frontier(pts + ([reference_point] if reference_point is not None else []))
        ax.plot([k for k, _ in hull], [r for _, r in hull], color=colours(i % 10), label=name, linewidth=1.8)
    if reference_point is not None:
        ax.scatter(
            [reference_point[0]],
            [reference_point[1]],
            marker="*",
            s=160,
            color="black",
            label=reference_label,
            zorder=5,
        )
    ax.set_xlabel("KL(π ‖ π_ref), nats per sequence (Monte Carlo over samples)")
    ax.set_ylabel("mean ground-truth reward (classifier logit)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
