"""The charts: metric families over training, and the final metric against each swept parameter.

Every line is a *variant* (``stats.py``): the mean over its seeds, with a shaded 95% band when it has
two or more. Colour = loss, line style = the other values (β, swept parameters), so a loss keeps its
colour in every chart.
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Any

from dpo_lightning.comparing.runs import Run
from dpo_lightning.comparing.stats import Variant, mean_ci, variants

# (file stem, figure title, column patterns, y-axis label); a pattern's matching columns become panels.
FAMILIES = [
    ("loss", "Preference loss", ["train/loss", "val/loss"], "loss"),
    ("rewards_margins", "Reward margin", ["*/rewards/margins"], "β·h = reward(chosen) − reward(rejected)"),
    ("rewards_accuracies", "Reward accuracy", ["*/rewards/accuracies"], "fraction with reward(c) > reward(r)"),
    ("logps_chosen", "Log-probability of the chosen response", ["*/logps/chosen"], "log π(y_c | x)  (nats)"),
    ("shadow_losses", "Shadow losses (each loss evaluated on the same batch)", ["*/shadow/*"], "loss"),
]
LOSS_COLOURS = {"dpo": "#1f77b4", "ipo": "#ff7f0e", "cdpo": "#2ca02c"}
SPARE_COLOURS = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
LINE_STYLES: list[Any] = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (3, 1, 1, 1))]
MARKERS = ["", "o", "s", "^", "v", "D", "x"]
DEFAULT_METRIC = "val/rewards/accuracies"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colours(losses: list[str]) -> dict[str, str]:
    spare = iter(SPARE_COLOURS * 10)
    out = dict(LOSS_COLOURS)
    for loss in losses:
        out.setdefault(loss, next(spare))
    return out


def styles(groups: list[Variant]) -> list[dict[str, Any]]:
    """Colour by loss; line style (then marker) by the rest of the variant, the same rest -> the same style."""
    palette = colours([g.loss for g in groups])
    rests = list(dict.fromkeys(repr((g.beta, sorted(g.extras.items(), key=str))) for g in groups))
    out = []
    for g in groups:
        k = rests.index(repr((g.beta, sorted(g.extras.items(), key=str))))
        out.append(
            {
                "color": palette[g.loss],
                "linestyle": LINE_STYLES[k % len(LINE_STYLES)],
                "marker": MARKERS[(k // len(LINE_STYLES)) % len(MARKERS)],
                "markevery": 0.1,
                "markersize": 4,
                "linewidth": 1.6,
            }
        )
    return out


def _legend(fig: Any, axes: Any) -> int:
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    return len(labels)


def plot_family(runs: list[Run], stem: str, title: str, patterns: list[str], ylabel: str, out: Path,
                smooth: float = 0.0) -> Path | None:  # fmt: skip
    """One figure, one panel per matching column, one line (± band) per variant; None when nothing matches."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    logged = sorted({c for r in runs for c in r.curves})
    columns = [c for pat in patterns for c in logged if fnmatch.fnmatchcase(c, pat)]
    columns = sorted(dict.fromkeys(columns), key=lambda c: (not c.startswith("train/"), c))
    if not columns:
        return None
    groups = variants(runs)
    show_beta = len({g.beta for g in groups}) > 1
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(10.0, 5.2 * ncols), 3.8 * nrows + 1), squeeze=False)
    banded = False
    for ax, column in zip(axes.flat, columns, strict=False):  # spare panels hidden below
        lines = [(g, style, *g.curve(column)) for g, style in zip(groups, styles(groups), strict=True)]
        lines = [(g, style, steps, _ema(mean, smooth), half) for g, style, steps, mean, half in lines if steps]
        plotted = [v for *_, mean, _ in lines for v in mean]
        # Variants' losses differ in scale (IPO's squared margin vs DPO's ~ln 2): a log axis keeps all readable.
        log = bool(plotted) and min(plotted) > 0 and max(plotted) / min(plotted) > 50
        floor = min(plotted) / 3 if log else -math.inf  # a band's lower edge on a log axis stays above 0
        for g, style, steps, mean, half in lines:
            ax.plot(steps, mean, label=g.legend(show_beta), **style)
            if any(half):
                banded = True
                low = [max(floor, m - h) for m, h in zip(mean, half, strict=True)]
                high = [m + h for m, h in zip(mean, half, strict=True)]
                ax.fill_between(steps, low, high, color=style["color"], alpha=_band_alpha(len(groups)), linewidth=0)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(floor, max(v for r in runs for _, v in r.curves.get(column, [])) * 1.5)
        else:  # the runs' own range: a 2-seed t-band (t = 12.7) would otherwise set the scale
            _limit_to(ax, [v for r in runs for _, v in r.curves.get(column, [])])
        ax.set_title(column)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.set_visible(False)
    band = " — mean over seeds, shaded: 95% CI (cut at the runs' range)" if banded else ""
    fig.suptitle(title + (f" (EMA {smooth:g})" if smooth else "") + band, fontsize=13)
    n = _legend(fig, axes)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(n / 3), 1, 0.95))
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def swept_numbers(runs: list[Run]) -> list[str]:
    """The numeric parameters that vary between runs (β included), the x axes of ``plot_final_vs_params``."""
    names = ["model.beta"] if len({r.beta for r in runs if r.beta is not None}) > 1 else []
    keys = sorted({k for r in runs for k, v in r.extras.items() if isinstance(v, (int, float))})
    return names + [k for k in keys if len({r.extras.get(k) for r in runs}) > 1]


def _x(r: Run, name: str) -> float | None:
    v = r.beta if name == "model.beta" else r.extras.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def final_points(runs: list[Run], name: str, metric: str) -> dict[str, list[tuple[float, float, float, int]]]:
    """Per loss: (x, mean, 95% half-width, n) of the final ``metric`` of the finished runs at each value of
    ``name``, other swept values pooled."""
    out: dict[str, list[tuple[float, float, float, int]]] = {}
    for loss in dict.fromkeys(r.loss for r in runs):
        by_x: dict[float, list[float]] = {}
        for r in runs:
            if r.loss == loss and r.usable and (x := _x(r, name)) is not None and (v := r.final(metric)) is not None:
                by_x.setdefault(x, []).append(v)
        if by_x:
            out[loss] = [(x, *mean_ci(by_x[x]), len(by_x[x])) for x in sorted(by_x)]
    return out


def plot_final_vs_params(runs: list[Run], out: Path, metric: str | None = None) -> Path | None:
    """The final ``metric`` against each swept numeric parameter: one line per loss, mean ± 95% CI over the
    finished runs at each value. None when nothing numeric varies."""
    metric = metric or next((r.sweep_metric for r in runs if r.sweep_metric), None) or DEFAULT_METRIC
    done = [r for r in runs if r.usable and r.final(metric) is not None]
    names = swept_numbers(done)
    if not names or not done:
        return None
    plt = _pyplot()
    palette = colours([r.loss for r in done])
    fig, axes = plt.subplots(1, len(names), figsize=(max(8.0, 5.6 * len(names)), 4.8), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=True):
        for loss, points in final_points(done, name, metric).items():
            xs, mean, half, ns = (list(c) for c in zip(*points, strict=True))
            label = f"{loss}  (n={'/'.join(map(str, sorted(set(ns))))} per point)"
            ax.errorbar(xs, mean, yerr=half, color=palette[loss], marker="o", capsize=3, linewidth=1.8, label=label)
            if any(half):
                low = [m - h for m, h in zip(mean, half, strict=True)]
                high = [m + h for m, h in zip(mean, half, strict=True)]
                ax.fill_between(xs, low, high, color=palette[loss], alpha=_band_alpha(2 * len({r.loss for r in done})))
        for r in done:  # the seeds themselves, small: with 2 seeds the t-interval is wide (t = 12.7)
            if (x := _x(r, name)) is not None:
                ax.scatter([x], [r.final(metric)], color=palette[r.loss], s=14, alpha=0.55, zorder=3)
        _limit_to(ax, [r.final(metric) for r in done])
        xs_all = {_x(r, name) for r in done} - {None}
        if min(xs_all) > 0 and len(xs_all) > 2 and max(xs_all) / min(xs_all) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"final {metric}")
        ax.set_title(f"final {metric} vs {name}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Final {metric} per loss: mean over seeds (line), each seed (dots),\n"
                 "95% CI (bars, shading; cut at the runs' range)", fontsize=11)  # fmt: skip
    n = _legend(fig, axes)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * math.ceil(n / 3), 1, 0.94))
    path = out / "final_vs_params.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _band_alpha(lines: int) -> float:
    """Fainter bands when many overlap, so the mean lines stay visible."""
    return max(0.03, min(0.18, 0.6 / max(1, lines)))


def _limit_to(ax: Any, values: list[float]) -> None:
    """y limits around the individual runs' values (bands that reach past them are cut at the frame)."""
    if values:
        low, high = min(values), max(values)
        pad = 0.08 * (high - low) or 0.05 * (abs(high) or 1.0)
        ax.set_ylim(low - pad, high + pad)


def _ema(values: list[float], alpha: float) -> list[float]:
    if not alpha:
        return values
    out, acc = [], values[0]
    for v in values:
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out
