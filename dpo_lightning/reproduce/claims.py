"""A claim checked by a reproduction run: what a paper says, what the run measured, and whether they agree.

Verdicts: ``PASS``, ``FAIL`` or ``INCONCLUSIVE``. Part 1's exact closed-form checks set ``passed`` and get PASS
or FAIL from it; Part 2's statistical claims set ``verdict`` from a 95% bootstrap ``interval`` against a
``threshold`` decided before the run (``reproduce/stats.py``), and ``passed`` is ``verdict == "PASS"``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")


@dataclass
class Claim:
    """One row of ``claims.json``: give ``passed`` (an exact check) or ``verdict`` (a statistical one)."""

    id: str  # stable key, e.g. "bandit.dpo_optimum.beta0.1"
    claim: str  # the statement, in words
    source: str  # paper and section/equation, e.g. "Rafailov et al. 2023, Eq. 4"
    expected: Any  # the paper's value (number, list, or a description for qualitative claims)
    measured: Any  # what this run measured
    tolerance: Any  # how close counts as agreement (number, or a description)
    passed: bool | None = None  # kept for old readers: verdict == "PASS"
    verdict: str | None = None  # PASS / FAIL / INCONCLUSIVE; from ``passed`` when not given
    interval: list[float] | None = None  # the 95% bootstrap interval of ``measured``, when there is one
    threshold: Any = None  # what the interval must clear, decided before the run

    def __post_init__(self) -> None:
        if self.verdict is None:
            if self.passed is None:
                raise ValueError(f"claim {self.id}: give passed or verdict")
            self.verdict = "PASS" if self.passed else "FAIL"
        elif self.verdict not in VERDICTS:
            raise ValueError(f"claim {self.id}: verdict {self.verdict!r} is not one of {VERDICTS}")
        self.passed = self.verdict == "PASS"


def write_claims(claims: list[Claim], path: str | Path) -> Path:
    """Write the claims table as a JSON list of objects."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(c) for c in claims], indent=2, default=float) + "\n")
    return path


def _flat(x: Any) -> list[float] | None:
    """Numbers, (nested) lists of numbers or tensors as a flat list of floats; None for anything else."""
    if hasattr(x, "tolist"):  # torch / numpy
        x = x.tolist()
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int | float):
        return [float(x)]
    if isinstance(x, list | tuple):
        out: list[float] = []
        for v in x:
            flat = _flat(v)
            if flat is None:
                return None
            out.extend(flat)
        return out
    return None


def deviation(measured: Any, expected: Any) -> float | None:
    """max |measured − expected| over the entries, or None when the two are not numbers of the same shape."""
    m, e = _flat(measured), _flat(expected)
    if m is None or e is None or len(m) != len(e) or not m:
        return None
    return max(abs(a - b) for a, b in zip(m, e, strict=True))


def within(measured: Any, expected: Any, tol: float) -> bool:
    """True when every entry of ``measured`` is within ``tol`` of ``expected`` (NaN never is)."""
    dev = deviation(measured, expected)
    return dev is not None and dev <= tol  # NaN compares False


def _cell(x: Any, nd: int = 4) -> str:
    """A compact table cell: numbers to ``nd`` significant-looking decimals, lists in brackets, no pipes."""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{nd}g}" if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5) else f"{round(x, nd):g}"
    if isinstance(x, list | tuple):
        return "[" + ", ".join(_cell(v, nd) for v in x) + "]"
    return str(x).replace("|", "\\|").replace("\n", " ")


def format_claims_table(claims: list[Claim]) -> str:
    """The claims as a Markdown table, the verdict first; the 95% interval, or max |Δ| where both sides of an
    exact check are numeric."""
    lines = [
        "| result | id | claim | source | expected | measured | 95% interval / max \\|Δ\\| | tolerance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in claims:
        dev = deviation(c.measured, c.expected)
        spread = "—" if dev is None else f"{dev:.2g}"
        if c.interval is not None:
            spread = f"[{_cell(c.interval[0], 3)}, {_cell(c.interval[1], 3)}]"
        cells = [
            f"**{c.verdict}**",
            f"`{c.id}`",
            _cell(c.claim),
            _cell(c.source),
            _cell(c.expected),
            _cell(c.measured),
            spread,
            _cell(c.tolerance),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
