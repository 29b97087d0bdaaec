"""Sweep files: load and check a wandb sweep YAML, and turn a trial's values into its command line.

    dpo-lightning sweep --check sweeps/beta_lr.yaml      (the verdict, and the trials it would run)

The same file serves two runners: ``wandb sweep`` + ``wandb agent`` online, and ``dpo-lightning sweep``
offline (see ``sweep.py``). The verdict on a file is wandb's own (:mod:`dpo_lightning.sweeping.engine` calls
the ``sweeps`` package, which wandb's server uses), plus the files wandb accepts but whose algorithms then
fail on them. :func:`load_sweep` adds what the *local* runner cannot do (nested blocks, ``custom``, bayes
over distributions Optuna has no counterpart for).

Command lines are built as ``wandb agent`` builds them, from wandb's own helper: every macro (``${args}``,
``${args_no_equals}``, ``${args_json_file}``, ``${args_append_hydra}``, ``${envvar:NAME}``, ...) means the
same in both runners, and the parameters come in wandb's order (sorted by name).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_lightning.errors import ConfigError
from dpo_lightning.sweeping import engine

# What the local bayes search (Optuna) can sample with the same meaning as wandb. Grid and random use
# wandb's own engine, so they take every distribution wandb takes.
BAYES_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform_values")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


def _number_hint(x: Any) -> str:
    # PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; wandb rejects it too.
    if isinstance(x, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", x):
        return f" (YAML reads {x} as text; write it with a dot, e.g. {x.lower().replace('e', '.0e', 1)})"
    return ""


def infer_distribution(spec: dict[str, Any]) -> str:
    """The distribution wandb assumes for a parameter block that does not name one."""
    if "distribution" in spec:
        return str(spec["distribution"])
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical_w_probabilities" if "probabilities" in spec else "categorical"
    if "parameters" in spec:
        return "nested"
    if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
        return "int_uniform"  # both bounds integers: wandb samples integers
    return "uniform"


def schema_violations(cfg: Any) -> list[str]:
    """Every way ``cfg`` fails under wandb (empty when valid): wandb's schema messages, else its algorithms'."""
    found = list(dict.fromkeys(engine.schema_verdict(cfg)))  # wandb repeats a min/max message
    if not found and isinstance(cfg, dict):
        found = engine.engine_failures(cfg)
    hints = {_number_hint(v) for spec in _blocks(cfg) for v in spec.values()} - {""}
    return found + [f"hint:{h}" for h in sorted(hints)] if found else found


def _blocks(cfg: Any) -> list[dict[str, Any]]:
    params = cfg.get("parameters") if isinstance(cfg, dict) else None
    return [s for s in params.values() if isinstance(s, dict)] if isinstance(params, dict) else []


@dataclass(frozen=True)
class Param:
    """One parameter of the file, by its dotted CLI name (bounds and q are what bayes needs)."""

    name: str
    distribution: str
    values: tuple[Any, ...] = ()  # constant / categorical
    low: float | None = None
    high: float | None = None
    q: float | None = None

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (used to check proposals)."""
        if self.distribution in ("constant", "categorical"):
            return value in self.values
        if self.low is None or self.high is None:
            return isinstance(value, (int, float))
        return isinstance(value, (int, float)) and self.low - 1e-12 <= value <= self.high + 1e-12


@dataclass
class SweepSpec:
    """A loaded, checked sweep file."""

    path: Path
    name: str
    method: str
    params: list[Param]
    command: list[str]
    program: str | None = None
    project: str | None = None
    metric: str | None = None
    goal: str = "minimize"
    run_cap: int | None = None
    hyperband: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def swept(self) -> list[Param]:
        return [p for p in self.params if p.distribution != "constant"]

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point in wandb's order (parameters sorted by name, the last one fastest)."""
        return engine.grid_points(self.raw)

    def random_draws(self, seed: int, n: int) -> list[dict[str, Any]]:
        """The first ``n`` random-search points for ``seed``, drawn by wandb's engine."""
        return engine.random_draws(self.raw, seed, n)

    def with_constants(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` completed with the constant parameters, in wandb's order (sorted by name)."""
        out = {p.name: p.values[0] for p in self.params if p.distribution == "constant"} | values
        return dict(sorted(out.items()))


def _to_param(name: str, spec: dict[str, Any], method: str) -> Param:
    dist = infer_distribution(spec)
    if dist == "nested":
        raise ConfigError(
            f"parameters.{name}: nested parameter blocks are not run locally (wandb would pass "
            f"--{name}={{...}}); write the dotted CLI name instead, e.g. '{name}.x'"
        )
    if method == "bayes" and dist not in BAYES_DISTRIBUTIONS:
        raise ConfigError(
            f"parameters.{name}: distribution {dist} is valid for wandb, but the local bayes search (Optuna) "
            f"supports only: {', '.join(BAYES_DISTRIBUTIONS)}; grid and random take every distribution"
        )
    if None in (spec.get("values") or [spec.get("value", 0)]):
        raise ConfigError(
            f"parameters.{name}: null is passed to the command as the text 'None', which the CLI does not "
            "read as null; leave the key out to keep the config's value"
        )
    if dist == "constant":
        return Param(name, dist, values=(spec["value"],))
    if dist.startswith("categorical"):
        for v in spec["values"]:
            if not isinstance(v, (bool, int, float, str)):
                raise ConfigError(f"parameters.{name}.values: {v!r} is not a scalar; the local runner needs scalars")
        return Param(name, "categorical", values=tuple(spec["values"]))
    # (wandb's schema refuses the deprecated log_uniform, whose bounds are exponents: bounds are values here)
    return Param(name, dist, low=spec.get("min"), high=spec.get("max"),
                 q=spec.get("q", 1.0 if dist.startswith("q_") else None))  # fmt: skip


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and check a sweep file; any problem raises :class:`ConfigError` naming the file and wandb's message."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    problems = schema_violations(raw)
    if problems:
        raise ConfigError(f"{path}: not a valid wandb sweep (wandb's messages):\n  " + "\n  ".join(problems))
    method = raw["method"]
    if method == "custom":
        raise ConfigError(f"{path}: method: 'custom' needs a wandb scheduler; run it with `wandb agent`")
    try:
        params = [_to_param(str(name), spec, method) for name, spec in raw["parameters"].items()]
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    metric = raw.get("metric") or {}
    return SweepSpec(
        path=path,
        name=str(raw.get("name") or path.stem),
        method=method,
        params=params,
        command=[str(c) for c in raw.get("command") or DEFAULT_COMMAND],
        program=raw.get("program"),
        project=raw.get("project"),
        metric=metric.get("name"),
        goal=metric.get("goal", "minimize"),
        run_cap=raw.get("run_cap"),
        hyperband=dict(raw["early_terminate"]) if raw.get("early_terminate") else None,
        raw=raw,
    )


def agent_macros(values: dict[str, Any]) -> dict[str, Any]:
    """The ``${...}`` argument macros of ``wandb agent`` for a trial's values.

    The same lists as wandb's ``create_sweep_command_args`` (wandb/sdk/launch/sweeps/utils.py), written out
    here because importing wandb costs a runner seconds; tests/test_sweep.py checks them against wandb's.
    """
    flags = [f"{k}={v}" for k, v in values.items()]
    return {
        "args": [f"--{f}" for f in flags],
        "args_no_equals": [x for k, v in values.items() for x in (f"--{k}", str(v))],
        "args_no_hyphens": flags,
        "args_no_boolean_flags": [
            f"--{k}" if v is True else f"--{k}={v}" for k, v in values.items() if not (isinstance(v, bool) and not v)
        ],
        "args_json": [json.dumps(values)],
        "args_dict": dict(values),
        "args_append_hydra": [f"+{f}" for f in flags],
        "args_override_hydra": [f"++{f}" for f in flags],
    }


def build_command(
    spec: SweepSpec, values: dict[str, Any], local: bool = True, args_json_file: Path | None = None
) -> list[str]:
    """The trial's command line: ``spec.command`` with every ``wandb agent`` macro expanded for ``values``.

    With ``local=True`` the interpreter is this one (``sys.executable``) and a ``dpo-lightning`` token runs
    ``python -m dpo_lightning`` from it, so trials use this venv even when its ``bin`` is not on PATH.
    With ``local=False`` the result is what ``wandb agent`` runs. ``${args_json_file}`` is written to
    ``args_json_file`` (the agent writes ``wandb/sweep-<id>/config-<run id>.json``).
    """
    macros = agent_macros(values)
    macros["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    macros["interpreter"] = [sys.executable if local else "python"]
    macros["program"] = [spec.program] if spec.program else []
    if "${args_json_file}" in spec.command:
        if args_json_file is None:
            raise ConfigError(f"{spec.path}: ${{args_json_file}} needs a file to write the trial's values to")
        args_json_file.write_text(json.dumps(values))
        macros["args_json_file"] = [str(args_json_file)]
    out: list[str] = []
    for chunk in spec.command:
        # as wandb: ${envvar:NAME} is replaced inside a token (left as NAME when unset); a whole-token ${macro}
        # becomes its list, and an unknown one nothing
        chunk = re.sub(r"\$\{envvar:([A-Z0-9_]*)\}", lambda m: os.environ.get(m[1], m[1]), chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            out += [str(c) for c in (macros.get(chunk[2:-1]) or [])]
        elif local and chunk == "dpo-lightning":
            out += [sys.executable, "-m", "dpo_lightning"]
        else:
            out.append(chunk)
    return out
