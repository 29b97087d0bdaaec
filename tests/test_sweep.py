"""Sweep files and the local sweep runner (dpo_lightning/sweep_space.py, dpo_lightning/sweep.py).

Most tests drive the runner with tests/fixtures/sweep_fake_trial.py, a stand-in for `dpo-lightning fit`
that starts in a fraction of a second; one test runs real tiny trials end to end, and one runs FSDP trials.
"""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpo_lightning import sweep
from dpo_lightning.errors import ConfigError
from dpo_lightning.sweep_space import build_command, load_sweep, schema_violations

from helpers import ROOT, synthetic_pairs, write_jsonl

FAKE = ROOT / "tests" / "fixtures" / "sweep_fake_trial.py"
SWEEP_FILES = sorted((ROOT / "sweeps").glob("*.yaml"))
FAKE_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]


def write_sweep(folder: Path, name: str, parameters: dict, **keys) -> Path:
    cfg = {"name": name, "program": str(FAKE), "method": "grid", "command": FAKE_COMMAND}
    cfg |= {"metric": {"name": "val/loss", "goal": "minimize"}, **keys, "parameters": parameters}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/trial.json"))]


# -- sweep files ------------------------------------------------------------------------------------------
def test_the_required_sweep_files_exist():
    assert {p.name for p in SWEEP_FILES} >= {"beta_lr.yaml", "loss_variants.yaml", "label_noise.yaml",
                                             "fsdp_smoke.yaml"}  # fmt: skip


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_files_follow_wandbs_schema(path):
    cfg = yaml.safe_load(path.read_text())
    assert schema_violations(cfg) == []
    spec = load_sweep(path)  # and the local runner can run them
    assert spec.command[:3] == ["${env}", "dpo-lightning", "fit"] and spec.command[-1] == "${args}"
    assert spec.metric and spec.name == path.stem


def test_schema_errors_name_the_file_and_the_key(tmp_path):
    bad = write_sweep(tmp_path, "bad", {"model.lr": {"distribution": "log_uniform_values", "min": "1e-5",
                                                     "max": 0.1}}, methd="grid")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_sweep(bad)
    message = str(err.value)
    assert str(bad) in message
    assert "parameters.model.lr.min: must be a number" in message and "1.0e-5" in message  # the YAML 1.1 hint
    assert "methd: not a sweep key" in message
    cfg = {"method": "bayes", "early_terminate": {"type": "hyperband", "eta": 3}, "parameters": {"x": {}}}
    problems = schema_violations(cfg)
    assert any(p.startswith("early_terminate: hyperband needs min_iter") for p in problems)
    assert any(p.startswith("parameters.x") for p in problems)
    with pytest.raises(ConfigError, match="parameters.model.beta: null"):
        load_sweep(write_sweep(tmp_path, "nulls", {"model.beta": {"values": [0.1, None]}}))
    with pytest.raises(ConfigError, match="local runner's grid search supports only"):
        load_sweep(write_sweep(tmp_path, "g", {"model.beta": {"min": 0.1, "max": 1.0}}))


def _wandb_agent_command(spec, values: dict) -> list[str]:
    """What `wandb agent` runs, from wandb's own helpers and the substitution loop of wandb_agent.py."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars |= {"interpreter": ["python"], "program": [spec.program], "env": ["/usr/bin/env"]}
    out = []
    for chunk in sweep_utils.create_sweep_command(list(spec.command)):
        chunk = str(chunk)
        out += (sweep_vars.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return out


def _sample_values(spec) -> dict:
    if spec.method == "grid":
        return spec.with_constants(spec.grid()[-1])
    return spec.with_constants({p.name: p.bounds()[0] if p.low is not None else p.values[0] for p in spec.swept})


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_local_command_is_the_one_wandb_agent_builds(path):
    spec = load_sweep(path)
    values = _sample_values(spec)
    assert build_command(spec, values, local=False) == _wandb_agent_command(spec, values)
    local = build_command(spec, values)
    assert local[1:4] == [sys.executable, "-m", "dpo_lightning"]  # this venv, with or without bin/ on PATH


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_cli_accepts_the_command_wandb_builds(path, capsys, monkeypatch):
    """The arguments wandb would pass parse in LightningCLI (--print_config parses and exits, runs nothing)."""
    from dpo_lightning.cli import main

    spec = load_sweep(path)
    values = _sample_values(spec)
    argv = _wandb_agent_command(spec, values)
    assert argv[:2] == ["/usr/bin/env", "dpo-lightning"]
    monkeypatch.chdir(ROOT)  # the files' --config paths are relative to the repository root
    monkeypatch.setattr(sys, "argv", ["dpo-lightning"])  # pytest's own arguments are not the CLI's
    with pytest.raises(SystemExit) as exit_:
        main(argv[2:] + ["--run.dir=/tmp/unused", "--run.group=g", "--print_config"])
    out = capsys.readouterr()
    assert exit_.value.code in (0, None), out.err[-2000:]
    printed = yaml.safe_load(out.out)
    for key, value in values.items():
        section, name = key.split(".", 1)
        assert str(printed[section][name]) == str(value), key  # str: trainer.devices keeps "2" as text


# -- the runner, with fake trials --------------------------------------------------------------------------
def test_random_and_bayes_propose_values_within_bounds(tmp_path, monkeypatch):
    """6 trials, 2 at a time: every proposal is within the file's bounds and reaches the trial's command and
    config; each trial is named <sweep>-NNN in group <sweep>. random samples with Optuna's RandomSampler; bayes with
    its TPE sampler, whose model proposes (non-empty relative samples) once its 2 start-up trials are done
    (startup = max(2, min(10, 6 // 3)))."""
    import optuna

    modelled: list[int] = []  # per TPE relative sample: how many parameters the model proposed
    real = optuna.samplers.TPESampler.sample_relative

    def spy(self, study, trial, search_space):
        proposed = real(self, study, trial, search_space)
        modelled.append(len(proposed))
        return proposed

    monkeypatch.setattr(optuna.samplers.TPESampler, "sample_relative", spy)
    parameters = {
        "model.beta": {"distribution": "log_uniform_values", "min": 0.01, "max": 1.0},
        "optimizer.lr": {"min": 0.0, "max": 0.01},
        "x": {"min": 0, "max": 3},
        "model.loss": {"values": ["dpo", "ipo", "cdpo"]},
        "q": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
        "fake.steps": {"value": 2},
    }
    for method in ("random", "bayes"):
        modelled.clear()
        path = write_sweep(tmp_path, method, parameters, method=method, run_cap=6)
        out = tmp_path / method
        (tmp_path / f"{method}-probe").mkdir()
        sampler = sweep.make_study(load_sweep(path), tmp_path / f"{method}-probe", 0, 2, 6).sampler
        if method == "bayes":
            assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == 2
        else:
            assert type(sampler) is optuna.samplers.RandomSampler
        assert sweep.main([str(path), "--out", str(out), "--workers", "2"]) == 0
        done = records(out)
        assert len(done) == 6 and all(r["state"] == "complete" for r in done)
        assert len({r["run_dir"] for r in done}) == 6  # parallel workers never share a folder
        spec = load_sweep(path)
        for r in done:
            for p in spec.params:
                assert p.contains(r["params"][p.name]), (method, p.name, r["params"][p.name])
            assert f"--model.beta={r['params']['model.beta']}" in r["command"]
            assert f"--run.dir={r['run_dir']}" in r["command"] and f"--run.group={method}" in r["command"]
            assert f"--run.name={method}-{Path(r['run_dir']).name}" in r["command"]
            assert f"beta: {float(r['params']['model.beta'])}" in (Path(r["run_dir"]) / "config.yaml").read_text()
        assert len({r["params"]["model.beta"] for r in done}) == 6  # bayes/random: no replayed proposals
        assert (out / "summary.csv").read_text().count("\n") == 7
        if method == "bayes":
            assert any(n > 0 for n in modelled), "TPE never proposed from its model"
        else:
            assert modelled == [], "the random sweep used TPE"


def test_crashed_and_killed_trials_are_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    parameters = {"fake.crash_x": {"value": 1}, "fake.kill_x": {"value": 2}, "x": {"values": [0, 1, 2, 3]}}
    path = write_sweep(tmp_path, "crashy", parameters)
    out = tmp_path / "crashy"
    assert sweep.main([str(path), "--out", str(out)]) == 0
    by_x = {r["params"]["x"]: r for r in records(out)}
    assert [by_x[x]["state"] for x in range(4)] == ["complete", "failed", "failed", "complete"]
    assert by_x[1]["reason"] == "exit code 1" and "crashed on purpose" in by_x[1]["log_tail"]
    assert by_x[2]["reason"] == "killed by signal SIGKILL (out of memory?)"
    summary = (out / "summary.md").read_text()
    assert "## Failed trials" in summary and "RuntimeError: fake trial crashed on purpose" in summary
    assert "2 complete, 0 pruned, 0 running, 2 failed" in summary
    capsys.readouterr()
    assert sweep.main([str(path), "--out", str(out), "--status"]) == 0
    assert capsys.readouterr().out.strip() == summary.strip()
    # --retry-failed runs the two failures again (and they fail again, deterministically)
    assert sweep.main([str(path), "--out", str(out), "--retry-failed"]) == 0
    assert [r["state"] for r in records(out)].count("retried") == 2 and len(records(out)) == 6


def test_metric_never_logged_fails_the_trial_with_the_columns_seen(tmp_path):
    path = write_sweep(tmp_path, "typo", {"x": {"values": [0]}}, metric={"name": "val/acc", "goal": "maximize"})
    assert sweep.main([str(path), "--out", str(tmp_path / "typo")]) == 0
    (record,) = records(tmp_path / "typo")
    assert record["state"] == "failed" and "'val/acc' was never logged" in record["reason"]
    assert "val/rewards/accuracies" in record["reason"]


def test_a_hung_trial_times_out_and_is_recorded(tmp_path):
    path = write_sweep(tmp_path, "slow", {"fake.sleep": {"value": 30}, "x": {"values": [0]}})
    started = time.monotonic()
    assert sweep.main([str(path), "--out", str(tmp_path / "slow"), "--trial-timeout", "1"]) == 0
    assert time.monotonic() - started < 20
    (record,) = records(tmp_path / "slow")
    assert record["state"] == "failed" and record["reason"] == "timed out after 1 s"


def test_hyperband_prunes_trials_that_trail_at_a_rung(tmp_path):
    """One bracket (max_iter / min_iter < eta): at iteration 2 only the best third of the trials so far go on.
    x = 0 finishes first; x = 5 and x = 1 trail it at iteration 2 and are stopped while running."""
    parameters = {"fake.sleep": {"value": 0.3}, "fake.steps": {"value": 6}, "x": {"values": [0, 5, 1]}}
    stop = {"type": "hyperband", "min_iter": 2, "max_iter": 4, "eta": 3}
    path = write_sweep(tmp_path, "hb", parameters, early_terminate=stop)
    assert sweep.main([str(path), "--out", str(tmp_path / "hb")]) == 0
    states = {r["params"]["x"]: (r["state"], r["iterations"]) for r in records(tmp_path / "hb")}
    assert states[0] == ("complete", 6)
    assert states[5][0] == "pruned" and states[1][0] == "pruned" and states[5][1] < 6


def test_interrupt_then_resume_runs_only_the_remaining_trials(tmp_path):
    record = tmp_path / "starts.jsonl"
    parameters = {"fake.sleep": {"value": 0.5}, "fake.record": {"value": str(record)}, "x": {"values": [0, 1, 2]}}
    path = write_sweep(tmp_path, "resumable", parameters)
    out = tmp_path / "resumable"
    argv = [sys.executable, "-m", "dpo_lightning", "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (out / "trials" / "001" / "trial.json").exists():  # trial 000 done, 001 started
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output
    assert "run the same command to resume" in output
    assert [r["state"] for r in records(out)] == ["complete", "interrupted"]

    assert sweep.main([str(path), "--out", str(out)]) == 0
    starts = [json.loads(line)["x"] for line in record.read_text().splitlines()]
    assert sorted(starts) == ["0", "1", "1", "2"]  # 0 ran once, the interrupted 1 again, then 2
    assert [r["state"] for r in records(out)] == ["complete", "interrupted", "complete", "complete"]
    assert sweep.main([str(path), "--out", str(out)]) == 0  # nothing left: runs nothing
    assert len(record.read_text().splitlines()) == 4


def test_runner_refuses_a_changed_file_and_an_endless_random_sweep(tmp_path, capsys):
    path = write_sweep(tmp_path, "s", {"x": {"values": [0]}})
    assert sweep.main([str(path), "--out", str(tmp_path / "s")]) == 0
    write_sweep(tmp_path, "s", {"x": {"values": [0, 1]}})
    assert sweep.main([str(path), "--out", str(tmp_path / "s")]) == 2
    assert "has changed since the sweep" in capsys.readouterr().err
    endless = write_sweep(tmp_path, "endless", {"x": {"min": 0, "max": 3}}, method="random")
    assert sweep.main([str(endless), "--out", str(tmp_path / "e")]) == 2
    assert "pass --max-trials or set run_cap" in capsys.readouterr().err


# -- real trials ---------------------------------------------------------------------------------------------
def _real_sweep(tmp_path: Path, source: Path | None, name: str, parameters: dict | None = None) -> Path:
    """A sweep of real `dpo-lightning fit` trials, made tiny by the test overlay and a synthetic data file."""
    data = tmp_path / "data.yaml"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(96))
    data.write_text(yaml.safe_dump({"data": {"train_files": [str(pairs)], "format": "explicit"}}))
    cfg = yaml.safe_load(source.read_text()) if source else {"method": "grid", "metric": {"name": "val/loss"}}
    cfg["name"] = name
    cfg["parameters"] = parameters or cfg["parameters"]
    # the file's own command, with the tiny overlay and the data file added after its --config
    cfg["command"] = ["${env}", "dpo-lightning", "fit", "--config", "experiments/tiny_cpu.yaml", "--config",
                      "tests/fixtures/sweep_tiny.yaml", "--config", str(data), "${args}"]  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_grid_sweep_of_real_trials_end_to_end_then_compare(tmp_path, monkeypatch):
    """3 real trials (dpo, ipo, cdpo), 2 at a time, offline; then `compare` on the sweep folder."""
    monkeypatch.chdir(ROOT)
    path = _real_sweep(tmp_path, ROOT / "sweeps" / "loss_variants.yaml", "tiny_grid")
    out = tmp_path / "tiny_grid"
    assert sweep.main([str(path), "--out", str(out), "--workers", "2", "--max-trials", "3"]) == 0
    done = records(out)
    assert [r["state"] for r in done] == ["complete"] * 3, [r.get("log_tail") for r in done]
    assert [r["params"]["model.loss"] for r in done] == ["dpo", "ipo", "cdpo"]  # loss is the fastest axis
    for r in done:
        run_dir = Path(r["run_dir"])
        assert f"loss: {r['params']['model.loss']}" in (run_dir / "config.yaml").read_text()
        assert "val/rewards/accuracies" in (run_dir / "metrics.csv").read_text()
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 4 and summary[0].startswith("rank,trial,state,val/rewards/accuracies")

    from dpo_lightning.compare import main as compare

    assert compare([str(out), "--out", str(out / "compare")]) == 0
    assert (out / "compare" / "rewards_margins.png").stat().st_size > 10_000
    assert (out / "compare" / "index.html").read_text().count("tiny_grid/00") >= 3


FSDP_READY = importlib.util.find_spec("dpo_lightning.strategy") is not None


@pytest.mark.slow
@pytest.mark.skipif(not FSDP_READY, reason="trainer.strategy=fsdp on CPU comes with dpo_lightning/strategy.py")
def test_fsdp_smoke_sweep_runs_two_trials_of_two_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = _real_sweep(tmp_path, ROOT / "sweeps" / "fsdp_smoke.yaml", "fsdp_smoke")
    out = tmp_path / "fsdp_smoke"
    assert sweep.main([str(path), "--out", str(out), "--trial-timeout", "300"]) == 0  # a hang fails, not waits
    done = records(out)
    assert [r["state"] for r in done] == ["complete", "complete"], [r.get("log_tail") for r in done]
    for r in done:
        assert "--trainer.devices=2" in r["command"] and "--trainer.strategy=fsdp" in r["command"]
        log = (Path(r["run_dir"]) / "trial.log").read_text()
        assert "MEMBER: 2/2" in log, log[-3000:]  # Lightning announces the second process
