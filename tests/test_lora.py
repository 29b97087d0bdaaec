"""LoRA (``model.peft_config``): the reference is the policy with its adapters off (one copy of the base weights);
checkpoints hold the adapters and optimizer state only; resume is exact; precomputed reference, FSDP2 and DDP
work; export merges the adapters (or writes the adapter directory with ``--adapter-only``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_lightning.errors import ConfigError, UserError
from dpo_lightning.export import load_checkpoint
from dpo_lightning.export import main as export
from dpo_lightning.lora import AdapterOffReference
from dpo_lightning.module import PreferenceModule
from dpo_lightning.reference import model_fingerprint

from helpers import DDP, FSDP, TINY_GPT2, curve, make_datamodule, metric_rows, quiet_trainer, shared_run

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "lora_dropout": 0.0}
LORA_ARGS = ("--model.peft_config", json.dumps(LORA))
IDS = torch.tensor([[5, 9, 12, 7, 3, 8, 2, 40]])


def _datamodule(assets: Path, batch_size: int = 8):
    return make_datamodule(assets / "train.jsonl", assets / "tokenizer", val_files=str(assets / "val.jsonl"),
                           batch_size=batch_size, group_by_length=False)  # fmt: skip


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def _fit(assets: Path, root: Path, max_steps: int, ckpt_path: str | None = None, **module_kwargs):
    """Batch-8 LoRA DPO in this process, a single-file checkpoint every step in ``root/ckpt``."""
    pl.seed_everything(0, verbose=False)
    dm = _datamodule(assets)
    module = PreferenceModule(policy=str(assets / "policy"), peft_config=LORA, lr=1e-2, warmup_steps=0,
                              tokenizer=dm.tokenizer, **module_kwargs)  # fmt: skip
    record = _Losses()
    checkpoints = pl.callbacks.ModelCheckpoint(root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    trainer = quiet_trainer(max_steps=max_steps, limit_val_batches=0, enable_checkpointing=True,
                            callbacks=[record, checkpoints])  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, record.losses


@pytest.fixture(scope="module")
def lora_fit(assets, tmp_path_factory):
    """4 steps of LoRA DPO with a checkpoint every step: (module, losses by step, run folder)."""
    root = tmp_path_factory.mktemp("lora_fit")
    module, losses = _fit(assets, root, 4)
    return module, losses, root


def _logps(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_reference_is_the_base_with_adapters_off(assets, lora_fit):
    """The reference owns no weights (one copy of the base in memory); only the adapters train (the base stays
    bit for bit the saved model); the first loss is ln 2 (policy == reference at B = 0), and after training the
    reference still scores exactly as the base model does, under no_grad, while the policy has moved."""
    module, losses, _ = lora_fit
    reference = module.reference
    assert isinstance(reference, AdapterOffReference) and list(reference.parameters()) == []
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[3] < losses[0]

    base = AutoModelForCausalLM.from_pretrained(assets / "policy").eval()
    trained_base = reference.base_state_dict()
    assert all(torch.equal(trained_base[k], v) for k, v in base.state_dict().items())
    dm = _datamodule(assets)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ref = module.reference_logps(batch)
    assert not ref.requires_grad
    assert torch.allclose(ref, module.concatenated_logps(base, batch), atol=1e-5)
    assert not torch.allclose(module.concatenated_logps(module.policy, batch).detach(), ref, atol=1e-3)
    assert module.policy.training  # the reference pass left the policy in train mode


def test_checkpoint_holds_adapters_and_resume_is_exact(assets, lora_fit, tmp_path):
    """The checkpoint's weights are the adapters alone (no frozen base), with their AdamW state and the base's
    fingerprint; a run stopped after step 2 and resumed from its checkpoint ends with the same adapters, bit for
    bit, and the same losses at steps 2 and 3, as the uninterrupted run."""
    module, losses, root = lora_fit
    ckpt = root / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    keys = set(saved["state_dict"])
    assert keys == {f"policy.{n}" for n, p in module.policy.named_parameters() if p.requires_grad}
    (optimizer,) = saved["optimizer_states"]
    assert len(optimizer["state"]) == len(keys)
    assert saved["dpo_lightning"]["reference_fingerprint"] == model_fingerprint(module.reference)
    assert ckpt.stat().st_size < 0.5 * (assets / "policy" / "model.safetensors").stat().st_size

    _fit(assets, tmp_path, 2)
    resumed, resumed_losses = _fit(assets, tmp_path, 4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    final, _ = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    expected, _ = load_checkpoint(ckpt)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert resumed_losses == {2: losses[2], 3: losses[3]}

    bad = {**saved, "state_dict": {k.replace("lora_A", "lora_X"): v for k, v in saved["state_dict"].items()}}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(ConfigError, match="not this run's LoRA adapters"):
        _fit(assets, tmp_path / "bad", 5, ckpt_path=str(tmp_path / "bad.ckpt"))


def test_export_merged_and_adapter_only(assets, lora_fit, tmp_path):
    """``export`` writes the merged model (a plain Hugging Face model, no LoRA keys) whose logits are the trained
    LoRA policy's; ``--adapter-only`` writes peft's adapter directory, which on the base gives the same logits."""
    from peft import PeftModel

    module, _, root = lora_fit
    ckpt = root / "ckpt" / "last.ckpt"
    trained = _logps(module.policy.eval())
    module.policy.train()

    tok = ("--tokenizer", str(assets / "tokenizer"))  # this in-process run has no run folder
    assert export([str(ckpt), str(tmp_path / "merged"), *tok]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(_logps(merged), trained, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").exists()

    assert export([str(ckpt), str(tmp_path / "adapter"), "--adapter-only", *tok]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    base = AutoModelForCausalLM.from_pretrained(assets / "policy")
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.allclose(_logps(adapted), trained, atol=1e-5)

    other = AutoModelForCausalLM.from_pretrained(assets / "policy")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(tmp_path / "other_base")
    with pytest.raises(UserError, match="not the one this run was trained on"):
        export([str(ckpt), str(tmp_path / "x"), "--base", str(tmp_path / "other_base"), *tok])
    full = {"state_dict": {f"policy.{k}": v for k, v in base.state_dict().items()}, "hyper_parameters": {}}
    torch.save(full, tmp_path / "full.ckpt")
    with pytest.raises(UserError, match="--adapter-only is for LoRA runs"):
        export([str(tmp_path / "full.ckpt"), str(tmp_path / "y"), "--adapter-only", *tok])
    with pytest.raises(UserError, match="--base is for LoRA runs"):  # not ignored: the checkpoint has the weights
        export([str(tmp_path / "full.ckpt"), str(tmp_path / "y"), "--base", str(assets / "policy"), *tok])
    saved = torch.load(ckpt, weights_only=False)
    moved = {**saved["hyper_parameters"], "policy": "a/relative/folder/elsewhere"}  # the run's model.policy, gone
    torch.save({**saved, "hyper_parameters": moved}, tmp_path / "moved.ckpt")
    with pytest.raises(UserError, match="could not rebuild the LoRA run's base model .*pass --base DIR"):
        export([str(tmp_path / "moved.ckpt"), str(tmp_path / "z"), *tok])


def test_export_rebuilds_a_random_init_base_from_the_run_seed(tiny_tokenizer, tmp_path):
    """A LoRA run on ``model.policy_config`` keeps its base in no file: export builds it again from the run
    folder's ``seed_everything`` (checked against the saved fingerprint) and merges the adapters."""
    torch.manual_seed(3)
    module = PreferenceModule(policy_config=TINY_GPT2, peft_config=LORA, tokenizer=tiny_tokenizer)
    module.setup("fit")
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.normal_()  # trained adapters, as far as export can tell
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    tiny_tokenizer.save_pretrained(run / "tokenizer")
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "dpo_lightning": {"reference_fingerprint": module.reference_fingerprint}}  # fmt: skip
    torch.save(checkpoint, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text("seed_everything: 4\n")
    with pytest.raises(UserError, match="not the one this run was trained on"):
        export([str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "wrong_seed")])
    (run / "config.yaml").write_text("seed_everything: 3\n")
    assert export([str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(_logps(merged), _logps(module.policy.eval()), atol=1e-5)


def test_precomputed_reference_with_lora(assets, lora_fit, tmp_path):
    """``precompute_reference`` with LoRA: the same losses as the reference run every step (to float summation
    order), one stored table per split, and a reference fingerprint equal to a full fine-tuning run's of the same
    base (so the two share the store)."""
    live, losses, _ = lora_fit
    store = tmp_path / "store"
    module, pre_losses = _fit(assets, tmp_path, 3, precompute_reference=True, reference_cache_dir=str(store))
    assert pre_losses == pytest.approx({s: losses[s] for s in range(3)}, abs=1e-5)
    assert pre_losses[2] != pytest.approx(pre_losses[0], abs=1e-4)  # it trained
    assert len(list(store.glob("*.safetensors"))) == 2
    assert module.reference_fingerprint == live.reference_fingerprint
    full = PreferenceModule(policy=str(assets / "policy"))
    full.setup("fit")
    assert full.reference_fingerprint == live.reference_fingerprint


def test_lora_config_errors(assets):
    """A LoRA policy with TR-DPO's reference sync, with a reference model of its own, with an unknown LoraConfig
    key or with target modules the model lacks: each a ConfigError naming the key."""
    policy = str(assets / "policy")
    with pytest.raises(ConfigError, match="reference_sync .* with model.peft_config"):
        PreferenceModule(policy=policy, peft_config=LORA, reference_sync={"mode": "hard", "every": 2})
    with pytest.raises(ConfigError, match="model.reference with model.peft_config"):
        PreferenceModule(policy=policy, peft_config=LORA, reference=policy)
    with pytest.raises(ConfigError, match="model.peft_config: .*rank"):
        PreferenceModule(policy=policy, peft_config={"rank": 4})
    with pytest.raises(ConfigError, match="model.peft_config: .*q_proj"):
        PreferenceModule(policy=policy, peft_config={"r": 4, "target_modules": ["q_proj"]})


# --------------------------------------------------------------------------- distributed (2 processes, gloo)
SHORT = ("--trainer.max_steps", "3")  # 3 steps, validation at step 2 (base.yaml), a checkpoint every step


def _same_curves(a: Path, b: Path) -> None:
    for key in ("train/loss", "train/rewards/margins", "val/loss"):
        ca, cb = curve(metric_rows(a), key), curve(metric_rows(b), key)
        assert ca and ca.keys() == cb.keys() and all(abs(ca[s] - cb[s]) <= 1e-5 for s in ca), (key, ca, cb)
    assert len(curve(metric_rows(a), "train/loss")) == 3


def _single(assets: Path) -> Path:
    return shared_run(assets, "lora_single_1x8", "--data.batch_size", "8", *SHORT, *LORA_ARGS, in_process=True)


def test_lora_fsdp2_matches_one_process_and_exports(assets, tmp_path):
    """2-process FSDP2 with LoRA (adapters and frozen base sharded per decoder block) gives the 1-process
    curve; its sharded checkpoint holds the adapters only, and exports to the same merged model."""
    single, fsdp = _single(assets), shared_run(assets, "lora_fsdp_2x4", *FSDP, *SHORT, *LORA_ARGS)
    _same_curves(fsdp, single)
    ckpt = fsdp / "checkpoints" / "last.ckpt"
    from torch.distributed.checkpoint import FileSystemReader

    keys = [k for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith("state_dict.")]
    assert keys and all("lora_" in k for k in keys)
    assert export([str(ckpt), str(tmp_path / "fsdp")]) == 0
    assert export([str(single / "checkpoints" / "last.ckpt"), str(tmp_path / "single")]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single").eval()
    assert torch.allclose(_logps(a), _logps(b), atol=1e-5)


@pytest.mark.slow  # DDP runs the unsharded module; the FSDP2 test above is the distributed guard of make test
def test_lora_ddp_matches_one_process(assets):
    _same_curves(shared_run(assets, "lora_ddp_2x4", *DDP, *SHORT, *LORA_ARGS), _single(assets))
