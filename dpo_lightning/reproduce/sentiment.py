"""Part 2 of `make reproduce`: the DPO paper's controlled sentiment generation on IMDb, at CPU scale.

    python -m dpo_lightning.reproduce --part 2 --out reports/reproduce    # ≤ 27 min on 2 slow cores (AVX2)
    python -m dpo_lightning.reproduce --part 2 --quick --out /tmp/p2      # toy size, tuning prompts

Rafailov et al. 2023, §6.1 and Appendix C.1, scaled down so that every stage runs here:

1. reviews: IMDb train/test from ``../shared/data/imdb`` (or ``$DPO_IMDB_DIR``), else the hub's ``stanfordnlp/imdb``;
2. ground-truth reward: TF-IDF + logistic regression on the train labels; reward = positive-class logit;
3. tokenizer: a byte-level BPE trained on the train reviews;
4. SFT: a tiny GPT-2 trained from scratch on the first tokens of the train reviews; it is also π_ref;
5. preference data: train-review prefixes of 2–8 tokens cut forward to a word boundary; 4 samples per prompt
   from the SFT model, cut at ``max_new_tokens`` (samples that ended early are left out); all pairs labelled by
   the reward; a copy with ``flip_rate`` of the labels flipped;
6. methods (``sentiment_settings.methods``): DPO at several β, IPO, DPO/cDPO/rDPO on the flipped pairs,
   Preferred-FT and Unlikelihood over learning rates, PPO-GT at several KL coefficients (``sentiment_ppo.py``),
   best-of-N from the SFT model;
7. evaluation on fresh test prefixes (the deciding slice; ``--quick``: the tuning slice) at several steps,
   with per-prompt rewards and KL; claims (``sentiment_claims``) decided by bootstrap (``stats``).

Files: ``sentiment_settings`` (sizes, methods), ``sentiment_data`` (IMDb, prompts), ``sentiment_stages`` (SFT,
pairs, threads), ``sentiment_methods`` (jobs), ``sentiment_claims``, ``sentiment_report``; this one wires them.

Cost model for FULL (seconds on the slow machine kind, AMD EPYC AVX2, fp32 matmul 2048² ≈ 120 GFLOP/s on 2
threads; one-thread CPU times of timed pieces at FULL size, 2026-12-02, which on idle cores are wall times):

    data + classifier + tokenizer          ≈ 25       (measured 2026-11-26: 5 + 10 + 7)
    SFT, 360 steps × 1.1 s (1 thread)      ≈ 400      upper bound; 2 threads on idle cores is expected faster
    pairs, 2,560 samples × 11 ms + SFT eval ≈ 35
    preference run: 60 × 2.2 s + 3 evals × 6 s + start ≈ 155   × 8 (DPO ×3, IPO, noisy DPO/cDPO/rDPO, UL)
    Preferred-FT run: 60 × 1.1 s + 18 + 5   ≈ 90    × 3 (lr 5e-4, 3e-3, 1e-2: to span DPO’s KL range)
    PPO-GT run: 24 × 2.4 s + 3 evals × 7 s  ≈ 80    × 3        (baselines' measurement)
    best-of-N: 80 prompts × 128 draws × 11 ms ≈ 115  (a worker process beside the runs)
    → worker time ≈ 1,240 + 270 + 240 + 115 ≈ 1,865 s, two at a time ≈ 935 s
    Part 1 ≈ 20; report ≈ 15                total ≈ 1,430 s ≈ 24 min (budget 27 min on this kind)

``make reproduce SEEDS=3`` adds two more sets of method runs: ≈ 1,430 + 2 × 875 ≈ 3,180 s ≈ 53 min (estimate).
The measured stage times are printed as the run goes and written in the report beside the machine's matmul rate.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dpo_lightning.reproduce.claims import Claim
from dpo_lightning.reproduce.report import matmul_gflops
from dpo_lightning.reproduce.sentiment_data import (  # noqa: F401 - the public names of Part 2
    HUB_DATASET,
    clean_review,
    default_imdb_dir,
    load_imdb,
    make_prompts,
    prompt_slices,
)
from dpo_lightning.reproduce.sentiment_methods import eval_kwargs, missing, run_methods
from dpo_lightning.reproduce.sentiment_settings import FULL, LOG_PREFIX, QUICK, Method, Settings  # noqa: F401
from dpo_lightning.reproduce.sentiment_stages import (
    cpu_seconds,
    flip_labels,
    quiet_one_thread,
    quiet_threads,
    sample_pairs,
    train_sft,
)


def best_of_n_job(cfg: Settings, work: Path, eval_ids: list[list[int]], seed: int) -> list[dict]:
    """Best-of-N from the SFT model, one thread (in a worker process beside the method runs)."""
    from dpo_lightning.reproduce import sentiment_ppo

    with quiet_one_thread():
        return sentiment_ppo.best_of_n_points(cfg, work, eval_ids[: cfg.bon_prompts], seed, ns=cfg.bon_ns)


def _start_best_of_n(cfg: Settings, work: Path, eval_ids: list[list[int]], seed: int):
    """A callable returning best-of-N's records: with workers, its process starts now and runs beside the method
    runs (each process one thread: three on two cores for its ≈ 2 min, no thread spinning); else it runs here."""
    if cfg.workers <= 1:
        return lambda: best_of_n_job(cfg, work, eval_ids, seed)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    future = pool.submit(best_of_n_job, cfg, work, eval_ids, seed)

    def result() -> list[dict]:
        try:
            return future.result()
        finally:
            pool.shutdown()

    return result


def run_part2(
    out_dir: Path, *, quick: bool = False, seed: int = 0, data_dir: str | Path | None = None, seeds: int = 1
) -> tuple[list[Claim], dict]:
    """Run every stage, check the claims, write figures and artifacts under ``out_dir``.

    ``seeds`` training seeds (``seed``, ``seed + 1``, …) each run every method; the shared stages use ``seed``.
    Returns (claims, {"figures": [PNG paths relative to out_dir], "markdown": the report section}). Artifacts
    (classifier, SFT model and tokenizer, pairs, every evaluated point, settings) go to ``out_dir/sentiment/``.
    """
    from transformers import AutoModelForCausalLM

    from dpo_lightning.data.tokenize import prompt_ids
    from dpo_lightning.evaluate import evaluate_policy, plot_frontier
    from dpo_lightning.reproduce import sentiment_report as report
    from dpo_lightning.reproduce import stats
    from dpo_lightning.reproduce.sentiment_claims import Points, check_claims
    from dpo_lightning.reward import SentimentClassifier
    from dpo_lightning.tokenizer import train_bpe_tokenizer

    cfg = QUICK if quick else FULL
    out_dir = Path(out_dir)
    work = out_dir / "sentiment"
    work.mkdir(parents=True, exist_ok=True)
    train_seeds = [seed + i for i in range(seeds)]
    (work / "settings.json").write_text(json.dumps({"quick": quick, "seed": seed, "train_seeds": train_seeds,
                                                    **asdict(cfg)}, indent=2))  # fmt: skip
    gflops = matmul_gflops(2)
    print(f"{LOG_PREFIX} machine: fp32 matmul {gflops:.0f} GFLOP/s on 2 threads", flush=True)
    timings: dict[str, tuple[float, float]] = {}  # stage -> (wall s, CPU s of this process and its workers)
    clock = [(time.perf_counter(), cpu_seconds())]

    def done(stage: str, message: str) -> None:
        now = (time.perf_counter(), cpu_seconds())
        timings[stage] = (now[0] - clock[0][0], now[1] - clock[0][1])
        clock[0] = now
        wall, cpu = timings[stage]
        print(f"{LOG_PREFIX} {stage}: {message} ({wall:.1f} s wall, {cpu:.1f} s CPU)", flush=True)

    absent = missing(cfg)
    with quiet_threads(1):
        train_texts, train_labels = load_imdb(data_dir, "train", limit=cfg.train_reviews, seed=seed)
        test_texts, test_labels = load_imdb(data_dir, "test", limit=cfg.test_reviews, seed=seed)
        local = Path(data_dir or default_imdb_dir())
        source = str(local) if (local / "train.jsonl.gz").exists() else f"hub dataset {HUB_DATASET}"
        done("data", f"{len(train_texts)} train and {len(test_texts)} test reviews")

        clf = SentimentClassifier.fit(train_texts, train_labels)
        accuracy = clf.accuracy(test_texts, test_labels)
        clf.save(work / "reward.npz")
        done("classifier", f"TF-IDF + logistic regression, test accuracy {accuracy:.4f}")

        tokenizer = train_bpe_tokenizer((t[:2000] for t in train_texts), vocab_size=cfg.vocab_size)
        done("tokenizer", f"byte-level BPE, {len(tokenizer)} tokens")

        sft_loss = train_sft(cfg, tokenizer, train_texts, work / "sft", seed)
        reference = AutoModelForCausalLM.from_pretrained(work / "sft").eval()
        done("sft", f"{cfg.sft_steps} steps, final loss {sft_loss:.3f}")

        rng = np.random.default_rng(seed)
        pick = rng.permutation(len(train_texts))[: cfg.pref_prompts]
        prompts = make_prompts(tokenizer, [train_texts[i] for i in pick], rng, cfg.min_prefix, cfg.max_prefix)
        pairs, pair_facts = sample_pairs(reference, tokenizer, prompts, clf, cfg, seed)
        noisy, n_flipped = flip_labels(pairs, cfg.flip_rate, seed)
        for name, rows in (("pairs.jsonl", pairs), ("pairs_noisy.jsonl", noisy)):
            (work / name).write_text("".join(json.dumps(p) + "\n" for p in rows))
        (work / "train_prompts.json").write_text(json.dumps(prompt_ids(tokenizer, prompts)))
        # quick runs evaluate on tuning prompts only, the full run on deciding prompts only (sentiment_data)
        tuning, deciding = prompt_slices(tokenizer, test_texts, cfg.eval_prompts if quick else 0,
                                         0 if quick else cfg.eval_prompts, cfg.min_prefix, cfg.max_prefix)  # fmt: skip
        eval_prompts = tuning if quick else deciding
        eval_ids = prompt_ids(tokenizer, eval_prompts)
        done("pairs", f"{len(pairs)} pairs from {len(prompts)} prompts ({pair_facts['ended']:.0f} of "
                      f"{pair_facts['samples']:.0f} samples ended early, left out); {n_flipped} flipped")  # fmt: skip

        sft_eval = evaluate_policy(reference, reference, eval_ids, clf, tokenizer, **eval_kwargs(cfg, seed))
        sft_eval["step"] = 0.0
        done("eval_sft", f"SFT reward {sft_eval['reward']:.3f} ± {sft_eval['reward_sem']:.3f}")

    best_of_n = None if "best-of-N" in absent else _start_best_of_n(cfg, work, eval_ids, seed)
    runs_by_seed = []
    for s in train_seeds:
        runs_by_seed.append(run_methods(cfg, work, eval_ids, s))
        done("methods" if seeds == 1 else f"methods_seed{s}", f"{len(runs_by_seed[-1])} runs, training seed {s}")
    bon = [] if best_of_n is None else best_of_n()
    if bon:
        done("best_of_n", ", ".join(f"N={r['n']:g}: reward {r['reward']:.2f}" for r in bon) + " (beside the runs)")

    note = " Quick mode: toy sizes that check the pipeline; this verdict is not evidence either way." if quick else ""
    points = Points(runs_by_seed, sft_eval, stats.Bootstrap(seeds, len(eval_ids), n_boot=cfg.n_boot, seed=0))
    claims = [Claim(
        id="sentiment.reward_classifier_accuracy",
        claim="The ground-truth reward reads sentiment: classifier accuracy on IMDb test ≥ 0.85",
        source="this reproduction's set-up (the paper uses a pretrained sentiment classifier)",
        expected="≥ 0.85", measured=round(accuracy, 4), tolerance=f"{len(test_texts)} test reviews",
        passed=bool(accuracy >= 0.85),
    )] + check_claims(cfg, points, bon, note, absent)  # fmt: skip
    runs = runs_by_seed[0]
    curves: dict[str, list[tuple[float, float]]] = {}
    for m, hist in runs.items():
        curves.setdefault(m.name, []).extend((h["kl"], h["reward"]) for h in hist if h["step"] > 0)
    if bon:
        curves["best-of-N (KL: formula)"] = [(r["kl"], r["reward"]) for r in bon]
    scale = "quick (toy size)" if quick else "CPU scale"
    figures = [
        plot_frontier(curves, out_dir / "sentiment_frontier.png", reference_point=(0.0, sft_eval["reward"]),
                      title=f"IMDb sentiment, {scale}: reward vs KL, all runs and checkpoints"),
        report.plot_training(runs, sft_eval, out_dir / "sentiment_training.png"),
    ]  # fmt: skip
    report.write_points(runs, sft_eval, work / "frontier.csv")
    (work / "evaluations.json").write_text(json.dumps(
        {"sft": sft_eval, "best_of_n": bon, "runs": [{"seed": s, "key": m.key, "history": h}
                                                     for s, r in zip(train_seeds, runs_by_seed, strict=True)
                                                     for m, h in r.items()]}))  # fmt: skip
    done("report", "claims, figures, frontier.csv, evaluations.json")
    facts = {
        "train_reviews": len(train_texts), "test_reviews": len(test_texts), "source": source,
        "accuracy": accuracy, "sft_loss": sft_loss, **pair_facts, "flipped": n_flipped, "quick": quick,
        "n_params": sum(p.numel() for p in reference.parameters()), "eval_prompts": len(eval_ids),
        "eval_prompt_texts": eval_prompts, "seed": seed, "train_seeds": train_seeds, "gflops": gflops,
        "threads": 2,
    }  # fmt: skip
    markdown = report.markdown(cfg, facts, runs, sft_eval, bon, timings)
    return claims, {"figures": [str(f.relative_to(out_dir)) for f in figures], "markdown": markdown}
