"""What identifies a reference and its precomputed log-probs: the model's config and dtype as well as its weights
(the store key and the resume check), and, for the tables held in memory, the data they were computed on."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_lightning.errors import ConfigError
from dpo_lightning.module import PreferenceModule
from dpo_lightning.reference import model_fingerprint

from helpers import make_datamodule, quiet_trainer, synthetic_pairs, write_jsonl


@pytest.fixture(scope="module")
def other_config_dir(assets, tmp_path_factory):
    """The assets' policy weights, bit for bit, saved with a different layer-norm epsilon (1e-5 -> 1e-2)."""
    model = AutoModelForCausalLM.from_pretrained(assets / "policy")
    model.config.layer_norm_epsilon = 1e-2
    out = tmp_path_factory.mktemp("other_eps")
    model.save_pretrained(out)
    return out


def test_fingerprint_hashes_config_and_dtype(assets, other_config_dir, tmp_path):
    """Same weights, another layer-norm epsilon: other log-probs, so another fingerprint (a weights-only hash
    gave the same one and reused a stale store). Another dtype: another fingerprint. The same model saved in
    another folder: the same fingerprint (the path is not hashed)."""
    base = AutoModelForCausalLM.from_pretrained(assets / "policy")
    other = AutoModelForCausalLM.from_pretrained(other_config_dir)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), other.state_dict().values(), strict=True))
    ids = torch.tensor([[5, 9, 12, 7]])
    assert not torch.allclose(base(ids).logits, other(ids).logits)
    assert model_fingerprint(base) != model_fingerprint(other)
    assert model_fingerprint(base) != model_fingerprint(AutoModelForCausalLM.from_pretrained(assets / "policy").half())
    base.save_pretrained(tmp_path / "moved")
    assert model_fingerprint(base) == model_fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "moved"))


def test_resume_check_sees_a_config_change(assets, other_config_dir):
    """Resuming with a reference of the same weights but another config fails with the clear message."""
    trained = PreferenceModule(policy=str(assets / "policy"))
    trained.setup("fit")
    resumed = PreferenceModule(policy=str(assets / "policy"), reference=str(other_config_dir))
    resumed.setup("fit")
    with pytest.raises(ConfigError, match="reference rebuilt for this run differs"):
        resumed.on_load_checkpoint({"dpo_lightning": {"reference_fingerprint": trained.reference_fingerprint}})


def _validate(module, assets, val_file, trainer) -> dict[str, float]:
    dm = make_datamodule(assets / "train.jsonl", assets / "tokenizer", val_files=str(val_file), batch_size=8)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    return metrics


def test_reference_tables_are_keyed_by_the_data(assets, tmp_path):
    """Validating a second data module (16 other pairs, same row numbers) computes its own table: with the policy
    still equal to the reference every reward is 0 on both. A table keyed by split name alone was reused for
    the second data module, scoring its rows against the first one's reference log-probs (rewards far from 0).
    After a fit (the reference left memory), validating the same data reuses its table, and validating other data
    fails clearly instead of reusing it."""
    other_val = write_jsonl(tmp_path / "other_val.jsonl", synthetic_pairs(16, seed=9))
    module = PreferenceModule(policy=str(assets / "policy"), precompute_reference=True,
                              reference_cache_dir=str(tmp_path / "store"))  # fmt: skip
    trainer = quiet_trainer(limit_val_batches=2)
    for val_file in (assets / "val.jsonl", other_val):
        metrics = _validate(module, assets, val_file, trainer)
        assert abs(metrics["val/rewards/chosen"]) < 1e-5 and abs(metrics["val/rewards/rejected"]) < 1e-5
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 2

    fitted = PreferenceModule(policy=str(assets / "policy"), precompute_reference=True, warmup_steps=0,
                              reference_cache_dir=str(tmp_path / "store2"))  # fmt: skip
    dm = make_datamodule(assets / "train.jsonl", assets / "tokenizer", val_files=str(assets / "val.jsonl"),
                         batch_size=8)  # fmt: skip
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1)
    trainer.fit(fitted, datamodule=dm)
    assert fitted.reference is None
    assert "val/loss" in _validate(fitted, assets, assets / "val.jsonl", trainer)  # the same data: its table
    with pytest.raises(ConfigError, match="left memory when training started"):
        _validate(fitted, assets, other_val, trainer)


@pytest.mark.parametrize("n,world", [(1, 4), (3, 4), (5, 2)])
def test_padding_a_tiny_split_to_the_world_stays_inside_it(monkeypatch, n, world):
    """Each rank scores the same number of rows, the padding repeating real rows: n=1 on 4 ranks asked for rows 1
    and 2 of a 1-row split (``range(-n % world)`` counted past its end). Every row is scored by some rank."""
    from types import SimpleNamespace

    import dpo_lightning.reference as store

    asked: list[list[int]] = []

    def score(module, dataset, rows, collate, batch_size):
        asked.append(list(rows))
        return torch.stack([torch.tensor(rows, dtype=torch.float64), torch.zeros(len(rows)), torch.zeros(len(rows))])

    monkeypatch.setattr(store, "score_rows", score)
    monkeypatch.setattr(store, "_lengths", lambda dataset: [1] * len(dataset))
    dataset = list(range(n))
    for rank in range(world):
        strategy = SimpleNamespace(world_size=world, global_rank=rank, all_gather=lambda t: torch.stack([t] * world))
        store.compute_split(SimpleNamespace(trainer=SimpleNamespace(strategy=strategy), device="cpu"), dataset, None, 8)
    assert len({len(rows) for rows in asked}) == 1
    assert all(0 <= row < n for rows in asked for row in rows)
    assert {row for rows in asked for row in rows} == set(range(n))
