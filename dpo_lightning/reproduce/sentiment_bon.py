"""Part 2, best-of-N from the SFT model: reference points for the reward–KL frontier, and the data of claim (f).

    records = best_of_n_points(cfg, work, eval_ids, seed)            # one record per N in cfg.bon_ns
    records = bon_records(sft, tokenizer, prompt_ids, classifier, ns=(4, 16, 64), max_new_tokens=32, seed=1)

Best-of-N keeps, of N samples y ~ π_ref(·|x), the one the reward scores highest. For a continuous reward its
distribution is π_BoN(y|x) = N F(r(y))^{N−1} π_ref(y|x), F the CDF of r(Y) under Y ~ π_ref(·|x), so its
log-ratio is log N + (N − 1) log F(r(y)) and, F(r) of the kept sample being the maximum of N uniforms,
KL(π_BoN ‖ π_ref) = log N − (N − 1)/N (Stiennon et al. 2020, App.; Beirami et al. 2024 show it is an upper bound
when rewards tie). That is the frontier point's KL (``kl``); the reward is measured.

Measured KL (claim f): the log-ratio with F replaced by F̂, the mid-rank empirical CDF of reward draws
independent of the kept one (:func:`dpo_lightning.best_of_n.bon_kl_terms`). Draws, per prompt: K = N_max + E
samples (N_max = max(ns), E = ``extra_base``), the same for every N. For each N the first N_max are cut into
N_max/N disjoint groups of N; each group's best is scored against the other K − N draws (independent of that
group: all K are i.i.d.), and a prompt's value is the mean over its groups. So N = 4 and 16 reuse the draws of
N = 64, and averaging over groups lowers their variance at no sampling cost. The estimator's mean for a continuous
reward, ``bon_kl_estimate_mean(N, K − N)``, is known from N and K alone; its gap to the formula (the finite-M bias,
−15% at N = 64 with 64 base draws) is subtracted from every term, decided before any run, so ``kl_terms`` has mean
log N − (N − 1)/N exactly under a continuous reward; ties (repeated samples, rewards that coincide) pull it down.
The raw terms are kept (``kl_terms_raw``). Per prompt, ``rewards`` is the mean over groups of the kept reward.

What claim (f) then tests is not the formula's algebra (the estimator uses the same density) but that the
draws are i.i.d. from π_ref, the best is the one kept, and the reward is continuous enough on these samples.

Cost: P × K continuations of ``max_new_tokens`` tokens from the SFT model; measured at FULL size (4 × 128 GPT-2,
vocabulary 4,096, 32 tokens, one thread, nice'd on a loaded 2-core AVX2 box): 11.1 ms CPU per draw (16 prompts ×
128 draws in 22.8 s CPU), so 64 / 96 / 128 prompts ≈ 91 / 136 / 182 s CPU. In a simulation of a continuous reward
(uniform draws, 200 repetitions) the 95% half-width of the prompt bootstrap relative to the formula is, with
K = 128: 5% / 5% / 9% at N = 4 / 16 / 64 for P = 96, and 4% / 4% / 7.5% for P = 128; claim (f)'s band is ±15%.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dpo_lightning.best_of_n import best_index, bon_kl, bon_kl_estimate_mean, bon_kl_terms

if TYPE_CHECKING:
    from dpo_lightning.reproduce.sentiment_settings import Settings

EXTRA_BASE = 64  # base draws per prompt beyond the N_max of the largest N (F̂ of N_max's best reads these)
BON_SEED_OFFSET = 7  # the sampling generator's seed is seed + this: draws unlike every evaluation's (seed + 1)


def bon_records(
    policy: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    reward_fn: Callable[[list[str]], Sequence[float] | np.ndarray],
    *,
    ns: Sequence[int],
    max_new_tokens: int,
    seed: int,
    extra_base: int = EXTRA_BASE,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """Best-of-N records of ``policy`` on ``prompt_ids``, one per N in ``ns`` (see the module docstring).

    ``reward_fn`` scores decoded prompt + continuation texts, as :func:`dpo_lightning.evaluate.evaluate_policy`
    does. Every N in ``ns`` must divide max(ns). Returns, per N: ``n``, ``reward``, ``reward_sem``, ``rewards``
    (per prompt), ``kl`` (the formula), ``kl_estimate``, ``kl_estimate_sem``, ``kl_terms`` (per prompt, bias
    removed), ``kl_estimate_raw``, ``kl_terms_raw``, ``kl_bias``, ``base_samples`` (K − N), ``groups``
    (N_max / N), ``length`` and ``eos_rate`` of the kept responses, ``samples`` (≤ 3 kept texts), ``prompts``.
    """
    from dpo_lightning.sampling import sample

    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1 or any(ns[-1] % n for n in ns) or extra_base < 1:
        raise ValueError(f"best-of-N: every N in {ns} must be >= 1 and divide the largest; extra_base >= 1")
    n_max, k, p = ns[-1], ns[-1] + extra_base, len(prompt_ids)
    rows = [list(map(int, ids)) for ids in prompt_ids for _ in range(k)]
    out = sample(policy, rows, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
                 generator=torch.Generator().manual_seed(seed))  # fmt: skip
    texts = [tokenizer.decode(r + c, skip_special_tokens=True) for r, c in zip(rows, out.continuations, strict=True)]
    rewards = torch.as_tensor(np.asarray(reward_fn(texts), dtype=np.float64)).view(p, k)
    lengths = torch.tensor([len(c) for c in out.continuations], dtype=torch.float64).view(p, k)
    finished = out.finished.to(torch.float64).view(p, k)
    records = []
    for n in ns:
        groups = n_max // n
        kept_r, kept_len, kept_eos, terms, kept_cols = [], [], [], [], []
        for g in range(groups):
            cols = torch.arange(g * n, (g + 1) * n)
            others = torch.cat([torch.arange(0, g * n), torch.arange((g + 1) * n, k)])
            best = cols[best_index(rewards[:, cols])]  # (P,) the column kept, first on ties
            at = torch.arange(p)
            kept_r.append(rewards[at, best])
            kept_len.append(lengths[at, best])
            kept_eos.append(finished[at, best])
            kept_cols.append(best)
            terms.append(bon_kl_terms(rewards[at, best], rewards[:, others], n))
        raw = torch.stack(terms).mean(0)  # (P,): mean over the groups of each prompt
        bias = bon_kl_estimate_mean(n, k - n) - bon_kl(n)
        corrected = raw - bias
        per_prompt = torch.stack(kept_r).mean(0)
        first = kept_cols[0]
        records.append({
            "n": float(n), "reward": float(per_prompt.mean()), "reward_sem": _sem(per_prompt),
            "rewards": per_prompt.tolist(), "kl": bon_kl(n), "kl_estimate": float(corrected.mean()),
            "kl_estimate_sem": _sem(corrected), "kl_terms": corrected.tolist(), "kl_estimate_raw": float(raw.mean()),
            "kl_terms_raw": raw.tolist(), "kl_bias": bias, "base_samples": float(k - n), "groups": float(groups),
            "length": float(torch.stack(kept_len).mean()), "eos_rate": float(torch.stack(kept_eos).mean()),
            "samples": [tokenizer.decode(out.continuations[i * k + int(first[i])], skip_special_tokens=True)
                        for i in range(min(3, p))],
            "prompts": float(p),
        })  # fmt: skip
    return records


def _sem(values: torch.Tensor) -> float:
    return float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def best_of_n_points(
    cfg: Settings,
    work: Path,
    eval_ids: list[list[int]],
    seed: int,
    ns: tuple[int, ...] | None = None,
    extra_base: int = EXTRA_BASE,
) -> list[dict[str, Any]]:
    """Best-of-N from ``work/sft`` on the first ``cfg.bon_prompts`` of ``eval_ids``, scored by
    ``work/reward.npz``; one record per N (``ns``, default ``cfg.bon_ns``). Runs in this process, with the
    threads it was given (the pipeline runs it as a stage on its own)."""
    from transformers import AutoModelForCausalLM

    from dpo_lightning.reward import SentimentClassifier
    from dpo_lightning.tokenizer import load_tokenizer

    sft = AutoModelForCausalLM.from_pretrained(work / "sft").eval()
    tokenizer = load_tokenizer(str(work / "sft"))
    classifier = SentimentClassifier.load(work / "reward.npz")
    prompts = eval_ids[: cfg.bon_prompts]
    return bon_records(sft, tokenizer, prompts, classifier, ns=ns or cfg.bon_ns, max_new_tokens=cfg.max_new_tokens,
                       seed=seed + BON_SEED_OFFSET, extra_base=extra_base)  # fmt: skip


def bon_claim_data(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """What claim (f) reads, per N: the formula log N − (N − 1)/N, the measured KL (bias removed) with its
    per-prompt terms for the bootstrap, the raw estimate and the bias that was removed."""
    return [{"n": int(r["n"]), "formula": bon_kl(int(r["n"])), "measured": r["kl_estimate"],
             "measured_sem": r["kl_estimate_sem"], "terms": list(r["kl_terms"]), "raw": r["kl_estimate_raw"],
             "bias": r["kl_bias"], "base_samples": int(r["base_samples"])} for r in records]  # fmt: skip
