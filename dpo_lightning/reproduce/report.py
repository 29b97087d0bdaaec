"""The reproduction report: ``README.md`` with the claims table, the figures, versions, seeds and wall time.

    python -m dpo_lightning.reproduce --out reports/reproduce     # writes reports/reproduce/{README.md, ...}

Each part of a run hands back a :class:`PartResult`; :func:`write_report` turns them into one Markdown file.
:func:`line_figure` is the small plotting helper the parts share (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_lightning.reproduce.claims import Claim, format_claims_table


@dataclass
class PartResult:
    """What one part of the reproduction produced, or why it did not run."""

    key: str  # "1" or "2"
    title: str
    ran: bool
    claims: list[Claim] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)  # paths relative to the output folder
    markdown: str = ""  # the part's own section of the report
    seconds: float = 0.0
    note: str = ""  # why it did not run, when it did not

    @property
    def n_passed(self) -> int:
        return sum(c.passed for c in self.claims)

    def tally(self) -> str:
        """ "12 PASS · 1 INCONCLUSIVE · 0 FAIL"."""
        return " · ".join(f"{sum(c.verdict == v for c in self.claims)} {v}" for v in ("PASS", "INCONCLUSIVE", "FAIL"))


def matmul_gflops(threads: int = 2, size: int = 2048, reps: int = 3) -> float:
    """This machine's fp32 matmul rate on ``threads`` threads (best of ``reps``), in GFLOP/s: the report prints it
    beside the wall time, since the machines that run this differ about 2.5× in speed."""
    import time

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 2 * size**3 / best / 1e9


def environment() -> dict[str, str]:
    """Versions that matter for reproducing the numbers."""
    import torch

    import dpo_lightning

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dpo_lightning": dpo_lightning.__version__,
        "platform": platform.platform(),
    }
    for name in ("lightning", "transformers", "matplotlib"):
        module = sys.modules.get(name)  # report only what this run imported: no import cost, no side effects
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    return versions


def write_report(
    out_dir: Path,
    parts: Sequence[PartResult],
    *,
    command: str,
    seed: int,
    quick: bool,
    wall_s: float,
    gflops: float | None = None,
) -> Path:
    """Write ``out_dir/README.md``: summary, claims table, each part's section and figures, environment.
    ``gflops``: the machine's measured fp32 matmul rate, printed beside the wall time."""
    claims = [c for p in parts for c in p.claims]
    n_pass = sum(c.passed for c in claims)
    everyone = PartResult("all", "", ran=True, claims=claims).tally()
    rate = "" if gflops is None else f" on a machine doing fp32 matmul at {gflops:.0f} GFLOP/s (2 threads)"
    lines = [
        "# Reproduction report",
        "",
        f"Command: `{command}`  ",
        f"Seed: {seed} · mode: {'quick' if quick else 'full'} · wall time: {wall_s:.1f} s{rate}  ",
        f"Result: **{n_pass}/{len(claims)} claims PASS** ({everyone}). Part 1's exact checks are PASS/FAIL; Part 2's "
        "verdicts come from 95% bootstrap intervals against thresholds fixed before the run. The same table is in "
        "`claims.json` (`verdict`, `interval`, `threshold`; `passed` = verdict is PASS).",
        "",
        "| part | status | verdicts | wall time |",
        "|---|---|---|---|",
    ]
    for p in parts:
        status = "ran" if p.ran else f"**not run**: {p.note}"
        lines.append(f"| {p.key}. {p.title} | {status} | {p.tally()} | {p.seconds:.1f} s |")
    lines += ["", "## Claims", "", format_claims_table(claims) if claims else "_No claims were checked._", ""]
    for p in parts:
        lines += [f"## Part {p.key}: {p.title}", ""]
        if not p.ran:
            lines += [f"**Not run.** {p.note}", ""]
        if p.markdown:
            lines += [p.markdown.strip(), ""]
        for fig in p.figures:
            lines += [f"![{Path(fig).stem}]({fig})", ""]
    lines += ["## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in environment().items()]
    path = Path(out_dir) / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Series:
    """One line on a panel, with an optional shaded band [lo, hi]."""

    label: str
    x: Any
    y: Any
    lo: Any = None
    hi: Any = None
    style: str = "-"
    color: str | None = None


@dataclass
class Panel:
    """One axes of a figure."""

    title: str
    series: list[Series]
    xlabel: str = "step"
    ylabel: str = ""
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label) dotted reference lines
    xlog: bool = False
    ylim: tuple[float, float] | None = None


def line_figure(path: Path, panels: Sequence[Panel], *, ncols: int, title: str) -> Path:
    """Draw ``panels`` on a grid with ``ncols`` columns and save a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt

    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for s in panel.series:
            (line,) = ax.plot(s.x, s.y, s.style, color=s.color, label=s.label, lw=1.4)
            if s.lo is not None and s.hi is not None:
                ax.fill_between(s.x, s.lo, s.hi, color=line.get_color(), alpha=0.2, lw=0)
        for k, (y, label) in enumerate(panel.hlines):
            ax.axhline(y, ls=":", lw=1, color="0.3", label=label if k == 0 else None)
        if panel.xlog:
            ax.set_xscale("log")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
