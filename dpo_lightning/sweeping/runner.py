"""The local sweep runner: take a trial, start its command, follow its metric, record how it ended.

* grid and random points come from the study's queue (``storage.py``): wandb's grid order, wandb's draws;
  bayes asks Optuna's TPE (multivariate, ``constant_liar`` for concurrent trials). wandb's own bayes is a
  Gaussian process over the unit cube; the two are compared in tests/test_sweep_engine.py.
* ``early_terminate: hyperband`` is decided by wandb's code (``engine.hyperband_stops``) on the metric's
  values so far of every trial in the study, all runners' included. As in wandb, an *iteration* is one
  logged value of the sweep's metric, read from the trial's ``metrics.csv`` while it runs; a trial's
  result is the metric's last value.
* every trial is the file's ``command`` with wandb's macros expanded, plus ``--run.dir`` and ``--run.name``
  (see ``identity.py``); ``WANDB_RUN_ID`` and ``WANDB_PROJECT`` are set as ``wandb agent`` sets them.
  Its output goes to ``trial.log`` in its folder, its record to ``trial.json`` there.
* Ctrl-C, SIGTERM and SIGHUP end the running trials and record them as interrupted; the same command
  (on any machine sharing the storage) runs them again. A runner killed outright leaves its trials
  running: the next runner on that host ends their process groups first (``processes.py``), and runners
  elsewhere re-queue a trial whose runner sent no heartbeat for ``--stale-after`` seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from dpo_lightning.comparing.runs import find_metrics_csv, read_metrics_csv
from dpo_lightning.comparing.tables import write_sweep_summary
from dpo_lightning.errors import ConfigError
from dpo_lightning.sweep_space import Param, SweepSpec, build_command
from dpo_lightning.sweeping import engine, processes, storage
from dpo_lightning.sweeping.identity import local_run_id
from dpo_lightning.sweeping.records import interrupted, is_done, trial_record

HEARTBEAT_S = 30.0


def distribution(p: Param) -> BaseDistribution:
    """The Optuna distribution of a parameter of a bayes sweep."""
    if p.distribution == "categorical":
        return CategoricalDistribution(list(p.values))
    if p.distribution == "int_uniform":
        return IntDistribution(int(p.low), int(p.high))
    if p.distribution == "q_uniform":
        return FloatDistribution(p.low, p.high, step=p.q)
    return FloatDistribution(p.low, p.high, log=p.distribution == "log_uniform_values")


@dataclass
class Running:
    """A trial whose process this runner started and is following."""

    trial: optuna.trial.Trial
    proc: Any  # subprocess.Popen
    log: TextIO
    run_dir: Path
    started: float
    values: list[float] = field(default_factory=list)  # the metric's values reported so far
    checked: int = 0  # prefixes of ``values`` hyperband has judged
    reported: int = 0  # values already written to the study


class Runner:
    """One runner process on one sweep; any number may share the sweep's storage."""

    def __init__(self, spec: SweepSpec, folder: Path, args: argparse.Namespace) -> None:
        self.spec, self.folder, self.args = spec, folder, args
        if spec.method == "bayes" and not spec.metric:
            raise ConfigError(f"{spec.path}: a bayes sweep needs a metric")
        caps = [c for c in (args.max_trials, spec.run_cap, len(spec.grid()) if spec.method == "grid" else None) if c]
        if not caps:
            raise ConfigError(
                f"{spec.path}: a {spec.method} sweep never ends by itself; pass --max-trials or set run_cap"
            )
        self.budget = min(caps)
        st, self.where = storage.open_storage(args.storage, folder)
        self.study = storage.create_or_load(st, spec, args.seed, self.budget)
        if spec.method != "bayes" and self.budget > int(self.study.user_attrs.get("queued", 0)):
            storage.extend_queue(self.study, spec, self.budget)  # a larger --max-trials: the next points
        if spec.method == "bayes":
            known = len(self.study.trials)  # seeded with the trial count: a resumed sweep does not replay proposals
            startup = max(2, min(10, self.budget // 3))  # random trials before TPE models; a third of small budgets
            self.study.sampler = optuna.samplers.TPESampler(
                seed=args.seed + known, multivariate=True, constant_liar=True, n_startup_trials=startup
            )
            self.dists = {p.name: distribution(p) for p in spec.swept}
        self.me = processes.identity() | {"runner": uuid.uuid4().hex[:12]}
        self.running: list[Running] = []
        self.stop_requested = False
        self.last_beat = time.monotonic()

    # -- storage helpers ------------------------------------------------------------------------------------
    def _set(self, t: FrozenTrial | optuna.trial.Trial, key: str, value: Any) -> None:
        self.study._storage.set_trial_user_attr(t._trial_id, key, value)

    @property
    def retried(self) -> set[int]:
        return set(self.study.user_attrs.get("retried", []))

    def _save_record(self, number: int) -> dict[str, Any]:
        t = self.study._storage.get_trial(self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, number))  # fmt: skip
        record = trial_record(self.spec, t, self.retried)
        if record["run_dir"] and Path(record["run_dir"]).is_dir():
            tmp = Path(record["run_dir"], "trial.json.tmp")
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            tmp.replace(tmp.with_suffix(""))
        return record

    def _mark_interrupted(self, t: FrozenTrial, reason: str) -> bool:
        """Record a trial as interrupted and queue its point again; False if another runner did it first.

        The state change RUNNING -> FAIL is the claim: both storages let one runner make it and refuse the
        others (UpdateFinishedTrialError), so exactly one queues the point again, whoever wrote the reason last.
        """
        try:
            self._set(t, "result", {"interrupted": True, "reason": reason, "by": self.me["runner"]})
            self.study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False
        storage.requeue(self.study, self.study._storage.get_trial(t._trial_id))
        self._save_record(t.number)
        return True

    # -- crash recovery -------------------------------------------------------------------------------------
    def recover(self, retry_failed: bool = False) -> int:
        """Re-queue the trials whose runner is gone (ending leftover processes on this host); returns how many."""
        mine = {r.trial._trial_id for r in self.running}
        count = 0
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id in mine:
                continue
            launch = t.user_attrs.get("launch", {})
            runner = launch.get("runner", {})
            seen = t.user_attrs.get("alive_at") or (t.datetime_start.timestamp() if t.datetime_start else now)
            if runner.get("host") == socket.gethostname():
                if processes.is_alive(runner):
                    continue
                ended = launch.get("pgid") and processes.end_group(launch["pgid"], launch.get("trial_start"))
                reason = f"interrupted: its runner (pid {runner.get('pid')}) stopped" + (
                    f"; runner {os.getpid()} ended the trial's leftover process group {launch['pgid']}" if ended else ""
                )
            elif now - seen > self.args.stale_after:
                reason = (
                    f"interrupted: its runner on {runner.get('host', '?')} sent no heartbeat for {now - seen:.0f} s"
                )
            else:
                continue
            count += self._mark_interrupted(t, reason)
            print(f"[{self.spec.name}] trial {t.number:03d} {reason}; queued again", flush=True)
        if retry_failed:
            failed = [t for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.FAIL]
            failed = [t for t in failed if is_done(t, self.retried)]
            if failed:
                self.study.set_user_attr("retried", sorted(self.retried | {t.number for t in failed}))
            for t in failed:
                storage.requeue(self.study, t)
                self._save_record(t.number)
                count += 1
        return count

    # -- starting trials ------------------------------------------------------------------------------------
    def remaining(self) -> int:
        """Trials not started yet, by any runner."""
        trials = self.study.get_trials(deepcopy=False)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if self.spec.method != "bayes":
            return waiting
        started = sum(is_done(t, self.retried) or t.state == TrialState.RUNNING for t in trials)
        return max(waiting, self.budget - started)

    def _next_trial(self) -> optuna.trial.Trial | None:
        if self.spec.method != "bayes":
            return storage.claim_queued(self.study)
        if not self.remaining():
            return None
        return self.study.ask(self.dists)  # takes a re-queued point first, else proposes

    def launch(self, trial: optuna.trial.Trial) -> None:
        import subprocess

        values = trial.user_attrs.get("values") if self.spec.method != "bayes" else dict(trial.params)
        values = self.spec.with_constants(values or {})
        run_id = local_run_id(trial.number)
        run_dir = self.folder / run_id
        run_dir.mkdir(parents=True, exist_ok=False)  # a fresh folder per trial, never shared
        name = f"{self.spec.name}-{run_id}"
        command = build_command(self.spec, values, args_json_file=run_dir / "args.json")
        command += [f"--run.dir={run_dir}", f"--run.name={name}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_RUN_ID=run_id)
        env.pop("DPO_LIGHTNING_RUN_DIR", None)
        if self.spec.project:
            env["WANDB_PROJECT"] = self.spec.project
        threads = str(max(1, (os.cpu_count() or 1) // self.args.workers))  # parallel trials share the cores
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", threads)
        shown = " ".join(f"{k}={v}" for k, v in values.items() if any(p.name == k for p in self.spec.swept))
        print(f"[{self.spec.name}] trial {trial.number:03d} started: {shown} -> {run_dir}", flush=True)
        log = open(run_dir / "trial.log", "w")  # closed in _finish
        log.write("$ " + " ".join(command) + "\n\n")
        log.flush()
        started = time.monotonic()
        launch = {"run_id": run_id, "name": name, "run_dir": str(run_dir), "command": command, "values": values}
        launch |= {"runner": self.me}
        try:  # a new session: signals to the runner stay there, and the trial's group can be ended whole
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as err:
            log.write(f"could not start the trial: {err}\n")
            log.close()
            self._set(trial, "launch", launch)
            self._tell(trial, run_dir, started, TrialState.FAIL, reason=f"could not start: {err}", tail=True)
            return
        self._set(trial, "launch", launch | {"pgid": proc.pid, "trial_start": processes.start_time(proc.pid)})
        self._set(trial, "alive_at", time.time())
        self._save_record(trial.number)
        self.running.append(Running(trial, proc, log, run_dir, started))

    # -- following trials -----------------------------------------------------------------------------------
    def _metric_values(self, run_dir: Path) -> tuple[list[float], list[str]]:
        """The metric's values so far, and the columns seen (for the error when the metric never shows)."""
        path = find_metrics_csv(run_dir)
        columns = read_metrics_csv(path) if path else {}
        return [v for _, v in columns.get(self.spec.metric or "", [])], sorted(columns)

    def _hyperband(self, alive: list[Running]) -> set[int]:
        """Trial ids of this runner's live trials that wandb's hyperband stops, judging each new iteration in turn."""
        if not self.spec.hyperband:
            return set()
        pending = [r for r in alive if r.checked < len(r.values)]
        if not pending:
            return set()
        mine = {r.trial._trial_id: r for r in self.running}
        others = {
            t._trial_id: (
                t.state == TrialState.RUNNING,
                [t.intermediate_values[s] for s in sorted(t.intermediate_values)],
            )
            for t in self.study.get_trials(deepcopy=False)
            if t._trial_id not in mine and t.intermediate_values and not interrupted(t)
        }
        stopped: set[int] = set()
        for r in pending:
            for k in range(r.checked + 1, len(r.values) + 1):
                histories = others | {i: (True, o.values) for i, o in mine.items() if i != r.trial._trial_id}
                histories[r.trial._trial_id] = (True, r.values[:k])
                r.checked = k
                if r.trial._trial_id in engine.hyperband_stops(self.spec.raw, histories):
                    stopped.add(r.trial._trial_id)
                    del r.values[k:]  # what the decision saw is what is recorded
                    break
        return stopped

    def poll(self) -> None:
        """Advance every running trial: report new values, apply hyperband, record the ones that ended."""
        codes = {id(r): r.proc.poll() for r in self.running}  # before reading the CSVs, so ended ones read complete
        seen_columns = {}
        for r in self.running:
            values, seen_columns[id(r)] = self._metric_values(r.run_dir)
            for step in range(len(r.values) + 1, len(values) + 1):
                r.values.append(values[step - 1])
        stopped = self._hyperband([r for r in self.running if codes[id(r)] is None])
        for r in self.running:  # into the study, where runners elsewhere see them
            for step in range(r.reported + 1, len(r.values) + 1):
                r.trial.report(r.values[step - 1], step)
            r.reported = len(r.values)
        still = []
        for r in self.running:
            code = codes[id(r)]
            timeout = self.args.trial_timeout
            timed_out = code is None and timeout and time.monotonic() - r.started > timeout
            pruned = r.trial._trial_id in stopped
            if code is None and not pruned and not timed_out:
                still.append(r)
                continue
            if code is None:
                processes.terminate(r.proc)
            metric = repr(self.spec.metric)
            if pruned:
                self._finish(r, TrialState.PRUNED, reason=f"stopped by hyperband at iteration {len(r.values)}")
            elif timed_out:
                self._finish(r, TrialState.FAIL, reason=f"timed out after {timeout:g} s", tail=True)
            elif code != 0:
                self._finish(r, TrialState.FAIL, reason=processes.describe_exit(code), tail=True)
            elif self.spec.metric is None:
                self._finish(r, TrialState.COMPLETE, value=0.0)
            elif not r.values:
                cols = seen_columns[id(r)]
                why = f"columns: {', '.join(cols)}" if cols else "no metrics.csv"
                self._finish(r, TrialState.FAIL, reason=f"metric {metric} was never logged ({why})", tail=True)
            elif math.isnan(r.values[-1]):
                self._finish(r, TrialState.FAIL, reason=f"metric {metric} is NaN", tail=True)
            else:
                self._finish(r, TrialState.COMPLETE, value=r.values[-1])
        self.running = still
        if time.monotonic() - self.last_beat > HEARTBEAT_S:  # tells runners elsewhere these trials are alive
            self.last_beat = time.monotonic()
            for r in self.running:
                self._set(r.trial, "alive_at", time.time())

    def _finish(self, r: Running, state: TrialState, **kwargs: Any) -> None:
        r.log.close()
        self._tell(r.trial, r.run_dir, r.started, state, code=r.proc.returncode, **kwargs)

    def _tell(self, trial, run_dir: Path, started: float, state: TrialState, value: float | None = None,
              reason: str | None = None, tail: bool = False, code: int | None = None,
              interrupted: bool = False) -> None:  # fmt: skip
        elapsed = round(time.monotonic() - started, 2)
        result = {"duration_s": elapsed, "exit_code": code, "reason": reason, "interrupted": interrupted}
        if interrupted:
            result["by"] = self.me["runner"]
        if tail:
            result["log_tail"] = _log_tail(run_dir / "trial.log")
        self._set(trial, "result", result)
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        record = self._save_record(trial.number)
        shown = f" {self.spec.metric}={record['value']:.4g}" if record["value"] is not None else ""
        print(
            f"[{self.spec.name}] trial {trial.number:03d} {record['state']} in {elapsed:.1f} s{shown}"
            + (f" ({reason})" if reason else ""),
            flush=True,
        )
        if tail:
            print("    " + (record["log_tail"] or "").replace("\n", "\n    "), flush=True)
        write_sweep_summary(self.spec, self.folder)

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run trials until none is left or a stop is requested; 130 when interrupted."""
        self.recover(retry_failed=self.args.retry_failed)
        print(
            f"[{self.spec.name}] {self.spec.method} sweep in {self.folder} ({self.where}): {self.remaining()} "
            f"trial(s) to run, {self.args.workers} at a time here",
            flush=True,
        )
        grace = processes.KILL_GRACE_S  # for each running trial between SIGTERM and SIGKILL, once stopped
        try:
            while not self.stop_requested:
                self.poll()
                while len(self.running) < self.args.workers and not self.stop_requested:
                    trial = self._next_trial()
                    if trial is None:
                        break
                    self.launch(trial)
                if not self.running and not self.stop_requested:
                    if not self.recover():  # runners elsewhere may have died with trials of theirs
                        break
                    continue
                try:  # sleep, but wake up as soon as the oldest trial ends
                    self.running[0].proc.wait(self.args.poll) if self.running else time.sleep(self.args.poll)
                except Exception:  # subprocess.TimeoutExpired
                    pass
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, still recording what was running
            self.stop_requested = True
            grace = 0.0
        if not self.stop_requested:
            print(write_sweep_summary(self.spec, self.folder), flush=True)
            return 0
        for r in self.running:
            try:
                processes.terminate(r.proc, grace)
            except KeyboardInterrupt:  # asked again while the trials end: no grace left, for any of them
                grace = 0.0
                processes.terminate(r.proc, grace)
            r.log.close()
            self._tell(r.trial, r.run_dir, r.started, TrialState.FAIL, reason="interrupted: the runner was stopped",
                       code=r.proc.returncode, interrupted=True)  # fmt: skip
            storage.requeue(self.study, self.study._storage.get_trial(r.trial._trial_id))
        self.running = []
        print(f"[{self.spec.name}] interrupted; {self.remaining()} trial(s) left: run the same command to resume",
              flush=True)  # fmt: skip
        return 130


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
