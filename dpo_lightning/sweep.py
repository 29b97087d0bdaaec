"""Run a wandb sweep file on this machine, with no W&B server: Optuna proposes, subprocesses train.

    dpo-lightning sweep sweeps/loss_variants.yaml --max-trials 3 [--workers 2]
    dpo-lightning sweep --status sweeps/loss_variants.yaml

The file is the one ``wandb sweep`` takes (see ``sweep_space.py``). Here:

* grid runs every point in file order, last parameter fastest; random uses Optuna's RandomSampler; bayes
  uses TPE (``constant_liar`` keeps parallel workers from proposing the same point). ``early_terminate:
  hyperband`` becomes Optuna's HyperbandPruner: min_resource = ``min_iter`` (or max_iter / eta^s),
  max_resource = ``max_iter`` (else learnt from the first finished trial), reduction_factor = ``eta``.
  As in wandb, an *iteration* is one logged value of the sweep's metric, read from the trial's
  ``metrics.csv`` while it runs; a trial's result is the metric's last value.
* every trial is ``command`` with ``${args}`` expanded, plus ``--run.dir=<sweep>/trials/NNN``,
  ``--run.name`` and ``--run.group=<sweep name>``; its output goes to ``trial.log`` there. Trial numbers
  come from the study, so no two trials (or workers) ever share a folder.
* state is an Optuna sqlite study, ``runs/sweeps/<name>/study.db``. Ctrl-C (or SIGTERM) ends the running
  trials and marks them interrupted; the same command then runs what is left: interrupted trials again,
  finished ones never. ``--retry-failed`` also re-runs crashed ones.
* ``summary.csv`` / ``summary.md`` (sorted by the metric, failures with their log tail) are rewritten after
  every trial; ``--status`` prints them from the trials' ``trial.json``, even while a sweep runs.

Overhead: the runner adds well under a second per trial (study writes, polling every 0.2 s); a real trial's
own start-up (Python, torch and Lightning imports, data, wandb init) is several seconds on top.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from dpo_lightning.compare import find_metrics_csv, read_metrics_csv, write_sweep_summary
from dpo_lightning.errors import ConfigError, UserError
from dpo_lightning.sweep_space import Param, SweepSpec, build_command, load_sweep

KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL when a trial is pruned, timed out or interrupted
STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


def distribution(p: Param, method: str) -> BaseDistribution:
    """The Optuna distribution of a swept parameter (a grid axis is a categorical of its points)."""
    if method == "grid" or p.distribution == "categorical":
        return CategoricalDistribution(p.grid_values())
    if p.distribution == "int_uniform":
        return IntDistribution(int(p.low), int(p.high))
    if p.distribution == "q_uniform":
        return FloatDistribution(p.low, p.high, step=p.q)
    low, high = p.bounds()
    return FloatDistribution(low, high, log=p.distribution.startswith("log_uniform"))


def make_study(spec: SweepSpec, folder: Path, seed: int, workers: int, budget: int) -> optuna.Study:
    """Create or reopen the sweep's study in ``folder/study.db``; refuses a study of a different file."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = f"sqlite:///{(folder / 'study.db').resolve()}"
    known = 0
    if (folder / "study.db").exists():
        known = len(optuna.load_study(study_name=spec.name, storage=storage).trials)
    # Seeding with the trial count keeps a resumed sweep from replaying its first proposals.
    sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed + known)
    if spec.method == "bayes":
        startup = max(2, min(10, budget // 3))  # random trials before TPE models; a third of small budgets
        sampler = optuna.samplers.TPESampler(
            seed=seed + known, multivariate=True, constant_liar=workers > 1, n_startup_trials=startup
        )
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if spec.hyperband:
        hb, eta = spec.hyperband, spec.hyperband.get("eta", 3)
        min_iter = hb.get("min_iter") or max(1, int(hb["max_iter"] / eta ** hb["s"]))
        max_iter = hb.get("max_iter", "auto")
        pruner = optuna.pruners.HyperbandPruner(min_iter, max_iter, reduction_factor=round(eta))
    direction = "maximize" if spec.goal == "maximize" else "minimize"
    study = optuna.create_study(
        storage=storage,
        study_name=spec.name,
        sampler=sampler,
        pruner=pruner,
        direction=direction,
        load_if_exists=True,
    )
    config = json.loads(json.dumps(spec.raw))
    stored = study.user_attrs.get("sweep_config")
    if stored is None:
        study.set_user_attr("sweep_config", config)
    elif stored != config:
        raise UserError(
            f"{spec.path} has changed since the sweep in {folder} started; resuming would mix two sweeps. "
            f"Start a new one with --out DIR (or delete {folder})."
        )
    return study


def _is_done(t: FrozenTrial, retried: set[int]) -> bool:
    """Finished for good: counts against the budget and is not run again."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    interrupted = t.user_attrs.get("result", {}).get("interrupted")
    return t.state == TrialState.FAIL and not interrupted and t.number not in retried


def _point_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
    return f"killed by signal {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def trial_record(spec: SweepSpec, t: FrozenTrial, retried: set[int]) -> dict[str, Any]:
    """What ``trial.json`` holds: the trial as the summary and ``compare`` read it, without Optuna."""
    launch, result = t.user_attrs.get("launch", {}), t.user_attrs.get("result", {})
    state = STATE_NAMES.get(t.state, "running")
    state = "interrupted" if result.get("interrupted") else state
    state = "retried" if t.number in retried else state
    value = t.value if spec.metric else None  # without a metric the study stores a placeholder 0
    if value is None and t.state == TrialState.PRUNED and t.last_step is not None:
        value = t.intermediate_values[t.last_step]  # a pruned trial's last reported value
    record = {"trial": t.number, "sweep": spec.name, "state": state, "metric": spec.metric, "value": value}
    record |= {"iterations": len(t.intermediate_values), "params": launch.get("values", t.params)}
    record |= {key: result.get(key) for key in ("duration_s", "exit_code", "reason")}
    record |= {"run_dir": launch.get("run_dir"), "command": launch.get("command"), "log_tail": result.get("log_tail")}
    return record


@dataclass
class Running:
    """A trial whose process is alive."""

    trial: optuna.trial.Trial
    proc: subprocess.Popen[bytes]
    log: TextIO
    run_dir: Path
    started: float
    reported: int = 0  # metric values already reported to the pruner


class LocalSweep:
    """One sweep folder driven by one process (a lock file keeps it that way)."""

    def __init__(self, spec: SweepSpec, folder: Path, args: argparse.Namespace) -> None:
        self.spec, self.folder, self.args = spec, folder, args
        grid_size = len(spec.grid()) if spec.method == "grid" else None
        caps = [c for c in (args.max_trials, spec.run_cap, grid_size) if c]
        if not caps:
            raise ConfigError(
                f"{spec.path}: a {spec.method} sweep never ends by itself; pass --max-trials or set run_cap"
            )
        self.budget = min(caps)
        self.study = make_study(spec, folder, args.seed, args.workers, self.budget)
        self.dists = {p.name: distribution(p, spec.method) for p in spec.swept}
        # A finished trial's attributes are frozen, so failures queued again by --retry-failed are a study attr.
        self.retried: set[int] = set(self.study.user_attrs.get("retried", []))
        self.running: list[Running] = []
        self.stop_requested = False

    def _set(self, t: FrozenTrial | optuna.trial.Trial, key: str, value: dict[str, Any]) -> None:
        # The storage API, as FrozenTrials of past sessions have no setter. One dict per write: each write is
        # an sqlite commit (~10 ms on a loaded machine), so a trial makes two: "launch" and "result".
        self.study._storage.set_trial_user_attr(t._trial_id, key, value)

    def _save_record(self, number: int) -> dict[str, Any]:
        record = trial_record(self.spec, self.study.get_trials(deepcopy=False)[number], self.retried)
        if record["run_dir"] and Path(record["run_dir"]).is_dir():
            Path(record["run_dir"], "trial.json").write_text(json.dumps(record, indent=2) + "\n")
        return record

    def _recover(self) -> None:
        """Trials left RUNNING by a process that died were interrupted: queue them (and failures if asked)."""
        for t in self.study.get_trials(deepcopy=False):
            if t.state == TrialState.RUNNING:
                self._set(t, "result", {"interrupted": True, "reason": "interrupted: the sweep process stopped"})
                self.study.tell(t.number, state=TrialState.FAIL)
            elif self.args.retry_failed and t.state == TrialState.FAIL and _is_done(t, self.retried):
                self.retried.add(t.number)
                self.study.set_user_attr("retried", sorted(self.retried))
            else:
                continue
            self._save_record(t.number)
            if self.spec.method != "grid":  # a grid finds its missing points by itself
                self.study.enqueue_trial(t.params)

    def _grid_left(self) -> list[dict[str, Any]]:
        trials = self.study.get_trials(deepcopy=False)
        taken = {_point_key(t.params) for t in trials if _is_done(t, self.retried)}
        taken |= {_point_key(r.trial.params) for r in self.running}
        return [p for p in self.spec.grid() if _point_key(p) not in taken]

    def _remaining(self) -> int:
        done = sum(_is_done(t, self.retried) for t in self.study.get_trials(deepcopy=False))
        left = self.budget - done - len(self.running)
        if self.spec.method == "grid":
            left = min(left, len(self._grid_left()))
        return max(0, left)

    def _launch(self) -> None:
        if self.spec.method == "grid" and not self.study.get_trials(states=(TrialState.WAITING,)):
            self.study.enqueue_trial(self._grid_left()[0])
        trial = self.study.ask(self.dists)  # pops a queued point (grid, resumed trials) before sampling
        values = self.spec.with_constants(trial.params)
        run_dir = self.folder / "trials" / f"{trial.number:03d}"
        run_dir.mkdir(parents=True, exist_ok=False)  # a fresh folder per trial, never shared
        name = f"{self.spec.name}-{trial.number:03d}"
        command = build_command(self.spec, values)
        command += [f"--run.dir={run_dir}", f"--run.name={name}", f"--run.group={self.spec.name}"]
        self._set(trial, "launch", {"run_dir": str(run_dir), "command": command, "values": values})
        self._save_record(trial.number)
        env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_RUN_GROUP=self.spec.name)
        threads = str(max(1, (os.cpu_count() or 1) // self.args.workers))  # parallel trials share the cores
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", threads)
        shown = " ".join(f"{k}={v}" for k, v in trial.params.items())
        print(f"[{self.spec.name}] trial {trial.number:03d} started: {shown} -> {run_dir}", flush=True)
        log = open(run_dir / "trial.log", "w")  # closed in _finish
        log.write("$ " + " ".join(command) + "\n\n")
        log.flush()
        started = time.monotonic()
        try:  # a new session: Ctrl-C reaches the runner only, and a trial's process group can be ended whole
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as err:
            log.write(f"could not start the trial: {err}\n")
            log.close()
            self._tell(trial, run_dir, started, TrialState.FAIL, reason=f"could not start: {err}", tail=True)
            return
        self.running.append(Running(trial, proc, log, run_dir, started))

    def _metric_values(self, run_dir: Path) -> tuple[list[float], list[str]]:
        """The metric's values so far, and the columns seen (for the error when the metric never shows)."""
        path = find_metrics_csv(run_dir)
        columns = read_metrics_csv(path) if path else {}
        return [v for _, v in columns.get(self.spec.metric or "", [])], sorted(columns)

    def _poll(self, r: Running) -> bool:
        """Advance one running trial; True once it has ended (finished, crashed, pruned or timed out)."""
        code = r.proc.poll()  # before reading the CSV, so that an ended trial's CSV is read complete
        values, seen = self._metric_values(r.run_dir)
        pruned = False
        for step in range(r.reported + 1, len(values) + 1):
            r.trial.report(values[step - 1], step)
            r.reported = step
            # Asked even when the trial has ended: asking is what records its rung values for later trials.
            if r.trial.should_prune() and code is None:
                pruned = True
                break
        timeout = self.args.trial_timeout
        timed_out = code is None and timeout and time.monotonic() - r.started > timeout
        if code is None and not pruned and not timed_out:
            return False
        if code is None:
            _terminate(r.proc)
        metric = repr(self.spec.metric)
        if pruned:
            self._finish(r, TrialState.PRUNED, reason=f"pruned by hyperband at iteration {r.reported}")
        elif timed_out:
            self._finish(r, TrialState.FAIL, reason=f"timed out after {timeout:g} s", tail=True)
        elif code != 0:
            self._finish(r, TrialState.FAIL, reason=_describe_exit(code), tail=True)
        elif self.spec.metric is None:
            self._finish(r, TrialState.COMPLETE, value=0.0)
        elif not values:
            why = f"columns: {', '.join(seen)}" if seen else "no metrics.csv"
            self._finish(r, TrialState.FAIL, reason=f"metric {metric} was never logged ({why})", tail=True)
        elif math.isnan(values[-1]):
            self._finish(r, TrialState.FAIL, reason=f"metric {metric} is NaN", tail=True)
        else:
            self._finish(r, TrialState.COMPLETE, value=values[-1])
        return True

    def _finish(self, r: Running, state: TrialState, **kwargs: Any) -> None:
        r.log.close()
        self._tell(r.trial, r.run_dir, r.started, state, code=r.proc.returncode, **kwargs)

    def _tell(
        self,
        trial: optuna.trial.Trial,
        run_dir: Path,
        started: float,
        state: TrialState,
        value: float | None = None,
        reason: str | None = None,
        tail: bool = False,
        code: int | None = None,
        interrupted: bool = False,
    ) -> None:
        elapsed = round(time.monotonic() - started, 2)
        result = {"duration_s": elapsed, "exit_code": code, "reason": reason, "interrupted": interrupted}
        if tail:
            result["log_tail"] = _log_tail(run_dir / "trial.log")
        self._set(trial, "result", result)
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        record = self._save_record(trial.number)
        result = f" {self.spec.metric}={record['value']:.4g}" if record["value"] is not None else ""
        print(
            f"[{self.spec.name}] trial {trial.number:03d} {record['state']} in {elapsed:.1f} s{result}"
            + (f" ({reason})" if reason else ""),
            flush=True,
        )
        if tail:
            print("    " + record["log_tail"].replace("\n", "\n    "), flush=True)
        write_sweep_summary(self.spec, self.folder)

    def run(self) -> int:
        """Run trials until the budget is spent or a stop is requested; 130 when interrupted."""
        self._recover()
        print(
            f"[{self.spec.name}] {self.spec.method} sweep in {self.folder}: {self._remaining()} trial(s) "
            f"to run, {self.args.workers} at a time",
            flush=True,
        )
        try:
            while not self.stop_requested:
                self.running = [r for r in self.running if not self._poll(r)]
                left = self._remaining()  # each study read is a query: count once per round
                while len(self.running) < self.args.workers and left and not self.stop_requested:
                    self._launch()
                    left -= 1
                if not self.running and not left:
                    break
                try:  # sleep, but wake up as soon as the oldest trial ends (the next one starts sooner)
                    self.running[0].proc.wait(self.args.poll) if self.running else time.sleep(self.args.poll)
                except subprocess.TimeoutExpired:
                    pass
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, still recording what was running
            self.stop_requested = True
        if not self.stop_requested:
            print(write_sweep_summary(self.spec, self.folder), flush=True)
            return 0
        for r in self.running:
            _terminate(r.proc)
            self._finish(r, TrialState.FAIL, reason="interrupted by the user", interrupted=True)
            if self.spec.method != "grid":
                self.study.enqueue_trial(r.trial.params)
        self.running = []
        left = self._remaining()
        print(f"[{self.spec.name}] interrupted; {left} trial(s) left: run the same command to resume", flush=True)
        return 130


def _terminate(proc: subprocess.Popen[bytes], grace: float = KILL_GRACE_S) -> None:
    """SIGTERM the trial's whole process group (FSDP workers included), SIGKILL it after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpo-lightning sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_file", help="a wandb sweep YAML, e.g. sweeps/loss_variants.yaml")
    p.add_argument("--workers", type=int, default=1, help="trials run in parallel (default 1)")
    p.add_argument("--max-trials", type=int, default=None, help="total trials of the sweep (with run_cap)")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<sweep name>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random / bayes proposals")
    p.add_argument("--trial-timeout", type=float, default=None, help="fail a trial after this many seconds")
    p.add_argument("--retry-failed", action="store_true", help="run crashed trials again")
    p.add_argument("--status", action="store_true", help="print the summary of the stored sweep and exit")
    p.add_argument("--poll", type=float, default=0.2, help=argparse.SUPPRESS)  # seconds between checks
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpo-lightning sweep``; returns the exit status (130 when interrupted)."""
    args = _parser().parse_args(argv)
    try:
        spec = load_sweep(args.sweep_file)
        folder = Path(args.out) if args.out else Path("runs") / "sweeps" / spec.name
        if args.status:
            if not any(folder.glob("trials/*/trial.json")):
                raise UserError(f"no trials recorded in {folder}; run `dpo-lightning sweep {spec.path}` first")
            text = write_sweep_summary(spec, folder)
            states = [json.loads(p.read_text())["state"] for p in folder.glob("trials/*/trial.json")]
            if "running" in states and not _is_locked(folder / "sweep.lock"):
                text += (
                    "\nNo sweep process holds this folder: the 'running' trials were cut off and re-run on resume.\n"
                )
            print(text)
            return 0
        if args.workers < 1 or (args.max_trials is not None and args.max_trials < 1):
            raise UserError("--workers and --max-trials must be at least 1")
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "study.db").exists() and any((folder / "trials").glob("*")):
            raise UserError(f"{folder}/trials holds runs of a sweep whose study.db is gone; use another --out")
        return _run_locked(spec, folder, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _is_locked(path: Path) -> bool:
    import fcntl

    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def _run_locked(spec: SweepSpec, folder: Path, args: argparse.Namespace) -> int:
    import fcntl

    with open(folder / "sweep.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS if this process dies
        except BlockingIOError:
            raise UserError(f"another `dpo-lightning sweep` is running in {folder}") from None
        shutil.copyfile(spec.path, folder / "sweep.yaml")
        sweep = LocalSweep(spec, folder, args)

        # First Ctrl-C / SIGTERM: stop launching, end the running trials, record them; a second: at once.
        def request_stop(signum: int, frame: Any) -> None:
            if sweep.stop_requested:
                raise KeyboardInterrupt
            sweep.stop_requested = True
            print(f"[{spec.name}] stopping: ending the running trials (Ctrl-C again to hurry)", flush=True)

        in_main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        try:
            return sweep.run()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
