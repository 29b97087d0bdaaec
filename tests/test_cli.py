"""The dpo-lightning command. One real subprocess per entry point (``python -m dpo_lightning fit`` on the tiny
config, the ``dpo-lightning`` console script); error paths and config parsing run ``cli.main`` in this process
(helpers.cli_main), which is the same code without the ~6 s of a fresh interpreter importing torch."""

import csv
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from helpers import ROOT, cli_env, cli_main, fit_argv, metric_rows, run_cli, single_run

METRIC_NAMES = (
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
METRICS = [f"{stage}/{name}" for stage in ("train", "val") for name in METRIC_NAMES] + [
    "train/lr",
    "train/tokens_per_sec",
]


def test_fit_tiny_config_writes_every_metric_and_logs_wandb_offline(tmp_path):
    """A few steps of the real tiny config on the HH data, as a user runs it (a subprocess, no WANDB_MODE, not
    logged in): the CSV holds every metric, the run folder holds the resolved config, the trained tokenizer, the
    checkpoint and an offline wandb run with the given name and group and the config's dotted keys (what each
    argument of WandbLogger is: test_offline.test_wandb_logger_gets_the_run_name_group_and_job_type); the
    overrides from the command line apply, and ``model.label_smoothing: label_noise`` sets cDPO's ε to
    data.label_noise."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in cli_env(threads=None).items() if k != "WANDB_MODE"}
    result = run_cli(
        "fit", "--config", "experiments/tiny_cpu.yaml", "--model.loss", "cdpo", "--model.beta", "0.5",
        "--model.label_smoothing", "label_noise", "--data.label_noise", "0.25", "--data.max_rows", "160",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1", "--run.dir", str(run_dir), "--run.name", "cli-smoke-007",
        "--run.group", "cli-smoke",
        "--trainer.enable_progress_bar", "false",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for metric in METRICS:
        assert any(r.get(metric) not in (None, "") for r in rows), f"{metric} never logged"
    config = (run_dir / "config.yaml").read_text()
    assert "loss: cdpo" in config and "beta: 0.5" in config
    assert "label_smoothing: 0.25" in (run_dir / "hparams.yaml").read_text()
    assert (run_dir / "tokenizer" / "tokenizer.json").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    (record,) = wandb_run.glob("*.wandb")
    data = record.read_bytes()  # wandb's own record file (protobuf): the strings are stored as written
    for value in (b"cli-smoke-007", b"cli-smoke", b"model.beta", b"data.label_noise"):
        assert value in data, value


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "experiments").glob("*.yaml")))
def test_every_experiment_config_parses(config):
    # an SFT or PPO config is its own command's; the rest are fit configs or overlays on one
    command = {"_sft.yaml": "sft", "_ppo.yaml": "ppo"}.get(config[config.rfind("_") :], "fit")
    result = cli_main(command, "--config", f"experiments/{config}", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model:" in result.stdout and "data:" in result.stdout


def test_unknown_loss_is_a_clear_error(tmp_path):
    """A wrong loss name fails before training (no run folder), names the key and every valid name, no traceback."""
    from dpo_lightning.losses import LOSSES

    args = ["--model.loss", "no_such_loss", "--data.max_rows", "16", "--trainer.max_steps", "1"]
    result = cli_main("fit", "--config", "experiments/tiny_cpu.yaml", *args, "--run.dir", str(tmp_path / "r"))
    assert result.returncode == 2
    valid = ", ".join(sorted(LOSSES))
    assert f"model.loss: unknown loss 'no_such_loss'; valid losses are: {valid}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


def test_missing_data_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    result = cli_main("fit", "--config", "experiments/tiny_cpu.yaml", "--data.train_files", missing,
                      "--data.hub_fallback", "null", "--run.dir", str(tmp_path / "r"))  # fmt: skip
    assert result.returncode == 2
    assert f"{tmp_path / 'missing.jsonl'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_fails_fast():
    """A misspelt key fails while parsing (exit status 2, nothing built) with the parser's own message naming it;
    the valid key of the same name parses."""
    result = cli_main("fit", "--config", "experiments/tiny_cpu.yaml", "--model.betta", "0.5")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "error: unrecognized arguments: --model.betta 0.5", result.stderr[-2000:]
    assert (
        cli_main("fit", "--config", "experiments/tiny_cpu.yaml", "--model.beta", "0.5", "--print_config").returncode
        == 0
    )


def test_console_script_is_cli_main_and_matches_the_module_entry(tmp_path):
    """The installed ``dpo-lightning`` script (a real subprocess) and ``python -m dpo_lightning`` run the same
    function, dpo_lightning.cli:main: the script's entry point names it, ``__main__`` exits with its return value,
    and the script's output and exit status on a failing command equal main's in this process."""
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "dpo-lightning"]
    assert script.value == "dpo_lightning.cli:main"
    assert "sys.exit(main())" in (ROOT / "dpo_lightning" / "__main__.py").read_text()
    args = ["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]
    import subprocess

    binary = Path(sys.executable).parent / "dpo-lightning"
    out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120, env=cli_env())
    here = cli_main(*args)
    assert (out.returncode, out.stdout, out.stderr) == (here.returncode, here.stdout, here.stderr)
    assert (
        out.returncode == 2 and out.stderr.startswith("dpo-lightning: error: ") and "no such checkpoint" in out.stderr
    )


def test_validate_and_test_log_every_metric_alike(assets, tmp_path):
    """``dpo-lightning validate`` and ``test`` on a checkpoint: every ``val/*`` and ``test/*`` metric is logged
    (epoch means), and, the test split being the validation split, each test value equals the validation value
    of the same name; margins are chosen − rejected rewards (a mean of differences)."""
    ckpt = single_run(assets) / "checkpoints" / "last.ckpt"
    values = {}
    for command in ("validate", "test"):
        args = fit_argv(assets, tmp_path / command, "--ckpt_path", str(ckpt), "--trainer.limit_test_batches", "2")
        result = cli_main(command, *args[1:])
        assert result.returncode == 0, result.stderr[-3000:]
        (row,) = [r for r in metric_rows(tmp_path / command) if any(r.values())]
        values[command] = {
            k: float(v) for k, v in row.items() if v not in ("", None) and k.startswith(("val/", "test/"))
        }
    stage = {"validate": "val", "test": "test"}
    for command, logged in values.items():
        assert set(logged) >= {f"{stage[command]}/{name}" for name in METRIC_NAMES}, command
    for name in METRIC_NAMES:
        assert values["test"][f"test/{name}"] == pytest.approx(values["validate"][f"val/{name}"], abs=1e-6), name
    test = values["test"]
    assert test["test/rewards/margins"] == pytest.approx(test["test/rewards/chosen"] - test["test/rewards/rejected"])
    assert test["test/loss"] != pytest.approx(0.6931, abs=1e-3)  # the trained policy, not the initial one
