"""`dpo-lightning compare` (dpo_lightning/compare.py, comparing/): charts, pages and tables from runs' CSV logs."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_lightning.compare import main
from dpo_lightning.comparing.charts import LOSS_COLOURS, final_points, styles
from dpo_lightning.comparing.runs import find_runs, read_metrics_csv
from dpo_lightning.comparing.stats import mean_ci, variants

from helpers import ROOT

FAKE = ROOT / "tests" / "fixtures" / "sweep_fake_trial.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir: Path, loss: str, beta: float, steps: int = 5) -> Path:
    """A finished run folder (metrics.csv + config.yaml), written by the sweep tests' stand-in trainer."""
    flags = [f"--model.loss={loss}", f"--model.beta={beta}", f"--fake.steps={steps}", f"--run.dir={run_dir}"]
    subprocess.run([sys.executable, str(FAKE), *flags], check=True, capture_output=True)
    return run_dir


def last_value(run_dir: Path, column: str) -> float:
    with open(run_dir / "metrics.csv") as f:
        return [float(r[column]) for r in csv.DictReader(f) if r[column]][-1]


def test_compare_two_runs_writes_charts_page_and_final_table(tmp_path):
    a = fake_run(tmp_path / "runs" / "dpo_run", "dpo", 0.1)
    b = fake_run(tmp_path / "runs" / "ipo_run", "ipo", 0.5, steps=3)
    out = tmp_path / "report"
    assert main([str(a), str(b), "--out", str(out)]) == 0

    import matplotlib.image

    for stem in ("loss", "rewards_margins", "rewards_accuracies", "logps_chosen", "shadow_losses"):
        png = out / f"{stem}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, stem
        height, width, _ = matplotlib.image.imread(png).shape
        assert width >= 500 and height >= 300, (stem, width, height)

    with open(out / "final_metrics.csv") as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert set(table) == {"dpo_run", "ipo_run"}
    for name, run_dir in (("dpo_run", a), ("ipo_run", b)):
        for column in ("train/loss", "val/rewards/accuracies", "train/shadow/ipo"):
            assert float(table[name][column]) == pytest.approx(last_value(run_dir, column))
    assert table["ipo_run"]["loss"] == "ipo" and float(table["ipo_run"]["beta"]) == 0.5
    assert table["ipo_run"]["last_step"] == "3"

    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 6  # self-contained: images inlined (+ final vs beta)
    assert "dpo_run" in page and "ipo_run" in page
    assert f"{last_value(b, 'val/rewards/accuracies'):.4g}" in page  # the final-values table
    report = (out / "report.md").read_text()
    assert "| run | loss | beta |" in report and "![rewards_margins](rewards_margins.png)" in report


def test_compare_finds_sweep_trials_and_nested_csv_logs(tmp_path):
    sweep_dir = tmp_path / "sweeps" / "demo"
    for number, loss in enumerate(("dpo", "cdpo")):
        trial_dir = sweep_dir / f"{number:03d}-abcde"
        fake_run(trial_dir / "csv" / "version_0", loss, 0.1)  # a CSVLogger that nests its file
        (trial_dir / "csv" / "version_0" / "config.yaml").rename(trial_dir / "config.yaml")
        record = {"trial": number, "sweep": "demo", "state": "complete" if number == 0 else "pruned",
                  "params": {"model.loss": loss, "model.beta": 0.1, "data.label_noise": 0.1 * number,
                             "model.label_smoothing": 0.1}}  # fmt: skip
        (trial_dir / "trial.json").write_text(json.dumps(record))
    runs = find_runs([str(sweep_dir)])
    assert [(r.label, r.loss, r.state) for r in runs] == [("demo/000", "dpo", "complete"),
                                                          ("demo/001", "cdpo", "pruned")]  # fmt: skip
    assert runs[1].extras == {"data.label_noise": 0.1}  # what varies between the runs; not the constant ε
    assert runs[0].path == sweep_dir / "000-abcde"
    assert main([str(sweep_dir), "--out", str(tmp_path / "out"), "--smooth", "0.5"]) == 0
    assert "label_noise" in (tmp_path / "out" / "final_metrics.csv").read_text().splitlines()[0]


def test_styles_colour_by_loss_and_dash_by_the_rest_of_the_variant(tmp_path):
    runs = [
        *find_runs([str(fake_run(tmp_path / "a", "dpo", 0.1, steps=1))]),
        *find_runs([str(fake_run(tmp_path / "b", "ipo", 0.5, steps=1))]),
        *find_runs([str(fake_run(tmp_path / "c", "dpo", 0.5, steps=1))]),
    ]
    got = styles(variants(runs))
    assert [s["color"] for s in got] == [LOSS_COLOURS["dpo"], LOSS_COLOURS["ipo"], LOSS_COLOURS["dpo"]]
    assert got[0]["linestyle"] != got[1]["linestyle"] == got[2]["linestyle"]  # β=0.1 vs β=0.5


def test_mean_ci_is_the_t_interval():
    """[1, 2, 3]: mean 2, s = 1, t(0.975, 2) = 4.3027 -> half-width 4.3027 / √3 = 2.4841; one value: no band."""
    mean, half = mean_ci([3.0, 1.0, 2.0])
    assert mean == pytest.approx(2.0) and half == pytest.approx(2.4841, abs=1e-4)
    assert mean_ci([0.5]) == (0.5, 0.0)


def _seeded_sweep(folder: Path) -> Path:
    """A label_noise-like sweep folder: 2 losses x 2 noise levels x 2 seeds, finals planted in metrics.csv."""
    finals = {}
    for i, (loss, noise, seed) in enumerate((lo, n, s) for lo in ("dpo", "cdpo") for n in (0.0, 0.2) for s in (0, 1)):
        acc = {"dpo": 0.9, "cdpo": 0.8}[loss] - noise * (2 if loss == "dpo" else 0.5) + 0.02 * seed
        run_dir = folder / f"{i:03d}-abcde"
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.csv").write_text(f"step,val/rewards/accuracies\n1,0.5\n2,{acc}\n")
        (run_dir / "config.yaml").write_text(f"model:\n  loss: {loss}\n  beta: 0.1\n")
        params = {"model.loss": loss, "model.beta": 0.1, "data.label_noise": noise, "seed_everything": seed}
        record = {"trial": i, "sweep": "ln", "state": "complete", "params": params}
        (run_dir / "trial.json").write_text(json.dumps(record))
        finals.setdefault((loss, noise), []).append(acc)
    (folder / "sweep.yaml").write_text("metric: {name: val/rewards/accuracies}\n")
    return folder


def test_seeds_make_one_variant_and_final_vs_noise_has_one_line_per_loss(tmp_path):
    """Seeds 0 and 1 of a point: one variant whose curve is their mean; final accuracy vs flip rate per loss:
    dpo 0.9 - 2·noise, cdpo 0.8 - 0.5·noise, + 0.02·seed, so means +0.01 and half-width t(0.975,1)·0.01/√2."""
    folder = _seeded_sweep(tmp_path / "ln")
    runs = find_runs([str(folder)])
    groups = variants(runs)
    assert len(groups) == 4 and all(len(g.runs) == 2 for g in groups)
    steps, mean, half = groups[0].curve("val/rewards/accuracies")
    assert steps == [1.0, 2.0] and mean == pytest.approx([0.5, 0.91]) and half[0] == 0.0
    half_width = 12.7062 * (0.02 / 2**0.5) / 2**0.5  # s of {a, a+0.02} = 0.02/√2
    points = final_points(runs, "data.label_noise", "val/rewards/accuracies")
    assert list(points) == ["dpo", "cdpo"]
    assert [(x, round(m, 6), n) for x, m, _, n in points["dpo"]] == [(0.0, 0.91, 2), (0.2, 0.51, 2)]
    assert [(x, round(m, 6)) for x, m, _, _ in points["cdpo"]] == [(0.0, 0.81), (0.2, 0.71)]
    assert points["dpo"][0][2] == pytest.approx(half_width, rel=1e-3)
    out = tmp_path / "report"
    assert main([str(folder), "--out", str(out)]) == 0
    assert (out / "final_vs_params.png").stat().st_size > 10_000
    page = (out / "index.html").read_text()
    assert "mean ± 95% CI" in page and "0.91 ± " in page  # the variants table
    assert "seed_everything" in (out / "final_metrics.csv").read_text().splitlines()[0]


def test_read_metrics_csv_skips_empty_cells_and_a_row_being_written(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss,val/loss\n0,0,0.69,\n0,1,,0.70\n0,1,0.6")  # last row unfinished
    assert read_metrics_csv(path) == {"epoch": [(0.0, 0.0), (1.0, 0.0)], "train/loss": [(0.0, 0.69)],
                                      "val/loss": [(1.0, 0.70)]}  # fmt: skip


def test_compare_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'empty'}: no metrics.csv below it" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such run or sweep folder" in capsys.readouterr().err
