"""Distributed training on CPU (2 processes, gloo), run as a user runs it: FSDP2 == DDP, 2 ranks x b == 1 rank
x 2b, and accumulate 2 x b == batch 2b, each over 5 optimizer steps from the same initial weights.

Why these equalities are exact up to float rounding: the DPO loss of a batch is the mean over its pairs, so
the mean of two half-batch means (DDP averages gradients over ranks; accumulation sums loss/2 twice) is the
full-batch mean, provided the halves hold the same pairs as the full batch. The data sampler cuts each
global batch (batch_size x ranks) into one slice per rank, so that holds across world sizes; padding differs
per micro-batch but padded positions are masked out of the log-probs. Logged training values are means over
every pair of the optimizer step (all ranks, all micro-batches), so the curves are directly comparable.

The runs here (and the helpers) are shared with test_resume.py, test_export.py and test_reference.py: each
is made once per session under pytest's base temp folder.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import ROOT, TINY_GPT2, synthetic_pairs, write_jsonl

BASE_YAML = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: 5
  val_check_interval: 2
  limit_val_batches: 2
  check_val_every_n_epoch: null
  log_every_n_steps: 1
  gradient_clip_val: 10.0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, save_top_k: 0, every_n_train_steps: 1}}
model:
  policy: {policy}
  lr: 1.0e-3
  warmup_steps: 2
data:
  train_files: {train}
  val_files: {val}
  format: explicit
  tokenizer: {tokenizer}
  max_length: 64
  max_prompt_length: 32
  batch_size: 4
  eval_batch_size: 8
run:
  wandb: false
  csv_flush_every: 1
"""
TIMEOUT = 420
NOT_COMPARED = {"train/tokens_per_sec", "epoch"}  # wall-clock values


# --------------------------------------------------------------------------- shared assets and runs
def make_assets(root: Path, tokenizer) -> Path:
    """A saved tiny GPT-2 (the policy and, copied, the reference), its tokenizer, 64 train + 16 val pairs and a
    base config. The policy is loaded from a folder, so its weights do not depend on any seed."""
    from dpo_lightning.models import build_causal_lm

    if (root / "base.yaml").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    build_causal_lm(None, TINY_GPT2, tokenizer).save_pretrained(root / "policy")
    rows = synthetic_pairs(80, seed=1)
    write_jsonl(root / "train.jsonl", rows[:64])
    write_jsonl(root / "val.jsonl", rows[64:])
    text = BASE_YAML.format(
        policy=root / "policy", train=root / "train.jsonl", val=root / "val.jsonl", tokenizer=root / "tokenizer"
    )
    (root / "base.yaml").write_text(text)
    return root


@pytest.fixture
def assets(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_assets(tmp_path_factory.getbasetemp() / "scale_assets", tiny_tokenizer)


def cli_env() -> dict[str, str]:
    # one BLAS thread per process: two processes share two cores
    return dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def fit_args(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dpo_lightning", "fit", "--config", str(assets / "base.yaml"), *extra,
            "--run.dir", str(run_dir)]  # fmt: skip


def shared_run(assets: Path, name: str, *extra: str) -> Path:
    """``dpo-lightning fit`` with the base config and ``extra``, once per session (cached on disk by name)."""
    run_dir = assets.parent / "scale_runs" / name
    done = run_dir / "DONE.json"
    if not done.exists():
        start = time.perf_counter()
        result = subprocess.run(
            fit_args(assets, run_dir, *extra), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=TIMEOUT
        )
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"
        done.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return run_dir


FSDP = ("--config", "experiments/tiny_fsdp.yaml")  # 2 processes, strategy fsdp, a checkpoint every step
DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2")


def fsdp_run(assets: Path) -> Path:
    return shared_run(assets, "fsdp_2x4", *FSDP)


def ddp_run(assets: Path) -> Path:
    return shared_run(assets, "ddp_2x4", *DDP)


def single_run(assets: Path) -> Path:
    return shared_run(assets, "single_1x8", "--data.batch_size", "8")


def metric_rows(run_dir: Path | str, metrics_file: str = "metrics.csv") -> list[dict[str, str]]:
    with open(Path(run_dir) / metrics_file) as f:
        return list(csv.DictReader(f))


def curve(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def assert_same_curves(a: Path, b: Path, keys=("train/loss", "train/rewards/margins", "val/loss"), tol=1e-5):
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    for key in keys:
        ca, cb = curve(rows_a, key), curve(rows_b, key)
        assert ca and ca.keys() == cb.keys(), (key, ca, cb)
        worst = max(abs(ca[s] - cb[s]) for s in ca)
        assert worst <= tol, f"{key}: {a.name} vs {b.name} differ by {worst:.2e}\n{ca}\n{cb}"
    assert len(curve(rows_a, "train/loss")) == 5


# --------------------------------------------------------------------------- equivalence
def test_fsdp_matches_ddp(assets):
    """FSDP2 (both models sharded per decoder block) and DDP give the same losses, step by step; FSDP writes a
    sharded checkpoint folder (one shard per rank) without the reference in it."""
    fsdp, ddp = fsdp_run(assets), ddp_run(assets)
    assert_same_curves(fsdp, ddp)
    ckpt = fsdp / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = torch.load(ckpt / "meta.pt", weights_only=False)
    assert meta["global_step"] == 5 and meta["dpo_lightning"]["reference_fingerprint"]
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.policy.") for k in keys)
    assert not any(".reference." in k or k.startswith("state_dict.reference") for k in keys)


def test_world_size_invariance(assets):
    """2 ranks x 4 pairs == 1 rank x 8 pairs: the same curve (training and validation)."""
    assert_same_curves(ddp_run(assets), single_run(assets))


def in_process_fit(
    assets: Path,
    log_dir: Path,
    batch_size: int = 8,
    accumulate: int = 1,
    seed: int = 0,
    data: dict | None = None,
    **module_kwargs,
) -> pl.Trainer:
    """The base config's run in this process (no checkpoints), with a plain shuffled data order."""
    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.module import PreferenceModule

    pl.seed_everything(seed)
    settings = {"max_length": 64, "max_prompt_length": 32, "eval_batch_size": 8, **(data or {})}
    dm = PreferenceDataModule(
        str(assets / "train.jsonl"),
        val_files=str(assets / "val.jsonl"),
        format="explicit",
        tokenizer=str(assets / "tokenizer"),
        batch_size=batch_size,
        group_by_length=False,
        **settings,
    )
    module = PreferenceModule(
        **{"policy": str(assets / "policy"), "lr": 1e-3, "warmup_steps": 2, **module_kwargs}, tokenizer=dm.tokenizer
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=5,
        accumulate_grad_batches=accumulate,
        val_check_interval=2 * accumulate,  # counts micro-batches: validate every 2 optimizer steps in both
        limit_val_batches=2,
        check_val_every_n_epoch=None,
        log_every_n_steps=1,
        gradient_clip_val=10.0,
        num_sanity_val_steps=0,
        logger=pl.loggers.CSVLogger(log_dir, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def plain_run(assets: Path) -> Path:
    """The in-process base run (batch 8, reference every step), once per session: the baseline of the
    accumulation, activation-checkpointing and precomputed-reference tests."""
    log_dir = assets.parent / "scale_runs" / "in_process_1x8"
    if not (log_dir / "DONE").exists():
        in_process_fit(assets, log_dir)
        (log_dir / "DONE").touch()
    return log_dir


def test_gradient_accumulation_invariance(assets, tmp_path):
    """accumulate 2 x 4 pairs == batch 8: the same curve. (Plain shuffled order here: the length-grouped order
    is cut per batch_size x ranks, so it differs between these two runs; see the report on the data side.)"""
    in_process_fit(assets, tmp_path / "acc", batch_size=4, accumulate=2)
    assert_same_curves(tmp_path / "acc", plain_run(assets))


def test_activation_checkpointing_is_exact(assets, tmp_path):
    """Recomputing activations in backward changes memory, not maths: the same curve with it on and off."""
    trainer = in_process_fit(assets, tmp_path / "ac", activation_checkpointing=True)
    policy = trainer.lightning_module.policy
    assert getattr(policy, "is_activation_checkpointing", None) or policy.is_gradient_checkpointing
    assert_same_curves(tmp_path / "ac", plain_run(assets), tol=1e-6)


# --------------------------------------------------------------------------- wiring
@pytest.mark.parametrize(
    "config,block",
    [
        ({"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 2}, "GPT2Block"),
        (
            {"model_type": "gpt_neox", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
             "intermediate_size": 32},
            "GPTNeoXLayer",
        ),
        (
            {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
             "intermediate_size": 32},
            "LlamaDecoderLayer",
        ),
    ],
)  # fmt: skip
def test_wrap_unit_comes_from_the_model(config, block, tiny_tokenizer):
    """The FSDP unit is the model's own decoder block (GPT-2, GPT-NeoX/Pythia, Llama), found without naming it."""
    from dpo_lightning.models import build_causal_lm
    from dpo_lightning.strategy import decoder_blocks

    blocks = decoder_blocks(build_causal_lm(None, config, tiny_tokenizer))
    assert [type(b).__name__ for b in blocks] == [block, block]


def test_strategy_names_select_fsdp2():
    """``trainer.strategy: fsdp`` is FSDP2 (sharded checkpoints) and accepted on CPU; ``fsdp_single_file`` writes
    one file; the data-parallel size follows the number of processes."""
    from dpo_lightning.strategy import FSDP2Strategy

    trainer = pl.Trainer(strategy="fsdp", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy) and trainer.strategy._save_distributed_checkpoint
    trainer = pl.Trainer(strategy="fsdp_single_file", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy) and not trainer.strategy._save_distributed_checkpoint


@pytest.mark.slow
def test_fsdp_bf16_mixed_with_activation_checkpointing(assets):
    """bf16-mixed under FSDP2 (bf16 gather and compute, fp32 reduction) with activation checkpointing trains,
    and stays within bf16 rounding of the fp32 run."""
    run = shared_run(assets, "fsdp_bf16", *FSDP, "--trainer.precision", "bf16-mixed",
                     "--model.activation_checkpointing", "true")  # fmt: skip
    assert_same_curves(run, fsdp_run(assets), keys=("train/loss",), tol=5e-3)
