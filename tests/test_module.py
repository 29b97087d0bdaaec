"""PreferenceModule invariants and learning on a tiny model."""

import csv
import math

import lightning.pytorch as pl
import pytest
import torch

from dpo_lightning.errors import ConfigError
from dpo_lightning.module import PreferenceModule

from helpers import TINY_GPT2, make_datamodule, quiet_trainer


def _datamodule(pairs_file, tokenizer_dir, **kwargs):
    settings = {"max_length": 48, "max_prompt_length": 24, "batch_size": 8, **kwargs}
    return make_datamodule(pairs_file, tokenizer_dir, setup=True, **settings)


@pytest.fixture
def tokenizer_dir(tiny_tokenizer_dir):
    return tiny_tokenizer_dir


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
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
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
    import re

    from dpo_lightning.losses import LOSSES

    valid = re.escape(", ".join(sorted(LOSSES)))
    with pytest.raises(ConfigError, match=rf"model.loss: unknown loss 'no_such_loss'; valid losses are: {valid}$"):
        PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, loss="no_such_loss")
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
    trainer = quiet_trainer(max_steps=40, logger=logger, log_every_n_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/rewards/accuracies")]
    first = float(rows[0]["train/rewards/accuracies"])
    last = [float(r["train/rewards/accuracies"]) for r in rows[-5:]]
    assert first == 0.0
    assert sum(last) / len(last) > 0.9
    assert float(rows[-1]["train/rewards/margins"]) > 0
    assert float(rows[-1]["train/tokens_per_sec"]) > 0  # its exact value: test_tokens_per_sec_counts_real_tokens


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


class _Recorder(pl.Callback):
    """The real (attention-mask) and padded token counts of every training batch."""

    def __init__(self):
        self.real, self.padded = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.real.append(int(batch["attention_mask"].sum()))
        self.padded.append(batch["attention_mask"].numel())


def test_tokens_per_sec_counts_real_tokens(hh_datamodule, tmp_path, monkeypatch):
    """train/tokens_per_sec = the step's non-padding tokens (chosen + rejected rows) / the step's wall time. The
    module's clock is replaced by one that advances exactly 1 s per reading (one at the step's start, one at its
    end), so the logged value must equal the step's real-token count: the attention mask's sum, not the padded
    batch's size. HH pairs differ in length, so every batch carries padding and the two counts differ."""
    import time
    import types

    import dpo_lightning.module as module_file

    ticks = iter(range(1, 10_000))
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    clock.perf_counter = lambda: float(next(ticks))
    monkeypatch.setattr(module_file, "time", clock)
    recorder = _Recorder()
    module = _module(hh_datamodule, lr=1e-3, warmup_steps=0)
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    quiet_trainer(max_steps=3, logger=logger, log_every_n_steps=1, limit_val_batches=0, callbacks=[recorder]).fit(
        module, datamodule=hh_datamodule
    )
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/tokens_per_sec")]
    logged = [float(r["train/tokens_per_sec"]) for r in rows]
    assert logged == [float(n) for n in recorder.real]
    assert all(real < padded for real, padded in zip(recorder.real, recorder.padded, strict=True))


def test_rmsprop_is_the_optimizer_when_asked(pairs_file, tokenizer_dir):
    """``model.optimizer: rmsprop`` (the DPO paper's choice): torch's RMSprop over the policy's parameters only,
    with the configured lr and weight decay, and after a step its state is RMSprop's (square averages), not
    Adam's (first and second moments). The default stays AdamW."""
    dm = _datamodule(pairs_file, tokenizer_dir)
    module = _module(dm, optimizer="rmsprop", lr=1e-3, warmup_steps=0, weight_decay=0.01)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.RMSprop
    (group,) = optimizer.param_groups
    assert group["lr"] == pytest.approx(1e-3) and group["weight_decay"] == 0.01
    assert {id(p) for p in group["params"]} == {id(p) for p in module.policy.parameters()}
    states = list(optimizer.state.values())
    assert states and all("square_avg" in s and "exp_avg" not in s for s in states)
    default = _module(dm)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(default, datamodule=dm)
    assert type(trainer.optimizers[0]) is torch.optim.AdamW


def test_cosine_schedule_warms_up_then_decays_to_zero(pairs_file, tokenizer_dir, tmp_path):
    """``model.lr_schedule: cosine`` with warmup w = 2 over T = 10 optimizer steps at peak lr η = 0.01: step s
    trains at η (s + 1)/(w + 1) for s < w, then at η · ½ (1 + cos(π (s − w)/(T − w))), reaching 0 at s = T.
    ``train/lr`` is logged at the end of each step, after Lightning has stepped the scheduler, so the row of
    step s shows the lr of step s + 1: 2/3 η, η, then the cosine from η down to 0 at the row of step T − 1."""
    dm = _datamodule(pairs_file, tokenizer_dir)
    module = _module(dm, lr=0.01, warmup_steps=2, lr_schedule="cosine")
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    quiet_trainer(max_steps=10, logger=logger, log_every_n_steps=1, limit_val_batches=0).fit(module, datamodule=dm)
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/lr")]
    logged = {int(r["step"]): float(r["train/lr"]) for r in rows}

    def lr_at(s: int, eta=0.01, w=2, total=10) -> float:
        return eta * (s + 1) / (w + 1) if s < w else eta * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w)))

    assert sorted(logged) == list(range(10))
    # logged as float32: equal to ~1e-7 relative
    assert [logged[s] for s in range(10)] == pytest.approx([lr_at(s + 1) for s in range(10)], rel=1e-6, abs=1e-9)
    assert logged[9] == pytest.approx(0.0, abs=1e-9) and logged[1] == pytest.approx(0.01)
