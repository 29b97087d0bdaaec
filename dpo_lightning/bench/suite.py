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
    """Sizes of one bench run; :func:`settings` gives the full and the quick ones."""

    quick: bool
    rounds: int  # alternations of the ours/TRL comparison
    lever_rounds: int  # alternations of the step-loop levers
    extra_rounds: int  # alternations of the single-lever HH runs, the process counts and torch.compile
    threads: int
    shape: str  # model of the comparison and the levers
    batch_size: int
    max_length: int
    max_prompt_length: int
    max_rows: int | None  # HH rows read (train + val): what the precompute pass scores
    vocab: int
    warmup: int
    steps: int
    lr: float = 5e-4
    beta: float = 0.1
    sweep_shapes: list[str] = field(default_factory=list)
    sweep_lengths: list[int] = field(default_factory=list)
    sweep_pairs: int = 4
    scaling_pairs: list[int] = field(default_factory=list)  # extra batch sizes for the first sweep shape
    sweep_steps: int = 2
    lever_steps: int = 3  # timed steps of a step-loop lever run (fixed shapes: steadier than HH batches)
    compile: bool = True
    processes: bool = True
    single_levers: bool = True  # HH runs with one lever on at a time (quick: only the response-only head)
    profile_ops: bool = True  # torch.profiler runs of both sides (quick: only the phase split)
    pipeline_rows: int | None = None


def settings(quick: bool, rounds: int | None = None, threads: int = 2) -> Settings:
    if quick:
        return Settings(
            quick=True,
            rounds=rounds or 1,
            lever_rounds=1,
            extra_rounds=1,
            threads=threads,
            shape="L2-d64",
            batch_size=2,
            max_length=64,
            max_prompt_length=32,
            max_rows=48,
            vocab=512,
            warmup=1,
            steps=1,
            sweep_shapes=["L2-d64"],
            sweep_lengths=[32, 64],
            sweep_pairs=2,
            scaling_pairs=[1],
            sweep_steps=1,
            lever_steps=1,
            compile=False,
            processes=False,
            single_levers=False,
            profile_ops=False,
            pipeline_rows=48,
        )
    return Settings(
        quick=False,
        rounds=rounds or 3,
        lever_rounds=2,
        extra_rounds=1,
        threads=threads,
        shape="L2-d128",
        batch_size=8,
        max_length=512,
        max_prompt_length=256,
        max_rows=240,
        vocab=8192,
        warmup=2,
        steps=5,
        sweep_shapes=["L2-d128", "L2-d256", "L4-d128", "L4-d256"],
        sweep_lengths=[256, 512, 1024],
        sweep_pairs=2,
        scaling_pairs=[1, 4],
        pipeline_rows=None,
    )


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
