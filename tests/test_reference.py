"""Precomputed reference log-probs (``model.precompute_reference``): the same training as running the reference
every step, one reference pass per distinct (reference, tokenizer, data, lengths, truncation, aggregation,
precision), shared by runs that change only the loss, β, the learning rate or the seed, and guarded by a
spot check against a fresh pass when a stored table is loaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dpo_lightning.reference as reference_store
from dpo_lightning.export import main as export

from helpers import (
    FSDP,
    assert_exported,
    assert_same_curves,
    fit_argv,
    fsdp_run,
    in_process_fit,
    make_datamodule,
    plain_run,
    run_ranks,
)


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """Counts full reference passes (one per split computed), with the real computation underneath."""
    calls: list[int] = []
    real = reference_store.compute_split

    def counting(module, dataset, *args, **kwargs):
        calls.append(len(dataset))
        return real(module, dataset, *args, **kwargs)

    monkeypatch.setattr(reference_store, "compute_split", counting)
    return calls


def _stores(cache: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}


def precomputed_run(assets: Path) -> tuple[Path, Path, dict]:
    """The in-process base run with ``precompute_reference``, once per session: (log dir, store, facts)."""
    root = assets.parent / "scale_runs" / "in_process_precomputed"
    if not (root / "DONE.json").exists():
        trainer = in_process_fit(assets, root / "logs", precompute_reference=True, reference_cache_dir=root / "store")
        facts = {"reference_dropped": trainer.lightning_module.reference is None}
        (root / "DONE.json").write_text(json.dumps(facts))
    return root / "logs", root / "store", json.loads((root / "DONE.json").read_text())


def _copy_store(assets: Path, dest: Path) -> Path:
    shutil.copytree(precomputed_run(assets)[1], dest)
    return dest


def test_precompute_matches_reference_every_step(assets):
    """Train and validation curves match the per-step reference within 1e-5 (only batch composition, hence
    float summation order, differs); one table per split (one pass each), and the reference left memory."""
    logs, store, facts = precomputed_run(assets)
    assert_same_curves(logs, plain_run(assets))
    assert facts["reference_dropped"]
    rows = sorted(len(load_file(str(p))["index"]) for p in store.glob("*.safetensors"))
    assert rows == [16, 64]


def test_store_is_reused_only_when_the_fingerprint_matches(assets, tmp_path, passes, caplog):
    """A run that changes the loss, β, lr and seed does no reference pass (it re-scores a few random rows and
    finds them equal); a tampered store fails that check and is recomputed; changing max_length computes a new
    store. The store holds log-prob sums (compute_loss divides for per-token means), so a run with
    logp_aggregation mean reuses it."""
    cache = _copy_store(assets, tmp_path / "cache")
    common = {"precompute_reference": True, "reference_cache_dir": cache}
    stored = _stores(cache)

    caplog.clear()
    in_process_fit(assets, tmp_path / "second", seed=7, loss="ipo", beta=0.5, lr=3e-4, **common)
    assert passes == [], "the store was not reused"
    assert _stores(cache) == stored
    assert "reference log-probs (train): reusing" in caplog.text and "re-scored" in caplog.text

    for path in cache.glob("*.safetensors"):
        table = load_file(str(path))
        table["chosen"] += 1.0
        save_file(table, str(path))
    with pytest.warns(UserWarning, match="disagrees with a fresh reference pass"):
        in_process_fit(assets, tmp_path / "tampered", **common)
    assert sorted(passes) == [16, 64] and len(_stores(cache)) == 2

    in_process_fit(assets, tmp_path / "shorter", data={"max_length": 48}, **common)
    assert len(passes) == 4 and len(_stores(cache)) == 4
    in_process_fit(assets, tmp_path / "mean", logp_aggregation="mean", **common)
    assert len(passes) == 4 and len(_stores(cache)) == 4


def test_dataset_fingerprint_is_content_only(assets, tmp_path):
    """The same rows hash the same however the table is laid out (index mapping, chunks); one token differs."""
    dm = make_datamodule(assets / "train.jsonl", assets / "tokenizer", val_files=str(assets / "val.jsonl"))
    dm.setup("fit")
    train = dm.datasets["train"]
    shuffled = train.shuffle(seed=0)
    same = shuffled.sort("index") if "index" in train.column_names else train
    assert reference_store.dataset_fingerprint(train) == reference_store.dataset_fingerprint(same.flatten_indices())
    changed = train.map(lambda row, i: {"chosen_input_ids": row["chosen_input_ids"][:-1]} if i == 3 else {},
                        with_indices=True)  # fmt: skip
    assert reference_store.dataset_fingerprint(changed) != reference_store.dataset_fingerprint(train)


def test_fsdp_two_ranks_compute_and_reuse(assets, tmp_path):
    """Under 2-process FSDP each rank scores its share of the rows (the reference is sharded, so both ranks run
    the same number of batches) and the shares are gathered; a split already in the store is loaded and
    spot-checked across ranks instead. The curve matches the FSDP run with the reference every step.

    The run uses ``trainer.strategy: fsdp_single_file`` (the same training; only the checkpoint differs), so it
    also checks that format for real: one file gathered from both ranks' shards, that ``export`` turns into the
    policy bit for bit."""
    cache = _copy_store(assets, tmp_path / "cache")
    for path in cache.glob("*.safetensors"):  # keep the val table, drop the train table
        if len(load_file(str(path))["index"]) == 64:
            os.remove(path)
    run_dir = tmp_path / "fsdp_precompute"
    precompute = ("--model.precompute_reference", "true", "--model.reference_cache_dir", str(cache))
    result = run_ranks(*fit_argv(assets, run_dir, *FSDP, "--trainer.strategy", "fsdp_single_file", *precompute))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "reference log-probs (train): computing 64 rows" in result.stderr
    assert "reference log-probs (val): reusing" in result.stderr
    assert_same_curves(run_dir, fsdp_run(assets))
    tables = sorted(load_file(str(p))["index"].tolist() for p in cache.glob("*.safetensors"))
    assert [len(t) for t in tables] == [16, 64] and len(set(tables[1])) == 64
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()  # one file, not a folder of shards
    saved = torch.load(ckpt, weights_only=False)
    assert saved["global_step"] == 5 and all(k.startswith("policy.") for k in saved["state_dict"])
    sharded = sharded_policy_shapes(fsdp_run(assets) / "checkpoints" / "last.ckpt")
    assert {k: tuple(v.shape) for k, v in saved["state_dict"].items()} == sharded  # whole tensors, not shards
    assert export([str(ckpt), str(tmp_path / "hf")]) == 0
    assert_exported(ckpt, tmp_path / "hf", run_dir / "tokenizer")


def sharded_policy_shapes(sharded_ckpt: Path) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shapes of the policy tensors in a sharded checkpoint, from its DCP metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(sharded_ckpt)).read_metadata().state_dict_metadata
    prefix = "state_dict."
    return {k[len(prefix) :]: tuple(v.size) for k, v in meta.items() if k.startswith(prefix + "policy.")}
