"""Bench section ``side_by_side``: our step's batch layouts and TRL's DPOTrainer in one run, the issue-12 table.

Ours padded / packed / share_prompt / both (``data.packing``, ``data.share_prompt``) and TRL's DPOTrainer, each
with the reference every step and with precomputed reference log-probs, take turns over rounds (one fresh worker
process per configuration and round, so a peak RSS is that configuration's own) on the same saved weights, the
same HH pairs in the same batches (our data module's defaults: length-grouped; TRL gets that order) and the same
settings (sigmoid DPO, AdamW, clipping 1.0, fp32, no activation checkpointing, the same thread count). First on
the issue's shape (GPT-2 L4/d128, the run's 8,192-token BPE, 8 pairs, max_length 512), then, for peak RSS, on
one where activations and logits outweigh the libraries (L8/d512 at GPT-2's 50,257-token vocabulary, 4 pairs).

Columns: real tokens/s (chosen + rejected, the prompt counted in both: the throughput a user compares),
processed tokens (what the model runs: with a shared prompt the prompt once per pair), peak RSS, the ratios to
TRL and to our padded step (same reference mode; per round, then the median), and MFU
(:mod:`dpo_lightning.bench.flops`: the FLOPs the step needs over its time, over the fp32 matmul rate measured in
this run; TRL is charged the FLOPs of the same batches, as if it needed no more than we do).
"""

from __future__ import annotations

import statistics
from typing import Any

from dpo_lightning.bench.assets import GPT2_TOKENIZER, policy_dir, saved_tokenizer
from dpo_lightning.bench.flops import step_flops
from dpo_lightning.bench.report_format import equal_work_table, fmt, status_line, table
from dpo_lightning.bench.suite import Context, alternate, call, ok, ratios, summary
from dpo_lightning.bench.vs_trl import batch_order, equal_work, ours_spec, trl_available, trl_spec

LAYOUTS = {"padded": {}, "packed": {"packing": True}, "share_prompt": {"share_prompt": True},
           "both": {"packing": True, "share_prompt": True}}  # fmt: skip
REFERENCES = ("every_step", "precomputed")
BEST = "both"  # the layout the targets are about: share_prompt + packing
# (label, shape key, measured key, config, reference, threshold, "min" | "max"), decided before measuring
TARGETS = (
    ("share_prompt + packing tokens/s ÷ today's default step (padded)", "main", "vs_default", BEST, "every_step",
     1.3, "min"),
    ("tokens/s ÷ TRL, reference every step", "main", "vs_trl", BEST, "every_step", 10.0, "min"),
    ("tokens/s ÷ TRL, precomputed reference", "main", "vs_trl", BEST, "precomputed", 14.0, "min"),
    ("MFU (share of the same-run fp32 matmul rate), reference every step", "main", "mfu", BEST, "every_step",
     0.5, "min"),
    ("peak RSS ÷ TRL's, L8/d512 vocab 50,257, reference every step", "rss", "rss_vs_trl", BEST, "every_step",
     0.5, "max"),
)  # fmt: skip


def name(layout: str, reference: str) -> str:
    return f"{layout}/{reference}"


def section_side(ctx: Context) -> dict[str, Any]:
    """Both shapes, the matmul rate measured before and after; ratios, MFU and the targets."""
    s = ctx.s
    trl_missing = trl_available()
    rate = [call(ctx, "flops", {"threads": s.threads, "n": 2048})]
    layouts = {k: LAYOUTS[k] for k in s.side_layouts}
    main = shape_runs(ctx, s.side_shape, ctx.assets.tokenizer_dir, s.batch_size, s.side_max_rows, s.side_warmup,
                      s.side_steps, layouts, REFERENCES, s.side_rounds, trl_missing)  # fmt: skip
    rss_layouts = {k: LAYOUTS[k] for k in ("padded", BEST)}
    tokenizer = saved_tokenizer(ctx.work, GPT2_TOKENIZER)
    rss = shape_runs(ctx, s.rss_shape, tokenizer, s.rss_pairs, s.rss_max_rows, 0, s.rss_steps, rss_layouts,
                     ("every_step",), 1, trl_missing)  # fmt: skip
    rate.append(call(ctx, "flops", {"threads": s.threads, "n": 2048}))
    gflops = max(r["gflops_best"] for r in rate)
    for part in (main, rss):
        add_flops(part, gflops)
    return {
        "status": "ok",
        "trl": {"status": "skipped", "reason": trl_missing} if trl_missing else {"status": "ok"},
        "matmul": {"gflops": gflops, "measurements": rate},
        "main": main,
        "rss": rss,
        "targets": targets({"main": main, "rss": rss}),
    }


def shape_runs(
    ctx: Context, shape: str, tokenizer: str, pairs: int, max_rows: int, warmup: int, steps: int,
    layouts: dict[str, Any], references: tuple[str, ...], rounds: int, trl_missing: str | None,
) -> dict[str, Any]:  # fmt: skip
    """Every (layout, reference) of ours and TRL's per reference, alternating for ``rounds``."""
    s = ctx.s
    model = policy_dir(ctx.work, shape, tokenizer, n_positions=s.max_length)
    data = {"tokenizer": tokenizer, "max_rows": max_rows, "batch_size": pairs}
    run = {"warmup": warmup, "steps": steps, "head": "response_only"}  # the shipped head
    cache = {"reference_cache_dir": str(ctx.work / "reference_logps")}
    runs: dict[str, tuple[str, Any]] = {}
    for reference in references:
        module = {"policy": model, **({"precompute_reference": True, **cache} if reference == "precomputed" else {})}
        for layout, keys in layouts.items():
            spec = ours_spec(ctx, grouped=True, data={**data, **keys}, module=module, **run)
            runs[name(layout, reference)] = ("ours_side", spec)
    if trl_missing is None:
        order = batch_order(ctx, True, warmup + steps, data=data, name=f"side-{shape}-{pairs}-{max_rows}")
        for reference in references:
            spec = trl_spec(ctx, order, precompute=reference == "precomputed", model_dir=model,
                            tokenizer_dir=tokenizer, warmup=warmup, steps=steps, batch_size=pairs)  # fmt: skip
            runs[name("trl", reference)] = ("trl_side", spec)
    if "precomputed" in references and not s.quick:  # fill the reference cache outside the timed runs
        call(ctx, "ours_side", {**runs[name("padded", "precomputed")][1], "warmup": 0, "steps": 1})
    ctx.log(f"side by side, {shape}: {len(runs)} configurations x {rounds} rounds")
    results = alternate(ctx, runs, rounds)
    compared: dict[str, Any] = {}
    for reference in references:
        default, trl = results[name("padded", reference)], results.get(name("trl", reference))
        for layout in layouts:
            mine = results[name(layout, reference)]
            compared[name(layout, reference)] = {
                "vs_default": ratios(mine, default),
                "vs_trl": ratios(mine, trl) if trl else None,
            }
    compare = [(name(layout, ref), name("trl", ref)) for ref in references for layout in layouts]
    return {
        "settings": {
            "shape": shape,
            "tokenizer": tokenizer,
            "model": model,
            "max_rows": max_rows,
            "pairs": pairs,
            "max_length": s.max_length,
            "warmup": warmup,
            "steps": steps,
            "rounds": rounds,
            "threads": s.threads,
        },  # fmt: skip
        "summary": summary(results),
        "ratios": compared,
        "equal_work": equal_work(results, compare),
        "runs": results,
    }


def add_flops(part: dict[str, Any], gflops: float) -> None:
    """Each run's FLOPs per real token (:func:`flops.step_flops`), GFLOP/s and MFU; TRL's from our padded run of
    the same reference mode (same batches); per configuration the median MFU over rounds."""
    runs = part["runs"]
    for config, results in runs.items():
        layout, reference = config.split("/")
        source = ok(runs.get(name("padded", reference), [])) if layout == "trl" else None
        for i, r in enumerate(ok(results)):
            basis = source[min(i, len(source) - 1)] if source else (None if layout == "trl" else r)
            if basis is None or "params" not in basis:
                continue
            every_step = reference == "every_step"
            processed, scored = basis["processed_tokens_per_step"], basis["scored_positions_per_step"]
            per_step = step_flops(basis["params"], processed, scored, reference_every_step=every_step)
            r["flops_per_real_token"] = per_step / basis["tokens_per_step"]
            r["gflops"] = r["flops_per_real_token"] * r["tokens_per_s"] / 1e9
            r["mfu"] = r["gflops"] / gflops
        mfus = [r["mfu"] for r in ok(results) if "mfu" in r]
        part["summary"][config].update(
            mfu=statistics.median(mfus) if mfus else None,
            flops_per_real_token=next((r["flops_per_real_token"] for r in ok(results) if "mfu" in r), None),
            processed_tokens_per_step=next((r["processed_tokens_per_step"] for r in ok(results)), None),
            tokens_per_step=next((r["tokens_per_step"] for r in ok(results)), None),
        )


def targets(parts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets against this run: measured, threshold, PASS / MISS / not measured."""
    out = []
    for label, part, key, layout, reference, threshold, kind in TARGETS:
        config = name(layout, reference)
        if key == "mfu":
            value = parts[part]["summary"].get(config, {}).get("mfu")
        else:
            r = parts[part]["ratios"].get(config, {}).get("vs_trl" if key != "vs_default" else "vs_default") or {}
            value = r.get("peak_rss_ratio" if key == "rss_vs_trl" else "tokens_per_s_ratio")
        met = None if value is None else (value >= threshold if kind == "min" else value <= threshold)
        out.append({"target": label, "config": config, "shape": parts[part]["settings"]["shape"], "value": value,
                    "threshold": f"{'≥' if kind == 'min' else '≤'} {threshold}",
                    "verdict": {None: "not measured", True: "PASS", False: "**MISS**"}[met]})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------- report
COMMAND = ".venv/bin/python -m dpo_lightning.bench --sections side_by_side"


def render_targets(side: dict[str, Any]) -> list[str]:
    """The headline: issue 12's targets, decided before the run, beside this run's measurements."""
    lines = ["## Targets (issue 12, this CPU)", ""]
    if status_line(side) or not side.get("targets"):
        return lines + [status_line(side) or "*not run*: the side_by_side section is not in --sections", ""]
    rows = [[t["target"], t["config"], t["shape"], None if t["value"] is None else f"{t['value']:.3f}",
             t["threshold"], t["verdict"]] for t in side["targets"]]  # fmt: skip
    lines += table(["target", "ours", "shape", "measured (median over rounds)", "target", "verdict"], rows)
    return lines + [f"Measured by `{COMMAND}` (part of `make bench`); section 'Side by side' has every number.", ""]


def render_side(side: dict[str, Any]) -> list[str]:
    lines = ["## Side by side: our layouts and TRL's DPOTrainer, one run", ""]
    if status_line(side) or "main" not in side:
        return lines + [status_line(side) or "*not run*", ""]
    if side["trl"]["status"] != "ok":
        lines += [f"TRL side *skipped*: {side['trl']['reason']}", ""]
    lines += [
        (__doc__ or "").split("\n\n")[1].replace("\n", " "),
        "",
        f"MFU = (FLOPs the step needs ÷ step time) ÷ {side['matmul']['gflops']:.1f} GFLOP/s, the best fp32 "
        f"2048×2048 matmul rate on {side['main']['settings']['threads']} threads measured in this run (before and "
        "after the rounds: " + ", ".join(f"{m['gflops_best']:.1f}" for m in side["matmul"]["measurements"]) + "). "
        "FLOPs = (6 + 2 with the reference every step) × (N × processed tokens + d·V × scored positions): N the "
        "non-embedding parameters (decoder blocks and final norm; embeddings and the output layer left out), d·V "
        "the output layer, run at response positions only (the shipped head). Attention's QKᵀ and AV matmuls are "
        "not counted (≈ context/(6d) of a block's FLOPs), so the MFU errs low.",
        "",
    ]
    for key, title in (("main", "the issue's shape"), ("rss", "the peak-RSS shape")):
        part = side[key]
        st = part["settings"]
        lines += [f"**{st['shape']}** ({title}; {st['pairs']} pairs, max_length {st['max_length']}, {st['warmup']} "
                  f"warm-up + {st['steps']} timed steps, {st['rounds']} round(s); tokenizer `{st['tokenizer']}`):",
                  ""]  # fmt: skip
        rows = []
        for config, x in part["summary"].items():
            r = part["ratios"].get(config) or {}
            trl_r, default_r = r.get("vs_trl") or {}, r.get("vs_default") or {}
            rows.append([config, x["tokens_per_s"], x.get("tokens_per_step"), x.get("processed_tokens_per_step"),
                         x["peak_rss_mb"], trl_r.get("tokens_per_s_ratio"), trl_r.get("peak_rss_ratio"),
                         default_r.get("tokens_per_s_ratio"), _mflop(x.get("flops_per_real_token")),
                         None if x.get("mfu") is None else f"{x['mfu']:.1%}",
                         "" if x["status"] == "ok" else f"{x['status']}: {x.get('reason')}"])  # fmt: skip
        header = ["layout/reference", "real tokens/s", "real tokens/step", "processed tokens/step",
                  "peak RSS MiB", "× TRL tokens/s", "× TRL peak RSS", "× ours padded", "MFLOP/real token", "MFU",
                  "note"]  # fmt: skip
        lines += table(header, rows)
        lines += equal_work_table(part.get("equal_work", {}))
    return lines


def _mflop(x: float | None) -> str | None:
    return None if x is None else fmt(x / 1e6)
