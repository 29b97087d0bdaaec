"""The two-stage run, in this process: ``dpo-lightning sft`` then ``dpo-lightning fit --model.policy <sft>/export``."""

import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpo_lightning.module import PreferenceModule

from helpers import TINY_GPT2, cli_main, metric_rows

QUIET = {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
         "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}  # fmt: skip


def _config(path, **sections) -> str:
    path.write_text(yaml.safe_dump({"seed_everything": 0, **sections}))
    return str(path)


def test_sft_then_dpo_from_its_export(assets, tmp_path, monkeypatch):
    """Stage 1, ``sft`` (3 steps, 2-layer d32 GPT-2 from a config, a BPE trained on the data, explicit pairs:
    prompt + chosen), run with ``--trainer.default_root_dir`` and no ``run.dir``: the run folder is
    ``<root>/<run.name>-<time>`` with metrics.csv (train and val loss), config.yaml, tokenizer/, an offline wandb
    run and ``export/`` (model + tokenizer). Stage 2, ``fit --model.policy <export>`` with ``data.tokenizer`` unset:
    the tokenizer is the export's, the policy and the reference start as exactly the exported weights, so the first
    DPO loss is −log σ(0) = ln 2."""
    train, val = str(assets / "train.jsonl"), str(assets / "val.jsonl")
    data = {"train_files": train, "val_files": val, "format": "explicit", "tokenizer": None, "max_length": 64,
            "max_prompt_length": 32, "batch_size": 8, "tokenizer_vocab_size": 300}  # fmt: skip
    sft = _config(
        tmp_path / "sft.yaml",
        trainer={**QUIET, "max_steps": 3, "val_check_interval": 2, "limit_val_batches": 1,
                 "check_val_every_n_epoch": None},
        model={"policy_config": TINY_GPT2, "lr": 1e-2, "warmup_steps": 0},
        data=data,
        run={"name": "stage1"},
    )  # fmt: skip
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored by cli_main
    result = cli_main("sft", "--config", sft, "--trainer.default_root_dir", str(tmp_path / "root"))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "root").glob("stage1-*")
    rows = metric_rows(run)
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    assert (run / "config.yaml").exists() and (run / "tokenizer" / "tokenizer.json").exists()
    assert list((run / "wandb").glob("offline-run-*"))
    export = run / "export"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()

    started = {}
    real = PreferenceModule.on_fit_start

    def record(self):
        started["policy"] = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
        started["reference"] = {k: v.detach().clone() for k, v in self.reference.state_dict().items()}
        real(self)

    monkeypatch.setattr(PreferenceModule, "on_fit_start", record)
    dpo = _config(
        tmp_path / "dpo.yaml",
        trainer={**QUIET, "max_steps": 2, "limit_val_batches": 0},
        model={"policy": str(export), "lr": 1e-3, "warmup_steps": 0},
        data={**data, "tokenizer": None},
        run={"wandb": False},
    )
    result = cli_main("fit", "--config", dpo, "--run.dir", str(tmp_path / "dpo"))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = load_file(str(export / "model.safetensors"))
    assert exported.keys() <= started["policy"].keys()
    for key, value in exported.items():
        assert torch.equal(started["policy"][key], value), key
        assert torch.equal(started["reference"][key], value), key
    assert "tokenizer: " + str(export) in (tmp_path / "dpo" / "config.yaml").read_text()
    first = next(r for r in metric_rows(tmp_path / "dpo") if r.get("train/loss"))
    assert first["step"] == "0" and float(first["train/loss"]) == pytest.approx(math.log(2), abs=1e-6)
