"""Distributed training on CPU (2 processes, gloo), run as a user runs it: FSDP2 == DDP, 2 ranks x b == 1 rank
x 2b, and accumulate 2 x b == batch 2b, each over 5 optimizer steps from the same initial weights.

Why these equalities are exact up to float rounding: the DPO loss of a batch is the mean over its pairs, so
the mean of two half-batch means (DDP averages gradients over ranks; accumulation sums loss/2 twice) is the
full-batch mean, provided the halves hold the same pairs as the full batch. The data sampler cuts each
global batch (batch_size x ranks) into one slice per rank, so that holds across world sizes; padding differs
per micro-batch but padded positions are masked out of the log-probs. Logged training values are means over
every pair of the optimizer step (all ranks, all micro-batches), so the curves are directly comparable.

The runs here (helpers.fsdp_run, ddp_run, single_run, plain_run) are shared with test_resume.py, test_export.py
and test_reference.py: each is made once per session under pytest's base temp folder.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from helpers import FSDP, assert_same_curves, ddp_run, fsdp_run, in_process_fit, plain_run, shared_run, single_run


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


def test_gradient_accumulation_invariance(assets, tmp_path):
    """accumulate 2 x 4 pairs == batch 8: the same curve (plain shuffled order; grouped order: the next test)."""
    in_process_fit(assets, tmp_path / "acc", batch_size=4, accumulate=2)
    assert_same_curves(tmp_path / "acc", plain_run(assets))


def test_gradient_accumulation_invariance_with_length_grouping(assets, tmp_path):
    """With length grouping on, accumulate 2 x 4 pairs == batch 8 as well: the sampler groups whole optimizer
    steps (8 pairs, the data module reads the Trainer's ``accumulate_grad_batches``) and cuts each into its 2
    micro-batches, so both runs train on the same pairs at every step: the same curve, and the same weights after
    5 steps. Grouping per micro-batch (4 pairs) would give other steps on this data (checked, so the test can fail)."""
    from dpo_lightning.data.sampler import PreferenceSampler

    grouped = {"group_by_length": True}
    acc = in_process_fit(assets, tmp_path / "acc", batch_size=4, accumulate=2, data=grouped)
    big = in_process_fit(assets, tmp_path / "big", data=grouped)
    small, large = acc.train_dataloader.sampler, big.train_dataloader.sampler
    assert small.accumulate == 2 and small.group_by_length

    def steps(batches, k):
        return [sorted(i for b in batches[j : j + k] for i in b) for j in range(0, len(batches), k)]

    assert steps(small.batches(0), 2) == steps(large.batches(0), 1)
    per_micro_batch = PreferenceSampler(small.lengths, batch_size=4, seed=small.seed).batches(0)
    assert steps(per_micro_batch, 2)[:5] != steps(large.batches(0), 1)[:5]
    assert_same_curves(tmp_path / "acc", tmp_path / "big")
    weights_acc, weights_big = acc.lightning_module.policy.state_dict(), big.lightning_module.policy.state_dict()
    worst = max((weights_acc[k] - weights_big[k]).abs().max().item() for k in weights_big)
    assert worst <= 1e-5, f"weights after 5 steps differ by {worst:.2e}"


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


def test_wrap_unit_is_the_outermost_listed_class():
    """A class listed in ``_no_split_modules`` that sits inside another listed one is inside that unit already:
    only the outer blocks are FSDP units (sharding the inner one too would nest a unit in a unit)."""
    from torch import nn

    from dpo_lightning.strategy import decoder_blocks

    class Inner(nn.Linear):
        pass

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner(2, 2)

    class Model(nn.Module):
        _no_split_modules = ["Block", "Inner"]

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])
            self.head = Inner(2, 2)  # a listed class outside any block is a unit of its own

    model = Model()
    assert decoder_blocks(model) == [model.layers[0], model.layers[1], model.head]


def test_strategy_names_select_fsdp2():
    """``trainer.strategy: fsdp`` is FSDP2 (sharded checkpoints) and accepted on CPU; ``fsdp_single_file`` writes
    one file (its real 2-process run, checkpoint and export: test_reference.test_fsdp_two_ranks_compute_and_reuse)."""
    from dpo_lightning.strategy import FSDP2Strategy

    trainer = pl.Trainer(strategy="fsdp", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy) and trainer.strategy._save_distributed_checkpoint
    trainer = pl.Trainer(strategy="fsdp_single_file", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, FSDP2Strategy) and not trainer.strategy._save_distributed_checkpoint


def test_bf16_true_trains_in_bf16_from_ln2(assets, tmp_path):
    """``trainer.precision: bf16-true``: policy and reference are cast to bfloat16 (the reference is outside the
    registered children, so it must follow the cast itself), the first loss is still exactly −log σ(0) = ln 2
    (policy and reference are the same bf16 weights), and the training steps stay finite and move the policy."""
    import math

    from helpers import curve, metric_rows

    trainer = in_process_fit(assets, tmp_path / "bf16", trainer={"precision": "bf16-true", "max_steps": 3})
    module = trainer.lightning_module
    assert {p.dtype for p in module.policy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.reference.parameters()} == {torch.bfloat16}
    losses = curve(metric_rows(tmp_path / "bf16"), "train/loss")
    assert sorted(losses) == [0, 1, 2] and all(math.isfinite(v) for v in losses.values())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[2] != losses[0]


@pytest.mark.slow  # fast suite: FSDP2 in fp32 (test_fsdp_matches_ddp) and bf16-true (above); make test-full runs this
def test_fsdp_bf16_mixed_with_activation_checkpointing(assets):
    """bf16-mixed under FSDP2 (bf16 gather and compute, fp32 reduction) with activation checkpointing trains,
    and stays within bf16 rounding of the fp32 run."""
    run = shared_run(assets, "fsdp_bf16", *FSDP, "--trainer.precision", "bf16-mixed",
                     "--model.activation_checkpointing", "true")  # fmt: skip
    assert_same_curves(run, fsdp_run(assets), keys=("train/loss",), tol=5e-3)
