"""Preference losses: small pure functions grouped by kind, one registry, one entry point.

- ``registry.py``: ``LOSSES``, ``register``, ``compute_loss`` (what the module, the tests and outside tools call)
  and ``compute_mixture`` (weighted sums such as ``[dpo, bco_pair, sft]``).
- ``pairwise.py``: losses on the log-ratio margin h against a reference (DPO, IPO, cDPO, rDPO, hinge, EXO, f-DPO,
  length-normalised DPO, RPO).
- ``anchored.py``: losses on each response's log-ratio separately (DPOP, NCA, BCO, APO, SPPO).
- ``reference_free.py``: losses that never read a reference (SimPO, ORPO, SFT, unlikelihood).
- ``unpaired.py``: losses on unpaired desirable / undesirable rows (KTO).
"""

from dpo_lightning.losses import anchored, pairwise, reference_free, unpaired  # noqa: F401  (registers the losses)
from dpo_lightning.losses.anchored import *  # noqa: F403
from dpo_lightning.losses.pairwise import *  # noqa: F403
from dpo_lightning.losses.reference_free import *  # noqa: F403
from dpo_lightning.losses.registry import (
    LOSSES,
    SPECS,
    LossFn,
    LossOutput,
    LossSpec,
    compute_loss,
    compute_mixture,
    get_loss,
    get_spec,
    loss_params,
    register,
)
from dpo_lightning.losses.unpaired import *  # noqa: F403

__all__ = [
    "LOSSES",
    "SPECS",
    "LossFn",
    "LossOutput",
    "LossSpec",
    "compute_loss",
    "compute_mixture",
    "get_loss",
    "get_spec",
    "loss_params",
    "register",
    *(fn.__name__ for fn in LOSSES.values()),
]
