"""Markdown pieces every section's report uses: numbers, tables, a section's status line."""

from __future__ import annotations

from typing import Any


def fmt(x: Any, digits: int = 2) -> str:
    """A table cell: floats with thousands separators and ``digits`` decimals, None as a dash."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table (lines), with a blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def status_line(section: dict[str, Any]) -> str | None:
    """Why a section has no numbers (skipped, error, not measured); None when it has them."""
    status = section.get("status")
    if status in ("skipped", "error", "not_measured"):
        return f"*{status}*: {section.get('reason') or section.get('error')}"
    return None


def equal_work_table(eq: dict[str, Any]) -> list[str]:
    """The equal-work check (``vs_trl.equal_work``) as a table: the first steps' losses of both sides."""
    if not eq:
        return []
    rows = [
        [k, ", ".join(f"{x:.6f}" for x in e["ours_losses"]), ", ".join(f"{x:.6f}" for x in e["trl_losses"]),
         f"{e['max_abs_diff']:.1e}", "yes" if e["ok"] else "**no**"]
        for k, e in eq.items()
    ]  # fmt: skip
    intro = (
        "Equal work: the losses of the first three steps, both sides, same batches (the first is ln 2 by "
        "construction; the next two test gradients, clipping and AdamW):"
    )
    return [intro, ""] + table(["runs", "ours", "TRL", "max |diff|", "≤ 1e-4"], rows)
