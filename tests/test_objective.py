"""The run's objective inside PreferenceModule: mixtures, reference-free losses, BCO's δ, KTO's z₀, TR-DPO."""

import math

import lightning.pytorch as pl
import pytest
import torch

from dpo_lightning.errors import ConfigError
from dpo_lightning.losses import LOSSES, SPECS, compute_loss
from dpo_lightning.module import PreferenceModule
from dpo_lightning.objective import Objective
from dpo_lightning.reference_sync import ReferenceSync, SyncConfig, sync_reference

from helpers import TINY_GPT2


def _objective(loss, weights=None, **settings) -> Objective:
    return Objective(
        loss,
        weights,
        beta=0.5,
        settings={"label_smoothing": 0.0, **settings},
        shadow_settings={},
        logp_aggregation="sum",
    )


def _logps(seed=0, n=4):
    """Policy and reference log-prob sums of 2n rows (chosen then rejected) and their lengths."""
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2 * n, generator=g) * 20
    reference = -torch.rand(2 * n, generator=g) * 20
    lengths = torch.randint(1, 30, (2 * n,), generator=g)
    return policy, reference, lengths


def test_mixture_is_the_weighted_sum_and_logs_each_component():
    """[dpo, sft] with weights [1, 0.5]: per pair L = L_dpo + 0.5 L_sft, each from compute_loss on the same
    log-probs; loss/dpo and loss/sft are the unweighted components; rewards are dpo's (the first)."""
    policy, reference, lengths = _logps()
    n = 4
    loss, values = _objective(["dpo", "sft"], [1.0, 0.5])((policy, reference), lengths, training=False)
    inputs = dict(
        policy_chosen_logps=policy[:n],
        policy_rejected_logps=policy[n:],
        reference_chosen_logps=reference[:n],
        reference_rejected_logps=reference[n:],
        chosen_lengths=lengths[:n],
        rejected_lengths=lengths[n:],
        beta=0.5,
    )
    dpo, chosen_rewards, _ = compute_loss("dpo", **inputs)
    sft = compute_loss("sft", **inputs)[0]
    assert torch.allclose(values["loss/dpo"], dpo) and torch.allclose(values["loss/sft"], sft)
    assert torch.allclose(values["loss"], dpo + 0.5 * sft)
    assert loss.item() == pytest.approx((dpo + 0.5 * sft).mean().item())
    assert torch.equal(values["rewards/chosen"], chosen_rewards)
    assert set(f"shadow/{name}" for name in LOSSES) <= set(values)


@pytest.mark.parametrize(
    "loss,weights,match",
    [("nope", None, "valid losses"), (["dpo", "ipo"], [1.0], "2 losses"), (["dpo", "dpo"], None, "twice")],
)
def test_bad_loss_configs_fail_clearly(loss, weights, match):
    with pytest.raises(ConfigError, match=match):
        _objective(loss, weights)


def test_bco_delta_is_the_running_mean_of_batch_rewards():
    """bco_pair's δ after k training batches is the mean of the k batch means of the rewards β·Δ over chosen
    and rejected rows (Jung et al. 2024; TRL's RunningMoments of the batch means). It is updated before the
    loss is computed, so the first batch already uses its own mean; evaluation steps leave it alone."""
    objective = _objective("bco_pair")
    means = []
    for seed in range(3):
        policy, reference, lengths = _logps(seed)
        means.append((0.5 * (policy - reference)).mean().item())
        _, values = objective((policy, reference), lengths, training=True)
        assert objective.bco_delta == pytest.approx(sum(means) / len(means), rel=1e-6)
        expected = compute_loss(
            "bco_pair",
            policy_chosen_logps=policy[:4],
            policy_rejected_logps=policy[4:],
            reference_chosen_logps=reference[:4],
            reference_rejected_logps=reference[4:],
            chosen_lengths=lengths[:4],
            rejected_lengths=lengths[4:],
            beta=0.5,
            bco_delta=objective.bco_delta,
        )[0]
        assert torch.allclose(values["loss"], expected)
    before = objective.state_dict()
    objective((policy, reference), lengths, training=False)
    assert objective.state_dict() == before
    restored = _objective("bco_pair")
    restored.load_state_dict(before)
    assert restored.bco_delta == objective.bco_delta


def test_kto_reference_point_comes_from_the_mismatched_rows():
    """Unpaired batch: rows 0..B-1 matched, B..2B-1 mismatched. z₀ = max(0, mean(π_kl − π_ref_kl)) over the
    mismatched rows; each matched row pays λ_D(1 − σ(β(Δ − z₀))) if desirable, λ_U(1 − σ(β(z₀ − Δ))) if not."""
    policy, reference, lengths = _logps(3)
    reference[4:] = policy[4:] - torch.tensor([1.0, 2.0, 3.0, 6.0])  # KL rows: mean log-ratio 3.0
    desirable = torch.tensor([True, False, True, False])
    objective = _objective("kto", desirable_weight=1.0, undesirable_weight=1.5)
    _, values = objective((policy, reference), lengths, desirable=desirable, training=True)
    z0 = 3.0
    delta = policy[:4] - reference[:4]
    expected = torch.where(
        desirable, 1 - torch.sigmoid(0.5 * (delta - z0)), 1.5 * (1 - torch.sigmoid(0.5 * (z0 - delta)))
    )
    assert torch.allclose(values["loss"], expected, atol=1e-6)
    assert torch.allclose(values["kl"], torch.full((4,), z0))
    reference[4:] = policy[4:] + 1.0  # a negative estimate clamps to 0
    _, values = objective((policy, reference), lengths, desirable=desirable, training=True)
    assert torch.equal(values["kl"], torch.zeros(4))
    rewards, weights = values["rewards/chosen"]
    assert torch.equal(weights, desirable.float())


def test_pair_losses_refuse_unpaired_batches():
    policy, reference, lengths = _logps()
    with pytest.raises(ConfigError, match="needs preference pairs"):
        _objective("dpo")((policy, reference), lengths, desirable=torch.ones(4, dtype=torch.bool), training=True)


def test_reference_free_losses_build_no_reference(tiny_tokenizer):
    """SimPO, ORPO and SFT never read a reference: the module builds none (no copy of the policy in memory)."""
    for name in [n for n in LOSSES if not SPECS[n].reference] + [["simpo", "sft"]]:
        module = PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, loss=name)
        assert module.reference is None, name
    assert PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, loss=["simpo", "dpo"]).reference


def test_loss_params_names_are_checked(tiny_tokenizer):
    with pytest.raises(ConfigError, match="no registered loss takes simpo_gama"):
        PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, loss_params={"simpo_gama": 1.0})


def test_reference_sync_soft_and_hard():
    """soft: π_ref ← α·π + (1−α)·π_ref (TR-DPO Eq. 4); α = 1 (hard) copies the policy."""
    torch.manual_seed(0)
    policy, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    p, r = policy.weight.detach().clone(), reference.weight.detach().clone()
    sync_reference(policy, reference, 0.25)
    assert torch.allclose(reference.weight, 0.25 * p + 0.75 * r)
    sync_reference(policy, reference, 1.0)
    assert torch.equal(reference.weight, policy.weight)
    with pytest.raises(ConfigError, match="alpha"):
        SyncConfig(alpha=0.0)


def test_reference_sync_config_errors(tiny_tokenizer):
    sync = SyncConfig(every=2)
    with pytest.raises(ConfigError, match="precompute_reference"):
        PreferenceModule(
            policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, reference_sync=sync, precompute_reference=True
        )
    with pytest.raises(ConfigError, match="uses no reference"):
        PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, reference_sync=sync, loss="simpo")
    # a mistyped key, as a config file gives it (a mapping): named, not a TypeError from the dataclass
    with pytest.raises(ConfigError, match=r"model.reference_sync: unknown key\(s\) \['alpah'\]"):
        PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, reference_sync={"alpah": 0.5})


def test_reference_sync_runs_every_n_optimizer_steps(tiny_tokenizer, pairs_file, tmp_path):
    """With every = 2 over 5 optimizer steps the reference is synced after steps 2 and 4 only: after a fit
    with α = 1 (hard) the reference equals the policy as it was after step 4, not after step 5."""
    from dpo_lightning.data import PreferenceDataModule

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    dm = PreferenceDataModule(
        str(pairs_file),
        format="explicit",
        tokenizer=str(tmp_path / "tok"),
        max_length=48,
        max_prompt_length=24,
        batch_size=4,
        val_fraction=0.25,
    )
    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots[trainer.global_step] = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}

    pl.seed_everything(0)
    module = PreferenceModule(
        policy_config=TINY_GPT2,
        tokenizer=dm.tokenizer,
        lr=1e-2,
        warmup_steps=0,
        reference_sync=SyncConfig(mode="hard", every=2),
    )
    trainer = pl.Trainer(
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        enable_model_summary=False,
        callbacks=[Snapshot()],
    )
    trainer.fit(module, datamodule=dm)
    sync = next(c for c in trainer.callbacks if isinstance(c, ReferenceSync))
    assert sync.last_synced == 4
    reference = module.reference.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in snapshots[4].items())
    assert not all(torch.equal(reference[k], v) for k, v in snapshots[5].items())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


def test_reference_sync_resumes_exactly(tiny_tokenizer, pairs_file, tmp_path):
    """TR-DPO's reference is trained state: resuming at step 3 (reference synced at step 2) a run of 5 steps
    ends with the same policy, reference and BCO running mean, bit for bit, as the run that was never stopped.
    Without the reference in the checkpoint the resumed run would restart from the initial reference."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from helpers import make_datamodule, quiet_trainer

    def run(ckpt_path=None):
        dm = make_datamodule(pairs_file, tiny_tokenizer, batch_size=4, max_length=48, max_prompt_length=24)
        pl.seed_everything(0)
        module = PreferenceModule(
            policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, lr=1e-2, warmup_steps=0, loss=["dpo", "bco_pair"],
            reference_sync=SyncConfig(mode="soft", alpha=0.5, every=2),
        )  # fmt: skip
        every_step = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        trainer = quiet_trainer(max_steps=5, limit_val_batches=0, enable_checkpointing=True, callbacks=[every_step])
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module

    straight = run()
    resumed = run(tmp_path / "ckpt" / "step=3.ckpt")
    for name in ("policy", "reference"):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed.objective.state_dict() == straight.objective.state_dict()  # BCO's running mean too
    assert resumed.objective.bco_count == 5


def test_kto_with_precomputed_reference_is_a_config_error(tiny_tokenizer, pairs_file):
    """z₀ comes from mismatched rows that depend on the batch: a stored table cannot hold them."""
    from helpers import make_datamodule, quiet_trainer

    dm = make_datamodule(pairs_file, tiny_tokenizer, batch_size=4, max_length=48, max_prompt_length=24, unpair=True)
    module = PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, loss="kto", precompute_reference=True)
    with pytest.raises(ConfigError, match="unpaired rows"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)


def test_cli_kto_on_paired_data_unpairs_and_a_loss_list_parses(assets, tmp_path):
    """``--model.loss kto`` on paired data splits the pairs into unpaired rows (data.unpair set by the CLI, saved
    in the run's config); ``--model.loss '[dpo, sft]' --model.loss_weights '[1, 0.5]'`` trains the mixture and
    logs each component."""
    import yaml

    from helpers import cli_main, fit_argv, metric_rows

    short = ("--trainer.max_steps", "2", "--trainer.limit_val_batches", "1")
    result = cli_main(*fit_argv(assets, tmp_path / "kto", "--model.loss", "kto", *short))
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((tmp_path / "kto" / "config.yaml").read_text())
    assert config["data"]["unpair"] is True and config["model"]["loss"] == "kto"
    assert any(row.get("train/kl") for row in metric_rows(tmp_path / "kto"))
    mix = ("--model.loss", "[dpo, sft]", "--model.loss_weights", "[1.0, 0.5]", *short)
    result = cli_main(*fit_argv(assets, tmp_path / "mix", *mix))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [r for r in metric_rows(tmp_path / "mix") if r.get("train/loss")]
    for row in rows:
        total = float(row["train/loss/dpo"]) + 0.5 * float(row["train/loss/sft"])
        assert float(row["train/loss"]) == pytest.approx(total, rel=1e-5)
    result = cli_main(*fit_argv(assets, tmp_path / "bad", "--model.loss", "[dpo, nope]", *short))
    assert result.returncode == 2 and "unknown loss 'nope'" in result.stderr


def test_reference_sync_under_fsdp_matches_one_process(assets):
    """TR-DPO on an FSDP2-sharded policy and reference (2 processes, 4 pairs each) follows the same curves as one
    process with 8 pairs: the soft update runs shard by shard, and after the syncs at steps 2 and 4 the losses
    and rewards (which read the reference) agree. A sync on mismatched shards, or on one rank only, would not."""
    from helpers import TRDPO, assert_same_curves, fsdp_trdpo_run, shared_run

    fsdp = fsdp_trdpo_run(assets)
    single = shared_run(assets, "single_trdpo", "--data.batch_size", "8", *TRDPO, in_process=True)
    assert_same_curves(fsdp, single, keys=("train/loss", "train/rewards/margins", "val/loss", "val/loss/bco_pair"))
