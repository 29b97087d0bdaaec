"""Tables: every run's final values, each variant's mean ± 95% band, and a sweep's ranked summary."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_lightning.comparing.runs import Run
from dpo_lightning.comparing.stats import Variant, mean_ci

if TYPE_CHECKING:
    from dpo_lightning.sweep_space import SweepSpec


def cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats to 4 significant digits."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(out)


def write_table_csv(path: Path, headers: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")  # several runners may rewrite it: replace atomically
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    tmp.replace(path)


def final_table(runs: list[Run], columns: list[str]) -> tuple[list[str], list[list[Any]]]:
    extra_keys = sorted({k for r in runs for k in r.extras})
    seed_keys = sorted({k for r in runs for k in r.seed})
    headers = ["run", "loss", "beta", *extra_keys, *seed_keys, "state", "last_step", *columns]
    rows = [
        [
            r.label,
            r.loss,
            r.beta,
            *(r.extras.get(k) for k in extra_keys),
            *(r.seed.get(k) for k in seed_keys),
            r.state,
            int(max((p[0] for c in r.curves.values() for p in c), default=0)),
            *(r.final(c) for c in columns),
        ]
        for r in runs
    ]
    return headers, rows


def variant_table(groups: list[Variant], columns: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Per variant: seeds that finished and ``mean ± half-width`` of each column's final value."""
    extra_keys = sorted({k for g in groups for k in g.extras})
    headers = ["loss", "beta", *extra_keys, "seeds", *columns]
    rows = []
    for g in groups:
        done = [r for r in g.runs if r.usable]
        row: list[Any] = [g.loss, g.beta, *(g.extras.get(k) for k in extra_keys), len(done)]
        for c in columns:
            finals = [v for r in done if (v := r.final(c)) is not None]
            if finals:
                m, h = mean_ci(finals)
                row.append(f"{m:.4g} ± {h:.2g}" if len(finals) > 1 else f"{m:.4g}")
            else:
                row.append(None)
        rows.append(row)
    return headers, rows


def _relative(path: str | None, folder: Path) -> str | None:
    try:
        return str(Path(path).relative_to(folder)) if path else None
    except ValueError:
        return path


def write_sweep_summary(spec: SweepSpec, folder: Path) -> str:
    """Write a sweep's ``summary.csv`` and ``summary.md`` from its trials' ``trial.json``; return the Markdown.

    Finished trials are ranked by the metric (stopped ones after them: their value is from an earlier
    iteration); failed trials are listed below with their reason and the tail of their log.
    """
    records = []
    for p in sorted(folder.glob("*/trial.json")):
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):  # being replaced by another runner
            continue
    records.sort(key=lambda r: r["trial"])
    sign = -1.0 if spec.goal == "maximize" else 1.0
    order = {"complete": 0, "pruned": 1, "running": 2}
    ranked = sorted(
        (r for r in records if r["state"] in order),
        key=lambda r: (order[r["state"]], r["value"] is None, sign * (r["value"] or 0.0)),
    )
    names = [p.name for p in spec.swept]
    headers = ["rank", "trial", "state", spec.metric or "value", *names, "time_s", "run_dir"]
    rows = [
        [
            i + 1,
            f"{r['trial']:03d}",
            r["state"],
            r["value"],
            *(r["params"].get(n) for n in names),
            r["duration_s"],
            _relative(r["run_dir"], folder),
        ]
        for i, r in enumerate(ranked)
    ]
    write_table_csv(folder / "summary.csv", headers, rows)
    goal = f"{spec.goal} {spec.metric}" if spec.metric else "no metric"
    counts = {s: sum(r["state"] == s for r in records) for s in ("complete", "pruned", "running", "failed")}
    lines = [f"# Sweep `{spec.name}` ({spec.method}, {goal})", "", markdown_table(headers, rows), ""]
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    stale = [f"{r['trial']:03d}" for r in records if r["state"] in ("interrupted", "retried")]
    if stale:
        lines += ["", "Interrupted or retried, so run again: " + ", ".join(stale)]
    failed = [r for r in records if r["state"] == "failed"]
    if failed:
        lines += ["", "## Failed trials"]
    for r in failed:
        params = " ".join(f"{k}={v}" for k, v in r["params"].items())
        lines += ["", f"### {r['trial']:03d}: {r['reason']}", "", f"{params} ({r['run_dir']})", ""]
        lines += ["```", r.get("log_tail") or "(no output)", "```"]
    text = "\n".join(lines) + "\n"
    tmp = folder / f"summary.md.{os.getpid()}.tmp"
    tmp.write_text(text)
    tmp.replace(folder / "summary.md")
    return text
