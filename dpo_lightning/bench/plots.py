"""PNG plots next to reports/bench/README.md (none when matplotlib is missing)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


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
