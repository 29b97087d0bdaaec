"""Every registered loss trains through a real (tiny) fit: ``--model.loss NAME`` for each name, KTO on unpaired rows."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.losses import LOSSES, SPECS
from dpo_lightning.module import PreferenceModule

from helpers import TINY_GPT2, synthetic_pairs, write_jsonl


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("family") / "tok"
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("family_data") / "pairs.jsonl", synthetic_pairs(32))


def _fit(tmp_path, data_path, tokenizer_dir, loss, **data_kwargs):
    dm = PreferenceDataModule(
        str(data_path), tokenizer=str(tokenizer_dir), max_length=40, max_prompt_length=20, batch_size=4,
        eval_batch_size=4, val_fraction=0.25, **data_kwargs,
    )  # fmt: skip
    pl.seed_everything(0)
    module = PreferenceModule(policy_config=TINY_GPT2, tokenizer=dm.tokenizer, loss=loss, lr=1e-2, warmup_steps=0)
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0, log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="", version=""), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    moved = any(not torch.equal(v, module.policy.state_dict()[k]) for k, v in before.items())
    return module, trainer, moved


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_fits(tmp_path, pairs_path, tokenizer_dir, name):
    """Two optimizer steps of each loss: the policy moves, the losses are finite, and the run logs the loss,
    its component ``loss/<name>`` and a shadow of every registered loss, for train and val."""
    unpaired = SPECS[name].unpaired
    module, trainer, moved = _fit(tmp_path, pairs_path, tokenizer_dir, name, unpair=unpaired)
    assert moved
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/loss"]))
    assert f"train/loss/{name}" in metrics and f"val/loss/{name}" in metrics
    shadows = [n for n in LOSSES if SPECS[n].unpaired] if unpaired else list(LOSSES)
    assert {f"val/shadow/{n}" for n in shadows} <= set(metrics)
    assert (module.reference is None) == (not SPECS[name].reference)


def test_kto_on_unpaired_rows(tmp_path, tokenizer_dir):
    """data.format unpaired: {prompt, completion, label} rows train KTO, logging z₀ as ``kl``."""
    rows = [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
        for i, p in enumerate(synthetic_pairs(32))
    ]
    path = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    _, trainer, moved = _fit(tmp_path, path, tokenizer_dir, "kto", format="unpaired")
    assert moved and float(trainer.callback_metrics["train/kl"]) >= 0.0
    assert math.isfinite(float(trainer.callback_metrics["val/loss/kto"]))


def test_mixture_fits_and_logs_components(tmp_path, pairs_path, tokenizer_dir):
    """model.loss [dpo, sft] (RPO-like mixture): the logged loss is the weighted sum of the logged components."""
    _, trainer, moved = _fit(tmp_path, pairs_path, tokenizer_dir, ["dpo", "sft"])
    metrics = trainer.callback_metrics
    assert moved
    assert float(metrics["val/loss"]) == pytest.approx(float(metrics["val/loss/dpo"] + metrics["val/loss/sft"]))
