"""Bench sections of our step alone: ``levers`` (step-loop switches), ``sweep`` (shapes x lengths, the step-time
fit), ``processes`` (1 vs 2 processes: DDP, FSDP2) and ``pipeline`` (tokenization pairs/s)."""

from __future__ import annotations

import time
from typing import Any

from dpo_lightning.bench.assets import HH_FILE, IMDB_FILE
from dpo_lightning.bench.suite import Context, alternate, call, linear_fit, ratios, summary
from dpo_lightning.bench.vs_trl import ours_spec


def section_levers(ctx: Context) -> dict[str, Any]:
    """Step-level levers in the bare step loop on HH batches padded to one width (one shape: compile-friendly)."""
    s, a = ctx.s, ctx.assets
    padded = ctx.work / "pairs-padded.json"  # the trl section's batches, when it ran
    base = {
        "shape": s.shape,
        "vocab": a.vocab,
        "pairs_file": str(padded) if padded.exists() else a.pairs_file,
        "pairs": s.batch_size,
        "seq_len": s.max_length,
        "fill": 0.3,
        "n_batches": 2,
        "warmup": s.warmup,
        "steps": s.lever_steps,
        "threads": s.threads,
        "pad_id": a.pad_id,
    }
    variants = {
        "base": {},
        "full_log_softmax": {"logps": "log_softmax"},
        "response_only_head": {"head": "response_only"},
    }
    runs = alternate(ctx, {k: ("step", {**base, **v}) for k, v in variants.items()}, s.lever_rounds)
    if s.compile:  # compiling takes a minute or two on CPU: one round, against round 1's base
        variants["compile"] = {"compile": True, "warmup": s.warmup + 1}
        runs.update(alternate(ctx, {"compile": ("step", {**base, **variants["compile"]})}, s.extra_rounds))
    gains = {name: ratios(runs[name], runs["base"]) for name in variants if name != "base"}
    if not s.compile:
        gains["compile"] = {"status": "skipped", "reason": "quick mode (compiling takes minutes on CPU)"}
    return {"status": "ok", "base": base, "summary": summary(runs), "gains": gains, "runs": runs}


def section_sweep(ctx: Context) -> dict[str, Any]:
    """Our step (bare loop, synthetic full-length rows) over GPT-2 shapes x sequence lengths; the first shape also
    over batch sizes, for the step time vs tokens fit."""
    s = ctx.s
    points = []
    for i, shape in enumerate(s.sweep_shapes):
        base = {"shape": shape, "vocab": ctx.assets.vocab, "fill": 1.0, "n_batches": 1, "threads": s.threads}
        base.update(warmup=1, steps=s.sweep_steps)
        specs = [{**base, "seq_len": t, "pairs": s.sweep_pairs} for t in s.sweep_lengths]
        if i == 0:
            middle = s.sweep_lengths[len(s.sweep_lengths) // 2]
            specs += [{**base, "seq_len": middle, "pairs": p} for p in s.scaling_pairs]
        specs.sort(key=lambda c: c["seq_len"] * c["pairs"])
        start = time.perf_counter()
        try:
            results = call(ctx, "step", specs)
        except Exception as err:  # noqa: BLE001
            ctx.log(f"  sweep {shape}: error {err}")
            points.append({"shape": shape, "status": "error", "error": str(err)[-1000:]})
            continue
        for r in results:
            c = r["spec"]
            points.append(
                {
                    "shape": shape,
                    "seq_len": c["seq_len"],
                    "pairs": c["pairs"],
                    "params": r["params"],
                    "tokens_per_step": r["tokens_per_step"],
                    "step_s": r["step_s_median"],
                    "tokens_per_s": r["tokens_per_s"],
                    "peak_rss_mb": r["peak_rss_mb"],
                    "rss_before_mb": r["rss_before_mb"],
                    "status": "ok",
                }
            )
        ctx.log(f"  sweep {shape}: {len(results)} configurations ({time.perf_counter() - start:.0f} s)")
    good = [p for p in points if p["status"] == "ok"]
    fits = {}
    for shape in s.sweep_shapes:
        mine = [p for p in good if p["shape"] == shape]
        fit = linear_fit([p["tokens_per_step"] for p in mine], [p["step_s"] for p in mine])
        if fit:
            fits[shape] = fit
    memory = {
        shape: {p["seq_len"]: p["peak_rss_mb"] for p in good if p["shape"] == shape and p["pairs"] == s.sweep_pairs}
        for shape in s.sweep_shapes
    }
    return {
        "status": "ok" if good else "error",
        "pairs_per_step": s.sweep_pairs,
        "points": points,
        "step_time_fit": fits,
        "memory_vs_seq_len": memory,
    }


def section_processes(ctx: Context) -> dict[str, Any]:
    """1 process x 2 threads vs 2 processes x 1 thread (DDP, FSDP2) on the two cores, same global batch."""
    s = ctx.s
    if not s.processes:
        return {"status": "skipped", "reason": "quick mode runs every worker in one process"}
    half = max(s.batch_size // 2, 1)
    runs = {
        "1_process": ("ours_side", ours_spec(ctx)),
        "2_processes_ddp": ("ours_side", ours_spec(ctx, batch_size=half, devices=2, strategy="ddp", threads=1)),
    }
    runs["2_processes_fsdp2"] = ("ours_side", ours_spec(ctx, batch_size=half, devices=2, strategy="fsdp", threads=1))
    results = alternate(ctx, runs, s.extra_rounds)
    gains = {name: ratios(results[name], results["1_process"]) for name in runs if name != "1_process"}
    return {"status": "ok", "summary": summary(results), "ratios": gains, "runs": results}


def section_pipeline(ctx: Context) -> dict[str, Any]:
    s = ctx.s
    from dpo_lightning.bench.pipeline import imdb_pairs

    n = s.pipeline_rows or 2000
    imdb = imdb_pairs(IMDB_FILE, ctx.work / f"imdb-pairs-{n}.jsonl.gz", n)
    spec = {
        "work": str(ctx.work / "pipeline"),
        "tokenizer_dir": ctx.assets.tokenizer_dir,
        "hh_file": str(HH_FILE),
        "imdb_file": str(imdb),
        "max_length": s.max_length,
        "max_prompt_length": s.max_prompt_length,
        "max_rows": s.pipeline_rows,
    }
    result = call(ctx, "pipeline", spec)
    return {"status": "ok", **result}
