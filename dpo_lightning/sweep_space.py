"""Sweep files: load and check a wandb sweep YAML, and turn its parameters into values and command lines.

    python -c "from dpo_lightning.sweep_space import load_sweep; print(load_sweep('sweeps/beta_lr.yaml'))"

The same file serves two runners: ``wandb sweep`` + ``wandb agent`` online, and ``dpo-lightning sweep``
offline (see ``sweep.py``). wandb 0.31 does not ship its sweep schema (it lives in the separate ``sweeps``
package, which pins numpy<2), so :func:`schema_violations` re-checks the keys that schema documents
(https://docs.wandb.ai/guides/sweeps/sweep-config-keys): every key, type and enum it names, no extra keys.
:func:`load_sweep` then also checks what the *local* runner can do, which is a subset of what wandb accepts.

Command lines are built the way ``wandb agent`` builds them: ``${args}`` becomes ``--name=value`` with
``str(value)``, so a value means the same thing to the CLI whichever runner produced it.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_lightning.errors import ConfigError

METHODS = ("grid", "random", "bayes", "custom")
TOP_LEVEL_KEYS = {
    "apiVersion",
    "kind",
    "controller",
    "description",
    "program",
    "job",
    "image_uri",
    "entity",
    "project",
    "method",
    "command",
    "name",
    "run_cap",
    "metric",
    "metrics",
    "scheduler",
    "early_terminate",
    "parameters",
}
METRIC_KEYS = {"name", "goal", "target", "impute", "impute_while_running"}
HYPERBAND_KEYS = {"type", "min_iter", "max_iter", "s", "eta", "strict"}
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

# distribution -> (required keys, optional keys) besides "distribution", from wandb's schema.
DISTRIBUTIONS: dict[str, tuple[set[str], set[str]]] = {
    "constant": ({"value"}, set()),
    "categorical": ({"values"}, set()),
    "categorical_w_probabilities": ({"values", "probabilities"}, set()),
    "int_uniform": ({"min", "max"}, set()),
    "uniform": ({"min", "max"}, set()),
    "q_uniform": ({"min", "max"}, {"q"}),
    "log_uniform": ({"min", "max"}, set()),
    "log_uniform_values": ({"min", "max"}, set()),
    "q_log_uniform": ({"min", "max"}, {"q"}),
    "q_log_uniform_values": ({"min", "max"}, {"q"}),
    "inv_log_uniform": ({"min", "max"}, set()),
    "inv_log_uniform_values": ({"min", "max"}, set()),
    "normal": (set(), {"mu", "sigma"}),
    "q_normal": (set(), {"mu", "sigma", "q"}),
    "log_normal": (set(), {"mu", "sigma"}),
    "q_log_normal": (set(), {"mu", "sigma", "q"}),
    "beta": (set(), {"a", "b"}),
    "q_beta": (set(), {"a", "b", "q"}),
}
# What the local runner can sample. Unbounded distributions (normal, beta, ...) have no Optuna counterpart
# with the same meaning, so they stay wandb-only rather than being approximated silently.
LOCAL_DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
)
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number_hint(x: Any) -> str:
    # PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; wandb would reject it too.
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


def _param_violations(name: str, spec: Any) -> list[str]:
    where = f"parameters.{name}"
    if not PARAM_NAME.match(name):
        return [f"{where}: parameter names must match {PARAM_NAME.pattern}"]
    if not isinstance(spec, dict):
        return [f"{where}: must be a mapping such as {{values: [...]}} or {{min: .., max: ..}}"]
    dist = infer_distribution(spec)
    if dist == "nested":
        extra = set(spec) - {"parameters"}
        if extra:
            return [f"{where}: unexpected key(s) {sorted(extra)} next to 'parameters'"]
        return _parameters_violations(spec["parameters"], prefix=f"{name}.")
    if dist not in DISTRIBUTIONS:
        return [f"{where}.distribution: unknown distribution {dist!r}; valid: {', '.join(DISTRIBUTIONS)}"]
    required, optional = DISTRIBUTIONS[dist]
    out = [f"{where}: distribution {dist} needs key {k!r}" for k in sorted(required - set(spec))]
    out += [
        f"{where}.{k}: not a key of distribution {dist}"
        for k in sorted(set(spec) - required - optional - {"distribution"})
    ]
    for key in ("min", "max", "q", "mu", "sigma", "a", "b"):
        if key in spec and not _is_number(spec[key]):
            out.append(f"{where}.{key}: must be a number, got {spec[key]!r}{_number_hint(spec[key])}")
    if dist == "int_uniform":
        out += [
            f"{where}.{k}: int_uniform needs an integer"
            for k in ("min", "max")
            if k in spec and not isinstance(spec[k], int)
        ]
    if dist.endswith("_values") and _is_number(spec.get("min")) and spec["min"] <= 0:
        out.append(f"{where}.min: {dist} needs min > 0")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        out.append(f"{where}.values: must be a non-empty list")
    if "probabilities" in spec:
        probs = spec["probabilities"]
        if not isinstance(probs, list) or not all(_is_number(p) and p >= 0 for p in probs):
            out.append(f"{where}.probabilities: must be a list of numbers >= 0")
    if not out and _is_number(spec.get("min")) and _is_number(spec.get("max")) and spec["min"] > spec["max"]:
        out.append(f"{where}: min ({spec['min']}) is greater than max ({spec['max']})")
    return out


def _parameters_violations(params: Any, prefix: str = "") -> list[str]:
    if not isinstance(params, dict) or not params:
        return [f"parameters{'.' + prefix if prefix else ''}: must be a non-empty mapping of name -> spec"]
    return [v for name, spec in params.items() for v in _param_violations(prefix + str(name), spec)]


def schema_violations(cfg: Any) -> list[str]:
    """Every way ``cfg`` breaks wandb's sweep schema, as ``key: problem`` strings (empty when valid)."""
    if not isinstance(cfg, dict):
        return ["<top>: a sweep file must be a YAML mapping"]
    out = [
        f"{k}: not a sweep key; valid keys: {', '.join(sorted(TOP_LEVEL_KEYS))}" for k in cfg if k not in TOP_LEVEL_KEYS
    ]
    if cfg.get("method") not in METHODS:
        out.append(f"method: must be one of {', '.join(METHODS)}, got {cfg.get('method')!r}")
    for key in ("program", "name", "description", "project", "entity", "job", "image_uri", "apiVersion"):
        if key in cfg and not isinstance(cfg[key], str):
            out.append(f"{key}: must be a string")
    if "command" in cfg and not isinstance(cfg["command"], list):
        out.append("command: must be a list of strings, e.g. [${env}, dpo-lightning, fit, ${args}]")
    if "run_cap" in cfg and not (isinstance(cfg["run_cap"], int) and cfg["run_cap"] > 0):
        out.append("run_cap: must be an integer > 0")
    metric = cfg.get("metric")
    if metric is not None:
        if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
            out.append("metric: must be a mapping with a string 'name'")
        else:
            out += [f"metric.{k}: not a metric key" for k in metric if k not in METRIC_KEYS]
            if metric.get("goal", "minimize") not in ("minimize", "maximize"):
                out.append(f"metric.goal: must be minimize or maximize, got {metric['goal']!r}")
    stop = cfg.get("early_terminate")
    if stop is not None:
        if not isinstance(stop, dict) or stop.get("type") != "hyperband":
            out.append("early_terminate.type: the only early termination wandb knows is 'hyperband'")
        else:
            out += [f"early_terminate.{k}: not a hyperband key" for k in stop if k not in HYPERBAND_KEYS]
            if "min_iter" not in stop and not {"max_iter", "s"} <= set(stop):
                out.append("early_terminate: hyperband needs min_iter, or both max_iter and s")
            for key in ("min_iter", "max_iter"):
                if key in stop and not (isinstance(stop[key], int) and stop[key] >= 1):
                    out.append(f"early_terminate.{key}: must be an integer >= 1")
            if "eta" in stop and not (_is_number(stop["eta"]) and stop["eta"] > 1):
                out.append("early_terminate.eta: must be a number > 1")
    if "parameters" not in cfg:
        out.append("parameters: missing; a sweep needs at least one parameter")
    else:
        out += _parameters_violations(cfg["parameters"])
    return out


@dataclass(frozen=True)
class Param:
    """One swept (or constant) parameter, by its dotted CLI name."""

    name: str
    distribution: str
    values: tuple[Any, ...] = ()  # constant / categorical
    low: float | None = None
    high: float | None = None
    q: float | None = None

    def grid_values(self) -> list[Any]:
        """The values a grid visits, in file order."""
        if self.distribution in ("constant", "categorical"):
            return list(self.values)
        if self.distribution == "int_uniform":
            return list(range(int(self.low), int(self.high) + 1))
        if self.distribution == "q_uniform":
            n = int(math.floor((self.high - self.low) / self.q + 1e-9))
            return [round(self.low + i * self.q, 12) for i in range(n + 1)]
        raise ConfigError(f"{self.name}: a grid cannot enumerate distribution {self.distribution}")

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (used to check proposals)."""
        if self.distribution in ("constant", "categorical"):
            return value in self.values
        low, high = self.bounds()
        return _is_number(value) and low - 1e-12 <= value <= high + 1e-12

    def bounds(self) -> tuple[float, float]:
        """Bounds in value space (log_uniform's are exponents in the file)."""
        if self.distribution == "log_uniform":
            return math.exp(self.low), math.exp(self.high)
        return self.low, self.high


@dataclass
class SweepSpec:
    """A loaded, checked sweep file."""

    path: Path
    name: str
    method: str
    params: list[Param]
    command: list[str]
    program: str | None = None
    metric: str | None = None
    goal: str = "minimize"
    run_cap: int | None = None
    hyperband: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def swept(self) -> list[Param]:
        return [p for p in self.params if p.distribution != "constant"]

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point, in file order with the *last* parameter varying fastest."""
        axes = [p.grid_values() for p in self.swept]
        names = [p.name for p in self.swept]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)]

    def with_constants(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` completed with the constant parameters, in file order."""
        return {p.name: (p.values[0] if p.distribution == "constant" else values[p.name]) for p in self.params}


def _flat_params(params: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for name, spec in params.items():
        if infer_distribution(spec) == "nested":
            raise ConfigError(
                f"parameters.{prefix}{name}: nested parameter blocks are not run locally; "
                f"write the dotted CLI name instead, e.g. '{prefix}{name}.x'"
            )
        out.append((prefix + str(name), spec))
    return out


def _to_param(name: str, spec: dict[str, Any], method: str) -> Param:
    dist = infer_distribution(spec)
    allowed = GRID_DISTRIBUTIONS if method == "grid" else LOCAL_DISTRIBUTIONS
    if dist not in allowed:
        raise ConfigError(
            f"parameters.{name}: distribution {dist} is valid for wandb, but the local runner's {method} "
            f"search supports only: {', '.join(allowed)}"
        )
    if None in (spec.get("values") or [spec.get("value", 0)]):
        raise ConfigError(
            f"parameters.{name}: null is passed to the command as the text 'None', which the CLI does not "
            "read as null; leave the key out to keep the config's value"
        )
    if dist == "constant":
        return Param(name, dist, values=(spec["value"],))
    if dist == "categorical":
        for v in spec["values"]:
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise ConfigError(f"parameters.{name}.values: {v!r} is not a scalar; the local runner needs scalars")
        return Param(name, dist, values=tuple(spec["values"]))
    return Param(name, dist, low=spec["min"], high=spec["max"], q=spec.get("q", 1.0 if "q_" in dist else None))


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and check a sweep file; any problem raises :class:`ConfigError` naming the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    problems = schema_violations(raw)
    if problems:
        raise ConfigError(f"{path}: not a valid wandb sweep:\n  " + "\n  ".join(problems))
    method = raw["method"]
    if method == "custom":
        raise ConfigError(f"{path}: method: 'custom' needs a wandb scheduler; run it with `wandb agent`")
    try:
        params = [_to_param(name, spec, method) for name, spec in _flat_params(raw["parameters"])]
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    metric = raw.get("metric") or {}
    stop = raw.get("early_terminate")
    if stop and not metric:
        raise ConfigError(f"{path}: early_terminate: hyperband needs a 'metric' to compare trials by")
    return SweepSpec(
        path=path,
        name=str(raw.get("name") or path.stem),
        method=method,
        params=params,
        command=[str(c) for c in raw.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]],
        program=raw.get("program"),
        metric=metric.get("name"),
        goal=metric.get("goal", "minimize"),
        run_cap=raw.get("run_cap"),
        hyperband=dict(stop) if stop else None,
        raw=raw,
    )


def arg_formats(values: dict[str, Any]) -> dict[str, list[str]]:
    """The argument macros of ``wandb agent`` (``wandb/sdk/launch/sweeps/utils.py``), same formatting."""
    import json

    return {
        "args": [f"--{k}={v}" for k, v in values.items()],
        "args_no_equals": [x for k, v in values.items() for x in (f"--{k}", str(v))],
        "args_no_hyphens": [f"{k}={v}" for k, v in values.items()],
        "args_no_boolean_flags": [f"--{k}" if v is True else f"--{k}={v}" for k, v in values.items() if v is not False],
        "args_json": [json.dumps(values)],
    }


def build_command(spec: SweepSpec, values: dict[str, Any], local: bool = True) -> list[str]:
    """The trial's command line: ``spec.command`` with wandb's macros expanded for ``values``.

    With ``local=True`` the interpreter is this one (``sys.executable``) and a ``dpo-lightning`` token runs
    ``python -m dpo_lightning`` from it, so trials use this venv even when its ``bin`` is not on PATH.
    With ``local=False`` the result is exactly what ``wandb agent`` would run.
    """
    macros = arg_formats(values)
    macros["env"] = ["/usr/bin/env"] if os.name != "nt" else []
    macros["interpreter"] = [sys.executable if local else "python"]
    macros["program"] = [spec.program] if spec.program else []
    out: list[str] = []
    for chunk in spec.command:
        # ${envvar:NAME} is replaced inside a token; a whole-token ${macro} becomes a list (unknown: dropped)
        chunk = re.sub(r"\$\{envvar:([A-Z0-9_]*)\}", lambda m: os.environ.get(m[1], m[1]), chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            out += macros.get(chunk[2:-1], [])
        elif local and chunk == "dpo-lightning":
            out += [sys.executable, "-m", "dpo_lightning"]
        else:
            out.append(chunk)
    return out
