"""Offline-first behaviour: wandb never prompts or waits for a login, the hub fallback fails clearly."""

import os

import pytest

from dpo_lightning.cli import configure_wandb_mode
from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.errors import DataError

from conftest import ROOT


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


def test_fit_logs_wandb_offline_by_default(clean_env, pairs_file):
    """With no login and no WANDB_MODE, a real run writes an offline wandb run inside its run folder.
    The same run checks `model.label_smoothing: label_noise`, which sets cDPO's ε to data.label_noise."""
    import subprocess
    import sys

    run_dir = clean_env / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpo_lightning",
            "fit",
            "--config",
            "experiments/tiny_cpu.yaml",
            "--data.train_files",
            str(pairs_file),
            "--data.format",
            "explicit",
            "--data.on_bad_row",
            "error",
            "--data.tokenizer_vocab_size",
            "300",
            "--model.loss",
            "cdpo",
            "--model.label_smoothing",
            "label_noise",
            "--data.label_noise",
            "0.25",
            "--trainer.max_steps",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--run.dir",
            str(run_dir),
            "--trainer.enable_progress_bar",
            "false",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run written"
    assert "label_smoothing: 0.25" in (run_dir / "hparams.yaml").read_text()


def test_missing_file_with_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = PreferenceDataModule(
        str(tmp_path / "absent.jsonl"),
        hub_fallback={"path": "Anthropic/hh-rlhf", "data_dir": "harmless-base", "split": "test"},
    )
    dm._tokenizer = tiny_tokenizer
    with pytest.raises(DataError, match=r"absent.jsonl does not exist, and the hub fallback .* could not be loaded"):
        dm.setup()


def test_explicit_file_still_loads_with_fallback_configured(tmp_path, tiny_tokenizer, pairs_file):
    dm = PreferenceDataModule(str(pairs_file), format="explicit", hub_fallback={"path": "never/used"})
    dm._tokenizer = tiny_tokenizer
    dm.setup()
    assert len(dm.datasets["train"]) > 0


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
