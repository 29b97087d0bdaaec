"""Sweep files and the local sweep runner (dpo_lightning/sweep_space.py, dpo_lightning/sweep.py, sweeping/).

Most tests drive the runner with tests/fixtures/sweep_fake_trial.py, a stand-in for `dpo-lightning fit`
that starts in a fraction of a second; one test runs real tiny trials end to end, and one runs FSDP trials.
The differential tests against wandb's engine are in test_sweep_engine.py, the shared-storage and crash
tests in test_sweep_shared.py.
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

from helpers import ROOT, record_wandb_logger, synthetic_pairs, write_jsonl

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
    found = [json.loads(p.read_text()) for p in out.glob("*/trial.json")]
    return sorted(found, key=lambda r: r["trial"])


# -- sweep files ------------------------------------------------------------------------------------------
def test_the_required_sweep_files_exist():
    assert {p.name for p in SWEEP_FILES} >= {"beta_lr.yaml", "loss_variants.yaml", "label_noise.yaml",
                                             "fsdp_smoke.yaml"}  # fmt: skip


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_files_are_valid_for_wandb_and_name_their_trials(path):
    cfg = yaml.safe_load(path.read_text())
    assert schema_violations(cfg) == []
    spec = load_sweep(path)  # and the local runner can run them
    assert spec.command[:3] == ["${env}", "dpo-lightning", "fit"] and spec.command[-1] == "${args}"
    assert spec.metric and spec.name == path.stem
    assert spec.project == "dpo-lightning"  # wandb sync of offline runs lands in the same project
    assert f"--run.sweep={spec.name}" in spec.command  # trials <sweep>-<run id>, grouped per (loss, β)
    assert f"--run.group={spec.name}" not in spec.command  # no longer one averaged line for every loss


def test_label_noise_has_two_seeds_per_point():
    spec = load_sweep(ROOT / "sweeps" / "label_noise.yaml")
    grid = spec.grid()
    assert len(grid) == 24 and {p["seed_everything"] for p in grid} == {0, 1}


def test_invalid_files_fail_with_wandbs_messages_naming_the_file(tmp_path):
    bad = write_sweep(tmp_path, "bad", {"model.lr": {"distribution": "log_uniform_values", "min": "1e-5",
                                                     "max": 0.1}}, methd="grid")  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_sweep(bad)
    message = str(err.value)
    assert str(bad) in message and "wandb's messages" in message
    assert "Additional properties are not allowed ('methd' was unexpected)" in message  # jsonschema, via wandb
    assert "1.0e-5" in message  # the YAML 1.1 hint
    with pytest.raises(ConfigError, match="parameters.model.beta: null"):
        load_sweep(write_sweep(tmp_path, "nulls", {"model.beta": {"values": [0.1, None]}}))
    with pytest.raises(ConfigError, match="disallowed type with grid search"):  # wandb's grid refuses it
        load_sweep(write_sweep(tmp_path, "g", {"model.beta": {"min": 0.1, "max": 1.0}}))
    with pytest.raises(ConfigError, match="local bayes search .Optuna. supports only"):
        load_sweep(write_sweep(tmp_path, "b", {"x": {"distribution": "normal"}}, method="bayes"))


def test_check_prints_the_grid_in_wandbs_order_and_exits_2_on_an_invalid_file(tmp_path, capsys):
    path = write_sweep(tmp_path, "chk", {"b": {"values": [1, 2]}, "a": {"values": ["x", "y"]}})
    assert sweep.main(["--check", str(path)]) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines() if line.startswith("  ") and "=" in line]
    assert lines[:4] == ["0  a=x b=1", "1  a=x b=2", "2  a=y b=1", "3  a=y b=2"]  # sorted names, last fastest
    assert f"{sys.executable}" not in out and "python " in out  # the command as wandb agent runs it
    bad = write_sweep(tmp_path, "bad", {"x": {"min": 1, "max": 1}})
    assert sweep.main(["--check", str(bad)]) == 2
    assert "x: min 1 is not less than max 1" in capsys.readouterr().err  # wandb's own message
    assert not (tmp_path / "runs").exists()  # nothing ran


def _wandb_agent_command(spec, values: dict, json_file: str) -> list[str]:
    """What `wandb agent` runs, from wandb's own helpers and the substitution loop of wandb_agent.py."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars |= {"interpreter": ["python"], "program": [spec.program], "env": ["/usr/bin/env"]}
    sweep_vars["args_json_file"] = [json_file]
    out = []
    for chunk in sweep_utils.create_sweep_command(list(spec.command)):
        chunk = str(chunk)
        out += (sweep_vars.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return out


def _sample_values(spec) -> dict:
    return spec.with_constants(spec.grid()[-1] if spec.method == "grid" else spec.random_draws(0, 1)[0])


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_local_command_is_the_one_wandb_agent_builds(path):
    spec = load_sweep(path)
    values = _sample_values(spec)
    assert build_command(spec, values, local=False) == _wandb_agent_command(spec, values, "")
    local = build_command(spec, values)
    assert local[1:4] == [sys.executable, "-m", "dpo_lightning"]  # this venv, with or without bin/ on PATH


def test_every_agent_macro_expands_as_wandb_expands_it(tmp_path, monkeypatch):
    """${args_json_file}, the hydra forms, the no-equals / no-hyphens / no-boolean forms and ${envvar:...}."""
    macros = ["args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags", "args_json",
              "args_json_file", "args_append_hydra", "args_override_hydra"]  # fmt: skip
    command = ["${interpreter}", "${program}", "--home=${envvar:SWEEP_TEST_HOME}", *[f"${{{m}}}" for m in macros]]
    path = write_sweep(tmp_path, "macros", {"flag": {"values": [True, False]}, "lr": {"value": 0.5}}, command=command)
    monkeypatch.setenv("SWEEP_TEST_HOME", "/data")
    spec = load_sweep(path)
    values = spec.with_constants({"flag": False})
    json_file = tmp_path / "args.json"
    got = build_command(spec, values, local=False, args_json_file=json_file)
    assert got == _wandb_agent_command(spec, values, str(json_file))
    assert "--home=/data" in got and "+flag=False" in got and "++lr=0.5" in got
    assert got.count("--flag") == 1  # from ${args_no_equals} (--flag False); ${args_no_boolean_flags} drops it
    assert json.loads(json_file.read_text()) == {"flag": False, "lr": 0.5}
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from dpo_lightning.sweep_space import agent_macros

    for values in ({"a": True, "b": False, "c": 1e-05, "d": "x y", "e": None, "f": 3}, {}):
        assert agent_macros(values) == create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_cli_accepts_the_command_wandb_builds(path, capsys, monkeypatch):
    """The arguments wandb would pass parse in LightningCLI (--print_config parses and exits, runs nothing)."""
    from dpo_lightning.cli import main

    spec = load_sweep(path)
    values = _sample_values(spec)
    argv = _wandb_agent_command(spec, values, "")
    assert argv[:2] == ["/usr/bin/env", "dpo-lightning"]
    monkeypatch.chdir(ROOT)  # the files' --config paths are relative to the repository root
    monkeypatch.setattr(sys, "argv", ["dpo-lightning"])  # pytest's own arguments are not the CLI's
    with pytest.raises(SystemExit) as exit_:
        main(argv[2:] + ["--run.dir=/tmp/unused", "--print_config"])
    out = capsys.readouterr()
    assert exit_.value.code in (0, None), out.err[-2000:]
    printed = yaml.safe_load(out.out)
    assert printed["run"]["sweep"] == spec.name
    for key, value in values.items():
        section, name = key.split(".", 1) if "." in key else (key, None)
        got = printed[section][name] if name else printed[section]
        same = str(got) == str(value) or value == "label_noise"  # str: trainer.devices keeps "2" as text
        assert same or (isinstance(value, (int, float)) and float(got) == value), key  # 1 -> 1.0 in int | float


def test_a_sweep_trial_is_named_after_the_sweep_and_grouped_per_variant(monkeypatch):
    """Under `wandb agent` (WANDB_RUN_ID, WANDB_PROJECT set): <sweep>-<run id>, runs/sweeps/<sweep>/<run id>,
    group <sweep>-<loss>-beta<β>, the sweep in the tags, over tiny_cpu.yaml's run.name; '' means no group."""
    from dpo_lightning.cli import RunConfig
    from dpo_lightning.sweeping.identity import apply_sweep_defaults

    monkeypatch.setenv("WANDB_RUN_ID", "ab12cd34")
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    run = apply_sweep_defaults(RunConfig(name="tiny_cpu", sweep="label_noise", tags=["x"]), "cdpo", 0.1)
    assert (run.name, run.dir) == ("label_noise-ab12cd34", "runs/sweeps/label_noise/ab12cd34")
    assert (run.group, run.tags, run.wandb_project) == ("label_noise-cdpo-beta0.1", ["x", "label_noise"], "proj")
    assert apply_sweep_defaults(RunConfig(sweep="s", group=""), "dpo", 0.5).group is None


def test_build_loggers_names_a_sweep_trial_for_wandb(tmp_path, monkeypatch):
    """`--run.sweep` reaches WandbLogger: name, group, tags and the agent's project (arguments bound against
    WandbLogger's own signature)."""
    from dpo_lightning.cli import RunConfig, build_loggers

    seen = record_wandb_logger(monkeypatch)
    monkeypatch.setenv("WANDB_RUN_ID", "r1d2")
    monkeypatch.setenv("WANDB_PROJECT", "from-agent")
    _, run_dir = build_loggers(RunConfig(dir=str(tmp_path / "t"), name="tiny_cpu", sweep="ln"), "ipo", 0.5)
    assert (seen["name"], seen["group"], seen["tags"], seen["project"]) == ("ln-r1d2", "ln-ipo-beta0.5", ["ln"],
                                                                            "from-agent")  # fmt: skip
    assert seen["job_type"] == "ipo" and run_dir == str(tmp_path / "t")


# -- the runner, with fake trials --------------------------------------------------------------------------
def test_bayes_proposes_within_bounds_and_random_draws_are_wandbs(tmp_path, monkeypatch):
    """6 trials, 2 at a time. bayes: Optuna's TPE, whose model proposes (non-empty relative samples) once its
    2 start-up trials are done (startup = max(2, min(10, 6 // 3))). random: the values are wandb's draws."""
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
        assert sweep.main([str(path), "--out", str(out), "--workers", "2", "--seed", "3"]) == 0
        spec = load_sweep(path)
        done = records(out)
        assert [r["state"] for r in done] == ["complete"] * 6, done
        for r in done:
            for p in spec.params:
                assert p.contains(r["params"][p.name]), (method, p.name, r["params"][p.name])
            run_id = Path(r["run_dir"]).name
            assert (
                Path(r["run_dir"]).parent == out and r["run_id"] == run_id and run_id.startswith(f"{r['trial']:03d}-")
            )
            assert f"--run.dir={r['run_dir']}" in r["command"] and f"--run.name={method}-{run_id}" in r["command"]
            assert f"beta: {float(r['params']['model.beta'])}" in (Path(r["run_dir"]) / "config.yaml").read_text()
        assert len({r["params"]["model.beta"] for r in done}) == 6  # no replayed proposals
        assert (out / "summary.csv").read_text().count("\n") == 7
        if method == "bayes":
            assert any(n > 0 for n in modelled), "TPE never proposed from its model"
        else:
            assert modelled == [], "the random sweep used TPE"
            wandb_draws = spec.random_draws(3, 6)
            assert [{k: r["params"][k] for k in wandb_draws[0]} for r in done] == wandb_draws


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


def test_status_flags_a_running_trial_only_when_its_runner_on_this_host_is_gone(tmp_path, capsys):
    """Three running trials: this host's live runner (this process), a dead pid on this host, a runner on
    another machine sharing the folder. Only the second is cut off; the third is not this host's to judge."""
    from dpo_lightning.sweeping.processes import identity

    path = write_sweep(tmp_path, "st", {"x": {"values": [0, 1, 2]}})
    out = tmp_path / "st"
    gone = identity() | {"start": -1}  # this pid, another start time: the recorded runner process has ended
    runners = [identity(), gone, {"host": "another-machine", "pid": 1, "start": 1}]
    for number, runner in enumerate(runners):
        (out / f"{number:03d}-abcde").mkdir(parents=True)
        record = {"trial": number, "state": "running", "value": None, "params": {"x": number}, "runner": runner,
                  "duration_s": None, "run_dir": str(out / f"{number:03d}-abcde")}  # fmt: skip
        (out / f"{number:03d}-abcde" / "trial.json").write_text(json.dumps(record))
    assert sweep.main([str(path), "--out", str(out), "--status"]) == 0
    assert "No runner on this host follows trial(s) 001:" in capsys.readouterr().out


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


def test_sighup_then_resume_runs_only_the_remaining_trials(tmp_path):
    """A terminal hang-up (SIGHUP) ends the running trial's process group and records it as interrupted;
    the same command then runs what is left: the interrupted trial again, the finished one never."""
    record = tmp_path / "starts.jsonl"
    parameters = {"fake.sleep": {"value": 0.5}, "fake.record": {"value": str(record)}, "x": {"values": [0, 1, 2]}}
    path = write_sweep(tmp_path, "resumable", parameters)
    out = tmp_path / "resumable"
    argv = [sys.executable, "-m", "dpo_lightning", "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len([r for r in records(out) if r["state"] == "running"]) < 1 or len(records(out)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.1)  # trial 000 done, 001 started
    pgid = records(out)[1]["pgid"]
    proc.send_signal(signal.SIGHUP)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, output
    assert "SIGHUP" in output and "run the same command to resume" in output
    assert [r["state"] for r in records(out)] == ["complete", "interrupted"]
    with pytest.raises(ProcessLookupError):
        import os

        os.killpg(pgid, 0)  # the trial's process group is gone

    assert sweep.main([str(path), "--out", str(out)]) == 0
    starts = [json.loads(line)["x"] for line in record.read_text().splitlines()]
    assert sorted(starts) == ["0", "1", "1", "2"]  # 0 ran once, the interrupted 1 again, then 2
    assert [r["state"] for r in records(out)] == ["complete", "interrupted", "complete", "complete"]
    assert sweep.main([str(path), "--out", str(out)]) == 0  # nothing left: runs nothing
    assert len(record.read_text().splitlines()) == 4


def test_a_second_stop_while_trials_end_ends_them_at_once_and_still_records_them(tmp_path, monkeypatch):
    """A stop once 2 trials run, then a second one (KeyboardInterrupt, as the handler raises it) during the
    first trial's grace: that trial and the next are ended with no grace, both recorded as interrupted."""
    from dpo_lightning.sweeping import processes
    from dpo_lightning.sweeping.runner import Runner

    graces, real_terminate, real_launch = [], processes.terminate, Runner.launch

    def terminate(proc, grace=processes.KILL_GRACE_S):
        graces.append(grace)
        if len(graces) == 1:
            raise KeyboardInterrupt  # the second Ctrl-C
        real_terminate(proc, grace)

    def launch(self, trial):
        real_launch(self, trial)
        self.stop_requested = len(self.running) == 2  # the first Ctrl-C, once both trials run

    monkeypatch.setattr(processes, "terminate", terminate)
    monkeypatch.setattr(Runner, "launch", launch)
    path = write_sweep(tmp_path, "hurry", {"fake.sleep": {"value": 30}, "x": {"values": [0, 1]}})
    started = time.monotonic()
    try:
        code = sweep.main([str(path), "--out", str(tmp_path / "hurry"), "--workers", "2"])
    except KeyboardInterrupt:
        for r in records(tmp_path / "hurry"):
            processes.end_group(r["pgid"], None, grace=0.0)
        pytest.fail("the second stop escaped the runner: its trials were left running, unrecorded")
    assert code == 130 and graces == [processes.KILL_GRACE_S, 0.0, 0.0]
    assert [r["state"] for r in records(tmp_path / "hurry")] == ["interrupted", "interrupted"]
    assert time.monotonic() - started < processes.KILL_GRACE_S


def test_max_trials_takes_the_first_grid_points_and_a_larger_budget_the_next(tmp_path):
    path = write_sweep(tmp_path, "cap", {"x": {"values": [2, 0, 1]}})
    assert sweep.main([str(path), "--out", str(tmp_path / "cap"), "--max-trials", "2", "--poll", "0.05"]) == 0
    assert [r["params"]["x"] for r in records(tmp_path / "cap")] == [2, 0]
    assert sweep.main([str(path), "--out", str(tmp_path / "cap"), "--poll", "0.05"]) == 0
    assert [r["params"]["x"] for r in records(tmp_path / "cap")] == [2, 0, 1]


def test_runner_refuses_a_changed_file_and_an_endless_random_sweep(tmp_path, capsys):
    path = write_sweep(tmp_path, "s", {"x": {"values": [0]}})
    assert sweep.main([str(path), "--out", str(tmp_path / "s")]) == 0
    stored = (tmp_path / "s" / "sweep.yaml").read_text()
    write_sweep(tmp_path, "s", {"x": {"values": [0, 1]}})
    assert sweep.main([str(path), "--out", str(tmp_path / "s")]) == 2
    assert "differs from the file the stored sweep" in capsys.readouterr().err
    assert (tmp_path / "s" / "sweep.yaml").read_text() == stored != path.read_text()  # compare reads this copy
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
                      "tests/fixtures/sweep_tiny.yaml", "--config", str(data), f"--run.sweep={name}",
                      "${args}"]  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_grid_sweep_of_real_trials_end_to_end_then_compare(tmp_path, monkeypatch):
    """The first 2 real trials of loss_variants.yaml (dpo, ipo), side by side, offline; then `compare` on the sweep
    folder. (The order and count of the whole grid are wandb's: test_sweep_engine.)"""
    monkeypatch.chdir(ROOT)
    path = _real_sweep(tmp_path, ROOT / "sweeps" / "loss_variants.yaml", "tiny_grid")
    out = tmp_path / "tiny_grid"
    assert sweep.main([str(path), "--out", str(out), "--workers", "2", "--max-trials", "2"]) == 0
    done = records(out)
    assert [r["state"] for r in done] == ["complete"] * 2, [r.get("log_tail") for r in done]
    assert [r["params"]["model.loss"] for r in done] == ["dpo", "ipo"]  # loss is the only swept axis
    for r in done:
        run_dir = Path(r["run_dir"])
        assert f"loss: {r['params']['model.loss']}" in (run_dir / "config.yaml").read_text()
        assert f"name: tiny_grid-{r['run_id']}" in (run_dir / "config.yaml").read_text()
        assert "val/rewards/accuracies" in (run_dir / "metrics.csv").read_text()
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and summary[0].startswith("rank,trial,state,val/rewards/accuracies")

    from dpo_lightning.compare import main as compare

    assert compare([str(out), "--out", str(out / "compare")]) == 0
    assert (out / "compare" / "rewards_margins.png").stat().st_size > 10_000
    assert (out / "compare" / "index.html").read_text().count("tiny_grid/00") >= 2


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
