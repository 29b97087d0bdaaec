"""A trial's record: its state in the sweep's terms, and what ``trial.json`` holds for the summary and ``compare``.

States: complete, pruned (stopped by hyperband), failed, running, interrupted (its runner was stopped or
died: it runs again) and retried (a failure queued again by ``--retry-failed``).
"""

from __future__ import annotations

from typing import Any

from optuna.trial import FrozenTrial, TrialState

from dpo_lightning.sweep_space import SweepSpec

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}


def interrupted(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get("result", {}).get("interrupted"))


def is_done(t: FrozenTrial, retried: set[int]) -> bool:
    """Finished for good: counts against the budget and is not run again."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state == TrialState.FAIL and not interrupted(t) and t.number not in retried


def trial_record(spec: SweepSpec, t: FrozenTrial, retried: set[int]) -> dict[str, Any]:
    """What ``trial.json`` holds: the trial as the summary and ``compare`` read it, without Optuna."""
    launch, result = t.user_attrs.get("launch", {}), t.user_attrs.get("result", {})
    state = STATE_NAMES.get(t.state, "running")
    state = "interrupted" if result.get("interrupted") else state
    state = "retried" if t.number in retried else state
    value = t.value if t.state == TrialState.COMPLETE else None
    if value is None and t.state == TrialState.PRUNED and t.last_step is not None:
        value = t.intermediate_values[t.last_step]  # a stopped trial's last reported value
    record = {"trial": t.number, "sweep": spec.name, "state": state, "metric": spec.metric, "value": value}
    record |= {"iterations": len(t.intermediate_values), "params": launch.get("values", {})}
    record |= {key: result.get(key) for key in ("duration_s", "exit_code", "reason")}
    record |= {key: launch.get(key) for key in ("run_id", "name", "run_dir", "command", "pgid")}
    record |= {"runner": launch.get("runner"), "log_tail": result.get("log_tail")}
    return record
