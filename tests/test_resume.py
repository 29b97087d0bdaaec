"""Exact resume: a run killed at an arbitrary step and resumed with ``--ckpt_path last`` ends with the same
weights and logs the same metrics, bit for bit on CPU, as a run that was never interrupted.

What must survive the kill, and where it lives in the checkpoint: weights and optimizer state (Lightning;
sharded per rank under FSDP), the lr scheduler and the loop counters, i.e. epoch and batch position
(Lightning), the position in the data order (the data module's resumable loader), and the training step's
RNG stream (PreferenceModule, per rank), which fixes dropout masks. A fixed reference is not in the
checkpoint: it is rebuilt from its source and checked against the fingerprint stored there; a TR-DPO reference,
which changes during the run, is saved with it.

One limit comes from Lightning's loop: a checkpoint is written in ``on_train_batch_end``, before that batch's
metrics row is logged and before a validation scheduled at that batch; a resumed run does not redo either.
Those rows are compared where the interrupted run managed to write them.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from dpo_lightning.errors import ConfigError
from dpo_lightning.export import load_checkpoint

from helpers import (
    FSDP,
    NOT_COMPARED,
    ROOT,
    TRDPO,
    cli_env,
    cli_main,
    curve,
    fit_args,
    fit_argv,
    fsdp_trdpo_run,
    make_datamodule,
    metric_rows,
    quiet_trainer,
    run_ranks,
    single_run,
)


def _row_key(row: dict[str, str]) -> tuple[int, str]:
    return int(row["step"]), "val" if row.get("val/loss") else "train"


def _comparable(row: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in row.items() if v not in ("", None) and k not in NOT_COMPARED}


def assert_rows_match(rows: list[dict[str, str]], reference: list[dict[str, str]]) -> None:
    """Each row equals the uninterrupted run's row of the same step and kind, as written (bitwise)."""
    by_key = {_row_key(r): _comparable(r) for r in reference}
    for row in rows:
        assert _comparable(row) == by_key[_row_key(row)], f"step {row['step']} differs"


def _checkpoint_step(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt / "meta.pt", weights_only=False)["global_step"])
    except (FileNotFoundError, EOFError, RuntimeError, OSError):  # absent, or being renamed into place
        return -1


def test_sigkill_and_resume_fsdp_is_exact(assets, tmp_path):
    """2-process FSDP run, SIGKILLed (both processes) once its checkpoint reaches step 3, resumed with
    ``--ckpt_path last``: the final sharded weights are bitwise those of the uninterrupted run, and every metrics
    row either run wrote equals the uninterrupted run's.

    The run is TR-DPO (soft reference sync every 2 steps) with a [dpo, bco_pair] mixture, so the reference is
    state too: the checkpoint at step 3 or 4 holds the reference synced at step 2 or 4 (gathered to full
    tensors, restored shard by shard), and BCO's running reward mean. A resume that rebuilt the reference from
    its source, or skipped the running mean, would change every loss after the resume and the final weights."""
    reference = fsdp_trdpo_run(assets)
    run_dir = tmp_path / "killed"
    args = fit_args(assets, run_dir, *FSDP, *TRDPO)
    ckpt = run_dir / "checkpoints" / "last.ckpt"

    start = time.perf_counter()
    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=log, stderr=log, start_new_session=True)
        while proc.poll() is None and time.perf_counter() - start < 300:
            if _checkpoint_step(ckpt) >= 3:
                os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank it launched, wherever they are
                break
            time.sleep(0.02)
        proc.wait(timeout=60)
    killed_seconds = time.perf_counter() - start
    output = (tmp_path / "killed.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way: {output}"
    resumed_from = _checkpoint_step(ckpt)  # a save cut by the kill sits in a hidden folder; last.ckpt is whole
    assert 3 <= resumed_from < 5
    before_kill = (run_dir / "metrics.csv").read_text()

    start = time.perf_counter()
    # resumed as a cluster launcher would start it (both ranks at once); the killed run was Lightning's own launch
    result = run_ranks(*fit_argv(assets, run_dir, *FSDP, *TRDPO), "--ckpt_path", "last")
    resumed_seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]

    final, _ = load_checkpoint(ckpt)
    expected, _ = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected), "weights differ after resume"

    # the resumed run kept the killed run's metrics.csv as metrics.before-<time>.csv and started a new one
    (kept,) = run_dir.glob("metrics.before-*.csv")
    assert kept.read_text() == before_kill
    uninterrupted = metric_rows(reference)
    before, after = metric_rows(run_dir, kept.name), metric_rows(run_dir)
    assert_rows_match(before + after, uninterrupted)
    trained_after = sorted(s for s, kind in map(_row_key, after) if kind == "train")
    assert trained_after == list(range(resumed_from, 5))  # every step after the checkpoint, none twice
    print(f"killed after {killed_seconds:.1f} s (at step {resumed_from}), resumed in {resumed_seconds:.1f} s")


# --------------------------------------------------------------------------- in-process: RNG and reference
class Crash(Exception):
    pass


class CrashAt(pl.Callback):
    """Stand-in for a crash: raise at the start of optimizer step ``step`` (nothing more is saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"crash at step {self.step}")


def _crash(assets: Path, root: Path, step: int, **module_kwargs) -> None:
    with pytest.raises(Crash):
        _fit(assets, root, callbacks=[CrashAt(step)], **module_kwargs)


def _fit(assets: Path, root: Path, *, callbacks=(), ckpt_path=None, **module_kwargs) -> pl.Trainer:
    from dpo_lightning.module import PreferenceModule

    pl.seed_everything(0)
    dm = make_datamodule(assets / "train.jsonl", assets / "tokenizer", val_files=str(assets / "val.jsonl"),
                         batch_size=8, eval_batch_size=8)  # fmt: skip
    kwargs = {"policy": str(assets / "policy"), "lr": 1e-3, "warmup_steps": 2, **module_kwargs}
    module = PreferenceModule(tokenizer=dm.tokenizer, **kwargs)
    trainer = quiet_trainer(
        enable_checkpointing=True,
        max_steps=6,
        val_check_interval=2,
        limit_val_batches=1,
        check_val_every_n_epoch=None,
        log_every_n_steps=1,
        logger=pl.loggers.CSVLogger(root, name="", version="", flush_logs_every_n_steps=1),
        callbacks=[
            pl.callbacks.ModelCheckpoint(root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1),
            *callbacks,
        ],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_resume_replays_dropout_masks(assets, tmp_path):
    """With dropout on, each step's masks come from the training RNG stream saved in the checkpoint (validation
    and data loading draw from the global RNG in between, and differently after a restart): the run crashed at
    step 4 and resumed from its single-file checkpoint matches the uninterrupted run bitwise."""
    _fit(assets, tmp_path / "full", disable_dropout=False)
    _crash(assets, tmp_path / "crash", 4, disable_dropout=False)
    ckpt = tmp_path / "crash" / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4
    shutil.copy(tmp_path / "crash" / "metrics.csv", tmp_path / "before.csv")
    _fit(assets, tmp_path / "crash", ckpt_path=str(ckpt), disable_dropout=False)

    final, _ = load_checkpoint(ckpt)
    expected, _ = load_checkpoint(tmp_path / "full" / "ckpt" / "last.ckpt")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    rows = metric_rows(tmp_path, "before.csv") + metric_rows(tmp_path / "crash")
    full = metric_rows(tmp_path / "full")
    assert curve(full, "train/loss")[0] != pytest.approx(math.log(2), abs=1e-4)  # dropout was live
    assert_rows_match(rows, full)
    assert {s for s, kind in map(_row_key, rows) if kind == "train"} == set(range(6))


def test_reference_not_in_checkpoint_and_checked_on_resume(assets, tmp_path):
    """The checkpoint holds the policy only, with the reference's weight fingerprint; resuming with a different
    reference fails with a clear message instead of silently training against another model."""
    from dpo_lightning.models import build_causal_lm

    _crash(assets, tmp_path / "run", 2)
    ckpt = tmp_path / "run" / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state_dict"] and all(k.startswith("policy.") for k in saved["state_dict"])
    assert saved["dpo_lightning"]["reference_fingerprint"]

    other = build_causal_lm(str(assets / "policy"))
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(tmp_path / "other_reference")
    with pytest.raises(ConfigError, match="reference rebuilt for this run differs"):
        _fit(assets, tmp_path / "run", ckpt_path=str(ckpt), reference=str(tmp_path / "other_reference"))


def test_ckpt_path_last_without_a_checkpoint_starts_fresh(assets, tmp_path):
    """The README's SLURM script passes ``--ckpt_path last`` on the first start too: with no checkpoint in the run
    folder yet, fit starts from the initial weights (its first losses equal those of the same run started without
    it, bitwise), writes its checkpoint, and keeps no earlier metrics file (there was none)."""
    run_dir = tmp_path / "first-start"
    args = fit_argv(assets, run_dir, "--data.batch_size", "8", "--trainer.max_steps", "2", "--ckpt_path", "last")
    result = cli_main(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not list(run_dir.glob("metrics.before-*.csv"))
    fresh = curve(metric_rows(run_dir), "train/loss")
    assert fresh == {s: v for s, v in curve(metric_rows(single_run(assets)), "train/loss").items() if s < 2}
