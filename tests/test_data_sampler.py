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


# ---------------------------------------------------------------- gradient accumulation with length grouping
def _steps(batches: list[list[int]], k: int) -> list[list[int]]:
    """The rows of each optimizer step (k consecutive batches), sorted."""
    return [sorted(i for b in batches[j : j + k] for i in b) for j in range(0, len(batches), k)]


def _global_steps(lengths, batch_size: int, accumulate: int, world: int = 1, **kwargs) -> list[list[int]]:
    """Every rank's rows of each optimizer step together, sorted."""
    shards = [
        PreferenceSampler(lengths, batch_size=batch_size, num_replicas=world, rank=r, seed=5, accumulate=accumulate,
                          mega_batch=3, **kwargs).batches()
        for r in range(world)
    ]  # fmt: skip
    per_rank = [_steps(s, accumulate) for s in shards]
    return [sorted(i for rank in step for i in rank) for step in zip(*per_rank, strict=True)]


@pytest.mark.parametrize("n", [240, 101])
def test_grouped_accumulation_forms_the_steps_of_one_larger_batch(n):
    """Length-grouped, 8 pairs per optimizer step split four ways: 4 × accumulate 2, 2 × accumulate 4, 2 ranks ×
    2 × accumulate 2 and 8 × accumulate 1 train on the same rows at every step, in the same order of steps
    (mega-batches of 3 steps, so the sort is cut into several mega-batches; 101 pairs: 12 full steps and a last
    one of 5, the world padding a repeat). Grouping per micro-batch (the old order) gives other steps."""
    lengths = _lengths(n, seed=1)
    one = _global_steps(lengths, 8, 1)
    assert _global_steps(lengths, 4, 2) == one and _global_steps(lengths, 2, 4) == one
    two_ranks = _global_steps(lengths, 2, 2, world=2)  # its last step holds n % 2 padding repeat(s) more
    assert two_ranks[:-1] == one[:-1]
    assert set(one[-1]) <= set(two_ranks[-1]) and len(two_ranks[-1]) - len(one[-1]) == n % 2
    per_micro_batch = _steps(PreferenceSampler(lengths, batch_size=4, seed=5, mega_batch=3).batches(), 2)
    assert per_micro_batch != one
    ungrouped = {"group_by_length": False}  # no grouping: one permutation cut into batches, whatever the split
    assert _global_steps(lengths, 4, 2, **ungrouped) == _global_steps(lengths, 8, 1, **ungrouped)


def test_grouped_accumulation_keeps_shards_disjoint_and_the_longest_step_first():
    """2 ranks × 4 pairs × accumulate 3 over 240 pairs: every pair once, ranks disjoint, as many batches on each;
    each step's micro-batches are consecutive pieces of its length-sorted rows (the longest micro-batch first),
    and the first step holds the longest pair."""
    lengths = _lengths(240, seed=2)
    shards = [PreferenceSampler(lengths, batch_size=4, num_replicas=2, rank=r, accumulate=3).batches() for r in (0, 1)]
    flat = [[i for b in s for i in b] for s in shards]
    assert not set(flat[0]) & set(flat[1]) and sorted(flat[0] + flat[1]) == list(range(240))
    assert len(shards[0]) == len(shards[1]) == 30
    first = PreferenceSampler(lengths, batch_size=4, num_replicas=2, accumulate=3).global_batches()[:3]
    rows = [lengths[i] for b in first for i in b]
    assert rows == sorted(rows, reverse=True) and rows[0] == max(lengths)


def _accumulating_dm(pairs_file, tokenizer, accumulate: int, batch_size: int):
    """A data module attached to a Trainer with ``accumulate_grad_batches`` (as ``fit`` attaches it)."""
    dm = _dm(pairs_file, tokenizer, batch_size=batch_size)
    dm.trainer = quiet_trainer(accumulate_grad_batches=accumulate)
    return dm


@pytest.mark.parametrize("skip", [3, 4])
def test_resume_mid_accumulation_is_exact(pairs_file, tiny_tokenizer, skip):
    """Grouped, 4 pairs × accumulate 2 (the data module reads it from its Trainer): a fresh data module restored
    from the state saved after 3 micro-batches (inside an optimizer step) or 4 yields exactly the rest of the
    uninterrupted epoch; the state names the accumulation, and a resume with another one warns."""
    reference = _accumulating_dm(pairs_file, tiny_tokenizer, 2, 4).train_dataloader()
    assert reference.sampler.accumulate == 2
    epoch1 = _epoch(reference, 1)
    interrupted = _accumulating_dm(pairs_file, tiny_tokenizer, 2, 4)
    loader = interrupted.train_dataloader()
    loader.sampler.set_epoch(1)
    it = iter(loader)
    first = [next(it)["index"].tolist() for _ in range(skip)]
    state = interrupted.state_dict()
    assert state["train_order"]["accumulate"] == 2 and state["train_order"]["batches"] == skip
    resumed = _accumulating_dm(pairs_file, tiny_tokenizer, 2, 4)
    resumed.load_state_dict(state)
    assert first == epoch1[:skip] and _epoch(resumed.train_dataloader(), 1) == epoch1[skip:]
    other = _accumulating_dm(pairs_file, tiny_tokenizer, 1, 4).train_dataloader()
    with pytest.warns(UserWarning, match="accumulate 2 -> 1"):
        other.load_state_dict(state["train_order"])
    before = {k: v for k, v in state["train_order"].items() if k != "accumulate"}  # saved by an older version
    with pytest.warns(UserWarning, match="accumulate 1 -> 2"):
        _accumulating_dm(pairs_file, tiny_tokenizer, 2, 4).train_dataloader().load_state_dict(before)


def test_lightning_accumulation_trains_the_steps_of_one_larger_batch(tmp_path, pairs_file, tiny_tokenizer):
    """Under ``trainer.fit``, grouped: batch 4 × accumulate 2 is fed, optimizer step by optimizer step, the rows
    batch 8 × accumulate 1 is (the data module takes the accumulation from its Trainer); resuming the accumulating
    run from its step-5 checkpoint is fed exactly the rest."""

    def fit(batch_size, accumulate, steps, ckpt_path=None, every=0):
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=every, save_top_k=-1)
        trainer = quiet_trainer(max_steps=steps, accumulate_grad_batches=accumulate, limit_val_batches=0,
                                enable_checkpointing=bool(every), callbacks=[saver] if every else [])  # fmt: skip
        module = _Recorder()
        trainer.fit(module, datamodule=_dm(pairs_file, tiny_tokenizer, batch_size=batch_size), ckpt_path=ckpt_path)
        return module.seen

    big = fit(8, 1, 12)
    acc = fit(4, 2, 12, every=1)
    assert len(big) == 12 and len(acc) == 24
    assert _steps(acc, 2) == _steps(big, 1)
    resumed = fit(4, 2, 12, ckpt_path=str(tmp_path / "ckpt" / "step=5.ckpt"))
    assert resumed == acc[10:]
