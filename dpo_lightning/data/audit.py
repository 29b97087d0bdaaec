"""Data audit: what the preference data will look like to the model, before a step is trained.

    dpo-lightning audit --config experiments/tiny_cpu.yaml [--data.max_length 256 ...] [--out DIR]

The command (``dpo_lightning/audit.py``) prepares the data exactly as ``fit`` would (same tokenizer, same cache)
and prints and writes this module's report, ``data_audit.json`` and ``data_lengths.png``: record counts per
split, bad records by kind with examples (named by 1-based line or row, as ``sources.Source.where`` names them),
token length percentiles of prompt/chosen/rejected, truncation rates (chosen and rejected separately), pairs
identical after truncation, responses left without EOS, pairs whose tokenizer merged a token across the
prompt/response boundary (``boundary_merges``: that token is scored as response, see ``tokenize``), the
chosen-minus-rejected length gap (DPO learns length when chosen answers are systematically longer), and the
padding fraction of the training batches with and without length grouping. ``fit`` builds the same report at
setup, writes ``data_audit.json`` into the run folder and stops when a ``data.max_*_rate`` threshold is crossed;
``audit`` reports them and exits with 1.

For unpaired rows (``data.format: unpaired`` or ``data.unpair``; KTO) the report counts rows instead of pairs and
has prompt/completion lengths (and the completions of desirable and undesirable rows apart), the share of
desirable rows (to set KTO's desirable/undesirable weights against), the desirable-minus-undesirable completion
length gap, and the padding of the collated batches with their mismatched rows; ``max_truncation_rate`` checks
the completions.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dpo_lightning.data.sampler import padding_fraction, unpaired_padding_fraction

PERCENTILES = (50, 90, 99)
EXAMPLES_PER_KIND = 3
BOUNDARY_LINE = "  token merged across the prompt/response boundary (scored as response): {} {}"


def collect_bad_rows(
    tokenized: Any, where: Callable[[int], str]
) -> tuple[list[int], collections.Counter, dict[str, dict[str, Any]]]:
    """The bad records of a tokenized split: (their rows, count per kind, {kind: {count, examples}}).

    ``where`` takes a record number: a row's position, or its ``record`` column where rows are not records
    (unpaired rows, two per pair with ``data.unpair``)."""
    kinds = tokenized["bad_kind"]
    bad = [i for i, k in enumerate(kinds) if k]
    by_kind: dict[str, dict[str, Any]] = {}
    for i in bad:
        entry = by_kind.setdefault(kinds[i], {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_KIND:
            row = tokenized[i]
            record = row.get("record", i)
            entry["examples"].append({"where": where(record), "field": row["bad_field"], "message": row["bad_message"]})
    return bad, collections.Counter({k: v["count"] for k, v in by_kind.items()}), by_kind


def _lengths(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    out: dict[str, float] = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    out["max"] = int(values.max())
    out["mean"] = round(float(values.mean()), 1)
    return out


def boundary_merges(stats: dict[str, np.ndarray]) -> int:
    """Pairs (rows) where the tokenizer merged a token across the prompt/response boundary, so the token across it
    was given to the response (``tokenize.joint_ids``)."""
    return int((stats["boundary_moved"] > 0).sum())


def unpaired_split_report(dm: Any, split: str) -> dict[str, Any]:
    """``split_report`` for unpaired rows: rows, labels, prompt/completion lengths, the label length gap."""
    stats = dm.stats[split]
    rows = len(stats["prompt_tokens"])
    rate = (lambda n: round(float(n) / rows, 4)) if rows else (lambda n: 0.0)
    labels = np.asarray(stats["label"], dtype=bool)
    completion = stats["completion_tokens"]
    desirable, undesirable = completion[labels], completion[~labels]

    def mean(values: np.ndarray) -> float:
        return round(float(values.mean()), 2) if len(values) else 0.0

    return {
        "format": dm.formats[split],
        "unpaired": True,
        "unpaired_from_pairs": dm.formats[split] != "unpaired",
        "records": dm.rows[split],
        "bad_records": sum(dm.skipped[split].values()),
        "bad_by_kind": dm.bad_rows[split],
        "rows": rows,
        "labels": {
            "desirable": int(labels.sum()),
            "undesirable": int((~labels).sum()),
            "desirable_fraction": rate(labels.sum()),
        },
        "tokens": {
            "prompt": _lengths(stats["prompt_tokens"]),
            "completion": _lengths(completion),
            "desirable": _lengths(desirable),
            "undesirable": _lengths(undesirable),
        },
        "truncation_rate": {
            part: rate((stats[f"{part}_len"] < stats[f"{part}_tokens"]).sum()) for part in ("prompt", "completion")
        },
        "identical_after_truncation": int(dm.identical[split]),
        "identical_dropped": bool(dm.drop_identical),
        "missing_eos": {"completion": int((stats["completion_len"] < stats["completion_tokens"]).sum())},
        "boundary_merges": boundary_merges(stats),
        "length_gap": {
            "mean": round(mean(desirable) - mean(undesirable), 2),
            "desirable_mean": mean(desirable),
            "undesirable_mean": mean(undesirable),
        },
        "from_cache": dm.from_cache.get(split, False),
    }


def split_report(dm: Any, split: str) -> dict[str, Any]:
    """The audit of one source split (``train`` or ``val``) from the data module's collected statistics."""
    stats = dm.stats[split]
    if "completion_tokens" in stats:
        return unpaired_split_report(dm, split)
    pairs = len(stats["prompt_tokens"])
    bad = sum(dm.skipped[split].values())
    rate = (lambda n: round(float(n) / pairs, 4)) if pairs else (lambda n: 0.0)
    gap = stats["chosen_tokens"].astype(np.int64) - stats["rejected_tokens"].astype(np.int64)
    return {
        "format": dm.formats[split],
        "records": dm.rows[split],
        "bad_records": bad,
        "bad_by_kind": dm.bad_rows[split],
        "pairs": pairs,
        "tokens": {part: _lengths(stats[f"{part}_tokens"]) for part in ("prompt", "chosen", "rejected")},
        "truncation_rate": {
            part: rate((stats[f"{part}_len"] < stats[f"{part}_tokens"]).sum())
            for part in ("prompt", "chosen", "rejected")
        },
        "identical_after_truncation": int(dm.identical[split]),
        "identical_dropped": bool(dm.drop_identical),
        "missing_eos": {
            part: int((stats[f"{part}_len"] < stats[f"{part}_tokens"]).sum()) for part in ("chosen", "rejected")
        },
        "boundary_merges": boundary_merges(stats),
        "length_gap": {
            "mean": round(float(gap.mean()), 2) if pairs else 0.0,
            "median": float(np.median(gap)) if pairs else 0.0,
            "chosen_longer": rate((gap > 0).sum()),
            "rejected_longer": rate((gap < 0).sum()),
        },
        "from_cache": dm.from_cache.get(split, False),
    }


def build_report(dm: Any) -> dict[str, Any]:
    """The whole audit of a prepared ``PreferenceDataModule`` (a JSON-able dict)."""
    splits = {split: split_report(dm, split) for split in dm.stats}
    padding = {"batch_size": dm.batch_size, "group_by_length": dm.group_by_length}
    unpaired = "completion_len" in dm.datasets["train"].column_names
    if unpaired:
        stats = dm.datasets["train"].with_format("numpy", columns=["prompt_len", "completion_len"])[:]
    else:
        stats = dm.datasets["train"].with_format("numpy", columns=["prompt_len", "chosen_len", "rejected_len"])[:]
    for name, grouped in (("grouped", True), ("random", False)):
        batches = dm.train_sampler(group_by_length=grouped).batches(0)
        if unpaired:
            fraction = unpaired_padding_fraction(
                stats["prompt_len"], stats["completion_len"], batches, dm.max_length, dm.max_prompt_length
            )
        else:
            fraction = padding_fraction(stats["prompt_len"], stats["chosen_len"], stats["rejected_len"], batches)
        padding[name] = round(fraction, 4)
    report = {
        "settings": {
            "tokenizer": dm.tokenizer_path or f"BPE trained on the data (vocab {dm.tokenizer_vocab_size})",
            "max_length": dm.max_length,
            "max_prompt_length": dm.max_prompt_length,
            "truncation_mode": dm.truncation_mode,
            "on_bad_row": dm.on_bad_row,
        },
        "splits": splits,
        "unit": "rows" if unpaired else "pairs",  # what "pairs" counts: unpaired rows, or pairs
        "pairs": {split: len(dm.datasets[split]) for split in ("train", "val")},
        "padding": padding,
        "thresholds": dict(dm.thresholds),
    }
    report["violations"] = violations(report)
    return report


def violations(report: dict[str, Any]) -> list[str]:
    """The configured thresholds the data crosses, each as one sentence."""
    limits, out = report["thresholds"], []
    for split, r in report["splits"].items():
        if r["bad_records"] and report["settings"]["on_bad_row"] == "error":
            out.append(f"{r['bad_records']} bad {split} records stop fit (data.on_bad_row: error)")
        responses = ("completion",) if r.get("unpaired") else ("chosen", "rejected")
        checks = [("max_bad_row_rate", "bad-record rate", r["bad_records"] / max(r["records"], 1))]
        checks += [("max_truncation_rate", f"{part} truncation rate", r["truncation_rate"][part]) for part in responses]
        checks.append(
            (
                "max_identical_rate",
                "identical-after-truncation rate",
                r["identical_after_truncation"] / max(r["rows"] if r.get("unpaired") else r["pairs"], 1),
            )
        )
        for key, what, value in checks:
            if limits.get(key) is not None and value > limits[key]:
                out.append(f"{split} {what} {value:.3f} > data.{key} {limits[key]}")
    return out


def summary_line(report: dict[str, Any]) -> str:
    """One line for the setup log."""
    train = report["splits"]["train"]
    pairs, unit = report["pairs"], report.get("unit", "pairs")
    parts = [
        f"data: {train['records']} {train['format']} records -> {pairs['train']} train / {pairs['val']} val {unit}"
    ]
    if train.get("unpaired"):
        parts.append(f"{train['labels']['desirable_fraction']:.1%} desirable")
    for split, r in report["splits"].items():
        if r["bad_records"]:
            kinds = ", ".join(f"{k} {v['count']}" for k, v in r["bad_by_kind"].items())
            parts.append(f"{r['bad_records']} bad {split} records skipped ({kinds})")
    t = train["truncation_rate"]
    parts.append("truncated: " + ", ".join(f"{part} {value:.1%}" for part, value in t.items()))
    if train["identical_after_truncation"]:
        verb = "dropped" if train["identical_dropped"] else "kept"
        parts.append(f"{train['identical_after_truncation']} {unit} identical after truncation ({verb})")
    if train["boundary_merges"]:
        parts.append(f"{train['boundary_merges']} {unit} with a token merged across the prompt/response boundary")
    pad = report["padding"]
    parts.append(f"padding {pad['grouped']:.1%} grouped by length vs {pad['random']:.1%} random")
    if train["from_cache"]:
        parts.append(f"tokenized {unit} from cache")
    return "; ".join(parts)


def format_report(report: dict[str, Any]) -> str:
    """The report as text, for the terminal."""
    lines = ["Data audit", "=========="]
    lines += [f"  {k}: {v}" for k, v in report["settings"].items()]
    unit = report.get("unit", "pairs")
    lines.append(f"  {unit} after filtering: train {report['pairs']['train']}, val {report['pairs']['val']}")
    for split, r in report["splits"].items():
        if r.get("unpaired"):
            lines += ["", *_unpaired_lines(split, r)]
            continue
        lines += ["", f"[{split}] {r['records']} records ({r['format']}), {r['bad_records']} bad, {r['pairs']} pairs"]
        for kind, entry in r["bad_by_kind"].items():
            lines.append(f"  bad {kind}: {entry['count']}")
            lines += [f"    e.g. {ex['where']}, field {ex['field']!r}: {ex['message']}" for ex in entry["examples"]]
        lines.append("  tokens        p50     p90     p99     max    mean")
        for part, s in r["tokens"].items():
            lines.append(f"  {part:<9} {s['p50']:>7.0f} {s['p90']:>7.0f} {s['p99']:>7.0f} {s['max']:>7} {s['mean']:>7}")
        t = r["truncation_rate"]
        lines.append(f"  truncated: prompt {t['prompt']:.1%}, chosen {t['chosen']:.1%}, rejected {t['rejected']:.1%}")
        e = r["missing_eos"]
        lines.append(f"  responses without EOS (cut at max_length): chosen {e['chosen']}, rejected {e['rejected']}")
        lines.append(BOUNDARY_LINE.format(r["boundary_merges"], "pairs"))
        verb = "dropped" if r["identical_dropped"] else "kept"
        lines.append(f"  identical after truncation (zero gradient): {r['identical_after_truncation']} ({verb})")
        g = r["length_gap"]
        lines.append(
            f"  length gap chosen - rejected (tokens): mean {g['mean']:+.1f}, median {g['median']:+.0f}; chosen "
            f"longer in {g['chosen_longer']:.1%}, rejected longer in {g['rejected_longer']:.1%}"
        )
    pad = report["padding"]
    lines += [
        "",
        f"padding of training batches (batch {pad['batch_size']} {unit}): {pad['grouped']:.1%} grouped by length, "
        f"{pad['random']:.1%} random order (data.group_by_length: {str(pad['group_by_length']).lower()})",
    ]
    lines.append("thresholds crossed: " + ("; ".join(report["violations"]) if report["violations"] else "none"))
    return "\n".join(lines)


def _bad_and_token_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    for kind, entry in r["bad_by_kind"].items():
        lines.append(f"  bad {kind}: {entry['count']}")
        lines += [f"    e.g. {ex['where']}, field {ex['field']!r}: {ex['message']}" for ex in entry["examples"]]
    lines.append("  tokens        p50     p90     p99     max    mean")
    for part, s in r["tokens"].items():
        lines.append(f"  {part:<11} {s['p50']:>5.0f} {s['p90']:>7.0f} {s['p99']:>7.0f} {s['max']:>7} {s['mean']:>7}")
    return lines


def _unpaired_lines(split: str, r: dict[str, Any]) -> list[str]:
    """The text of one unpaired split's report."""
    origin = ", pairs split by data.unpair" if r["unpaired_from_pairs"] else ""
    lines = [f"[{split}] {r['records']} records ({r['format']}{origin}), {r['bad_records']} bad, {r['rows']} rows"]
    labels = r["labels"]
    lines.append(
        f"  labels: {labels['desirable']} desirable, {labels['undesirable']} undesirable "
        f"({labels['desirable_fraction']:.1%} desirable)"
    )
    lines += _bad_and_token_lines(r)
    t = r["truncation_rate"]
    lines.append(f"  truncated: prompt {t['prompt']:.1%}, completion {t['completion']:.1%}")
    lines.append(f"  completions without EOS (cut at max_length): {r['missing_eos']['completion']}")
    lines.append(BOUNDARY_LINE.format(r["boundary_merges"], "rows"))
    verb = "dropped" if r["identical_dropped"] else "kept"
    lines.append(f"  rows identical after truncation (a pair's two rows): {r['identical_after_truncation']} ({verb})")
    g = r["length_gap"]
    lines.append(
        f"  completion length gap desirable - undesirable (tokens): mean {g['mean']:+.1f} "
        f"({g['desirable_mean']:.1f} vs {g['undesirable_mean']:.1f})"
    )
    return lines


def write_report(report: dict[str, Any], out_dir: str | Path, stats: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Write ``data_audit.json`` and, when matplotlib is installed, ``data_lengths.png``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "data_audit.json"]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    if stats is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return paths
        parts = ("prompt", "completion") if "completion_tokens" in stats else ("prompt", "chosen", "rejected")
        fig, axes = plt.subplots(1, len(parts), figsize=(4.4 * len(parts), 3.5), sharey=True)
        settings = report["settings"]
        for ax, part in zip(axes, parts, strict=True):
            ax.hist(stats[f"{part}_tokens"], bins=50, color="tab:blue" if part == "prompt" else "tab:green")
            limit = settings["max_prompt_length"] if part == "prompt" else settings["max_length"]
            ax.axvline(
                limit,
                color="tab:red",
                linestyle="--",
                label=f"{'max_prompt_length' if part == 'prompt' else 'max_length'} {limit}",
            )
            ax.set_title(f"{part} tokens (before truncation)")
            ax.set_xlabel("tokens")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("rows" if "completion_tokens" in stats else "pairs")
        fig.tight_layout()
        paths.append(out / "data_lengths.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
