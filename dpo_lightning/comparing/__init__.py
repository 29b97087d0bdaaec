"""``dpo-lightning compare`` in one file per idea (the command itself is ``dpo_lightning/compare.py``).

* ``runs``: find run folders, read their CSV logs and identity (loss, β, swept values, seed).
* ``stats``: variants (runs that differ only in their seed) and their mean with a 95% band.
* ``tables``: final-value tables, and a sweep's ``summary.csv`` / ``summary.md``.
* ``charts``: the curve families and the final metric against each swept parameter.
"""
