"""Differential tests: the local runner against wandb's own sweep engine, the `sweeps` package.

Each test asks `sweeps` directly (not through dpo_lightning.sweeping.engine) and compares: the verdict on
an edge-case corpus of sweep files, the order and count of a grid the runner ran, the values of random
draws, and the trials hyperband stopped, replayed on the histories the runner recorded.
"""

import random
import warnings

import pytest
import yaml
from test_sweep import records, write_sweep

from dpo_lightning import sweep
from dpo_lightning.sweep_space import load_sweep, schema_violations

from helpers import ROOT

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sweeps.random_search import random_search_next_runs

    import sweeps

ROOT_SWEEPS = ROOT / "sweeps"
P = {"x": {"values": [1, 2]}}  # a valid parameters block
M = {"name": "val/loss", "goal": "minimize"}
HB = {"type": "hyperband"}
Q = {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25}


def rnd(x: dict) -> dict:
    return {"method": "random", "parameters": {"x": x}}


def hb(**stop) -> dict:
    return {"method": "grid", "metric": M, "early_terminate": HB | stop, "parameters": P}


CORPUS = [  # (id, config)
    ("grid", {"method": "grid", "parameters": P}),
    ("random", rnd({"min": 0.0, "max": 1.0})),
    ("bayes", {"method": "bayes", "metric": M, "parameters": {"x": {"min": 0.0, "max": 1.0}}}),
    ("bayes-no-metric", {"method": "bayes", "parameters": {"x": {"min": 0.0, "max": 1.0}}}),
    ("no-method", {"parameters": P}),
    ("bad-method", {"method": "anneal", "parameters": P}),
    ("no-parameters", {"method": "grid"}),
    ("unknown-key", {"method": "grid", "paramters": P, "parameters": P}),
    ("log_uniform-deprecated", rnd({"distribution": "log_uniform", "min": -5, "max": 0})),
    ("q_log_uniform-deprecated", rnd({"distribution": "q_log_uniform", "min": 0, "max": 3})),
    ("log_uniform_values", rnd({"distribution": "log_uniform_values", "min": 1e-4, "max": 1.0})),
    ("log_uniform_values-min0", rnd({"distribution": "log_uniform_values", "min": 0.0, "max": 1.0})),
    ("min-equals-max", rnd({"min": 1.0, "max": 1.0})),
    ("min-above-max", rnd({"min": 2, "max": 1})),
    ("min-as-text", rnd({"min": "1e-5", "max": 0.1})),
    ("probabilities-sum-1", rnd({"values": [1, 2], "probabilities": [0.25, 0.75]})),
    ("probabilities-not-1", rnd({"values": [1, 2], "probabilities": [0.5, 0.6]})),
    ("probabilities-length", rnd({"values": [1, 2], "probabilities": [1.0]})),
    ("probabilities-in-grid", {"method": "grid", "parameters": {"x": {"values": [1, 2], "probabilities": [0.5, 0.5]}}}),
    ("metric-and-metrics", {"method": "grid", "metric": M, "metrics": [M], "parameters": P}),
    ("metrics-without-custom", {"method": "grid", "metrics": [M], "parameters": P}),
    ("metric-bad-goal", {"method": "grid", "metric": {"name": "a", "goal": "up"}, "parameters": P}),
    ("metric-no-name", {"method": "grid", "metric": {"goal": "minimize"}, "parameters": P}),
    ("hb-min_iter", hb(min_iter=1)),
    ("hb-max_iter-s", hb(max_iter=27, s=2)),
    ("hb-max_iter-0-s", hb(max_iter=0, s=2)),
    ("hb-min-and-max-no-s", hb(min_iter=1, max_iter=9)),
    ("hb-eta-1", hb(min_iter=1, eta=1)),
    ("hb-min_iter-0", hb(min_iter=0)),
    ("hb-neither", hb(eta=3)),
    ("hb-no-metric", {"method": "grid", "early_terminate": HB | {"min_iter": 1}, "parameters": P}),
    ("hb-bad-type", hb(min_iter=1) | {"early_terminate": {"type": "median", "min_iter": 1}}),
    ("grid-uniform", {"method": "grid", "parameters": {"x": {"min": 0.0, "max": 1.0}}}),
    ("grid-int_uniform", {"method": "grid", "parameters": {"x": {"min": 0, "max": 3}}}),
    ("grid-q_uniform", {"method": "grid", "parameters": {"x": Q}}),
    ("grid-q_uniform-no-min", {"method": "grid", "parameters": {"x": {k: v for k, v in Q.items() if k != "min"}}}),
    ("normal", rnd({"distribution": "normal", "mu": 0.0, "sigma": 1.0})),
    ("beta-dist", rnd({"distribution": "beta", "a": 2.0, "b": 3.0})),
    ("empty-values", {"method": "grid", "parameters": {"x": {"values": []}}}),
    ("constant-only", {"method": "grid", "parameters": {"x": {"value": 1}}}),
    ("run_cap-0", {"method": "random", "run_cap": 0, "parameters": {"x": {"min": 0.0, "max": 1.0}}}),
    ("command-not-list", {"method": "grid", "command": "python train.py", "parameters": P}),
    ("nested", {"method": "grid", "parameters": {"model": {"parameters": {"beta": {"values": [0.1, 0.5]}}}}}),
]  # fmt: skip


def wandb_accepts(cfg: dict) -> bool:
    """Ground truth from `sweeps` itself: its schema accepts the file and its algorithms then run on it
    (one proposal; hyperband on a running trial with one value)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if sweeps.schema_violations_from_proposed_config(cfg):
                return False
            sweeps.next_runs(cfg, [], validate=True)
            if "early_terminate" in cfg:
                run = sweeps.SweepRun(name="a", state=sweeps.RunState.running, history=[{"val/loss": 1.0}])
                sweeps.stop_runs(cfg, [run], validate=True)
        except Exception:
            return False
    return True


def test_the_corpus_is_large_enough_and_mixed():
    verdicts = [wandb_accepts(cfg) for _, cfg in CORPUS]
    assert len(CORPUS) >= 36 and 10 <= sum(verdicts) <= len(CORPUS) - 10


@pytest.mark.parametrize("cfg", [c for _, c in CORPUS], ids=[i for i, _ in CORPUS])
def test_validation_verdicts_agree_with_wandbs_engine(cfg):
    ours = schema_violations(cfg)
    assert (ours == []) == wandb_accepts(cfg), ours
    if ours:  # and an invalid file is told with wandb's own schema messages when its schema is the reason
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                theirs = sweeps.schema_violations_from_proposed_config(cfg)
            except ValueError as err:
                theirs = [str(err)]
        assert set(theirs) <= set(ours)


def _wandb_grid(cfg: dict) -> list[dict]:
    """The grid as wandb's server proposes it: one next_run at a time, told of the runs so far."""
    runs, out = [], []
    while (run := sweeps.next_run(cfg, runs, validate=True)) is not None:
        runs.append(run)
        out.append({k: v["value"] for k, v in run.config.items()})
    return out


def test_grid_order_and_count_of_a_runner_sweep_are_wandbs(tmp_path):
    """A grid over a q_uniform axis (wandb: numpy.arange(min, max, q), max excluded: 3 points, not 4) and a
    categorical written after it; wandb sorts parameters by name (a_loss before q) and varies the last fastest."""
    parameters = {"q": {"distribution": "q_uniform", "min": 0.0, "max": 0.75, "q": 0.25},
                  "a_loss": {"values": ["ipo", "dpo"]}, "fake.steps": {"value": 1}}  # fmt: skip
    path = write_sweep(tmp_path, "g", parameters)
    assert sweep.main([str(path), "--out", str(tmp_path / "g"), "--poll", "0.05"]) == 0
    ran = [{k: r["params"][k] for k in ("a_loss", "fake.steps", "q")} for r in records(tmp_path / "g")]
    expected = _wandb_grid(yaml.safe_load(path.read_text()))
    assert len(ran) == 6 and ran == expected, (ran, expected)


def test_random_draws_are_wandbs_for_the_seed(tmp_path):
    cfg = {"method": "random", "parameters": {
        "b": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1.0},
        "a": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.1},
        "n": {"distribution": "normal", "mu": 0.0, "sigma": 1.0}, "c": {"values": ["x", "y", "z"]}}}  # fmt: skip
    state = random.getstate()
    random.seed(7)
    theirs = [{k: v["value"] for k, v in r.config.items()} for r in random_search_next_runs(cfg, n=12)]
    random.setstate(state)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    spec_draws = load_sweep(tmp_path / "s.yaml").random_draws(7, 12)
    assert spec_draws == theirs
    assert {round(d["a"] / 0.1, 9) % 1 for d in spec_draws} == {0.0}  # q_uniform: multiples of q, not min + k·q


HISTORIES = ["3,2,1,1", "2.5,2.5,2.5,2.5", "0.5,3,5,0", "4,4,4,4", "2,1.5,0.8,0.7"]  # val/loss per iteration
PLAYBACK = (  # a trial that logs its history h one value every 0.15 s
    "import sys,time,pathlib;a=dict(x[2:].split('=',1) for x in sys.argv[1:]);p=pathlib.Path(a['run.dir'],'m.csv');"
    "f=open(pathlib.Path(a['run.dir'],'metrics.csv'),'w');f.write('step,val/loss\\n');"
    "[(f.write(f'{i},{v}\\n'),f.flush(),time.sleep(0.15)) for i,v in enumerate(a['h'].split(','))]"
)


def test_hyperband_stops_are_wandbs_on_the_recorded_histories(tmp_path):
    """5 trials one after another, 4 iterations each, planted histories; rungs at 1 and 3 (min_iter 1, eta 3).
    Replaying wandb's stop_runs over the histories the runner recorded — each trial judged after each of its
    iterations, against the trials before it — gives the same stops at the same iterations. The third trial is
    stopped only by wandb's default strict rule (its value at the rung, 5, trails; its best so far, 0.5, not)."""
    stop = {"type": "hyperband", "min_iter": 1, "eta": 3}
    command = ["${interpreter}", "-c", PLAYBACK, "${args}"]
    path = write_sweep(tmp_path, "hb", {"h": {"values": HISTORIES}}, early_terminate=stop, command=command)
    out = tmp_path / "hb"
    assert sweep.main([str(path), "--out", str(out), "--poll", "0.05"]) == 0
    import optuna

    study = optuna.load_study(study_name="hb", storage=f"sqlite:///{out / 'study.db'}")
    recorded = [[v for _, v in sorted(t.intermediate_values.items())] for t in study.trials]
    planted = [[float(v) for v in h.split(",")] for h in HISTORIES]
    assert [h[: len(r)] for h, r in zip(planted, recorded, strict=True)] == recorded  # prefixes, in order
    cfg = yaml.safe_load(path.read_text())
    expected, finished = [], []
    for i, history in enumerate(recorded):
        stopped_at = None
        for k in range(1, len(history) + 1):
            running = sweeps.SweepRun(name="me", state=sweeps.RunState.running,
                                      history=[{"val/loss": v} for v in history[:k]])  # fmt: skip
            if sweeps.stop_runs(cfg, [*finished, running]):
                stopped_at = k
                break
        expected.append(("pruned", stopped_at) if stopped_at else ("complete", 4))
        finished.append(sweeps.SweepRun(name=str(i), state=sweeps.RunState.finished,
                                        history=[{"val/loss": v} for v in history]))  # fmt: skip
    got = [(r["state"], r["iterations"]) for r in records(out)]
    assert got == expected == [("complete", 4), ("pruned", 3), ("pruned", 3), ("pruned", 1), ("complete", 4)]


def _objective(beta: float, lr: float) -> float:
    """A synthetic val/rewards/accuracies-like objective on beta_lr.yaml's space, best (0) at β=0.1, lr=5e-4."""
    import math

    return -((math.log10(beta) + 1) ** 2) - math.log10(lr / 5e-4) ** 2


def _bayes_bests(seed: int, trials: int = 20) -> tuple[list[float], list[float]]:
    """Best-so-far curves of Optuna TPE (as the runner configures it) and of wandb's GP bayes."""
    import numpy as np
    import optuna
    from sweeps.bayes_search import bayes_search_next_run

    from dpo_lightning.sweeping.runner import distribution

    spec = load_sweep(ROOT_SWEEPS / "beta_lr.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                         n_startup_trials=max(2, min(10, trials // 3)))  # fmt: skip
    study = optuna.create_study(direction="maximize", sampler=sampler)
    dists = {p.name: distribution(p) for p in spec.swept}
    ours = []
    for _ in range(trials):
        t = study.ask(dists)
        study.tell(t, _objective(t.params["model.beta"], t.params["model.lr"]))
        ours.append(study.best_value)
    cfg = yaml.safe_load((ROOT_SWEEPS / "beta_lr.yaml").read_text())
    cfg.pop("early_terminate")
    states = random.getstate(), np.random.get_state()  # wandb's bayes draws from the global generators
    random.seed(seed)
    np.random.seed(seed)
    try:
        runs, theirs, best = [], [], -1e9
        for i in range(trials):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = bayes_search_next_run(runs, cfg, validate=True)
            values = {k: v["value"] for k, v in run.config.items()}
            value = _objective(float(values["model.beta"]), float(values["model.lr"]))
            runs.append(sweeps.SweepRun(name=str(i), state=sweeps.RunState.finished, config=run.config,
                                        summary_metrics={cfg["metric"]["name"]: value}))  # fmt: skip
            best = max(best, value)
            theirs.append(best)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    return ours, theirs


@pytest.mark.slow
def test_bayes_optuna_and_wandb_both_find_the_optimum_region_of_a_synthetic_objective(capsys):
    """Measured, not identical: 20 trials, 5 seeds, best value found (0 is the optimum). Both must come
    within 0.1 of it on average; the numbers are printed for the README."""
    rows = [_bayes_bests(seed) for seed in range(5)]
    ours = [r[0] for r in rows]
    theirs = [r[1] for r in rows]
    mean = lambda curves, k: sum(c[k - 1] for c in curves) / len(curves)  # noqa: E731
    with capsys.disabled():
        for k in (5, 10, 20):
            print(f"after {k:2d} trials: optuna TPE best {mean(ours, k):.4f}, wandb bayes best {mean(theirs, k):.4f}")
    assert mean(ours, 20) > -0.1 and mean(theirs, 20) > -0.1
