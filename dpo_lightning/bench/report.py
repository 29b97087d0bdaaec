"""Turn results.json into reports/bench/README.md and plots (matplotlib when installed; the table stands alone)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

TARGETS = (  # (label, section path, key, target, "min" | "max"): ours as shipped (response-only head)
    ("tokens/s ours/TRL, reference every step", "reference_every_step_response_only", "tokens_per_s_ratio", 1.3, "min"),
    (
        "tokens/s ours/TRL, precomputed reference + length grouping",
        "precomputed_and_grouped_response_only",
        "tokens_per_s_ratio",
        1.8,
        "min",
    ),
    ("peak RSS ours/TRL, reference every step", "reference_every_step_response_only", "peak_rss_ratio", 1.0, "max"),
    (
        "peak RSS ours/TRL, precomputed reference + length grouping",
        "precomputed_and_grouped_response_only",
        "peak_rss_ratio",
        1.0,
        "max",
    ),
)
FULL_HEAD = (  # the same ratios with model.score_response_only: false (every position through the output layer)
    ("tokens/s ours/TRL, reference every step", "reference_every_step", "tokens_per_s_ratio"),
    ("tokens/s ours/TRL, precomputed + grouped", "precomputed_and_grouped", "tokens_per_s_ratio"),
    ("peak RSS ours/TRL, reference every step", "reference_every_step", "peak_rss_ratio"),
    ("peak RSS ours/TRL, precomputed + grouped", "precomputed_and_grouped", "peak_rss_ratio"),
)


def _f(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _status_line(section: dict[str, Any]) -> str | None:
    status = section.get("status")
    if status in ("skipped", "error", "not_measured"):
        return f"*{status}*: {section.get('reason') or section.get('error')}"
    return None


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


def render(results: dict[str, Any], plots: dict[str, str]) -> list[str]:
    m = results["machine"]
    v = m["versions"]
    trl = results.get("trl", {})
    lines = [
        "# Benchmark: DPO step throughput and memory, side by side with TRL",
        "",
        f"Written by `python -m dpo_lightning.bench{' --quick' if results['mode'] == 'quick' else ''}` "
        f"({results['mode']} mode) on {m['date']}, in {results.get('seconds', 0) / 60:.1f} min.",
        f"Machine: `{m['host']}`, {m['cpu'] or 'CPU'} ({m['cpu_count']} cores, {_f(m['memory_gb'], 0)} GiB), "
        f"load average {_f(m['load_average_at_start'][0], 1)} at start and "
        f"{_f((m.get('load_average_at_end') or [None])[0], 1)} at the end (the machine is shared: "
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
    lines += ["## Targets", ""]
    ratios = trl.get("ratios", {})
    rows = []
    for label, key, field, target, kind in TARGETS:
        value = ratios.get(key, {}).get(field)
        met = None if value is None else (value >= target if kind == "min" else value <= target)
        rows.append(
            [
                label,
                None if value is None else f"{value:.3f}",
                f"{'≥' if kind == 'min' else '≤'} {target}",
                {None: "not measured", True: "yes", False: "**no**"}[met],
            ]
        )
    lines += _table(["ratio (median over rounds)", "measured", "target", "met"], rows)
    if results["mode"] != "quick":
        lines += render_findings(results)
    full_head = [[label, ratios.get(key, {}).get(field)] for label, key, field in FULL_HEAD if key in ratios]
    if full_head:
        lines += ["With `model.score_response_only: false` (every position through the output layer):", ""]
        lines += _table(["ratio", "measured"], full_head)

    # ------------------------------------------------------------------ 1. TRL
    lines += ["## 1. Ours vs TRL's DPOTrainer on Anthropic HH", ""]
    if _status_line(trl):
        lines += [_status_line(trl), ""]
    else:
        st = trl["settings"]
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
        lines += _table(["configuration", "tokens/s (median)", "peak RSS MiB (median)", "runs", "note"], rows)
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
        lines += _table(
            ["ratio", "ours", "TRL", "tokens/s ours/TRL", "peak RSS ours/TRL", "per round (tokens/s)"], rows
        )
        eq = trl.get("equal_work", {})
        if eq:
            lines += [
                "Equal work: the losses of the first three steps, both sides, same batches (the first is ln 2 "
                "by construction; the next two test gradients, clipping and AdamW):",
                "",
            ]
            rows = [
                [
                    k,
                    ", ".join(f"{x:.6f}" for x in e["ours_losses"]),
                    ", ".join(f"{x:.6f}" for x in e["trl_losses"]),
                    f"{e['max_abs_diff']:.1e}",
                    "yes" if e["ok"] else "**no**",
                ]
                for k, e in eq.items()
            ]
            lines += _table(["runs", "ours", "TRL", "max |diff|", "≤ 1e-4"], rows)
        if "trl" in plots:
            lines += [f"![tokens/s per configuration]({plots['trl']})", ""]

    lines += render_profile(results.get("profile", {}))

    # ------------------------------------------------------------------ 2. levers
    lines += ["## 2. Levers, each on vs off in the same run", ""]
    rows = []
    for lever, g in trl.get("lever_gains", {}).items():
        rows.append(
            [f"{lever} (HH, Lightning)", g.get("tokens_per_s_gain"), g.get("peak_rss_ratio"), g.get("reason") or ""]
        )
    lev = results.get("levers", {})
    for lever, g in lev.get("gains", {}).items():
        rows.append(
            [f"{lever} (step loop)", g.get("tokens_per_s_gain"), g.get("peak_rss_ratio"), g.get("reason") or ""]
        )
    lines += _table(["lever", "tokens/s on/off", "peak RSS on/off", "note"], rows)
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
    if _status_line(lev):
        lines += [_status_line(lev), ""]

    # ------------------------------------------------------------------ 3. sweep
    sw = results.get("sweep", {})
    lines += ["## 3. Step throughput, memory and scaling (synthetic full-length rows)", ""]
    if _status_line(sw):
        lines += [_status_line(sw), ""]
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
        lines += _table(
            ["shape", "params", "seq len", "pairs", "tokens/step", "step s", "tokens/s", "peak RSS MiB"], rows
        )
        rows = [
            [shape, f["slope_s_per_token"] * 1e3, f["intercept_s"], f["r2"], f["points"]]
            for shape, f in sw.get("step_time_fit", {}).items()
        ]
        lines += ["Step time vs tokens per step, least-squares line per shape:", ""]
        lines += _table(["shape", "s per 1k tokens", "intercept s", "R²", "points"], rows)
        for key in ("scaling", "memory"):
            if key in plots:
                lines += [f"![{key}]({plots[key]})", ""]

    # ------------------------------------------------------------------ 4. processes
    pr = results.get("processes", {})
    lines += ["## 4. One process vs two (DDP, FSDP2) on the same cores", ""]
    if _status_line(pr):
        lines += [_status_line(pr), ""]
    elif pr.get("summary"):
        rows = [
            [name, x["tokens_per_s"], x["peak_rss_mb"], x["runs"], x.get("reason") or ""]
            for name, x in pr["summary"].items()
        ]
        lines += _table(["configuration", "tokens/s (all processes)", "peak RSS MiB (sum)", "runs", "note"], rows)
        rows = [[k, g["tokens_per_s_vs_1_process"], g["total_peak_rss_vs_1_process"]] for k, g in pr["ratios"].items()]
        lines += _table(["vs 1 process × 2 threads", "tokens/s", "peak RSS (sum)"], rows)

    # ------------------------------------------------------------------ 5. pipeline
    pl = results.get("pipeline", {})
    lines += ["## 5. Data pipeline: `PreferenceDataModule.setup()` pairs/s", ""]
    if _status_line(pl):
        lines += [_status_line(pl), ""]
    else:
        rows = []
        for name in ("hh", "imdb"):
            if name in pl:
                for kind in ("cold", "cached"):
                    x = pl[name][kind]
                    rows.append([name, kind, x["pairs"], x["seconds"], x["pairs_per_s"]])
        lines += _table(["data", "cache", "pairs", "seconds", "pairs/s"], rows)

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

    from dpo_lightning.bench.lora import render_lora  # (imports torch: only when rendering this section)

    lines += render_lora(results.get("lora", {}))

    # ------------------------------------------------------------------ reproduce
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "make bench                                             # installs the bench extra (pinned trl), runs all",
        ".venv/bin/python -m dpo_lightning.bench --sections trl --rounds 5   # the comparison alone, more rounds",
        ".venv/bin/python -m dpo_lightning.bench.step --shape L4-d256 --seq-len 1024 --pairs 4   # one step config",
        ".venv/bin/python -m dpo_lightning.bench --quick --out /tmp/bench  # harness check (seconds)",
        "```",
        "",
        "Raw numbers, every run and round: `results.json`.",
    ]
    return lines


def head_share(phases: dict[str, Any]) -> float | None:
    """Share of the no-grad policy forward spent after the backbone: output layer + log-softmax."""
    full = phases.get("full", {})
    total, backbone = full.get("policy forward (no grad)"), full.get("backbone forward (no grad)")
    return (total - backbone) / total if total and backbone is not None else None


def render_findings(results: dict[str, Any]) -> list[str]:
    """The numbers behind the response-only head, in a few sentences (empty when the sections did not run)."""
    prof = results.get("profile", {})
    ph = prof.get("phases") or {}
    trl = results.get("trl", {})
    gains = trl.get("lever_gains", {}).get("response_only_head", {})
    if not ph.get("full") or gains.get("tokens_per_s_gain") is None:
        return []
    slots = ph["rows"] * (ph["width"] - 1)
    share = head_share(ph)
    full, resp = ph["full"], ph["response_only"]
    step_full = sum(full[k] for k in ("policy forward", "reference forward", "policy backward", "optimizer step"))
    step_resp = sum(resp[k] for k in ("policy forward", "reference forward", "policy backward", "optimizer step"))
    return [
        "**Findings.** "
        f"In an HH batch of {ph['rows']} rows padded to {ph['width']} tokens, {ph['real_tokens']} of the "
        f"{ph['rows'] * ph['width']} slots are real tokens and only {ph['response_positions']} "
        f"({ph['response_positions'] / slots:.0%} of the scored positions) are response tokens, the only ones "
        "whose log-probs enter the loss. With the `full` head, `concatenated_logps` projects every position onto the "
        f"vocabulary and takes its log-softmax: that output layer is {share:.0%} of the policy's forward time "
        "(section 'Where the time goes'), and its (2B, T, V) logits, their softmax and their gradient are the "
        "peak memory. Projecting only the response positions (the shipped `logps.response_logps`, a forward "
        "pre-hook on the output layer; `model.score_response_only`) gives the same log-probs (to float "
        f"rounding) and cuts the step from {step_full:.2f} s to {step_resp:.2f} s on that batch; through the whole "
        f"Lightning loop on HH it is ×{gains['tokens_per_s_gain']:.2f} tokens/s at "
        f"×{gains['peak_rss_ratio']:.2f} peak RSS.",
        "",
    ]


def render_profile(prof: dict[str, Any]) -> list[str]:
    lines = ["## Where the time goes", ""]
    if _status_line(prof):
        return lines + [_status_line(prof), ""]
    if not prof:
        return []
    ph = prof.get("phases") or {}
    if ph.get("full"):
        lines += [
            f"Our step in phases (seconds, median of 3) on one HH batch ({ph['rows']} rows × {ph['width']} tokens, "
            f"{ph['real_tokens']} real tokens, {ph['response_positions']} response positions), output layer as "
            "shipped vs response-only:",
            "",
        ]
        rows = [[k, ph["full"][k], ph["response_only"].get(k)] for k in ph["full"]]
        lines += _table(["phase", "full head", "response-only head (shipped)"], rows)
        share = head_share(ph)
        if share is not None:
            lines += [f"Output layer + log-softmax: {share:.0%} of the policy forward with the full head.", ""]
    tops = prof.get("top_ops") or {}
    if any(tops.values()):
        names = [n for n in tops if tops[n]]
        depth = max(len(tops[n]) for n in names)
        header = []
        for n in names:
            header += [f"{n}: op", "ms", "share"]
        rows = []
        for i in range(min(depth, 10)):
            row: list[Any] = []
            for n in names:
                t = tops[n]
                row += [f"`{t[i]['op']}`", t[i]["self_cpu_ms"], f"{t[i]['share']:.0%}"] if i < len(t) else ["", "", ""]
            rows.append(row)
        steps = prof.get("profiled_step_s", {})
        lines += [
            "torch.profiler, one step after warm-up, same batch, top operators by self CPU time (step: "
            + ", ".join(f"{n} {_f(steps.get(n))} s" for n in names)
            + "):",
            "",
        ]
        lines += _table(header, rows)
    return lines


def make_plots(out: Path, results: dict[str, Any]) -> dict[str, str]:
    """PNG plots next to the README; {} when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    plots: dict[str, str] = {}
    trl = results.get("trl", {})
    runs = trl.get("runs", {})
    names = [n for n, rs in runs.items() if any(r.get("status") == "ok" for r in rs)]
    if names:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for i, name in enumerate(names):
            values = [r["tokens_per_s"] for r in runs[name] if r.get("status") == "ok"]
            color = "tab:orange" if name.startswith("trl") else "tab:blue"
            ax.bar(i, statistics.median(values), color=color, alpha=0.6)
            ax.plot([i] * len(values), values, "k.", ms=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("tokens/s (bar: median; dots: rounds)")
        ax.set_title("ours (blue) vs TRL DPOTrainer (orange), HH")
        fig.tight_layout()
        fig.savefig(out / "trl_tokens_per_s.png", dpi=110)
        plt.close(fig)
        plots["trl"] = "trl_tokens_per_s.png"
    sw = results.get("sweep", {})
    points = [p for p in sw.get("points", []) if p.get("status") == "ok"]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        for shape in dict.fromkeys(p["shape"] for p in points):
            mine = [p for p in points if p["shape"] == shape]
            ax.plot([p["tokens_per_step"] for p in mine], [p["step_s"] for p in mine], "o", label=shape)
            fit = sw.get("step_time_fit", {}).get(shape)
            if fit:
                xs = [0, max(p["tokens_per_step"] for p in mine)]
                ax.plot(
                    xs,
                    [fit["intercept_s"] + fit["slope_s_per_token"] * x for x in xs],
                    "-",
                    lw=0.8,
                    color=ax.lines[-1].get_color(),
                )
        ax.set_xlabel("real tokens per step (chosen + rejected)")
        ax.set_ylabel("step time, s")
        ax.legend(fontsize=8)
        ax.set_title("step time vs tokens per step (lines: fits)")
        fig.tight_layout()
        fig.savefig(out / "step_time_vs_tokens.png", dpi=110)
        plt.close(fig)
        plots["scaling"] = "step_time_vs_tokens.png"
        fig, ax = plt.subplots(figsize=(6, 4))
        for shape, series in sw.get("memory_vs_seq_len", {}).items():
            if series:
                xs = sorted(series, key=int)
                ax.plot([int(x) for x in xs], [series[x] for x in xs], "o-", label=shape)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("peak RSS, MiB")
        ax.legend(fontsize=8)
        ax.set_title(f"peak memory vs sequence length ({sw.get('pairs_per_step')} pairs/step)")
        fig.tight_layout()
        fig.savefig(out / "memory_vs_seq_len.png", dpi=110)
        plt.close(fig)
        plots["memory"] = "memory_vs_seq_len.png"
    return plots
