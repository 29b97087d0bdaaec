"""Training order: length grouping, rank shards, epoch reshuffles, and exact mid-epoch resume (with Lightning too)."""

import random
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dpo_lightning.data.sampler import PreferenceSampler, padding_fraction

from helpers import make_datamodule, quiet_trainer


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [int(rng.lognormvariate(4, 0.8)) + 1 for _ in range(n)]


def _shards(n: int, world: int, epoch: int = 0, **kwargs) -> list[list[list[int]]]:
    lengths = _lengths(n)
    return [
        PreferenceSampler(lengths, batch_size=4, num_replicas=world, rank=r, seed=3, **kwargs).batches(epoch)
        for r in range(world)
    ]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_each_index_once_per_epoch_in_disjoint_shards(group_by_length):
    """96 pairs, 2 ranks × 4 pairs: the ranks' indices are disjoint and together every index exactly once; each
    rank has the same number of batches; the next epoch is another order of the same indices."""
    shards = _shards(96, 2, group_by_length=group_by_length)
    flat = [[i for b in shard for i in b] for shard in shards]
    assert not set(flat[0]) & set(flat[1])
    assert sorted(flat[0] + flat[1]) == list(range(96))
    assert len(shards[0]) == len(shards[1]) == 12 and all(len(b) == 4 for s in shards for b in s)
    next_epoch = _shards(96, 2, epoch=1, group_by_length=group_by_length)
    assert next_epoch != shards
    assert sorted(i for s in next_epoch for b in s for i in b) == list(range(96))
    single = _shards(96, 1, group_by_length=group_by_length)[0]
    assert sorted(i for b in single for i in b) == list(range(96))


def test_uneven_data_pads_fewer_than_world_size_and_keeps_ranks_in_step():
    """101 pairs over 2 ranks × 4: 12 full global batches, then 5 left over, padded with one repeated pair to 3 + 3."""
    shards = _shards(101, 2)
    counts = Counter(i for s in shards for b in s for i in b)
    assert set(counts) == set(range(101)) and sum(counts.values()) == 102
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]] == [4] * 12 + [3]
    sampler = PreferenceSampler(_lengths(101), batch_size=4, num_replicas=2, rank=1)
    assert len(sampler) == 51 and list(sampler) == [i for b in sampler.batches() for i in b]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_a_split_smaller_than_the_world_pads_with_its_own_rows(n):
    """n pairs on 4 ranks × 2 (n = 1: every rank gets row 0): no index past the end, every rank as many pairs
    and batches, every row seen. (Regression guard: the padding cycles through the rows, it does not count on.)"""
    shards = _shards(n, 4)
    flat = [i for s in shards for b in s for i in b]
    assert max(flat) < n and set(flat) == set(range(n))
    assert len({len(s) for s in shards}) == 1 and len({sum(map(len, s)) for s in shards}) == 1


def test_order_is_a_function_of_seed_epoch_rank_and_world():
    lengths = _lengths(64)

    def order(**kwargs):
        sampler = PreferenceSampler(lengths, **{"batch_size": 4, "num_replicas": 2, "rank": 0, "seed": 0, **kwargs})
        return list(sampler)

    assert order() == order()
    assert order(seed=1) != order() and order(rank=1) != order() and order(num_replicas=4) != order()
    sampler = PreferenceSampler(lengths, batch_size=4, num_replicas=2, rank=0)
    sampler.set_epoch(2)
    assert list(sampler) != order() and list(sampler) == [i for b in sampler.batches(2) for i in b]


def test_grouping_cuts_padding_and_puts_the_longest_batch_first():
    lengths = _lengths(2000)
    prompt = [n // 2 for n in lengths]
    response = [n - n // 2 for n in lengths]
    grouped = PreferenceSampler(lengths, batch_size=8).batches()
    shuffled = PreferenceSampler(lengths, batch_size=8, group_by_length=False).batches()
    pad_grouped = padding_fraction(prompt, response, response, grouped)
    pad_random = padding_fraction(prompt, response, response, shuffled)
    assert pad_grouped < 0.1 < 0.3 < pad_random
    assert max(lengths) == max(lengths[i] for i in grouped[0])


def test_padding_fraction_by_hand():
    """Pairs (prompt, chosen, rejected) = (2, 3, 1) and (1, 1, 2): width max(2+3, 1+2) = 5, 4 rows -> 20 slots;
    real tokens (2·2+3+1) + (2·1+1+2) = 13; padding 7/20 = 0.35."""
    assert padding_fraction([2, 1], [3, 1], [1, 2], [[0, 1]]) == pytest.approx(0.35)


# ---------------------------------------------------------------- resume, without and with Lightning
def _dm(pairs_file, tokenizer, **kwargs):
    return make_datamodule(pairs_file, tokenizer, setup=True, **{"batch_size": 8, **kwargs})


def _epoch(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [b["index"].tolist() for b in loader]


@pytest.mark.parametrize("restore_before_loader", [True, False])
def test_datamodule_state_resumes_mid_epoch(pairs_file, tiny_tokenizer, restore_before_loader):
    """A fresh data module restored from the state saved after k batches of epoch 1 yields batches k.. of an
    uninterrupted run's epoch 1, and then the whole of epoch 2."""
    reference = _dm(pairs_file, tiny_tokenizer).train_dataloader()
    epoch1, epoch2 = _epoch(reference, 1), _epoch(reference, 2)
    assert len(epoch1) == 9

    interrupted = _dm(pairs_file, tiny_tokenizer)
    loader = interrupted.train_dataloader()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    first = [next(it)["index"].tolist() for _ in range(4)]
    state = interrupted.state_dict()
    assert state["train_order"]["epoch"] == 1 and state["train_order"]["batches"] == 4

    resumed = _dm(pairs_file, tiny_tokenizer)
    if restore_before_loader:  # Lightning's order: restore the data module, then build the loaders
        resumed.load_state_dict(state)
        assert resumed.state_dict()["train_order"]["batches"] == 4
        loader = resumed.train_dataloader()
    else:
        loader = resumed.train_dataloader()
        resumed.load_state_dict(state)
    rest = _epoch(loader, 1)
    assert first == epoch1[:4] and rest == epoch1[4:]
    assert len(loader) == 9, "the loader's length stays the epoch's (Lightning adds the batches already done)"
    assert _epoch(loader, 2) == epoch2


def test_changed_world_size_on_resume_warns_and_keeps_the_pair_count(pairs_file, tiny_tokenizer):
    loader = _dm(pairs_file, tiny_tokenizer).train_dataloader()
    state = dict(loader.state_dict(), epoch=0, batches=4, batch_size=4)
    with pytest.warns(UserWarning, match=r"batch_size 4 -> 8.*skipping 2 batches"):
        loader.load_state_dict(state)
    assert len(_epoch(loader, 0)) == 9 - 2


class _Recorder(pl.LightningModule):
    """Records the pair indices of every training batch; trains nothing (lr 0)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return (self.w * batch["attention_mask"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, pairs_file, tokenizer, ckpt_path=None, every=0) -> list[list[int]]:
    callbacks = []
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=every, save_top_k=-1))
    trainer = quiet_trainer(max_steps=22, enable_checkpointing=bool(every), callbacks=callbacks, limit_val_batches=0)
    module = _Recorder()
    trainer.fit(module, datamodule=_dm(pairs_file, tokenizer), ckpt_path=ckpt_path)
    return module.seen


def test_lightning_resume_from_mid_epoch_checkpoint_sees_the_same_batches(tmp_path, pairs_file, tiny_tokenizer):
    """An uninterrupted 22-step run (9 batches per epoch) checkpoints every step; resuming from step 13 (epoch 1,
    batch 4) and from step 9 (an epoch boundary) is fed exactly the batches the uninterrupted run saw next."""
    full = _fit(tmp_path, pairs_file, tiny_tokenizer, every=1)
    assert len(full) == 22 and full[:9] != full[9:18]
    for step in (13, 9):
        resumed = _fit(tmp_path / "r", pairs_file, tiny_tokenizer, ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        assert resumed == full[step:], f"resume from step {step}"
