"""How the bench runs its measurements: sizes, worker processes, alternation and the statistics over rounds.

Every measurement runs in a worker process of its own (``call``), so its peak RSS is its own, and configurations
that are compared take turns within one run (round r runs them in order, round r+1 in reverse), so the drift of a
shared, noisy machine hits both sides alike; ratios are taken per round, then their median is reported. With
``quick`` the workers run in this process, at toy sizes: that checks the harness, not the speed.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_lightning.bench.assets import Assets

# Worker environment: both sides alike. Passive OpenMP waiting: on a shared, oversubscribed CPU, threads that
# spin at barriers make 2-thread steps up to 10x slower and the timings mostly noise.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
WORKER_ENV.update({"WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})


@dataclass
class Settings:
    """Sizes of one bench run: the full one by default; :func:`settings` gives it or the quick one."""

    quick: bool = False
    rounds: int = 3  # alternations of the trl section's ours/TRL runs (not in make bench: side_by_side is)
    lever_rounds: int = 1  # alternations of the step-loop levers
    extra_rounds: int = 1  # alternations of the single-lever HH runs, the process counts and torch.compile
    threads: int = 2
    shape: str = "L2-d128"  # model of the trl section and the levers
    batch_size: int = 8
    max_length: int = 512
    max_prompt_length: int = 256
    max_rows: int | None = 240  # HH rows read (train + val): what the precompute pass scores
    vocab: int = 8192
    warmup: int = 2
    steps: int = 5
    lr: float = 5e-4
    beta: float = 0.1
    sweep_shapes: list[str] = field(default_factory=lambda: ["L2-d128", "L4-d128"])
    sweep_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])
    sweep_pairs: int = 2
    scaling_pairs: list[int] = field(default_factory=lambda: [1, 4])  # extra batch sizes for the first shape
    sweep_steps: int = 2
    lever_steps: int = 3  # timed steps of a step-loop lever run (fixed shapes: steadier than HH batches)
    compile: bool = True
    processes: bool = True
    single_levers: bool = True  # HH runs with one lever on at a time (off: only the response-only head)
    profile_ops: bool = True  # torch.profiler runs of both sides (quick: only the phase split)
    pipeline_rows: int | None = None
    # the side-by-side section (bench/side_by_side.py): the shape, then the peak-RSS shape
    side_shape: str = "L4-d128"
    side_layouts: list[str] = field(default_factory=lambda: ["padded", "packed", "share_prompt", "both"])
    side_rounds: int = 2
    side_warmup: int = 1
    side_steps: int = 3
    side_max_rows: int = 64  # ≥ (warmup + steps) batches of train pairs after the 5% validation split
    rss_shape: str = "L8-d512"  # at GPT-2's 50,257-token vocabulary (../shared/data/tokenizers/gpt2)
    rss_pairs: int = 4  # at 50k vocab and d512 a step of 8 pairs takes minutes on 2 cores; 4 still dominate
    rss_steps: int = 2  # the second step's peak holds AdamW's moments too
    rss_max_rows: int = 24


QUICK = dict(
    quick=True, rounds=1, shape="L2-d64", batch_size=2, max_length=64, max_prompt_length=32, max_rows=48, vocab=512,
    warmup=1, steps=1, sweep_shapes=["L2-d64"], sweep_lengths=[32, 64], scaling_pairs=[1], sweep_steps=1,
    lever_steps=1, compile=False, processes=False, single_levers=False, profile_ops=False, pipeline_rows=48,
    side_shape="L2-d64", side_layouts=["padded", "both"], side_rounds=1, side_steps=1, side_max_rows=48,
    rss_shape="L2-d64", rss_pairs=2, rss_steps=1, rss_max_rows=8,
)  # fmt: skip


def settings(quick: bool, rounds: int | None = None, threads: int = 2) -> Settings:
    """The full sizes, or the quick ones (toy sizes: a harness check); ``rounds`` overrides both sections'."""
    s = Settings(**QUICK) if quick else Settings()
    s.threads = threads
    if rounds:
        s.rounds = s.side_rounds = rounds
    return s


@dataclass
class Context:
    out: Path
    work: Path
    s: Settings
    assets: Assets
    log: Callable[[str], None] = print
    calls: int = 0


# ---------------------------------------------------------------------------------------------------- workers
def call(ctx: Context, module: str, spec: Any, timeout: float = 900) -> Any:
    """Run ``python -m dpo_lightning.bench.<module> SPEC OUT`` (in this process when quick); its JSON result.

    A worker of a multi-process run leaves one file per rank: they come back as ``{"ranks": [...]}``.
    """
    ctx.calls += 1
    specs = ctx.work / "specs"
    specs.mkdir(parents=True, exist_ok=True)
    spec_file, out_file = specs / f"{ctx.calls:03d}-{module}.json", specs / f"{ctx.calls:03d}-{module}.out.json"
    spec_file.write_text(json.dumps(spec, indent=1))
    if ctx.s.quick:
        import importlib

        importlib.import_module(f"dpo_lightning.bench.{module}").main([str(spec_file), str(out_file)])
    else:
        env = {**os.environ, **WORKER_ENV}
        cmd = [sys.executable, "-m", f"dpo_lightning.bench.{module}", str(spec_file), str(out_file)]
        # a session of its own: on a timeout the whole group goes, ranks a launcher started included
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(f"worker {module} timed out after {timeout:.0f} s") from None
        if proc.returncode != 0 or not out_file.exists():
            raise RuntimeError(f"worker {module} failed (exit {proc.returncode}): {output[-1500:]}")
    result = json.loads(out_file.read_text())
    ranks = sorted(out_file.parent.glob(out_file.name + ".rank*"))
    if ranks:
        return merge_ranks([result] + [json.loads(r.read_text()) for r in ranks])
    return result


def merge_ranks(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One result for a multi-process run: tokens/s summed over ranks, peak RSS summed (the machine's total)."""
    if any(r.get("status", "ok") != "ok" for r in ranks):
        return next(r for r in ranks if r.get("status", "ok") != "ok")
    return {
        "tokens_per_s": sum(r["tokens_per_s"] for r in ranks),
        "peak_rss_mb": sum(r["peak_rss_mb"] for r in ranks),
        "peak_rss_mb_per_process": max(r["peak_rss_mb"] for r in ranks),
        "step_s_median": max(r["step_s_median"] for r in ranks),
        "tokens_per_step": sum(r["tokens_per_step"] for r in ranks),
        "losses": ranks[0].get("losses"),
        "threads": ranks[0].get("threads"),
        "processes": len(ranks),
        "param_mb_per_process": [r.get("param_mb") for r in ranks],  # FSDP: each rank's shards
    }


def alternate(ctx: Context, runs: dict[str, tuple[str, Any]], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Run each named (worker, spec) once per round, in order on even rounds and reversed on odd ones."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            module, spec = runs[name]
            start = time.perf_counter()
            try:
                result = call(ctx, module, spec)
            except Exception as err:  # noqa: BLE001 - one failed run is recorded, the rest go on
                result = {"status": "error", "error": f"{type(err).__name__}: {err}"[-2000:]}
            result.setdefault("status", "ok")
            result["round"] = r
            results[name].append(result)
            ctx.log(f"  round {r + 1}/{rounds} {name}: {_brief(result)} ({time.perf_counter() - start:.0f} s)")
    return results


def _brief(result: dict[str, Any]) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')}: {result.get('reason') or result.get('error', '')[:300]}"
    return f"{result['tokens_per_s']:.0f} tokens/s, peak RSS {result['peak_rss_mb']:.0f} MiB"


def ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r.get("status") == "ok"]


def median_of(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in ok(results)]
    return statistics.median(values) if values else None


def ratio_per_round(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
    """a/b of ``key`` for each round where both ran."""
    by_round = {r["round"]: r for r in ok(b)}
    return [x[key] / by_round[x["round"]][key] for x in ok(a) if x["round"] in by_round]


def ratios(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """a/b of tokens/s and of peak RSS: the median of the per-round ratios (the medians' ratio when a and b ran
    in different rounds), and the per-round values."""
    out: dict[str, Any] = {}
    for key, name in (("tokens_per_s", "tokens_per_s_ratio"), ("peak_rss_mb", "peak_rss_ratio")):
        per_round = ratio_per_round(a, b, key)
        if not per_round and median_of(a, key) and median_of(b, key):
            per_round = [median_of(a, key) / median_of(b, key)]
        out[name] = statistics.median(per_round) if per_round else None
        out[f"per_round_{name}"] = per_round
    return out


def summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {
        name: {
            "tokens_per_s": median_of(runs, "tokens_per_s"),
            "peak_rss_mb": median_of(runs, "peak_rss_mb"),
            "runs": len(ok(runs)),
            "status": "ok" if ok(runs) else (runs[0].get("status") if runs else "not_run"),
            "reason": None if ok(runs) else (runs[0].get("reason") or runs[0].get("error") if runs else None),
        }
        for name, runs in results.items()
    }


def linear_fit(x: list[float], y: list[float]) -> dict[str, float] | None:
    """Least-squares y = a + b·x and its R²."""
    n = len(x)
    if n < 2 or len(set(x)) < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y, strict=True))
    ss_tot = sum((yi - my) ** 2 for yi in y)
    return {"intercept_s": a, "slope_s_per_token": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0, "points": n}
