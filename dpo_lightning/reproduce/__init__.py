"""`make reproduce`: the papers' claims re-checked on this code, with a report of what held.

    python -m dpo_lightning.reproduce --quick --out reports/reproduce     # see --help

- ``claims.py``   — :class:`Claim` (one row of ``claims.json``), ``write_claims``, the Markdown table.
- ``bandit.py``   — Part 1: exact claims of DPO, IPO and cDPO on bandits, against closed forms.
- ``bandit_margins.py``, ``bandit_populations.py`` — Part 1, continued: a bandit claim for every other loss
  with a closed-form optimum (per-pair and population optima); ``bandit_helpers.py``, what they share.
- ``sentiment.py``— Part 2: IMDb controlled sentiment (reward/KL frontier), when present.
- ``report.py``   — ``README.md`` of a run (claims table, figures, versions, seeds, wall time) and figure helper.
- ``__main__.py`` — the command line: ``main(argv) -> exit code``.
"""

from dpo_lightning.reproduce.claims import Claim, write_claims

__all__ = ["Claim", "write_claims"]
