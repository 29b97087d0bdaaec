"""The local sweep runner, in one file per idea (``dpo-lightning sweep``, see ``dpo_lightning/sweep.py``).

* ``engine``: wandb's own sweep engine (the ``sweeps`` package): validation, grid order, random draws,
  hyperband stops, so a sweep file behaves the same under ``wandb agent`` and offline.
* ``storage``: where a sweep's state lives (sqlite, a journal file, PostgreSQL), shared by several runners.
* ``processes``: trial process groups, recorded so that a restarted runner can end leftovers.
* ``records``: a trial's state and its ``trial.json``.
* ``runner``: the loop that asks for trials, starts them, follows their metric and records the outcome.
* ``check``: ``dpo-lightning sweep --check FILE``.
* ``identity``: a trial's name, folder, wandb group and tags (also used by ``dpo-lightning fit`` online).
"""
