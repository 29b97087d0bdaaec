"""Where a sweep's state lives, and how several runners share it without a W&B server.

    dpo-lightning sweep FILE                                   sqlite, runs/sweeps/<name>/study.db (one machine)
    dpo-lightning sweep FILE --storage /shared/fs/sweep.journal  a journal file on a shared filesystem
    dpo-lightning sweep FILE --storage postgresql://user@host/db  a database every machine reaches

The state is an Optuna study (https://optuna.readthedocs.io/en/stable/reference/storages.html): its
``RDBStorage`` (sqlite, PostgreSQL, MySQL; any SQLAlchemy URL) or its ``JournalStorage`` on a file (an
append-only log with file locks, for NFS-like shared filesystems where sqlite's locking is unsafe).

Grid and random sweeps are a *queue*: the runner that creates the study enqueues every point (the grid in
wandb's order, or the first N of wandb's random draws for the seed) as a WAITING trial, and a runner takes a
point by moving it WAITING -> RUNNING, which both storages do atomically (a second taker is refused). So any
number of runners, on any machines, run the union of the points with no point twice. Bayes asks Optuna's
sampler instead (its ``constant_liar`` keeps concurrent proposals apart).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from dpo_lightning.errors import UserError
from dpo_lightning.sweep_space import SweepSpec

QUEUE_WAIT_S = 60.0  # how long a runner waits for the creating runner to finish enqueuing the points


def open_storage(where: str | None, folder: Path) -> tuple[BaseStorage, str]:
    """The storage for ``--storage`` (None: sqlite in the sweep folder) and a description for messages."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if where is None:
        where = f"sqlite:///{(folder / 'study.db').resolve()}"
    if "://" in where:
        try:
            storage = optuna.storages.RDBStorage(where, engine_kwargs=_engine_kwargs(where))
        except Exception as err:  # a wrong URL, a missing driver, a server that does not answer
            raise UserError(f"--storage {_hide_password(where)}: cannot open it: {err}") from None
        return storage, _hide_password(where)
    path = Path(where)
    if not path.parent.is_dir():
        raise UserError(f"--storage {where}: folder {path.parent} does not exist")
    backend = optuna.storages.journal.JournalFileBackend(str(path))
    return optuna.storages.JournalStorage(backend), f"journal file {path}"


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # wait for a busy database instead of failing
    return {"pool_pre_ping": True}  # a server restarted under a long sweep


def _hide_password(url: str) -> str:
    head, sep, tail = url.partition("://")
    if "@" in tail and ":" in tail.split("@", 1)[0]:
        user = tail.split("@", 1)[0].split(":", 1)[0]
        return f"{head}{sep}{user}:***@{tail.split('@', 1)[1]}"
    return url


def queue_points(spec: SweepSpec, seed: int, budget: int) -> list[dict[str, Any]]:
    """The points a queued sweep runs, in order: the first ``budget`` of the grid or of the random draws."""
    if spec.method == "grid":
        return spec.grid()[:budget]
    return spec.random_draws(seed, budget)


def create_or_load(storage: BaseStorage, spec: SweepSpec, seed: int, budget: int) -> optuna.Study:
    """Create the sweep's study (enqueuing its points) or join it; refuses a study of a different file."""
    direction = "maximize" if spec.goal == "maximize" else "minimize"
    config = json.loads(json.dumps(spec.raw))
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, direction=direction)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        _wait_for_creator(study, spec)
    else:
        study.set_user_attr("sweep_config", config)
        study.set_user_attr("seed", seed)
        if spec.method != "bayes":
            extend_queue(study, spec, budget)
        study.set_user_attr("ready", True)
    if study.user_attrs.get("sweep_config") != config:
        raise UserError(
            f"{spec.path} differs from the file the stored sweep '{spec.name}' was started with; joining "
            "would mix two sweeps. Start a new one with --out DIR / --storage (or delete the old state)."
        )
    return study


def _wait_for_creator(study: optuna.Study, spec: SweepSpec) -> None:
    deadline = time.monotonic() + QUEUE_WAIT_S
    while not study.user_attrs.get("ready"):
        if time.monotonic() > deadline:
            raise UserError(f"the sweep '{spec.name}' was created but never finished enqueuing its points")
        time.sleep(0.2)


def extend_queue(study: optuna.Study, spec: SweepSpec, budget: int) -> None:
    """Enqueue the points not enqueued yet (all of them at creation; more random draws for a larger budget)."""
    queued = int(study.user_attrs.get("queued", 0))
    points = queue_points(spec, int(study.user_attrs.get("seed", 0)), budget)
    for index in range(queued, len(points)):
        study.enqueue_trial({}, user_attrs={"values": points[index], "point": index}, skip_if_exists=False)
    if len(points) > queued:
        study.set_user_attr("queued", len(points))


def claim_queued(study: optuna.Study) -> optuna.trial.Trial | None:
    """Take one WAITING trial (moving it to RUNNING); None when the queue is empty."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
            return optuna.trial.Trial(study, t._trial_id)
    return None


def requeue(study: optuna.Study, t: FrozenTrial) -> None:
    """Put a trial's point back in the queue (an interrupted or retried trial runs again)."""
    attrs = {"values": t.user_attrs.get("launch", {}).get("values", t.user_attrs.get("values"))}
    attrs |= {"point": t.user_attrs.get("point"), "requeued_from": t.number}
    study.enqueue_trial(t.params, user_attrs=attrs, skip_if_exists=False)
