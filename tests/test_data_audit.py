"""The data audit (report, files, thresholds) and the caches that let a second run skip tokenization."""

import json

import pytest
import yaml

from dpo_lightning.audit import main as audit_main
from dpo_lightning.data import cache as data_cache
from dpo_lightning.data import tokenize as data_tokenize
from dpo_lightning.data.cache import tokenizer_fingerprint
from dpo_lightning.errors import DataError
from dpo_lightning.tokenizer import train_bpe_tokenizer

from helpers import ROOT, make_datamodule, synthetic_pairs, write_jsonl

_dm = make_datamodule  # explicit format, max_length 64, max_prompt_length 32, val_fraction 0.25


def _never(*args, **kwargs):
    raise AssertionError("called although the result is cached")


def test_caches_live_in_this_sessions_folder():
    """The suite is hermetic (conftest.py): the tokenized-pair and tokenizer caches (under datasets'
    HF_DATASETS_CACHE), the reference store and HOME are all inside this session's fresh folder, never ~/.cache."""
    from pathlib import Path

    import datasets

    from dpo_lightning.reference import cache_dir as reference_cache_dir

    from conftest import SESSION_ROOT

    for path in (
        data_cache.cache_dir(),
        Path(datasets.config.HF_DATASETS_CACHE),
        reference_cache_dir(None),
        Path.home(),
    ):
        assert Path(path).resolve().is_relative_to(SESSION_ROOT.resolve()), path


def test_second_load_hits_the_cache_and_any_change_retokenizes(tmp_path, tiny_tokenizer, monkeypatch):
    """First load: a miss (the tokenizing map runs); second: a hit (it must not run); any change of data,
    tokenizer or setting: a miss again."""
    calls = []
    real = data_tokenize.tokenize_rows

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    path = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(40))
    with monkeypatch.context() as patch:
        patch.setattr(data_tokenize, "tokenize_rows", counting)
        first = _dm(path, tiny_tokenizer)
        first.setup()
    assert first.from_cache == {"train": False} and calls, "the first load did not tokenize"
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
    """First load trains the BPE (a miss), the second loads it from the cache (a hit), another vocabulary size
    trains again."""
    trained = []
    real = data_cache.train_bpe_tokenizer

    def counting(*args, **kwargs):
        trained.append(1)
        return real(*args, **kwargs)

    path = write_jsonl(tmp_path / "p.jsonl", synthetic_pairs(60))
    with monkeypatch.context() as patch:
        patch.setattr(data_cache, "train_bpe_tokenizer", counting)
        first = _dm(path, tokenizer_vocab_size=320)
        first.setup()
    assert trained == [1] and first.from_cache == {"train": False}
    with monkeypatch.context() as patch:
        patch.setattr(data_cache, "train_bpe_tokenizer", _never)
        second = _dm(path, tokenizer_vocab_size=320)
        second.setup()
    assert tokenizer_fingerprint(second.tokenizer) == tokenizer_fingerprint(first.tokenizer)
    assert second.from_cache == {"train": True}
    with monkeypatch.context() as patch:
        patch.setattr(data_cache, "train_bpe_tokenizer", counting)
        other = _dm(path, tokenizer_vocab_size=300)
        assert tokenizer_fingerprint(other.tokenizer) != tokenizer_fingerprint(first.tokenizer)
    assert trained == [1, 1]


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
    assert f"e.g. {path}, line 21, field 'chosen': field 'chosen' is empty" in out
    assert "1 bad train records stop fit (data.on_bad_row: error)" in out


def test_padding_is_what_the_collated_batches_carry(tmp_path, tiny_tokenizer):
    """The audit's padding fractions are measured on the real thing: collate each training batch of the
    length-grouped and of the random order (PairCollator, the training collate) and count the attention mask's
    zeros over all slots. Grouping must cut the padding."""
    from dpo_lightning.data.audit import build_report
    from dpo_lightning.data.tokenize import PairCollator

    rows = synthetic_pairs(200) + [dict(r, chosen=r["chosen"] * 6) for r in synthetic_pairs(40, seed=3)]
    dm = _dm(write_jsonl(tmp_path / "p.jsonl", rows), tiny_tokenizer, max_length=128, batch_size=8)
    dm.setup()
    report = build_report(dm)
    collate = PairCollator(tiny_tokenizer.pad_token_id)
    train = dm.datasets["train"]
    for name, grouped in (("grouped", True), ("random", False)):
        pads = slots = 0
        for batch in dm.train_sampler(group_by_length=grouped).batches(0):
            mask = collate([dict(train[i]) for i in batch])["attention_mask"]
            pads, slots = pads + int((mask == 0).sum()), slots + mask.numel()
        assert report["padding"][name] == pytest.approx(pads / slots, abs=5e-5), name
    assert report["padding"]["grouped"] < report["padding"]["random"] / 2


def test_audit_of_the_tiny_config_on_hh(tmp_path, capsys):
    """The acceptance check: the audit of experiments/tiny_cpu.yaml on the shared HH data, with the README's
    figures: 8 bad records of 2,312, and batch padding 33.3% in random order vs 10.0% grouped by length."""
    code = audit_main(["--config", str(ROOT / "experiments" / "tiny_cpu.yaml"), "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "data_audit.json").read_text())
    train = report["splits"]["train"]
    assert train["records"] == 2312 and train["bad_records"] == 8
    assert set(train["bad_by_kind"]) == {"empty_response", "hh_prompt_mismatch"}
    assert report["padding"]["random"] == pytest.approx(0.333, abs=5e-4)
    assert report["padding"]["grouped"] == pytest.approx(0.100, abs=5e-4)
    out = capsys.readouterr().out
    assert "hh_prompt_mismatch: 4" in out and "10.0% grouped by length" in out and "33.3%" in out


def test_audit_takes_the_policy_directory_s_tokenizer_as_fit_does(tmp_path, tiny_tokenizer):
    """data.tokenizer unset and model.policy a directory with a tokenizer (an SFT export): fit tokenizes with that
    tokenizer (cli.tokenizer_from_policy), so the audit must too, not train a new BPE; a set data.tokenizer wins."""
    from dpo_lightning.audit import parse_args

    policy = tmp_path / "export"
    tiny_tokenizer.save_pretrained(policy)
    _config(tmp_path, {"train_files": "unused.jsonl", "tokenizer": None})
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["model"] = {"policy": str(policy), "loss": "ipo"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    init, parsed = parse_args(["--config", str(tmp_path / "config.yaml")])
    assert parsed.data.tokenizer == str(policy) and init.data.tokenizer_path == str(policy)
    _, parsed = parse_args(["--config", str(tmp_path / "config.yaml"), "--data.tokenizer", "elsewhere"])
    assert parsed.data.tokenizer == "elsewhere"
