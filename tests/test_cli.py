"""The dpo-lightning command, run as a user runs it (a subprocess)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

METRICS = [
    f"{stage}/{name}"
    for stage in ("train", "val")
    for name in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "shadow/dpo",
        "shadow/ipo",
        "shadow/cdpo",
    )
] + ["train/lr", "train/tokens_per_sec"]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "dpo_lightning", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_fit_tiny_config_writes_every_metric(tmp_path):
    """A few steps of the real tiny config on the HH data: the CSV holds every metric, the run folder holds
    the resolved config and the trained tokenizer, and the model overrides from the command line apply."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "fit",
        "--config",
        "experiments/tiny_cpu.yaml",
        "--model.loss",
        "ipo",
        "--model.beta",
        "0.5",
        "--data.max_rows",
        "160",
        "--trainer.max_steps",
        "4",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--run.dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for metric in METRICS:
        assert any(r.get(metric) not in (None, "") for r in rows), f"{metric} never logged"
    config = (run_dir / "config.yaml").read_text()
    assert "loss: ipo" in config and "beta: 0.5" in config
    assert (run_dir / "tokenizer" / "tokenizer.json").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "experiments").glob("*.yaml")))
def test_every_experiment_config_parses(config):
    result = run_cli("fit", "--config", f"experiments/{config}", "--print_config", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model:" in result.stdout and "data:" in result.stdout


def test_unknown_loss_is_a_clear_error():
    """A wrong loss name fails before training, names the key and the valid names, with no traceback."""
    result = run_cli(
        "fit",
        "--config",
        "experiments/tiny_cpu.yaml",
        "--model.loss",
        "kto",
        "--data.max_rows",
        "16",
        "--run.dir",
        "/tmp/dpo-unused",
    )
    assert result.returncode == 2
    assert "model.loss: unknown loss 'kto'; valid losses are: cdpo, dpo, ipo" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_file_is_a_clear_error(tmp_path):
    result = run_cli(
        "fit",
        "--config",
        "experiments/tiny_cpu.yaml",
        "--data.train_files",
        str(tmp_path / "missing.jsonl"),
        "--data.hub_fallback",
        "null",
        "--run.dir",
        str(tmp_path / "r"),
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'missing.jsonl'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_fails_fast():
    result = run_cli("fit", "--config", "experiments/tiny_cpu.yaml", "--model.betta", "0.5", timeout=120)
    assert result.returncode != 0 and "betta" in result.stderr


def test_module_entry_matches_console_script():
    script = Path(sys.executable).parent / "dpo-lightning"
    out = subprocess.run([str(script), "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--model.loss" in out.stdout
