"""Variants and their spread: runs that differ only in their seed, averaged with a 95% confidence band.

The band is the t-interval of the mean over the n seeds, mean ± t(0.975, n−1)·s/√n with s the sample
standard deviation (ddof 1); with one seed there is no band. Curves are averaged step by step over the
seeds that logged that step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dpo_lightning.comparing.runs import Run


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the ``level`` t-interval); half-width 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


@dataclass
class Variant:
    """The runs of one (loss, β, swept values) combination, one per seed."""

    loss: str
    beta: float | None
    extras: dict[str, Any]
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.legend(show_beta=True)

    def legend(self, show_beta: bool) -> str:
        """The variant's legend entry; β left out when every variant shown has the same one."""
        beta = "" if self.beta is None or not show_beta else f" β={self.beta:g}"
        extras = "".join(f" {k.split('.')[-1]}={v}" for k, v in self.extras.items())
        seeds = f"  (n={len(self.runs)} seeds)" if len(self.runs) > 1 else f"  ({self.runs[0].label})"
        return f"{self.loss}{beta}{extras}{seeds}"

    def curve(self, column: str) -> tuple[list[float], list[float], list[float]]:
        """Steps, mean and 95% half-width of ``column`` over the variant's runs."""
        by_step: dict[float, list[float]] = {}
        for r in self.runs:
            for step, value in r.curves.get(column, []):
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        stats = [mean_ci(by_step[s]) for s in steps]
        return steps, [m for m, _ in stats], [h for _, h in stats]


def variants(runs: list[Run]) -> list[Variant]:
    """Runs grouped by everything but their seed, in first-seen order."""
    out: dict[str, Variant] = {}
    for r in runs:
        key = repr((r.loss, r.beta, sorted(r.extras.items(), key=str)))
        out.setdefault(key, Variant(r.loss, r.beta, dict(r.extras))).runs.append(r)
    return list(out.values())
