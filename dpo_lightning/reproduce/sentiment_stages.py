"""Part 2's shared stages: the SFT model, the preference pairs (and their label-flipped copy), thread settings.

Every response in the pairs is a sample cut at ``max_new_tokens``, not ended: samples that drew EOS earlier are
left out of the pairs, and no method trains on an EOS after a response (``NoEosPreferenceData`` strips the one
the preference data pipeline appends; Preferred-FT and Unlikelihood read the same responses without it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpo_lightning.data.datamodule import PreferenceDataModule
from dpo_lightning.reproduce.sentiment_settings import Settings


def trainer(max_steps: int, callbacks: list | None = None):
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks or [],
    )  # fmt: skip


@contextlib.contextmanager
def quiet_threads(threads: int = 1) -> Iterator[None]:
    """A fixed number of intra-op threads, and no per-run chatter (Lightning banners, known deprecations).

    Everything runs one thread, the method runs (and best-of-N) two at a time in processes: on a busy 2-core
    machine OpenMP threads spin waiting for a core (measured here under load ≈ 4: SFT steps 1.8×, sampling 10×
    slower on 2 threads than on 1). Only SFT, which runs alone while the second core would idle, takes
    ``Settings.sft_threads`` (FULL: 2, for an idle machine). A fixed count keeps a seed's numbers the same run to
    run on one machine; across CPU kinds (AVX2 / AVX-512) the float kernels differ anyway.
    """
    import datasets
    import transformers

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            noise = r".*(treespec|loss_type=None|does not have many workers|module\(s\) in eval mode).*"
            warnings.filterwarnings("ignore", message=noise)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
        torch.set_num_threads(before)


def quiet_one_thread():
    """:func:`quiet_threads` with one thread: how every method run (and a baselines job) runs."""
    return quiet_threads(1)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def train_sft(cfg: Settings, tokenizer: Any, texts: list[str], out: Path, seed: int) -> float:
    """Train the SFT model from scratch on the first ``cfg.context`` tokens of ``texts``; returns its final loss."""
    import lightning.pytorch as pl

    from dpo_lightning.sft import SFTDataModule, SFTModule

    pl.seed_everything(seed, verbose=False)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.sft_threads)
    # a 10-characters-per-token cut keeps tokenization cheap and still leaves every long review over
    # ``context`` tokens, so only reviews that really end there get an EOS
    dm = SFTDataModule.from_texts(
        [t[: 10 * cfg.context] for t in texts], tokenizer=tokenizer, max_length=cfg.context,
        batch_size=cfg.sft_batch, val_fraction=0.0, seed=seed,
    )  # fmt: skip
    gpt2 = {"model_type": "gpt2", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "n_positions": cfg.context}  # fmt: skip
    module = SFTModule(policy_config=gpt2, disable_dropout=True, lr=cfg.sft_lr, tokenizer=tokenizer, save_dir=str(out),
                       warmup_steps=max(cfg.sft_steps // 20, 1), lr_schedule="cosine")  # fmt: skip
    fit = trainer(cfg.sft_steps)
    try:
        fit.fit(module, dm)
    finally:
        torch.set_num_threads(before)
    return float(fit.callback_metrics["train/loss"])


def sample_pairs(
    reference: Any, tokenizer: Any, prompts: list[str], reward_fn: Any, cfg: Settings, seed: int
) -> tuple[list[dict[str, str]], dict[str, float]]:
    """All pairs of each prompt's ``samples_per_prompt`` samples (App. C.1), labelled by the reward.

    Samples that ended with EOS before ``max_new_tokens`` are left out (a prompt needs two cut samples to
    give a pair), so every response is cut, none ended. Returns (pairs, facts: samples, ended, pairs, mean
    |reward gap| within a pair).
    """
    from dpo_lightning.data.tokenize import prompt_ids
    from dpo_lightning.sampling import label_pairs, sample

    k = cfg.samples_per_prompt
    ids = prompt_ids(tokenizer, prompts)
    out = sample(
        reference, [p for p in ids for _ in range(k)], max_new_tokens=cfg.max_new_tokens, temperature=1.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, batch_size=256,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in out.continuations]
    rewards = np.asarray(reward_fn([prompts[i // k] + r for i, r in enumerate(texts)]), dtype=np.float64)
    ended = out.finished.numpy().astype(bool)
    pairs, gaps = [], []
    for n, prompt in enumerate(prompts):
        keep = [i for i in range(n * k, (n + 1) * k) if not ended[i] and texts[i].strip()]
        pairs += label_pairs(prompt, [texts[i] for i in keep], [rewards[i] for i in keep])
        gaps += [abs(rewards[i] - rewards[j]) for a, i in enumerate(keep) for j in keep[a + 1 :]]
    facts = {"samples": float(len(texts)), "ended": float(ended.sum()), "pairs": float(len(pairs)),
             "pair_gap": float(np.mean(gaps)) if gaps else float("nan")}  # fmt: skip
    return pairs, facts


def flip_labels(pairs: list[dict[str, str]], rate: float, seed: int) -> tuple[list[dict[str, str]], int]:
    """A copy of ``pairs`` with round(rate × n) of them, chosen by ``seed``, chosen and rejected swapped (claim
    e); the same pairs for every run that reads it. Returns (pairs, number flipped)."""
    n_flip = int(round(rate * len(pairs)))
    flipped = set(np.random.default_rng(seed + 7919).permutation(len(pairs))[:n_flip].tolist())
    out = [
        {**p, "chosen": p["rejected"], "rejected": p["chosen"]} if i in flipped else dict(p)
        for i, p in enumerate(pairs)
    ]
    return out, n_flip


class NoEosPreferenceData(PreferenceDataModule):
    """The preference data module without the EOS it appends to every response: the responses were cut at
    ``max_new_tokens``, not ended, so an EOS would teach chosen and rejected alike to stop there."""

    def prepare(self, enforce_thresholds: bool = True) -> None:
        if self.datasets:
            return
        super().prepare(enforce_thresholds)
        eos = self.tokenizer.eos_token_id

        def strip(row: dict) -> dict:
            for side in ("chosen", "rejected"):
                ids = row[f"{side}_input_ids"]
                if len(ids) > 1 and ids[-1] == eos:
                    row[f"{side}_input_ids"] = ids[:-1]
                    row[f"{side}_len"] = row[f"{side}_len"] - 1
            return row

        for split in ("train", "val"):
            if split in self.datasets and len(self.datasets[split]):
                self.datasets[split] = self.datasets[split].map(strip, load_from_cache_file=False)
        self.datasets["test"] = self.datasets["val"]
