"""PreferenceModule invariants and learning on a tiny model."""

import csv
import math

import lightning.pytorch as pl
import pytest
import torch

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.errors import ConfigError
from dpo_lightning.module import PreferenceModule

from conftest import TINY_GPT2


def _datamodule(pairs_file, tokenizer_dir, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(
        str(pairs_file),
        format="explicit",
        tokenizer=str(tokenizer_dir),
        max_length=48,
        max_prompt_length=24,
        batch_size=8,
        val_fraction=0.25,
        **kwargs,
    )
    dm.setup()
    return dm


@pytest.fixture
def tokenizer_dir(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def _module(dm, **kwargs) -> PreferenceModule:
    pl.seed_everything(0)
    return PreferenceModule(policy_config=TINY_GPT2, tokenizer=dm.tokenizer, **kwargs)


@pytest.mark.parametrize("loss,beta", [("dpo", 0.1), ("cdpo", 0.5), ("ipo", 0.5)])
def test_first_step_policy_equals_reference(pairs_file, tokenizer_dir, loss, beta):
    """At step 0 the reference is a copy of the policy and dropout is off, so log π = log π_ref, h = 0:
    DPO = cDPO = −log σ(0) = ln 2, IPO = (0 − 1/(2β))² = 1/(4β²) = 1 at β = 0.5; every reward and margin is 0.
    The module is in train mode, as in a real first step: dropout must not make policy and reference differ."""
    dm = _datamodule(pairs_file, tokenizer_dir)
    module = _module(dm, loss=loss, beta=beta, label_smoothing=0.1 if loss == "cdpo" else 0.0)
    module.train()
    batch = next(iter(dm.train_dataloader()))
    loss_value, values = module.model_step(batch)
    expected = 1 / (4 * beta**2) if loss == "ipo" else math.log(2)
    assert loss_value.item() == pytest.approx(expected, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert torch.equal(values[key], torch.zeros_like(values[key])), key
    assert values["shadow/dpo"].mean().item() == pytest.approx(math.log(2), abs=1e-6)


def test_reference_is_frozen_and_stays_in_eval(pairs_file, tokenizer_dir):
    """After real optimizer steps the policy has moved and the reference has not; the optimizer holds the
    policy's parameters only, and the reference is still in eval mode after Lightning's train() calls."""
    dm = _datamodule(pairs_file, tokenizer_dir)
    module = _module(dm, lr=1e-2, warmup_steps=0)
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    policy_before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert all(torch.equal(v, module.reference.state_dict()[k]) for k, v in reference_before.items())
    assert not all(torch.equal(v, module.policy.state_dict()[k]) for k, v in policy_before.items())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.policy.parameters()}
    assert all(not p.requires_grad for p in module.reference.parameters())
    module.train()
    assert module.policy.training and not module.reference.training


def test_reference_free_uses_zero_reference(pairs_file, tokenizer_dir):
    """With reference_free the rewards are β·log π itself: chosen_reward = β · logps/chosen."""
    dm = _datamodule(pairs_file, tokenizer_dir)
    module = _module(dm, reference_free=True, beta=0.2)
    assert module.reference is None
    _, values = module.model_step(next(iter(dm.train_dataloader())))
    assert torch.allclose(values["rewards/chosen"], 0.2 * values["logps/chosen"])


def test_config_errors_name_the_key(tokenizer_dir, tiny_tokenizer):
    with pytest.raises(ConfigError, match=r"model.loss: unknown loss 'kto'; valid losses are: cdpo, dpo, ipo"):
        PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, loss="kto")
    with pytest.raises(ConfigError, match="model.beta"):
        PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, beta=0)
    with pytest.raises(ConfigError, match="model.label_smoothing"):
        PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, loss="cdpo", label_smoothing=0.5)


def test_learns_systematic_preference(pairs_file, tokenizer_dir, tmp_path):
    """Chosen responses use one word list and rejected another, so a preference is learnable: after 40 steps
    the training reward accuracy (fraction of pairs with chosen reward > rejected reward) is above 0.9 and
    the mean margin is positive. At step 0 it is 0 (all rewards are exactly 0, and > is strict)."""
    dm = _datamodule(pairs_file, tokenizer_dir)
    module = _module(dm, lr=2e-3, warmup_steps=2, beta=0.1)
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = pl.Trainer(
        max_steps=40,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/rewards/accuracies")]
    first = float(rows[0]["train/rewards/accuracies"])
    last = [float(r["train/rewards/accuracies"]) for r in rows[-5:]]
    assert first == 0.0
    assert sum(last) / len(last) > 0.9
    assert float(rows[-1]["train/rewards/margins"]) > 0
    assert float(rows[-1]["train/tokens_per_sec"]) > 0


def test_response_only_scoring_matches_full_scoring(pairs_file, tokenizer_dir):
    """score_response_only changes the cost of the forward, not its result: same loss and log-probs."""
    dm = _datamodule(pairs_file, tokenizer_dir)
    batch = next(iter(dm.train_dataloader()))
    results = []
    for flag in (True, False):
        module = _module(dm, score_response_only=flag)
        with torch.no_grad():
            module.policy.transformer.wte.weight.add_(0.01)  # policy != reference, so rewards are not all 0
        results.append(module.model_step(batch))
    (loss_a, values_a), (loss_b, values_b) = results
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-5)
    assert torch.allclose(values_a["logps/chosen"], values_b["logps/chosen"], atol=1e-4)
    assert not torch.equal(values_a["rewards/margins"], torch.zeros_like(values_a["rewards/margins"]))
