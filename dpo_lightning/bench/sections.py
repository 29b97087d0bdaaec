"""The sections of ``python -m dpo_lightning.bench``: what each one measures, with which workers, in which order."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from dpo_lightning.bench.assets import HH_FILE, IMDB_FILE
from dpo_lightning.bench.suite import (
    Context,
    alternate,
    call,
    linear_fit,
    median_of,
    ok,
    ratio_per_round,
    summary,
)


# ---------------------------------------------------------------------------------------------------- specs
def ours_spec(ctx: Context, *, grouped: bool = False, precompute: bool = False, **extra: Any) -> dict[str, Any]:
    s, a = ctx.s, ctx.assets
    data = {
        "train_files": a.data_file,
        "tokenizer": a.tokenizer_dir,
        "max_length": s.max_length,
        "max_prompt_length": s.max_prompt_length,
        "max_rows": s.max_rows,
        "batch_size": extra.pop("batch_size", s.batch_size),
        "seed": 0,
        "group_by_length": grouped,
    }
    module = {"policy": a.model_dir, "beta": s.beta, "lr": s.lr}
    if precompute:
        module.update(precompute_reference=True, reference_cache_dir=str(ctx.work / "reference_logps"))
    return {"data": data, "module": module, "threads": s.threads, "warmup": s.warmup, "steps": s.steps, **extra}


def trl_spec(ctx: Context, pairs_file: str, *, precompute: bool = False) -> dict[str, Any]:
    s, a = ctx.s, ctx.assets
    return {
        "model_dir": a.model_dir,
        "tokenizer_dir": a.tokenizer_dir,
        "pairs_file": pairs_file,
        "batch_size": s.batch_size,
        "max_length": s.max_length,
        "warmup": s.warmup,
        "steps": s.steps,
        "lr": s.lr,
        "beta": s.beta,
        "threads": s.threads,
        "reference": "precomputed" if precompute else "every_step",
    }


def batch_order(ctx: Context, grouped: bool, n_batches: int) -> str:
    """Write the pairs of our data module's first ``n_batches`` training batches, in order, for TRL."""
    from dpo_lightning.bench.ours_side import datamodule

    spec = ours_spec(ctx, grouped=grouped)
    dm = datamodule(spec["data"])
    dm.setup("fit")
    train = dm.datasets["train"]
    position = {int(i): p for p, i in enumerate(train["index"])}
    rows = []
    for b, batch in enumerate(dm.train_dataloader()):
        if b == n_batches:
            break
        for i in batch["index"].tolist():
            row = train[position[int(i)]]
            rows.append({k: list(row[k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")})
    path = ctx.work / f"pairs-{'grouped' if grouped else 'padded'}.json"
    path.write_text(json.dumps(rows))
    return str(path)


def available_levers() -> dict[str, str | None]:
    """Each HH-path lever: None when this checkout has it, else why it cannot be measured."""
    from dpo_lightning.bench.ours_side import missing_arguments
    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.module import PreferenceModule

    out: dict[str, str | None] = {}
    for lever, cls, arg in (
        ("length_grouping", PreferenceDataModule, "group_by_length"),
        ("precomputed_reference", PreferenceModule, "precompute_reference"),
    ):
        out[lever] = f"{cls.__name__} has no `{arg}` argument" if missing_arguments(cls, [arg]) else None
    return out


def trl_available() -> str | None:
    """None when TRL can be imported, else why not."""
    from dpo_lightning.bench.trl_side import trl_version

    if trl_version() is None:
        return "trl is not installed (it comes with the `bench` extra: pip install -e '.[bench]', or `make bench`)"
    return None


# ---------------------------------------------------------------------------------------------------- sections
def section_trl(ctx: Context) -> dict[str, Any]:
    """Ours vs TRL's DPOTrainer on HH, alternating; plus our HH-path levers, each on vs off in the same run."""
    s = ctx.s
    n_batches = s.warmup + s.steps
    levers = available_levers()
    trl_missing = trl_available()
    both = levers["length_grouping"] is None and levers["precomputed_reference"] is None
    core: dict[str, tuple[str, Any]] = {"ours_padded": ("ours_side", ours_spec(ctx))}
    if trl_missing is None:
        core["trl_padded"] = ("trl_side", trl_spec(ctx, batch_order(ctx, False, n_batches)))
    if both:
        core["ours_levers"] = ("ours_side", ours_spec(ctx, grouped=True, precompute=True))
        if trl_missing is None:
            grouped_pairs = batch_order(ctx, True, n_batches)
            core["trl_levers"] = ("trl_side", trl_spec(ctx, grouped_pairs, precompute=True))
    extra: dict[str, tuple[str, Any]] = {}
    if levers["length_grouping"] is None and s.single_levers:
        extra["ours_grouped"] = ("ours_side", ours_spec(ctx, grouped=True))
    if levers["precomputed_reference"] is None and s.single_levers:
        extra["ours_precomputed"] = ("ours_side", ours_spec(ctx, precompute=True))
    extra["ours_padded_response_only"] = ("ours_side", ours_spec(ctx, head="response_only"))
    if both and s.single_levers:
        extra["ours_levers_response_only"] = (
            "ours_side",
            ours_spec(ctx, grouped=True, precompute=True, head="response_only"),
        )
    if levers["precomputed_reference"] is None and not s.quick:  # fill the reference cache outside timed runs
        call(ctx, "ours_side", ours_spec(ctx, precompute=True, warmup=0, steps=1))
    ctx.log(f"ours vs TRL: {len(core)} configurations x {s.rounds} rounds, {len(extra)} x {s.extra_rounds}")
    runs = alternate(ctx, core, s.rounds)
    runs.update(alternate(ctx, extra, s.extra_rounds))

    ratios: dict[str, Any] = {}
    for label, ours, trl in (
        ("reference_every_step", "ours_padded", "trl_padded"),
        ("precomputed_and_grouped", "ours_levers", "trl_levers"),
        ("reference_every_step_response_only", "ours_padded_response_only", "trl_padded"),
        ("precomputed_and_grouped_response_only", "ours_levers_response_only", "trl_levers"),
        ("ours_levers_vs_trl_plain", "ours_levers", "trl_padded"),
    ):
        if ours in runs and trl in runs:
            tps = ratio_per_round(runs[ours], runs[trl], "tokens_per_s")
            mem = ratio_per_round(runs[ours], runs[trl], "peak_rss_mb")
            if not tps:  # runs of different round counts: compare medians
                a, b = median_of(runs[ours], "tokens_per_s"), median_of(runs[trl], "tokens_per_s")
                ma, mb = median_of(runs[ours], "peak_rss_mb"), median_of(runs[trl], "peak_rss_mb")
                tps = [a / b] if a and b else []
                mem = [ma / mb] if ma and mb else []
            ratios[label] = {
                "ours": ours,
                "trl": trl,
                "tokens_per_s_ratio": statistics.median(tps) if tps else None,
                "peak_rss_ratio": statistics.median(mem) if mem else None,
                "per_round_tokens_per_s_ratio": tps,
                "per_round_peak_rss_ratio": mem,
            }
    gains = {}
    for lever, name in (
        ("length_grouping", "ours_grouped"),
        ("precomputed_reference", "ours_precomputed"),
        ("response_only_head", "ours_padded_response_only"),
        ("precomputed_and_grouped", "ours_levers"),
    ):
        if name in runs and ok(runs[name]):
            tps = ratio_per_round(runs[name], runs["ours_padded"], "tokens_per_s")
            mem = ratio_per_round(runs[name], runs["ours_padded"], "peak_rss_mb")
            gains[lever] = {
                "on": name,
                "off": "ours_padded",
                "tokens_per_s_gain": statistics.median(tps) if tps else None,
                "peak_rss_ratio": statistics.median(mem) if mem else None,
            }
        elif not s.single_levers and name in ("ours_grouped", "ours_precomputed"):
            gains[lever] = {"status": "skipped", "reason": "quick mode runs the levers together only"}
        else:
            gains[lever] = {"status": "not_measured", "reason": levers.get(lever) or _reason(runs.get(name))}
    return {
        "status": "ok",
        "trl": {"status": "skipped", "reason": trl_missing} if trl_missing else {"status": "ok"},
        "trl_version": None if trl_missing else _trl_version(),
        "equal_work": equal_work(runs),
        "settings": {
            "shape": s.shape,
            "batch_size": s.batch_size,
            "max_length": s.max_length,
            "max_prompt_length": s.max_prompt_length,
            "warmup_steps": s.warmup,
            "timed_steps": s.steps,
            "rounds": s.rounds,
            "extra_rounds": s.extra_rounds,
            "lr": s.lr,
            "beta": s.beta,
            "threads": s.threads,
        },
        "lever_availability": levers,
        "summary": summary(runs),
        "ratios": ratios,
        "lever_gains": gains,
        "runs": runs,
    }


def _reason(runs: list[dict[str, Any]] | None) -> str | None:
    if not runs:
        return "not run"
    return runs[0].get("reason") or runs[0].get("error")


def _trl_version() -> str | None:
    from dpo_lightning.bench.trl_side import trl_version

    return trl_version()


def equal_work(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Same batches, same weights, same settings: the first steps' losses of both sides must agree (≤ 1e-4)."""
    out = {}
    for ours, trl in (("ours_padded", "trl_padded"), ("ours_levers", "trl_levers")):
        a, b = ok(runs.get(ours, [])), ok(runs.get(trl, []))
        if a and b:
            la, lb = a[0]["losses"], b[0]["losses"]
            diff = max(abs(x - y) for x, y in zip(la, lb, strict=False))
            out[f"{ours} vs {trl}"] = {"ours_losses": la, "trl_losses": lb, "max_abs_diff": diff, "ok": diff <= 1e-4}
    return out


def section_levers(ctx: Context) -> dict[str, Any]:
    """Step-level levers in the bare step loop on HH batches padded to one width (one shape: compile-friendly)."""
    s, a = ctx.s, ctx.assets
    base = {
        "shape": s.shape,
        "vocab": a.vocab,
        "pairs_file": str(ctx.work / "pairs-padded.json") if (ctx.work / "pairs-padded.json").exists() else None,
        "pairs": s.batch_size,
        "seq_len": s.max_length,
        "fill": 0.3,
        "n_batches": 2,
        "warmup": s.warmup,
        "steps": s.lever_steps,
        "threads": s.threads,
        "pad_id": a.pad_id,
    }
    if base["pairs_file"] is None:
        base["pairs_file"] = a.pairs_file
    variants = {
        "base": {},
        "full_log_softmax": {"logps": "log_softmax"},
        "response_only_head": {"head": "response_only"},
    }
    runs = alternate(ctx, {k: ("step", {**base, **v}) for k, v in variants.items()}, s.lever_rounds)
    if s.compile:  # compiling takes a minute or two on CPU: one round, against round 1's base
        variants["compile"] = {"compile": True, "warmup": s.warmup + 1}
        runs.update(alternate(ctx, {"compile": ("step", {**base, **variants["compile"]})}, s.extra_rounds))
    gains = {}
    for name in variants:
        if name == "base":
            continue
        tps = ratio_per_round(runs[name], runs["base"], "tokens_per_s")
        mem = ratio_per_round(runs[name], runs["base"], "peak_rss_mb")
        gains[name] = {
            "tokens_per_s_gain": statistics.median(tps) if tps else None,
            "peak_rss_ratio": statistics.median(mem) if mem else None,
        }
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
    fsdp = fsdp2_available()
    if fsdp is None:
        runs["2_processes_fsdp2"] = (
            "ours_side",
            ours_spec(ctx, batch_size=half, devices=2, strategy="fsdp", threads=1),
        )
    results = alternate(ctx, runs, s.extra_rounds)
    gains = {}
    for name in runs:
        if name != "1_process":
            tps = ratio_per_round(results[name], results["1_process"], "tokens_per_s")
            mem = ratio_per_round(results[name], results["1_process"], "peak_rss_mb")
            gains[name] = {
                "tokens_per_s_vs_1_process": statistics.median(tps) if tps else None,
                "total_peak_rss_vs_1_process": statistics.median(mem) if mem else None,
            }
    return {
        "status": "ok",
        "fsdp2": {"status": "ok"} if fsdp is None else {"status": "not_measured", "reason": fsdp},
        "summary": summary(results),
        "ratios": gains,
        "runs": results,
    }


def fsdp2_available() -> str | None:
    try:
        from dpo_lightning.strategy import FSDP2Strategy  # noqa: F401
    except ImportError as err:
        return f"no FSDP2 strategy in this checkout ({err})"
    return None


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


def section_gpu() -> dict[str, Any]:
    """What a later session with a GPU runs; here, whether there is one."""
    import torch

    have = torch.cuda.is_available()
    commands = [
        "python -m dpo_lightning.bench.step --device cuda --dtype bf16 --fsdp --shape gpt2-medium "
        "--vocab 50257 --seq-len 1024 --pairs 8 --threads 8",
        "python -m dpo_lightning.bench.step --device cuda --dtype bf16 --fsdp --shape llama-1b "
        "--vocab 32000 --seq-len 2048 --pairs 4 --threads 8",
    ]
    return {
        "status": "skipped" if not have else "not_run",
        "reason": "No GPU on this machine" if not have else "Run the commands below on the GPU machine",
        "device": torch.cuda.get_device_name(0) if have else None,
        "commands": commands,
        "mfu_formula": "(6 * trainable params + 2 * reference params) * tokens/s / measured bf16 matmul peak",
    }


def section_profile(ctx: Context) -> dict[str, Any]:
    """Where the time goes: torch.profiler's top operators over one step of each side (HH, same batch), and our
    step split into phases with the full output layer and the response-only one."""
    s, a = ctx.s, ctx.assets
    pairs_file = ctx.work / "pairs-padded.json"
    if not pairs_file.exists():
        batch_order(ctx, False, s.warmup + s.steps)
    runs: dict[str, tuple[str, Any]] = {}
    if s.profile_ops:
        runs["ours"] = ("ours_side", ours_spec(ctx, profile=True, steps=1))
        if trl_available() is None:
            runs["trl"] = ("trl_side", {**trl_spec(ctx, str(pairs_file)), "profile": True, "steps": 1})
    results = alternate(ctx, runs, 1)
    spec = {"phases": True, "shape": s.shape, "vocab": a.vocab, "pairs_file": str(pairs_file), "pairs": s.batch_size}
    spec.update(n_batches=1, threads=s.threads, pad_id=a.pad_id)
    return {
        "status": "ok",
        "top_ops": {name: r[0].get("profile") for name, r in results.items()},
        "profiled_step_s": {name: r[0].get("step_s_median") for name, r in results.items()},
        "phases": call(ctx, "step", spec),
    }
