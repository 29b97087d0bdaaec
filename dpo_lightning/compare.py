"""Side-by-side charts and tables for finished runs and sweeps, from their CSV logs, on one HTML page.

    dpo-lightning compare runs/sweeps/label_noise --out runs/sweeps/label_noise/compare
    dpo-lightning compare runs/a runs/b runs/sweeps/loss_variants --out runs/compare

Each argument is a run folder (one holding ``metrics.csv``) or any folder above some (a sweep folder): every
``metrics.csv`` below it is one run (``comparing/runs.py``). Runs that differ only in a seed are one
variant, drawn as the mean over its seeds with a 95% band (``comparing/stats.py``).

Writes into ``--out``: one PNG per metric family (``loss``, ``rewards_margins``, ``rewards_accuracies``,
``logps_chosen``, ``shadow_losses``: one panel per stage, colour = loss), ``final_vs_params.png`` (the
sweep's metric at the end against each swept numeric parameter, one line per loss; for ``label_noise``:
reward accuracy vs flip rate), ``final_metrics.csv`` (every metric's last value per run),
``variants.csv``, ``report.md`` and a self-contained ``index.html`` (images inlined) with all of them.
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from pathlib import Path

from dpo_lightning.comparing.charts import DEFAULT_METRIC, FAMILIES, plot_family, plot_final_vs_params
from dpo_lightning.comparing.runs import Run, find_runs
from dpo_lightning.comparing.stats import variants
from dpo_lightning.comparing.tables import cell, final_table, markdown_table, variant_table, write_table_csv
from dpo_lightning.errors import UserError

# Columns of the tables on the page (final_metrics.csv holds all of them).
TABLE_COLUMNS = [
    "train/loss",
    "val/loss",
    "train/rewards/accuracies",
    "val/rewards/accuracies",
    "train/rewards/margins",
    "val/rewards/margins",
    "val/logps/chosen",
]
PAGE_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:1em 0}"""


def _html_table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_pages(runs: list[Run], images: list[Path], out: Path, inputs: list[str]) -> None:
    """``report.md`` (images beside it) and ``index.html`` (images inlined: one file to send around)."""
    columns = [c for c in TABLE_COLUMNS if any(c in r.curves for r in runs)]
    groups = variants(runs)
    v_headers, v_rows = variant_table(groups, columns)
    headers, rows = final_table(runs, columns)
    title = f"Comparison of {len(runs)} runs ({len(groups)} variants)"
    md = [f"# {title}", "", "Inputs: " + ", ".join(f"`{p}`" for p in inputs), ""]
    md += ["## Variants: final values, mean ± 95% CI over seeds", "", markdown_table(v_headers, v_rows), ""]
    md += [f"![{p.stem}]({p.name})\n" for p in images]
    md += ["## Every run's final values", "", markdown_table(headers, rows), ""]
    (out / "report.md").write_text("\n".join(md))
    figures = "".join(
        f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img alt="{p.stem}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in images
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>Inputs: {html.escape(', '.join(inputs))}. Colour = loss; a line is the mean over a variant's "
        "seeds, the shading its 95% confidence interval.</p>"
        f"<h2>Variants: final values, mean ± 95% CI over seeds</h2>{_html_table(v_headers, v_rows)}{figures}"
        f"<h2>Every run's final values</h2>{_html_table(headers, rows)}</body></html>"
    )
    (out / "index.html").write_text(page)


def compare(paths: list[str], out: Path, smooth: float = 0.0, metric: str | None = None) -> list[Path]:
    """Read the runs below ``paths`` and write the charts, tables and pages into ``out``."""
    runs = find_runs(paths)
    out.mkdir(parents=True, exist_ok=True)
    images = [p for p in [plot_final_vs_params(runs, out, metric)] if p is not None]
    images += [
        p
        for stem, title, pats, ylabel in FAMILIES
        if (p := plot_family(runs, stem, title, pats, ylabel, out, smooth)) is not None
    ]
    all_columns = sorted({c for r in runs for c in r.curves})
    write_table_csv(out / "final_metrics.csv", *final_table(runs, all_columns))
    write_table_csv(out / "variants.csv", *variant_table(variants(runs), all_columns))
    write_pages(runs, images, out, paths)
    return images


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpo-lightning compare``."""
    p = argparse.ArgumentParser(prog="dpo-lightning compare", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run folders or folders above runs")
    p.add_argument("--out", default="runs/compare", help="where the charts and pages go (default runs/compare)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1) for noisy curves (0: raw)")
    p.add_argument("--metric", default=None, help=f"final metric charted (default: the sweep's, else {DEFAULT_METRIC})")
    args = p.parse_args(argv)
    try:
        if not 0.0 <= args.smooth < 1.0:
            raise UserError("--smooth must be in [0, 1)")
        out = Path(args.out)
        images = compare(args.paths, out, args.smooth, args.metric)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(images)} charts, final_metrics.csv, variants.csv, report.md and index.html to {out}")
    return 0
