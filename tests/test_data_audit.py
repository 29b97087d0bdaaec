"""The data audit (report, files, thresholds) and the caches that let a second run skip tokenization."""

import json

import pytest
import yaml

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.data import cache as data_cache
from dpo_lightning.data import tokenize as data_tokenize
from dpo_lightning.data.audit import main as audit_main
from dpo_lightning.data.tokenize import tokenizer_fingerprint
from dpo_lightning.errors import DataError
from dpo_lightning.tokenizer import train_bpe_tokenizer

from conftest import ROOT, synthetic_pairs, write_jsonl


def _dm(path, tokenizer=None, **kwargs) -> PreferenceDataModule:
    kwargs = {"format": "explicit", "max_length": 64, "max_prompt_length": 32, "val_fraction": 0.25, **kwargs}
    dm = PreferenceDataModule(str(path), **kwargs)
    if tokenizer is not None:
        dm._tokenizer = tokenizer
    return dm


def _never(*args, **kwargs):
    raise AssertionError("called although the result is cached")


def test_second_load_hits_the_cache_and_any_change_retokenizes(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(40))
    first = _dm(path, tiny_tokenizer)
    first.setup()
    assert first.from_cache == {"train": False}
    with monkeypatch.context() as patch:
        patch.setattr(data_tokenize, "tokenize_rows", _never)  # the map must not run again
        second = _dm(path, tiny_tokenizer)
        second.setup()
    assert second.from_cache == {"train": True} and second.report["splits"]["train"]["from_cache"]
    assert list(second.datasets["train"]["chosen_input_ids"]) == list(first.datasets["train"]["chosen_input_ids"])
    other_tokenizer = train_bpe_tokenizer([r["prompt"] + r["chosen"] for r in synthetic_pairs(200)], vocab_size=280)
    for changed in (
        _dm(path, tiny_tokenizer, max_length=48),
        _dm(path, tiny_tokenizer, truncation_mode="keep_start"),
        _dm(path, other_tokenizer),
    ):
        changed.setup()
        assert changed.from_cache == {"train": False}
    write_jsonl(path, synthetic_pairs(40, seed=1))  # same file, other data
    edited = _dm(path, tiny_tokenizer)
    edited.setup()
    assert edited.from_cache == {"train": False}


def test_trained_tokenizer_is_cached_by_data_and_vocab(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(60))
    first = _dm(path, tokenizer_vocab_size=320)
    first.setup()
    with monkeypatch.context() as patch:
        patch.setattr(data_cache, "train_bpe_tokenizer", _never)
        second = _dm(path, tokenizer_vocab_size=320)
        second.setup()
    assert tokenizer_fingerprint(second.tokenizer) == tokenizer_fingerprint(first.tokenizer)
    assert second.from_cache == {"train": True}
    other = _dm(path, tokenizer_vocab_size=300)
    assert tokenizer_fingerprint(other.tokenizer) != tokenizer_fingerprint(first.tokenizer)


def test_truncation_threshold_fails_setup_fast(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(24))
    dm = _dm(path, tiny_tokenizer, max_length=12, max_prompt_length=8, max_truncation_rate=0.2)
    with pytest.raises(DataError, match=r"data audit: train chosen truncation rate 1.000 > data.max_truncation_rate"):
        dm.setup()


def _config(tmp_path, data: dict) -> str:
    """A fit-style config: the audit reads its data section and ignores the rest."""
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 5, "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]},
        "model": {"policy_config": {"model_type": "gpt2"}, "loss": "ipo"},
        "data": {"format": "explicit", "tokenizer_vocab_size": 300, "max_length": 64, "max_prompt_length": 32, **data},
        "run": {"name": "audit-test", "wandb": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_audit_command_prints_and_writes_the_report(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(60) + [{"prompt": "p", "chosen": " x", "rejected": " x"}])
    config = _config(tmp_path, {"train_files": str(path), "on_bad_row": "skip"})
    assert audit_main(["--config", config, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "Data audit" in printed and "bad identical_responses: 1" in printed and "padding" in printed
    report = json.loads((tmp_path / "out" / "data_audit.json").read_text())
    train = report["splits"]["train"]
    assert train["records"] == 61 and train["bad_records"] == 1 and train["pairs"] == 60
    assert set(train["tokens"]["chosen"]) == {"p50", "p90", "p99", "max", "mean"}
    assert set(train["truncation_rate"]) == {"prompt", "chosen", "rejected"}
    assert {"mean", "median", "chosen_longer", "rejected_longer"} <= set(train["length_gap"])
    assert report["padding"]["grouped"] <= report["padding"]["random"]
    assert report["pairs"]["train"] + report["pairs"]["val"] == 60
    assert (tmp_path / "out" / "data_lengths.png").stat().st_size > 1000
    # a command-line override crossing a threshold: reported, exit status 1
    args = ["--config", config, "--data.max_length", "12", "--data.max_prompt_length", "8"]
    assert audit_main([*args, "--data.max_truncation_rate", "0.5", "--run.dir", str(tmp_path / "run")]) == 1
    assert "thresholds crossed: train chosen truncation rate" in capsys.readouterr().out
    assert (tmp_path / "run" / "data_audit.json").exists()


def test_audit_reports_bad_records_that_would_stop_fit(tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(20) + [{"prompt": "p", "chosen": "", "rejected": " x"}])
    config = _config(tmp_path, {"train_files": str(path), "on_bad_row": "error"})
    assert audit_main(["--config", config, "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert f"e.g. {path}, record 20, field 'chosen': field 'chosen' is empty" in out
    assert "1 bad train records stop fit (data.on_bad_row: error)" in out


def test_audit_of_the_tiny_config_on_hh(tmp_path, capsys):
    """The acceptance check: the audit of experiments/tiny_cpu.yaml on the shared HH data."""
    code = audit_main(["--config", str(ROOT / "experiments" / "tiny_cpu.yaml"), "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "data_audit.json").read_text())
    train = report["splits"]["train"]
    assert train["records"] == 2312 and train["bad_records"] == 8
    assert set(train["bad_by_kind"]) == {"empty_response", "hh_prompt_mismatch"}
    assert report["padding"]["grouped"] < report["padding"]["random"]
    assert "hh_prompt_mismatch: 4" in capsys.readouterr().out
