"""``dpo-lightning export CKPT OUT_DIR``: a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained``
loads, holding exactly the trained policy, from a sharded (FSDP) and from a single-file checkpoint alike."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_lightning.errors import UserError
from dpo_lightning.export import main

from helpers import assert_exported, cli_main, fsdp_run, single_run


@pytest.mark.parametrize("which", ["sharded", "single_file"])
def test_export_round_trip(assets, tmp_path, which, capsys):
    """The FSDP run's checkpoint is a folder of shards, the single-process run's one file; both export the
    policy bit for bit, tied output layer included, with the run's tokenizer (found from the run folder)."""
    run = fsdp_run(assets) if which == "sharded" else single_run(assets)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() == (which == "sharded")
    assert main([str(ckpt), str(tmp_path / "hf")]) == 0
    assert "exported the policy" in capsys.readouterr().out
    assert_exported(ckpt, tmp_path / "hf", run / "tokenizer")


def test_export_to_bfloat16(assets, tmp_path, capsys):
    """``--dtype bfloat16``: exit status 0, and the saved weights are the trained fp32 weights cast to bf16 (every
    tensor, tied output layer and tokenizer included), loading back as bf16 without a dtype argument."""
    run = single_run(assets)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert main([str(ckpt), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "exported the policy" in capsys.readouterr().out
    assert_exported(ckpt, tmp_path / "bf16", run / "tokenizer", dtype=torch.bfloat16)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "gpt_neox", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
         "intermediate_size": 32},
        {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2,
         "intermediate_size": 32, "num_key_value_heads": 1},
    ],
)  # fmt: skip
def test_export_other_architectures(config, tiny_tokenizer, tmp_path):
    """Pythia (GPT-NeoX) and Llama policies, as PreferenceModule checkpoints them, export and reload exactly."""
    from dpo_lightning.models import build_causal_lm

    torch.manual_seed(0)
    policy = build_causal_lm(None, config, tiny_tokenizer)
    checkpoint = {
        "state_dict": {f"policy.{k}": v for k, v in policy.state_dict().items()},
        "dpo_lightning": {"hf_config": policy.config.to_dict()},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    main([str(tmp_path / "last.ckpt"), str(tmp_path / "hf")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(model(ids).logits, policy.eval()(ids).logits)


def test_export_errors_are_clear(tmp_path):
    """export's own errors are UserErrors; through the command they are one line and exit status 2."""
    with pytest.raises(UserError, match="no such checkpoint"):
        main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    torch.save({"state_dict": {"reference.w": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match="holds no policy weights"):
        main([str(tmp_path / "bad.ckpt"), str(tmp_path / "out")])
    result = cli_main("export", str(tmp_path / "bad.ckpt"), str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.startswith("dpo-lightning: error: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "holds no policy weights" in result.stderr


def test_a_model_type_transformers_does_not_know_is_a_clear_error(tmp_path):
    """A checkpoint whose stored config names a model type outside transformers (a model with its own code) is a
    UserError naming the type, not a KeyError traceback."""
    checkpoint = {
        "state_dict": {"policy.w": torch.zeros(1)},
        "dpo_lightning": {"hf_config": {"model_type": "my_remote_arch", "hidden_size": 8}},
    }
    torch.save(checkpoint, tmp_path / "remote.ckpt")
    with pytest.raises(UserError, match="'my_remote_arch' is not one transformers knows"):
        main([str(tmp_path / "remote.ckpt"), str(tmp_path / "out"), "--tokenizer", str(tmp_path)])
