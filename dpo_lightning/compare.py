"""Side-by-side charts and a final-metrics table for finished runs, from their CSV logs.

    dpo-lightning compare runs/sweeps/loss_variants --out reports/loss_variants
    dpo-lightning compare runs/a runs/b runs/sweeps/label_noise --out runs/compare

Each argument is a run folder (one holding ``metrics.csv``) or any folder above some (a sweep folder): every
``metrics.csv`` below it is one run. A run's loss and β come from its ``config.yaml`` (the resolved
LightningCLI config) and, for sweep trials, from ``trial.json``, which also gives the trial's state.

Writes into ``--out``: one PNG per metric family (``loss``, ``rewards_margins``, ``rewards_accuracies``,
``logps_chosen``, ``shadow_losses``; one panel per stage, one line per run, colour = loss variant,
line style = β), ``final_metrics.csv`` (every metric's last value per run), ``report.md`` and a
self-contained ``index.html`` (images inlined) with the table of final values.
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dpo_lightning.errors import UserError

if TYPE_CHECKING:
    from dpo_lightning.sweep_space import SweepSpec

# (file stem, figure title, column patterns, y-axis label); a pattern's matching columns become panels.
FAMILIES = [
    ("loss", "Preference loss", ["train/loss", "val/loss"], "loss"),
    ("rewards_margins", "Reward margin", ["*/rewards/margins"], "β·h = reward(chosen) − reward(rejected)"),
    (
        "rewards_accuracies",
        "Reward accuracy",
        ["*/rewards/accuracies"],
        "fraction with reward(c) > reward(r)",
    ),
    ("logps_chosen", "Log-probability of the chosen response", ["*/logps/chosen"], "log π(y_c | x)  (nats)"),
    ("shadow_losses", "Shadow losses (each loss evaluated on the same batch)", ["*/shadow/*"], "loss"),
]
# Columns of the final-values table on the page (the CSV holds all of them).
TABLE_COLUMNS = [
    "train/loss",
    "val/loss",
    "train/rewards/accuracies",
    "val/rewards/accuracies",
    "train/rewards/margins",
    "val/rewards/margins",
    "val/logps/chosen",
]
LOSS_COLOURS = {"dpo": "#1f77b4", "ipo": "#ff7f0e", "cdpo": "#2ca02c"}
SPARE_COLOURS = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
LINE_STYLES: list[Any] = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3))]
MARKERS = ["", "o", "s", "^", "v", "D", "x"]  # tells apart runs that share loss and β


# -- reading runs (also used by sweep.py to follow a running trial) ---------------------------------------
def find_metrics_csv(run_dir: Path) -> Path | None:
    """The run's ``metrics.csv``: at the top of the folder, else the first one below (not under wandb/)."""
    direct = run_dir / "metrics.csv"
    if direct.is_file():
        return direct
    return next((p for p in sorted(run_dir.rglob("metrics.csv")) if "wandb" not in p.parts), None)


def read_metrics_csv(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Column -> [(step, value)] for the non-empty cells of a Lightning CSVLogger file.

    Rows log different columns (train steps vs. validation), so most cells are empty. A last line without
    its newline is a row still being written and is skipped.
    """
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    out: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(csv.DictReader(lines)):
        step = _float(row.get("step"))
        step = float(i) if step is None else step
        for key, cell in row.items():
            value = _float(cell)
            if key not in (None, "step") and value is not None:
                out.setdefault(key, []).append((step, value))
    return out


def _float(cell: str | None) -> float | None:
    try:
        return float(cell) if cell not in (None, "") else None
    except ValueError:
        return None


@dataclass
class Run:
    """One run's curves and what it was."""

    path: Path
    label: str
    loss: str
    beta: float | None
    state: str
    extras: dict[str, Any] = field(default_factory=dict)  # other swept values, e.g. data.label_noise
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def final(self, column: str) -> float | None:
        points = self.curves.get(column)
        return points[-1][1] if points else None


def _config_value(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, dict) and "init_args" in node and part not in node:
            node = node["init_args"]  # class_path/init_args blocks of LightningCLI configs
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_run(run_dir: Path, csv_path: Path, root: Path) -> Run:
    """Read one run folder: curves from ``csv_path``, identity from config.yaml and trial.json."""
    cfg: dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    trial: dict[str, Any] = {}
    if (run_dir / "trial.json").is_file():
        trial = json.loads((run_dir / "trial.json").read_text())
    params = trial.get("params") or {}
    loss = params.get("model.loss") or _config_value(cfg, "model.loss") or "?"
    beta = params.get("model.beta", _config_value(cfg, "model.beta"))
    extras = {k: v for k, v in params.items() if k not in ("model.loss", "model.beta")}
    extras = {k: v for k, v in extras.items() if not isinstance(v, (dict, list))}
    name = run_dir.name if run_dir == root else str(run_dir.relative_to(root))
    name = f"{trial['sweep']}/{trial['trial']:03d}" if trial else name
    return Run(
        run_dir,
        name,
        str(loss),
        None if beta is None else float(beta),
        trial.get("state", "finished"),
        extras,
        read_metrics_csv(csv_path),
    )


def find_runs(paths: list[str]) -> list[Run]:
    """Every run below the given folders, in argument order then path order."""
    runs: list[Run] = []
    for arg in paths:
        root = Path(arg)
        if not root.exists():
            raise UserError(f"{root}: no such run or sweep folder")
        if root.is_file():  # a metrics.csv given directly
            root = root.parent
        csvs = [p for p in sorted(root.rglob("metrics.csv")) if "wandb" not in p.parts]
        if not csvs:
            raise UserError(f"{root}: no metrics.csv below it (runs log one through Lightning's CSVLogger)")
        for csv_path in csvs:
            run_dir = csv_path.parent
            # CSVLogger may nest its file (run/csv/version_0/); the run folder is where config.yaml lives.
            while run_dir != root and not (run_dir / "config.yaml").exists() and not (run_dir / "trial.json").exists():
                run_dir = run_dir.parent
            runs.append(load_run(run_dir, csv_path, root))
    runs = list({r.path.resolve(): r for r in runs}.values())  # a folder given twice is one run
    # Legends and tables name only the swept values that differ between the runs shown.
    varying = {k for k in {k for r in runs for k in r.extras} if len({str(r.extras.get(k)) for r in runs}) > 1}
    for r in runs:
        r.extras = {k: v for k, v in r.extras.items() if k in varying}
    return runs


# -- tables ---------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats to 4 significant digits."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(out)


def write_table_csv(path: Path, headers: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def final_table(runs: list[Run], columns: list[str]) -> tuple[list[str], list[list[Any]]]:
    extra_keys = sorted({k for r in runs for k in r.extras})
    headers = ["run", "loss", "beta", *extra_keys, "state", "last_step", *columns]
    rows = [
        [
            r.label,
            r.loss,
            r.beta,
            *(r.extras.get(k) for k in extra_keys),
            r.state,
            int(max((p[0] for c in r.curves.values() for p in c), default=0)),
            *(r.final(c) for c in columns),
        ]
        for r in runs
    ]
    return headers, rows


def _relative(path: str | None, folder: Path) -> str | None:
    try:
        return str(Path(path).relative_to(folder)) if path else None
    except ValueError:
        return path


def write_sweep_summary(spec: SweepSpec, folder: Path) -> str:
    """Write a sweep's ``summary.csv`` and ``summary.md`` from its trials' ``trial.json``; return the Markdown.

    Finished trials are ranked by the metric (pruned ones after them: their value is from an earlier
    iteration); failed trials are listed below with their reason and the tail of their log.
    """
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("trials/*/trial.json"))]
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
    (folder / "summary.md").write_text(text)
    return text


# -- charts ---------------------------------------------------------------------------------------------
def _styles(runs: list[Run]) -> list[dict[str, Any]]:
    """Colour by loss, line style by β, a marker for each further run with the same (loss, β)."""
    spare = iter(SPARE_COLOURS * 10)
    colours = dict(LOSS_COLOURS)
    for r in runs:
        colours.setdefault(r.loss, next(spare))
    betas = sorted({r.beta for r in runs if r.beta is not None})
    seen: dict[tuple[str, float | None], int] = {}
    styles = []
    for r in runs:
        k = seen[(r.loss, r.beta)] = seen.get((r.loss, r.beta), -1) + 1
        style = LINE_STYLES[betas.index(r.beta) % len(LINE_STYLES)] if r.beta in betas else "-"
        styles.append(
            {
                "color": colours[r.loss],
                "linestyle": style,
                "marker": MARKERS[k % len(MARKERS)],
                "markevery": 0.1,
                "markersize": 4,
                "linewidth": 1.6,
            }
        )
    return styles


def _legend_label(r: Run) -> str:
    beta = "" if r.beta is None else f" β={r.beta:g}"
    extras = "".join(f" {k.split('.')[-1]}={v}" for k, v in r.extras.items())
    return f"{r.loss}{beta}{extras}  ({r.label}{'' if r.state in ('complete', 'finished') else ', ' + r.state})"


def plot_family(
    runs: list[Run], stem: str, title: str, patterns: list[str], ylabel: str, out: Path, smooth: float = 0.0
) -> Path | None:
    """One figure, one panel per matching column; None when no run logged any of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    logged = sorted({c for r in runs for c in r.curves})
    columns = [c for pat in patterns for c in logged if fnmatch.fnmatchcase(c, pat)]
    columns = sorted(dict.fromkeys(columns), key=lambda c: (not c.startswith("train/"), c))
    if not columns:
        return None
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):  # spare panels hidden below
        plotted: list[float] = []
        for r, style in zip(runs, _styles(runs), strict=True):
            points = r.curves.get(column)
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, _ema(list(values), smooth), label=_legend_label(r), **style)
                plotted += values
        # Variants' losses differ in scale (IPO's squared margin vs DPO's ~ln 2): a log axis keeps all readable.
        log = min(plotted) > 0 and max(plotted) / min(plotted) > 50
        if log:
            ax.set_yscale("log")
        ax.set_title(column)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:  # the first panel may miss runs that never logged its column
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.suptitle(title + (f" (EMA {smooth:g})" if smooth else ""), fontsize=13)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 3), 1, 0.95))
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ema(values: list[float], alpha: float) -> list[float]:
    if not alpha:
        return values
    out, acc = [], values[0]
    for v in values:
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


# -- pages ----------------------------------------------------------------------------------------------
PAGE_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:1em 0}"""


def write_pages(runs: list[Run], images: list[Path], out: Path, inputs: list[str]) -> None:
    columns = [c for c in TABLE_COLUMNS if any(c in r.curves for r in runs)]
    headers, rows = final_table(runs, columns)
    md = [
        f"# Comparison of {len(runs)} runs",
        "",
        "Inputs: " + ", ".join(f"`{p}`" for p in inputs),
        "",
        "## Final values",
        "",
        markdown_table(headers, rows),
        "",
    ]
    md += [f"![{p.stem}]({p.name})\n" for p in images]
    (out / "report.md").write_text("\n".join(md))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    figures = "".join(
        f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img alt="{p.stem}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Comparison of {len(runs)} runs</title>"
        f"<style>{PAGE_CSS}</style></head><body><h1>Comparison of {len(runs)} runs</h1>"
        f"<p>Inputs: {html.escape(', '.join(inputs))}. Colour = loss variant, line style = β.</p>"
        f"<h2>Final values</h2><table><tr>{head}</tr>{body}</table>{figures}</body></html>"
    )
    (out / "index.html").write_text(page)


def compare(paths: list[str], out: Path, smooth: float = 0.0) -> list[Path]:
    """Read the runs below ``paths`` and write the charts, tables and pages into ``out``."""
    runs = find_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    images = [
        p
        for stem, title, pats, ylabel in FAMILIES
        if (p := plot_family(runs, stem, title, pats, ylabel, out, smooth)) is not None
    ]
    all_columns = sorted({c for r in runs for c in r.curves})
    write_table_csv(out / "final_metrics.csv", *final_table(runs, all_columns))
    write_pages(runs, images, out, paths)
    return images


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpo-lightning compare``."""
    p = argparse.ArgumentParser(prog="dpo-lightning compare", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run folders or folders above runs")
    p.add_argument("--out", default="runs/compare", help="where the charts and pages go (default runs/compare)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for noisy curves (0: raw)")
    args = p.parse_args(argv)
    try:
        if not 0.0 <= args.smooth < 1.0:
            raise UserError("--smooth must be in [0, 1)")
        out = Path(args.out)
        images = compare(args.paths, out, args.smooth)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(images)} charts, final_metrics.csv, report.md and index.html to {out}")
    return 0
