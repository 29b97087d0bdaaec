"""wandb's sweep engine, the ``sweeps`` package, as the local runner uses it.

wandb's server validates sweep files and proposes runs with ``sweeps`` (https://github.com/wandb/sweeps, MIT).
Calling it here, rather than re-implementing it, is what makes a file behave the same under ``wandb agent``
and ``dpo-lightning sweep``: the same verdict on the file, the same grid in the same order, the same random
values for a given seed, the same hyperband stop decisions on the same histories. Bayes is the exception
(see ``dpo_lightning/sweeping/runner.py``).

``sweeps`` 0.3.0 pins ``numpy<2`` but runs on numpy 2; ``make install`` installs it with ``--no-deps`` after
its real dependencies (listed in pyproject.toml).
"""

from __future__ import annotations

import random
import warnings
from types import ModuleType
from typing import Any

from dpo_lightning.errors import UserError

INSTALL_HINT = "pip install --no-deps sweeps==0.3.0  (its dependencies come with dpo-lightning; `make install` does it)"


def wandb_sweeps() -> ModuleType:
    """The ``sweeps`` package, or a UserError saying how to install it."""
    with warnings.catch_warnings():  # sweeps 0.3.0 still spells a pydantic v1 config key
        warnings.simplefilter("ignore")
        try:
            import sweeps
        except ImportError as err:
            raise UserError(f"wandb's sweep engine is not installed ({err}): {INSTALL_HINT}") from None
    if not hasattr(sweeps, "next_runs"):  # e.g. a folder named sweeps/ (this repository's) found first
        raise UserError(f"`import sweeps` found {list(sweeps.__path__)}, not wandb's engine: {INSTALL_HINT}")
    return sweeps


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values, as they reach the agent after the server's JSON round trip."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def _values(run: Any) -> dict[str, Any]:
    return {name: _plain(block["value"]) for name, block in run.config.items()}


def schema_verdict(cfg: Any) -> list[str]:
    """wandb's own messages for a sweep file (empty when ``wandb sweep`` would accept it)."""
    sweeps = wandb_sweeps()
    if not isinstance(cfg, dict):
        return ["a sweep file must be a YAML mapping (wandb: Sweep config must be parsable as a JSON object)"]
    try:
        return list(sweeps.schema_violations_from_proposed_config(cfg))
    except ValueError as err:  # raised (not listed) for e.g. a parameter that is not a mapping
        return [str(err)]


def engine_failures(cfg: dict[str, Any]) -> list[str]:
    """Files ``wandb sweep`` accepts but wandb's own algorithms then fail on, found by running them once.

    E.g. hyperband with ``max_iter`` and no ``s`` (the schema asks for min_iter *or* max_iter + s, the
    stopping code takes the max_iter branch and needs s), ``max_iter: 0`` (no bands), a grid over a
    continuous distribution, hyperband or bayes without a metric.
    """
    sweeps = wandb_sweeps()
    out = []
    stop = cfg.get("early_terminate")
    if stop is not None:
        if isinstance(stop, dict) and "max_iter" in stop and "s" not in stop:
            out.append(
                "early_terminate: max_iter without s: wandb's schema accepts it, but its hyperband code then "
                "needs s (KeyError 's'); add s, or replace max_iter by min_iter"
            )
        else:
            try:
                sweeps.stop_runs(cfg, [], validate=True)
            except Exception as err:  # the engine's own message is the point
                out.append(f"early_terminate: wandb's hyperband fails on this block: {err}")
    try:
        if cfg.get("method") == "grid":
            sweeps.next_runs(cfg, [], validate=True)
        elif cfg.get("method") == "bayes" and "metric" not in cfg:
            out.append("metric: a bayes sweep needs a metric to model (wandb's bayes search raises without one)")
    except Exception as err:
        out.append(f"method: wandb's {cfg.get('method')} search fails on this file: {err}")
    return out


def grid_points(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of a grid sweep, in the order wandb proposes them (swept parameters only).

    wandb sorts the parameters by name and varies the last one fastest; ``q_uniform`` axes are
    ``numpy.arange(min, max, q)``, so ``max`` itself is not a point.
    """
    sweeps = wandb_sweeps()
    from sweeps.grid_search import grid_search_next_runs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = sweeps.params.HyperParameterSet.from_config(cfg["parameters"])
    size = 1
    for p in params:
        if p.type == p.CATEGORICAL:
            size *= len(p.config["values"])
        elif p.type == p.INT_UNIFORM:
            size *= p.config["max"] - p.config["min"] + 1
        elif p.type == p.Q_UNIFORM:
            size *= max(1, int((p.config["max"] - p.config["min"]) / p.config["q"]) + 1)
    runs = [r for r in grid_search_next_runs([], cfg, validate=True, n=size + 1) if r is not None]
    swept = {p.name for p in params.searchable_params}
    return [{k: v for k, v in _values(r).items() if k in swept} for r in runs]


def random_draws(cfg: dict[str, Any], seed: int, n: int) -> list[dict[str, Any]]:
    """The first ``n`` values wandb's random search draws after ``random.seed(seed)`` (swept parameters only).

    wandb draws from Python's global ``random``; its state is saved and restored around the draws.
    """
    sweeps = wandb_sweeps()
    from sweeps.random_search import random_search_next_runs

    state = random.getstate()
    try:
        random.seed(seed)
        runs = random_search_next_runs(dict(cfg, method="random"), validate=True, n=n)  # bayes: its prior
    finally:
        random.setstate(state)
    params = sweeps.params.HyperParameterSet.from_config(cfg["parameters"])
    swept = {p.name for p in params.searchable_params}
    return [{k: v for k, v in _values(r).items() if k in swept} for r in runs]


def hyperband_stops(cfg: dict[str, Any], histories: dict[Any, tuple[bool, list[float]]]) -> set[Any]:
    """Which running trials wandb's hyperband stops now.

    ``histories`` maps a trial key to (running, the metric's values so far, one per logged iteration);
    finished, stopped and failed trials count for the thresholds as they do in wandb.
    """
    sweeps = wandb_sweeps()
    metric = cfg["metric"]["name"]
    runs = [
        sweeps.SweepRun(
            name=str(i),
            state=sweeps.RunState.running if running else sweeps.RunState.finished,
            history=[{metric: v} for v in values],
        )
        for i, (running, values) in enumerate(histories.values())
    ]
    keys = list(histories)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped = sweeps.stop_runs(cfg, runs, validate=False)
    return {keys[int(r.name)] for r in stopped}
