"""A sweep trial's identity on disk and on the wandb project page, the same under ``wandb agent`` and offline.

* name ``<sweep>-<run id>`` and folder ``runs/sweeps/<sweep>/<run id>``: the run id is wandb's (the agent
  sets ``WANDB_RUN_ID``), or the local runner's (``NNN-xxxxx``: the trial number and a random suffix, so
  that sweeps started again elsewhere never reuse an id when their offline runs are ``wandb sync``-ed);
* wandb group ``<sweep>-<loss>-beta<β>``, so the project page draws one line per variant by default (an
  empty ``--run.group=`` means no group), the sweep name among the tags, job_type = the loss;
* project: the sweep file's ``project:`` (the agent sets ``WANDB_PROJECT`` from it; so does the runner).

``dpo-lightning fit`` applies these when ``--run.sweep=<name>`` is given (every shipped sweep file does);
the name always, the others unless given (``--run.dir``, ``--run.group``).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import string
from typing import Any

ALPHABET = string.ascii_lowercase + string.digits


def local_run_id(number: int) -> str:
    """The run id of the local runner's trial ``number``."""
    return f"{number:03d}-" + "".join(secrets.choice(ALPHABET) for _ in range(5))


def variant_group(sweep: str, loss: str, beta: float) -> str:
    return f"{sweep}-{loss}-beta{beta:g}"


def apply_sweep_defaults(run: Any, loss: str, beta: float) -> Any:
    """``run`` (the CLI's RunConfig) completed for a trial of sweep ``run.sweep``; explicit values win."""
    run_id = os.environ.get("WANDB_RUN_ID") or local_run_id(0)
    os.environ["WANDB_RUN_ID"] = run_id  # wandb.init picks it up; a multi-process run's workers inherit it
    group = run.group if run.group is not None else variant_group(run.sweep, loss, beta)
    return dataclasses.replace(
        run,
        name=f"{run.sweep}-{run_id}",  # over the config's run.name (tiny_cpu.yaml names every run tiny_cpu)
        dir=run.dir or os.path.join("runs", "sweeps", run.sweep, run_id),
        group=group or None,
        tags=list(dict.fromkeys([*run.tags, run.sweep])),
        wandb_project=os.environ.get("WANDB_PROJECT") or run.wandb_project,
    )
