"""Validation means across processes (each pair once, a NaN an error) and the step-bounded progress bar.

The distributed cases run in this process with a fake world size: a ``DistributedSampler(num_replicas=4,
rank=r)`` on the validation loader of a one-process Trainer, once per rank, is what rank r sees under DDP.
"""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from dpo_lightning.data.sampler import repeated_rows
from dpo_lightning.guards import NonFiniteError
from dpo_lightning.module import PreferenceModule
from dpo_lightning.progress import StepProgressBar

from helpers import make_datamodule, quiet_trainer


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_repeated_rows_are_exactly_the_distributed_samplers_padding(n, world):
    """Over all ranks, the rows not flagged are every dataset row exactly once (n = 5 on 4 ranks: 8 rows handed
    out, 3 flagged), whatever the batch size the positions are counted in."""
    kept = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=1)
        order = list(sampler)
        flags = torch.cat(
            [repeated_rows(sampler, start, min(2, len(order) - start)) for start in range(0, len(order), 2)]
        )
        kept += [i for i, repeat in zip(order, flags.tolist(), strict=True) if not repeat]
    assert sorted(kept) == list(range(n))


class _States(Callback):
    """Each val metric's (weighted sum, weight) at the end of the epoch, before Lightning resets it."""

    def __init__(self):
        self.states = {}

    def on_validation_epoch_end(self, trainer, pl_module):
        for name, metric in pl_module.eval_means.metrics["val"].items():
            self.states[name] = (float(metric.mean_value), float(metric.weight))


@pytest.fixture(scope="module")
def five_pairs(assets, tiny_tokenizer):
    dm = make_datamodule(assets / "train.jsonl", tiny_tokenizer, setup=True, val_files=str(assets / "val.jsonl"))
    data = dm.datasets["val"].select(range(5)).select_columns(dm.loader_columns).with_format(None)
    module = PreferenceModule(policy=str(assets / "policy"), tokenizer=dm.tokenizer)
    return module, data, dm.collator()


def _validate(module, loader):
    states = _States()
    quiet_trainer(callbacks=[states]).validate(module, dataloaders=loader, verbose=False)
    return states.states


def test_pairs_a_distributed_sampler_repeats_are_counted_once(five_pairs):
    """5 pairs on 4 fake ranks, 2 per batch: the sampler hands out 8 rows (3 repeats). Summing each metric's
    (weighted sum, weight) over the ranks gives the one-process epoch state: weight 5, the same means. (Counting
    the repeats, the weight is 8 and the means move.)"""
    module, data, collate = five_pairs
    one = _validate(module, DataLoader(data, batch_size=2, collate_fn=collate))
    ranks = [
        _validate(module, DataLoader(data, batch_size=2, collate_fn=collate,
                                     sampler=DistributedSampler(data, num_replicas=4, rank=r, shuffle=False)))
        for r in range(4)
    ]  # fmt: skip
    assert one["loss"][1] == 5
    for name, (total, weight) in one.items():
        assert weight in (0, 5), name  # 0: a metric with no row of its kind (paired data: none)
        assert sum(s[name][1] for s in ranks) == weight, name
        assert sum(s[name][0] for s in ranks) == pytest.approx(total, rel=1e-6, abs=1e-5), name
    assert math.isclose(one["loss"][0] / 5, math.log(2), abs_tol=1e-5)  # policy = reference: ln 2 per pair


def test_a_nan_in_validation_fails_the_run_naming_the_metric_and_rows(five_pairs, monkeypatch):
    """A NaN reference log-prob for dataset row 3 makes that pair's loss NaN; torchmetrics' default would drop it
    from the mean with a warning. The validation epoch stops with NonFiniteError naming val/loss and row 3."""
    module, data, collate = five_pairs
    real = module.reference_logps

    def planted(batch, split="train"):
        logps = real(batch, split).clone()
        rows = batch["index"].shape[0]
        logps[:rows][batch["index"] == data[3]["index"]] = math.nan
        return logps

    monkeypatch.setattr(module, "reference_logps", planted)
    with pytest.raises(NonFiniteError, match=rf"non-finite val/loss .*rows \(index\) \[{data[3]['index']}\]"):
        _validate(module, DataLoader(data, batch_size=2, collate_fn=collate))


def test_a_max_steps_run_shows_steps_out_of_max_steps(assets, tiny_tokenizer):
    """On a max_steps run Lightning's rich bar reads `Epoch 0/-2` and counts one epoch's batches. The module puts
    a StepProgressBar in its place: described `Step`, counting optimizer steps, 3 of 3 at the end (2 epochs of
    2 batches each, 3 steps)."""
    dm = make_datamodule(assets / "val.jsonl", tiny_tokenizer, setup=True, batch_size=6, val_fraction=0.25)
    module = PreferenceModule(policy=str(assets / "policy"), tokenizer=dm.tokenizer, lr=1e-3)
    seen = {}

    class Look(Callback):
        def on_train_end(self, trainer, pl_module):
            bar = trainer.progress_bar_callback
            task = bar.progress._tasks[bar.train_progress_bar_id]
            seen.update(kind=type(bar), description=task.description.strip(), done=task.completed, total=task.total)

    trainer = quiet_trainer(max_steps=3, enable_progress_bar=True, limit_val_batches=0, callbacks=[Look()])
    trainer.fit(module, dm)
    assert seen == {"kind": StepProgressBar, "description": "Step", "done": 3, "total": 3}
