"""Offline-first behaviour: wandb never prompts or waits for a login, the hub fallback fails clearly."""

import os

import pytest

from dpo_lightning.cli import configure_wandb_mode
from dpo_lightning.errors import DataError

from helpers import make_datamodule, record_wandb_logger


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path


def test_wandb_is_offline_without_login(clean_env):
    assert configure_wandb_mode() == "offline"
    assert os.environ["WANDB_MODE"] == "offline"


def test_wandb_mode_set_by_user_is_kept(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert configure_wandb_mode() == "disabled"


def test_wandb_logged_in_stays_online(clean_env, monkeypatch):
    (clean_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (clean_env / ".netrc").chmod(0o600)
    monkeypatch.setenv("NETRC", str(clean_env / ".netrc"))
    assert configure_wandb_mode() == "online"
    assert "WANDB_MODE" not in os.environ


def test_missing_file_with_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fallback = {"path": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "split": "test"}
    dm = make_datamodule(tmp_path / "absent.jsonl", tiny_tokenizer, format="auto", hub_fallback=fallback)
    with pytest.raises(DataError, match=r"absent.jsonl does not exist, and the hub fallback .* could not be loaded"):
        dm.setup()


def test_explicit_file_still_loads_with_fallback_configured(tmp_path, tiny_tokenizer, pairs_file):
    """All 96 pairs load from the file (the fallback is never tried); the default val_fraction 0.05 holds out
    ceil(0.05 · 96) = 5 of them."""
    dm = make_datamodule(pairs_file, tiny_tokenizer, val_fraction=0.05, hub_fallback={"path": "never/used"})
    dm.setup()
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (91, 5)


def test_wandb_logger_gets_the_run_name_group_and_job_type(tmp_path, monkeypatch):
    """What a sweep trial passes (``--run.name <sweep>-NNN --run.group <sweep>``) reaches WandbLogger as the
    display name and group; the job type defaults to the loss (so runs colour by variant) and the config carries
    the dotted keys. The arguments are WandbLogger's own (bound against its signature)."""
    import lightning.pytorch.loggers as pl_loggers

    from dpo_lightning.cli import RunConfig, build_loggers

    seen = record_wandb_logger(monkeypatch)
    settings = {"model.beta": 0.5, "data.label_noise": 0.1}
    run = RunConfig(dir=str(tmp_path / "run"), name="loss_variants-003", group="loss_variants", tags=["t"])
    loggers, _ = build_loggers(run, "ipo", 0.5, settings)
    assert isinstance(loggers[-1], pl_loggers.WandbLogger)  # the recorder, patched in
    assert (seen["name"], seen["group"], seen["job_type"], seen["tags"]) == ("loss_variants-003", "loss_variants",
                                                                           "ipo", ["t"])  # fmt: skip
    assert seen["config"] == settings and seen["save_dir"] == str(tmp_path / "run")
    build_loggers(RunConfig(dir=str(tmp_path / "other"), job_type="baseline"), "dpo", 0.1)
    assert (seen["name"], seen["group"], seen["job_type"]) == ("dpo-beta0.1", None, "baseline")


def test_run_folder_defaults(monkeypatch, tmp_path):
    """Every process of one job must pick the same run folder: the scheduler's job id names it; a resumed run
    keeps the earlier metrics.csv instead of letting the CSV logger overwrite it."""
    from dpo_lightning.cli import RUN_DIR_ENV, RunConfig, build_loggers, default_run_dir
    from dpo_lightning.errors import ConfigError

    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", RUN_DIR_ENV):
        monkeypatch.setenv(key, "x")  # recorded, so the teardown restores each variable's absence
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert default_run_dir("dpo") == "runs/dpo-4242"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert default_run_dir("dpo") == "runs/dpo-abc"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--run.dir"):
        default_run_dir("dpo")

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("step,train/loss\n0,0.69\n")
    build_loggers(RunConfig(dir=str(run_dir), wandb=False), "dpo", 0.1)
    kept = list(run_dir.glob("metrics.before-*.csv"))
    assert len(kept) == 1 and kept[0].read_text() == "step,train/loss\n0,0.69\n"
