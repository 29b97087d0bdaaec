"""``dpo-lightning sweep --check FILE``: wandb's verdict on a sweep file and the trials it would run.

Nothing runs. A valid grid prints every trial in the order both runners take them; random prints the first
N of wandb's draws for ``--seed`` (the values the local runner queues); bayes prints Optuna's first N
proposals before any result (its random start-up). Each line is a trial's swept values; the command line of
the first trial follows, as ``wandb agent`` would run it. An invalid file raises with wandb's messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo_lightning.sweep_space import SweepSpec, build_command, load_sweep


def proposals(spec: SweepSpec, seed: int, n: int) -> list[dict[str, Any]]:
    """The points the runner would take first: the whole grid, or the first ``n`` random / bayes ones."""
    if spec.method == "grid":
        return spec.grid()
    if spec.method == "random":
        return spec.random_draws(seed, n)
    import optuna

    from dpo_lightning.sweeping.runner import distribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    study = optuna.create_study(sampler=sampler)
    dists = {p.name: distribution(p) for p in spec.swept}
    return [dict(study.ask(dists).params) for _ in range(n)]


def check(path: str | Path, seed: int = 0, n: int = 10, max_trials: int | None = None) -> str:
    """The report ``--check`` prints (raises ConfigError with wandb's messages for an invalid file)."""
    spec = load_sweep(path)
    points = proposals(spec, seed, n)
    cap = min(c for c in (max_trials, spec.run_cap, len(points) if spec.method == "grid" else None, 10**9) if c)
    what = {
        "grid": f"{len(points)} grid points in wandb's order (parameters sorted by name, the last one fastest)",
        "random": f"the first {len(points)} of wandb's random draws for --seed {seed}",
        "bayes": f"Optuna TPE's first {len(points)} proposals before any result (--seed {seed})",
    }[spec.method]
    lines = [f"{spec.path}: valid for wandb ({spec.method}, project {spec.project or '(from program:)'}, "
             f"metric {spec.metric or 'none'}); {what}" + (f"; runs {cap}" if cap < 10**9 else ""), ""]  # fmt: skip
    width = len(str(len(points)))
    for i, point in enumerate(points):
        lines.append(f"  {i:0{width}d}  " + " ".join(f"{k}={v}" for k, v in point.items()))
    if points:
        first = build_command(spec, spec.with_constants(points[0]), local=False, args_json_file=None
                              ) if "${args_json_file}" not in spec.command else ["(writes", "args.json)"]  # fmt: skip
        lines += ["", "first trial, as `wandb agent` runs it:", "  " + " ".join(first)]
    return "\n".join(lines)
