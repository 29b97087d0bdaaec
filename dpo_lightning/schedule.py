"""The learning-rate schedule of every trainer here (DPO's PreferenceModule, SFTModule): a factor of the peak lr.

torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, "cosine"))
"""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Linear warmup to 1 over ``warmup_steps`` optimizer steps ((step + 1) / (warmup + 1), so step 0 already
    trains), then ``constant`` (1) or ``cosine`` decay, ½(1 + cos(π·progress)), reaching 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "cosine":
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0
