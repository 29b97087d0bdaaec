"""What every worker measures with: this process's memory, its step times, a batch's token counts, the profiler.

Needs only torch and lightning (no datasets), so a bare GPU image can run the step loop (``bench.step``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch

IGNORE_INDEX = -100  # as dpo_lightning.logps (imported there without the data package)


# ---------------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size (VmHWM) of this process since start or the last :func:`reset_peak_rss`, MiB."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------- tokens
def token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(real, processed, scored) tokens of a padded or laid-out (packed / prompt-shared) batch.

    real: chosen + rejected, the prompt counted in both (every tokens/s here); processed: the non-pad tokens the
    model runs (fewer than real with a shared prompt); scored: positions whose next token is a response token
    (where the response-only head runs the output layer).
    """
    if "score_source" in batch:  # data.packing / data.share_prompt (dpo_lightning.data.packing)
        processed = int((batch["group_ids"] >= 0).sum())
        return int(batch["real_tokens"]), processed, int(batch["score_source"].numel())
    real = int(batch["attention_mask"].sum())
    labels = batch.get("labels")
    scored = int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels is not None else 0
    return real, real, scored


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    return token_counts(batch)[0]


# ---------------------------------------------------------------------------------------------------- time
class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_end`` calls, and each batch's token counts and loss.

    A step's interval covers everything the trainer does for it (data loading, forward, backward, optimizer,
    logging), which is what a user waits for. The first interval starts at ``on_train_start``.
    """

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.counts: list[tuple[int, int, int]] = []
        self.losses: list[torch.Tensor] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.ends.append(time.perf_counter())
        self.counts.append(token_counts(batch))
        self.losses.append(outputs["loss"].detach())


def throughput(ends: list[float], counts: list[tuple[int, int, int]] | list[int], warmup: int) -> dict[str, Any]:
    """:func:`rates` of the steps after ``warmup``, from step end times (``ends[0]`` is the start of step 1)."""
    times = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)]
    return rates(times[warmup:], counts[warmup:])


def rates(times: list[float], counts: list[tuple[int, int, int]] | list[int]) -> dict[str, Any]:
    """Real tokens/s and per-step means of steps that took ``times`` and held ``counts`` tokens (real ones, or
    :func:`token_counts` triples)."""
    triples = [c if isinstance(c, tuple) else (c, c, 0) for c in counts]
    real, processed, scored = (sum(c[i] for c in triples) for i in range(3))
    return {
        "tokens_per_s": real / sum(times),
        "step_s_median": statistics.median(times),
        "step_s": times,
        "tokens_per_step": real / len(triples),
        "processed_tokens_per_step": processed / len(triples),
        "scored_positions_per_step": scored / len(triples),
    }


# ---------------------------------------------------------------------------------------------------- profiler
def top_ops(prof: Any, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` operators with the most self CPU time in a ``torch.profiler`` run, with their share."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
         "calls": e.count}
        for e in events[:n]
    ]  # fmt: skip


class ProfileStep(pl.Callback):
    """``torch.profiler`` over one training step (batch ``index``, after warm-up); ``table`` holds its top ops."""

    def __init__(self, index: int) -> None:
        self.index, self.table, self._prof = index, None, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        if idx == self.index:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._prof.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if idx == self.index and self._prof is not None:
            self._prof.__exit__(None, None, None)
            self.table = top_ops(self._prof)
