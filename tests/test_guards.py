"""NonFiniteGuard: a NaN/inf loss or gradient stops the run naming the global step and the batch's dataset rows,
before the optimizer step, so the last checkpoint on disk is the last good one; a non-finite weight is never
saved."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from dpo_lightning.guards import NonFiniteError

from helpers import DDP, QUIET_TRAINER, ROOT, cli_env, cli_main, fit_args, fit_argv, make_datamodule


class Poison(pl.Callback):
    """At the start of optimizer step ``step``: make the loss NaN (``what="loss"``: a NaN weight) or only the
    gradient (``what="gradient"``: a hook that turns one parameter's gradient into NaN)."""

    def __init__(self, step: int, what: str):
        self.step, self.what, self.rows = step, what, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        self.rows = sorted(batch["index"].tolist())
        weight = pl_module.policy.get_input_embeddings().weight
        if self.what == "loss":
            with torch.no_grad():
                weight.fill_(math.nan)
        else:
            weight.register_hook(lambda grad: torch.full_like(grad, math.nan))


def _trainer(root: Path, *callbacks: pl.Callback, max_steps: int = 6) -> pl.Trainer:
    return pl.Trainer(
        **{**QUIET_TRAINER, "enable_checkpointing": True},
        max_steps=max_steps,
        limit_val_batches=0,
        callbacks=[pl.callbacks.ModelCheckpoint(root, save_last=True, save_top_k=0, every_n_train_steps=1), *callbacks],
    )


def _setup(assets: Path):
    from dpo_lightning.module import PreferenceModule

    pl.seed_everything(0)
    dm = make_datamodule(assets / "train.jsonl", assets / "tokenizer", val_files=str(assets / "val.jsonl"),
                         batch_size=8)  # fmt: skip
    return dm, PreferenceModule(policy=str(assets / "policy"), tokenizer=dm.tokenizer, lr=1e-3, warmup_steps=0)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_non_finite_stops_before_the_step_and_keeps_last_good_checkpoint(assets, tmp_path, what):
    dm, module = _setup(assets)
    poison = Poison(3, what)
    with pytest.raises(NonFiniteError) as err:
        _trainer(tmp_path, poison).fit(module, datamodule=dm)
    message = str(err.value)
    assert f"non-finite {what} at global step 3" in message
    assert f"Batch rows (dataset index): {poison.rows}" in message
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 3  # the checkpoint after step 3's predecessor, never overwritten
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_non_finite_weights_are_never_saved(assets, tmp_path):
    dm, module = _setup(assets)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=dm)
    with torch.no_grad():
        module.policy.get_input_embeddings().weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="non-finite weight .* refusing to save a checkpoint"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_cli_prints_one_line_and_exits_2(assets, tmp_path):
    """Through the command (one process, in this process): an absurd learning rate blows the weights up after the
    first step; fit stops with exit status 2 and one line naming the step and rows, no traceback, and the last
    checkpoint is the last good one (step 1). The 2-process version below (make test-full) adds that both DDP
    ranks stop together."""
    result = cli_main(*fit_argv(assets, tmp_path / "run", "--model.lr", "1e30", "--model.warmup_steps", "0"))
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("dpo-lightning: error:")]
    assert len(lines) == 1 and lines[0].startswith("dpo-lightning: error: non-finite loss at global step 1")
    assert "Batch rows (dataset index): [" in lines[0] and "Traceback" not in result.stderr
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 1 and all(torch.isfinite(v).all() for v in last["state_dict"].values())


@pytest.mark.slow
def test_cli_two_processes_stop_together_with_one_message(assets, tmp_path):
    """An absurd learning rate blows the weights up after the first step: both DDP ranks stop at the same
    step (no hang), and the command prints one line naming the step and rows, exit status 2, no traceback."""
    args = fit_args(assets, tmp_path / "run", *DDP, "--model.lr", "1e30", "--model.warmup_steps", "0")
    result = subprocess.run(args, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "dpo-lightning: error: non-finite loss at global step 1" in result.stderr
    assert "Batch rows (dataset index): [" in result.stderr and "Traceback" not in result.stderr
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 1
