"""Turn results.json into reports/bench/README.md and plots (matplotlib when installed; the table stands alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_lightning.bench.lora import render_lora
from dpo_lightning.bench.plots import make_plots
from dpo_lightning.bench.profile import render_findings, render_profile
from dpo_lightning.bench.report_format import equal_work_table, fmt, status_line, table
from dpo_lightning.bench.side_by_side import render_side, render_targets
from dpo_lightning.bench.suite import ok


def write_report(out: Path, results: dict[str, Any]) -> None:
    plots = make_plots(out, results)
    (out / "README.md").write_text("\n".join(render(results, plots)) + "\n")


def _gpu_line(gpu: dict[str, Any], m: dict[str, Any]) -> str:
    """The headline's GPU sentence, from the gpu section: none on this machine, or which one (not used here)."""
    if gpu.get("device"):
        return (
            f"**GPU: {gpu['device']}** on this machine (`{m['host']}`, {m['date'][:10]}), not used by this run: the "
            "GPU numbers (tokens/s and MFU for GPT-2-medium and a ~1B Llama in bf16 with FSDP2) come from the "
            "commands in section 6."
        )
    return (
        f"**GPU: none.** This machine (`{m['host']}`, {m['date'][:10]}) has no GPU, so the GPU numbers (tokens/s "
        "and MFU for GPT-2-medium and a ~1B Llama in bf16 with FSDP2) are not measured here; section 6 gives the "
        "commands for a session on a GPU machine."
    )


def _param_mb(run: dict[str, Any]) -> str | None:
    """Policy + reference parameter MiB each process holds (its shards under FSDP)."""
    per = run.get("param_mb_per_process") or ([run["param_mb"]] if run.get("param_mb") is not None else [])
    return ", ".join(f"{x:.1f}" for x in per if x is not None) or None


def render(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    m = results["machine"]
    v = m["versions"]
    trl = results.get("trl", {})
    lines = [
        "# Benchmark: DPO step throughput and memory, side by side with TRL",
        "",
        f"Written by `python -m dpo_lightning.bench{' --quick' if results['mode'] == 'quick' else ''}` "
        f"({results['mode']} mode) on {m['date']}, in {results.get('seconds', 0) / 60:.1f} min.",
        f"Machine: `{m['host']}`, {m['cpu'] or 'CPU'} ({m['cpu_count']} cores, {fmt(m['memory_gb'], 0)} GiB), "
        f"load average {fmt(m['load_average_at_start'][0], 1)} at start and "
        f"{fmt((m.get('load_average_at_end') or [None])[0], 1)} at the end (the machine is shared: "
        "absolute numbers move with the load, so compared runs take turns and ratios are per round).",
        f"Versions: torch {v['torch']}, lightning {v['lightning']}, transformers {v['transformers']}, "
        f"datasets {v['datasets']}, trl {v['trl']}, accelerate {v['accelerate']}. Worker environment: "
        + ", ".join(f"`{k}={val}`" for k, val in m["worker_env"].items())
        + ".",
        "",
        _gpu_line(results.get("gpu") or {}, m),
        "",
    ]
    if results["mode"] == "quick":
        lines += [
            "*Quick mode: toy sizes, every worker in one process. It checks the harness; the numbers mean nothing.*",
            "",
        ]

    # ------------------------------------------------------------------ headline
    side = results.get("side_by_side", {})
    lines += render_targets(side)
    if results["mode"] != "quick":
        lines += render_findings(results)
    lines += render_side(side)

    # ------------------------------------------------------------------ 1. TRL
    lines += ["## 1. Ours vs TRL's DPOTrainer on Anthropic HH", ""]
    if status_line(trl):
        lines += [status_line(trl), ""]
    else:
        st, ratios = trl["settings"], trl.get("ratios", {})
        if trl.get("trl", {}).get("status") == "skipped":
            lines += [f"TRL side *skipped*: {trl['trl']['reason']}", ""]
        lines += [
            f"Same saved random-init GPT-2 ({st['shape']}), same {results['assets']['vocab']}-token BPE tokenizer, "
            "same HH pairs in the same batches "
            f"({st['batch_size']} pairs, max_length {st['max_length']}, max_prompt_length {st['max_prompt_length']}), "
            f"sigmoid loss β {st['beta']}, AdamW lr {st['lr']} constant, gradient clipping 1.0, fp32, no activation "
            f"checkpointing, {st['threads']} threads. TRL {trl.get('trl_version')} with `bf16=False` and "
            "`gradient_checkpointing=False` (its defaults are on; off here so both do the same work). Each run is a "
            f"fresh process: {st['warmup_steps']} warm-up steps, then {st['timed_steps']} timed steps; tokens are "
            "the real (non-pad) tokens of chosen + rejected. The comparison alternates for "
            f"{st['rounds']} rounds; single-lever runs for {st.get('extra_rounds', st.get('lever_rounds'))}.",
            "",
        ]
        rows = [
            [name, x["tokens_per_s"], x["peak_rss_mb"], x["runs"], x["status"] if x["status"] != "ok" else ""]
            for name, x in trl["summary"].items()
        ]
        lines += table(["configuration", "tokens/s (median)", "peak RSS MiB (median)", "runs", "note"], rows)
        rows = [
            [
                label,
                r["ours"],
                r["trl"],
                r["tokens_per_s_ratio"],
                r["peak_rss_ratio"],
                ", ".join(f"{x:.2f}" for x in r["per_round_tokens_per_s_ratio"]),
            ]
            for label, r in ratios.items()
        ]
        lines += table(["ratio", "ours", "TRL", "tokens/s ours/TRL", "peak RSS ours/TRL", "per round (tokens/s)"], rows)
        lines += equal_work_table(trl.get("equal_work", {}))
        if "trl" in plots:
            lines += [f"![tokens/s per configuration]({plots['trl']})", ""]

    lines += render_profile(results.get("profile", {}))

    # ------------------------------------------------------------------ 2. levers
    lines += ["## 2. Levers, each on vs off in the same run", ""]
    rows = []
    for lever, g in trl.get("lever_gains", {}).items():
        rows.append(
            [f"{lever} (HH, Lightning)", g.get("tokens_per_s_ratio"), g.get("peak_rss_ratio"), g.get("reason") or ""]
        )
    lev = results.get("levers", {})
    for lever, g in lev.get("gains", {}).items():
        rows.append(
            [f"{lever} (step loop)", g.get("tokens_per_s_ratio"), g.get("peak_rss_ratio"), g.get("reason") or ""]
        )
    lines += table(["lever", "tokens/s on/off", "peak RSS on/off", "note"], rows)
    if lev.get("base"):
        b = lev["base"]
        lines += [
            f"Step-loop levers: `PreferenceModule.model_step` + backward + AdamW in a plain loop on HH batches "
            f"of {b['pairs']} pairs padded to one width, {b['warmup']} warm-up + {b['steps']} timed steps per "
            "run; on/off is the lever's tokens/s over the shipped step's, same round. `full_log_softmax`: the "
            "(B, T, V) log-softmax then gather, instead of the package's gather − logsumexp. `compile`: "
            "`torch.compile` of the policy's and the reference's forward (one round; its compile time is in the "
            "warm-up). `response_only_head`: the shipped output layer, run only at response positions, against "
            "`full` (findings above). Single-lever HH runs and the "
            "process counts ran one round each, so they carry the round-to-round spread that section 1 shows.",
            "",
        ]
    if status_line(lev):
        lines += [status_line(lev), ""]

    # ------------------------------------------------------------------ 3. sweep
    sw = results.get("sweep", {})
    lines += ["## 3. Step throughput, memory and scaling (synthetic full-length rows)", ""]
    if status_line(sw):
        lines += [status_line(sw), ""]
    if sw.get("points"):
        rows = [
            [
                p["shape"],
                p.get("params"),
                p.get("seq_len"),
                p.get("pairs"),
                p.get("tokens_per_step"),
                p.get("step_s"),
                p.get("tokens_per_s"),
                p.get("peak_rss_mb"),
            ]
            for p in sw["points"]
            if p["status"] == "ok"
        ]
        lines += table(
            ["shape", "params", "seq len", "pairs", "tokens/step", "step s", "tokens/s", "peak RSS MiB"], rows
        )
        rows = [
            [shape, f["slope_s_per_token"] * 1e3, f["intercept_s"], f["r2"], f["points"]]
            for shape, f in sw.get("step_time_fit", {}).items()
        ]
        lines += ["Step time vs tokens per step, least-squares line per shape:", ""]
        lines += table(["shape", "s per 1k tokens", "intercept s", "R²", "points"], rows)
        for key in ("scaling", "memory"):
            if key in plots:
                lines += [f"![{key}]({plots[key]})", ""]

    # ------------------------------------------------------------------ 4. processes
    pr = results.get("processes", {})
    lines += ["## 4. One process vs two (DDP, FSDP2) on the same cores", ""]
    if status_line(pr):
        lines += [status_line(pr), ""]
    elif pr.get("summary"):
        params = {n: (ok(r) or [{}])[0] for n, r in pr["runs"].items()}
        rows = [
            [name, x["tokens_per_s"], x["peak_rss_mb"], _param_mb(params[name]), x["runs"], x.get("reason") or ""]
            for name, x in pr["summary"].items()
        ]
        header = ["configuration", "tokens/s (all processes)", "peak RSS MiB (sum)", "parameter MiB per process"]
        lines += table(header + ["runs", "note"], rows)
        rows = [[k, g.get("tokens_per_s_ratio"), g.get("peak_rss_ratio")] for k, g in pr["ratios"].items()]
        lines += table(["vs 1 process × 2 threads", "tokens/s", "peak RSS (sum)"], rows)

    # ------------------------------------------------------------------ 5. pipeline
    pl = results.get("pipeline", {})
    lines += ["## 5. Data pipeline: `PreferenceDataModule.setup()` pairs/s", ""]
    if status_line(pl):
        lines += [status_line(pl), ""]
    else:
        rows = []
        for name in ("hh", "imdb"):
            if name in pl:
                for kind in ("cold", "cached"):
                    x = pl[name][kind]
                    rows.append([name, kind, x["pairs"], x["seconds"], x["pairs_per_s"]])
        lines += table(["data", "cache", "pairs", "seconds", "pairs/s"], rows)

    # ------------------------------------------------------------------ 6. GPU
    gpu = results.get("gpu", {})
    lines += ["## 6. GPU (not run here)", ""]
    if gpu.get("commands"):
        reason = gpu.get("reason") or ""
        lines += [
            f"{reason[:1].upper()}{reason[1:]}. On a GPU machine (needs torch, lightning, transformers; no datasets or "
            "wandb), each command prints one JSON line with tokens/s, peak memory and MFU = "
            f"{gpu['mfu_formula']}:",
            "",
            "```bash",
            *gpu["commands"],
            "```",
            "",
        ]

    lines += render_lora(results.get("lora", {}))

    # ------------------------------------------------------------------ reproduce
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "make bench                                             # installs the bench extra (pinned trl), runs all",
        ".venv/bin/python -m dpo_lightning.bench --sections side_by_side --rounds 3   # the issue-12 table alone",
        ".venv/bin/python -m dpo_lightning.bench --sections trl --rounds 3   # the older comparison, more rounds",
        ".venv/bin/python -m dpo_lightning.bench.step --shape L4-d256 --seq-len 1024 --pairs 4   # one step config",
        ".venv/bin/python -m dpo_lightning.bench --quick --out /tmp/bench  # harness check (a few minutes)",
        ".venv/bin/python -m dpo_lightning.bench.chunked_head   # the log-prob head's peak memory, vocab 50k/128k",
        ".venv/bin/python -m dpo_lightning.bench.ppo_vs_dpo     # a PPO step against a DPO step, tokens/s",
        "```",
        "",
        "Raw numbers, every run and round: `results.json`.",
    ]
    return lines
