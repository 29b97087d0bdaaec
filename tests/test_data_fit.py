"""Every format trains through `dpo-lightning fit` (cli.main in this process: the command's code, without a fresh
interpreter each time; test_cli.py runs fit as a subprocess once), and bad data fails cleanly."""

import csv
import json

import pytest

from fixtures.data_cases import chat_rows, explicit_rows, hh_rows, mapped_rows
from helpers import cli_main, write_jsonl

FORMATS = {
    "explicit": (explicit_rows, []),
    "hh": (hh_rows, []),
    "chat": (chat_rows, []),
    "columns": (mapped_rows, ["--data.columns", "{prompt: instruction, chosen: better, rejected: worse}"]),
}


def _fit(tmp_path, data_file, *extra: str):
    return cli_main(
        "fit",
        "--config",
        "experiments/tiny_cpu.yaml",
        "--data.train_files",
        str(data_file),
        "--data.hub_fallback",
        "null",
        "--data.val_fraction",
        "0.25",
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--run.wandb",
        "false",
        "--run.dir",
        str(tmp_path / "run"),
        *extra,
    )


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_trains_through_fit(tmp_path, fmt):
    rows_fn, extra = FORMATS[fmt]
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", rows_fn(48))
    result = _fit(tmp_path, data, "--data.format", "explicit" if fmt == "columns" else fmt, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.csv") as f:
        losses = [r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")]
    assert losses, "no training step logged"
    audit = json.loads((tmp_path / "run" / "data_audit.json").read_text())
    assert audit["splits"]["train"]["records"] == 48 and audit["splits"]["train"]["bad_records"] == 0


def test_bad_record_fails_fit_with_one_clear_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in explicit_rows(5)]
    lines[3] = '{"prompt": "a", "chosen": '
    data.write_text("\n".join(lines) + "\n")
    result = _fit(tmp_path, data, "--data.format", "explicit", "--data.on_bad_row", "error")
    assert result.returncode == 2
    assert f"dpo-lightning: error: {data}, line 4: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_fit_without_a_validation_split(tmp_path):
    """data.val_fraction: 0 trains with no validation loop (before the fix: a datasets ValueError traceback)."""
    data = write_jsonl(tmp_path / "p.jsonl", explicit_rows(24))
    result = _fit(tmp_path, data, "--data.format", "explicit", "--data.val_fraction", "0")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows) and not any(r.get("val/loss") for r in rows)
