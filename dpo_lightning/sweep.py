"""Run a wandb sweep file on this machine (or many), with no W&B server: wandb's engine proposes, subprocesses train.

    dpo-lightning sweep --check sweeps/label_noise.yaml          validate; print the trials it would run
    dpo-lightning sweep sweeps/loss_variants.yaml --max-trials 3 [--workers 2]
    dpo-lightning sweep sweeps/label_noise.yaml --storage /shared/label_noise.journal   (on each machine)
    dpo-lightning sweep sweeps/label_noise.yaml --storage postgresql://me@dbhost/sweeps  (on each machine)
    dpo-lightning sweep --status sweeps/loss_variants.yaml

The file is the one ``wandb sweep`` takes, checked and run with wandb's own engine (``sweeping/engine.py``):
the grid in wandb's order, wandb's random draws, wandb's hyperband; bayes is Optuna's TPE. Trials run
under ``runs/sweeps/<name>/<run id>/`` (``--out`` moves the sweep folder), named ``<name>-<run id>``.
State: ``study.db`` there, or the shared ``--storage`` (``sweeping/storage.py``): every runner on it takes
points from one queue, so the union of their trials is the sweep, each point once. Ctrl-C, SIGTERM or
SIGHUP end the running trials and record them as interrupted; the same command resumes (interrupted
trials again, finished ones never; ``--retry-failed`` also re-runs crashed ones). ``summary.csv`` /
``summary.md`` are rewritten after every trial; ``--status`` prints them from the trials' ``trial.json``.

Overhead: well under a second per trial (storage writes, polling every 0.2 s); a real trial's own start-up
(Python, torch and Lightning imports, data, wandb init) is several seconds on top.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from dpo_lightning.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpo-lightning sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_file", help="a wandb sweep YAML, e.g. sweeps/loss_variants.yaml")
    p.add_argument("--check", action="store_true", help="validate with wandb's engine, print the trials; run nothing")
    p.add_argument("--show", type=int, default=10, help="with --check: random/bayes proposals to print (default 10)")
    p.add_argument("--workers", type=int, default=1, help="trials run in parallel by this process (default 1)")
    p.add_argument("--max-trials", type=int, default=None, help="total trials of the sweep (with run_cap)")
    p.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<sweep name>)")
    p.add_argument("--storage", default=None, help="shared state: a journal file path or a database URL")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws / bayes proposals")
    p.add_argument("--trial-timeout", type=float, default=None, help="fail a trial after this many seconds")
    p.add_argument("--retry-failed", action="store_true", help="run crashed trials again")
    p.add_argument("--status", action="store_true", help="print the summary of the stored sweep and exit")
    p.add_argument("--stale-after", type=float, default=180.0, help=argparse.SUPPRESS)  # no heartbeat: re-queue
    p.add_argument("--poll", type=float, default=0.2, help=argparse.SUPPRESS)  # seconds between checks
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dpo-lightning sweep``; returns the exit status (130 when interrupted)."""
    args = _parser().parse_args(argv)
    try:
        if args.check:
            from dpo_lightning.sweeping.check import check

            print(check(args.sweep_file, args.seed, args.show, args.max_trials))
            return 0
        from dpo_lightning.sweep_space import load_sweep

        spec = load_sweep(args.sweep_file)
        folder = Path(args.out) if args.out else Path("runs") / "sweeps" / spec.name
        if args.status:
            return _status(spec, folder)
        if args.workers < 1 or (args.max_trials is not None and args.max_trials < 1):
            raise UserError("--workers and --max-trials must be at least 1")
        folder.mkdir(parents=True, exist_ok=True)
        if args.storage is None and not (folder / "study.db").exists() and any(folder.glob("*/trial.json")):
            raise UserError(f"{folder} holds trials of a sweep whose study.db is gone; use another --out")
        return _run(spec, folder, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _status(spec: Any, folder: Path) -> int:
    from socket import gethostname

    from dpo_lightning.comparing.tables import write_sweep_summary
    from dpo_lightning.sweeping.processes import is_alive

    if not any(folder.glob("*/trial.json")):
        raise UserError(f"no trials recorded in {folder}; run `dpo-lightning sweep {spec.path}` first")
    text = write_sweep_summary(spec, folder)
    running = [json.loads(p.read_text()) for p in folder.glob("*/trial.json")]
    running = [r for r in running if r["state"] == "running" and (r.get("runner") or {}).get("host") == gethostname()]
    orphans = [r["trial"] for r in running if not is_alive(r["runner"])]  # a runner elsewhere: not ours to judge
    if orphans:
        text += "\nNo runner on this host follows trial(s) " + ", ".join(f"{n:03d}" for n in sorted(orphans))
        text += ": they were cut off and run again on resume.\n"
    print(text)
    return 0


def _run(spec: Any, folder: Path, args: argparse.Namespace) -> int:
    from dpo_lightning.sweeping.runner import Runner

    runner = Runner(spec, folder, args)  # refuses a file that differs from the stored sweep's
    shutil.copyfile(spec.path, folder / "sweep.yaml")  # then the copy beside the trials is the stored one

    # First Ctrl-C / SIGTERM / SIGHUP: stop launching, end the running trials, record them; a second: at once.
    def request_stop(signum: int, frame: Any) -> None:
        if runner.stop_requested:
            raise KeyboardInterrupt
        runner.stop_requested = True
        name = signal.Signals(signum).name
        print(f"[{spec.name}] {name}: ending the running trials (Ctrl-C again to hurry)", flush=True)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, request_stop) for s in signals} if in_main else {}
    try:
        return runner.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
