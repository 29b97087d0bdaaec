"""Part 2's method runs: one job per :class:`Method` (preference loss, Preferred-FT, PPO-GT), run two at a time.

Each job reads everything it needs from the work folder (``sft/``, ``reward.npz``, ``pairs.jsonl``,
``pairs_noisy.jsonl``, ``train_prompts.json``), is seeded and single-threaded, so its numbers are the same
whichever process runs it. Every job returns its evaluation history: one record per evaluated step, with the
per-prompt arrays of :func:`dpo_lightning.evaluate.evaluate_policy` (``per_prompt=True``). The preference runs
share precomputed reference tables (``work/reference_cache``; one per pairs file: the first job of each computes
it, :func:`~dpo_lightning.reproduce.sentiment_settings.methods` starts one of each first).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpo_lightning.reproduce.sentiment_settings import LOG_PREFIX, Method, Settings, methods
from dpo_lightning.reproduce.sentiment_stages import NoEosPreferenceData, quiet_one_thread, trainer

PPO_MODULE = "dpo_lightning.reproduce.sentiment_ppo"


def eval_kwargs(cfg: Settings, seed: int) -> dict[str, Any]:
    """The same sampling settings and seed for every evaluation: the SFT model's and every checkpoint's."""
    return {"max_new_tokens": cfg.max_new_tokens, "seed": seed + 1, "per_prompt": True}


def pairs_path(work: Path, method: Method) -> Path:
    return work / ("pairs_noisy.jsonl" if method.noisy else "pairs.jsonl")


def missing(cfg: Settings) -> dict[str, str]:
    """Method name -> why its runs cannot run in this installation (PPO-GT, Unlikelihood, best-of-N)."""
    import dpo_lightning.losses  # noqa: F401 - registers every loss
    from dpo_lightning.losses.registry import LOSSES

    out = {}
    if why := ppo_available():
        out["PPO-GT"] = out["best-of-N"] = why
    for m in methods(cfg):
        if m.kind == "preference" and m.loss not in LOSSES:
            out[m.name] = f"loss {m.loss!r} is not registered in dpo_lightning/losses/"
    return out


def ppo_available() -> str:
    """ "" when the PPO-GT and best-of-N jobs (sentiment_ppo.py) are installed, else why not."""
    import importlib

    try:
        importlib.import_module(PPO_MODULE)
    except ModuleNotFoundError as err:
        if err.name == PPO_MODULE:
            return f"{PPO_MODULE.replace('.', '/')}.py is not in this installation"
        raise
    return ""


def method_job(cfg: Settings, method: Method, work: Path, eval_ids: list[list[int]], seed: int) -> list[dict]:
    """Fit one method from the SFT model; return its evaluation history (step 0 is the SFT model)."""
    if method.kind == "ppo":
        import dataclasses

        from dpo_lightning.reproduce import sentiment_ppo

        # a rollout batch cannot hold more prompts than there are (the suite's toy size has 6)
        cfg = dataclasses.replace(cfg, ppo_rollout_prompts=min(cfg.ppo_rollout_prompts, cfg.pref_prompts))
        return sentiment_ppo.ppo_job(cfg, method, work, eval_ids, seed)

    import lightning.pytorch as pl
    from transformers import AutoModelForCausalLM

    from dpo_lightning.evaluate import RewardKLCallback
    from dpo_lightning.losses.registry import get_spec
    from dpo_lightning.module import PreferenceModule
    from dpo_lightning.reward import SentimentClassifier
    from dpo_lightning.sft import SFTDataModule, SFTModule
    from dpo_lightning.tokenizer import load_tokenizer

    sft_dir, pairs_file = work / "sft", pairs_path(work, method)
    lr = method.lr if method.lr is not None else cfg.method_lr
    # fmt: off
    with quiet_one_thread():
        reference = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
        tokenizer = load_tokenizer(str(sft_dir))
        callback = RewardKLCallback(reference, eval_ids, SentimentClassifier.load(work / "reward.npz"), tokenizer,
                                    eval_steps=cfg.eval_steps, **eval_kwargs(cfg, seed))
        pl.seed_everything(seed, verbose=False)  # the same data order for every method
        max_length = cfg.context  # the SFT model's positions; prompts ≤ max_prefix + 2 tokens + the response fit
        if method.kind == "sft":
            pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
            # samples were cut at max_new_tokens, not ended: no EOS after them, as for every method
            dm = SFTDataModule.from_texts(
                [p["chosen"] for p in pairs], prompts=[p["prompt"] for p in pairs], tokenizer=tokenizer,
                max_length=max_length, add_eos=False, batch_size=cfg.method_batch, val_fraction=0.0, seed=seed,
            )
            module = SFTModule(policy=str(sft_dir), disable_dropout=True, lr=lr,
                               warmup_steps=cfg.warmup_steps, lr_schedule=cfg.method_schedule)
        else:
            dm = NoEosPreferenceData(
                train_files=str(pairs_file), format="explicit", tokenizer=str(sft_dir), max_length=max_length,
                max_prompt_length=cfg.max_prefix + 8, batch_size=cfg.method_batch, val_fraction=0.0, seed=seed,
            )
            shared = get_spec(method.loss).reference  # a reference-free loss (Unlikelihood) has no table
            module = PreferenceModule(
                policy=str(sft_dir), loss=method.loss, beta=float(method.beta), label_smoothing=method.eps,
                lr=lr, warmup_steps=cfg.warmup_steps, lr_schedule=cfg.method_schedule, optimizer="adamw",
                precompute_reference=shared, reference_cache_dir=str(work / "reference_cache") if shared else None,
            )
        trainer(cfg.method_steps, [callback]).fit(module, dm)
    # fmt: on
    return callback.history


def final(history: list[dict]) -> dict:
    """The record of the last evaluated step."""
    return max(history, key=lambda h: h["step"])


def run_methods(cfg: Settings, work: Path, eval_ids: list[list[int]], seed: int) -> dict[Method, list[dict]]:
    """Every method, ``cfg.workers`` at a time in spawned processes (or in this one when ``workers`` is 1).
    A method this installation lacks (:func:`missing`) is left out, and said so."""
    absent = missing(cfg)
    for name in sorted({m.name for m in methods(cfg)} & set(absent)):
        print(f"{LOG_PREFIX}   {name} not run: {absent[name]}", flush=True)
    jobs = [m for m in methods(cfg) if m.name not in absent]
    start = time.perf_counter()

    def report(method: Method, history: list[dict]) -> None:
        last = final(history)
        print(f"{LOG_PREFIX}   {method.key}: reward {last['reward']:.3f}, KL {last['kl']:.2f} "
              f"(at {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip

    return _map(method_job, jobs, cfg, work, eval_ids, seed, report, cfg.workers)


def _map(job: Callable, jobs: list[Method], cfg, work, eval_ids, seed, report, workers: int) -> dict:
    if workers <= 1:
        runs = {}
        for m in jobs:
            runs[m] = job(cfg, m, work, eval_ids, seed)
            report(m, runs[m])
        return runs
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # fork after torch has started threads is unsafe
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(job, cfg, m, work, eval_ids, seed): m for m in jobs}
        for future in as_completed(futures):
            report(futures[future], future.result())
        return {m: f.result() for f, m in sorted(futures.items(), key=lambda fm: jobs.index(fm[1]))}
