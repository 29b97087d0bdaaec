"""Runs as ``compare`` and the sweep runner read them: curves from ``metrics.csv``, identity from the folder.

A run's loss and β come from its ``config.yaml`` (the resolved LightningCLI config) and, for sweep trials,
from ``trial.json``, which also gives the trial's state and swept values. Parameters whose name holds
``seed`` are the run's *seed*: runs that differ only there are replicates of one variant.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_lightning.errors import UserError


def is_seed(name: str) -> bool:
    """Whether a swept parameter is a replicate seed (seed_everything, data.seed, ...)."""
    return "seed" in name.split(".")[-1]


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
    extras: dict[str, Any] = field(default_factory=dict)  # other swept values that vary, e.g. data.label_noise
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    seed: dict[str, Any] = field(default_factory=dict)  # the replicate's seed values
    sweep_metric: str | None = None  # the metric of the sweep it belongs to

    def final(self, column: str) -> float | None:
        points = self.curves.get(column)
        return points[-1][1] if points else None

    @property
    def usable(self) -> bool:
        """Ran to its end (finished trials, and runs outside a sweep)."""
        return self.state in ("complete", "finished")


def _config_value(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if isinstance(node, dict) and "init_args" in node and part not in node:
            node = node["init_args"]  # class_path/init_args blocks of LightningCLI configs
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _sweep_metric(run_dir: Path, root: Path) -> str | None:
    for folder in (run_dir, *run_dir.parents):
        if (folder / "sweep.yaml").is_file():
            return ((yaml.safe_load((folder / "sweep.yaml").read_text()) or {}).get("metric") or {}).get("name")
        if folder == root.parent:
            break
    return None


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
        {k: v for k, v in extras.items() if not is_seed(k)},
        read_metrics_csv(csv_path),
        {k: v for k, v in extras.items() if is_seed(k)},
        _sweep_metric(run_dir, root),
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
