"""Every model family a user brings (Llama, Qwen2, Mistral, GPT-NeoX/Pythia, Gemma, GPT-2): a tiny random-init
config of each fits from ln 2, shards by its own decoder block, and has its dropout zeroed wherever it lives;
and ``model.policy: DIR`` loads with the dtype, attention kernel and remote-code settings asked for."""

from __future__ import annotations

import json
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch

from dpo_lightning.errors import ConfigError
from dpo_lightning.models import build_causal_lm, disable_dropout
from dpo_lightning.module import PreferenceModule
from dpo_lightning.strategy import decoder_blocks

from helpers import make_datamodule, quiet_trainer, synthetic_pairs, write_jsonl

# 2 layers, width 32, 2 heads of 16; every dropout number the family has set to 0.5, so a missed one shows
ROPE = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64, "max_position_embeddings": 128, "attention_dropout": 0.5}  # fmt: skip
FAMILIES = {
    "llama": ({"model_type": "llama", **ROPE}, "LlamaDecoderLayer"),
    "qwen2": ({"model_type": "qwen2", **ROPE}, "Qwen2DecoderLayer"),
    "mistral": ({"model_type": "mistral", **ROPE}, "MistralDecoderLayer"),
    "gemma": ({"model_type": "gemma", **ROPE, "head_dim": 16}, "GemmaDecoderLayer"),
    "gpt_neox": (
        {"model_type": "gpt_neox", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 128, "attention_dropout": 0.5, "hidden_dropout": 0.5},
        "GPTNeoXLayer",
    ),
    "gpt2": (
        {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128, "attn_pdrop": 0.5,
         "resid_pdrop": 0.5, "embd_pdrop": 0.5},
        "GPT2Block",
    ),
}  # fmt: skip
IDS = torch.tensor([[1, 5, 9, 12, 7, 3, 8, 2]])


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's own decoder-layer list, as each family names it."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h"):
        if hasattr(body, name):
            return list(getattr(body, name))
    raise AssertionError(f"{type(model).__name__}: no layer list")


@pytest.fixture(scope="module")
def family_data(tmp_path_factory, tiny_tokenizer):
    path = write_jsonl(tmp_path_factory.mktemp("families") / "pairs.jsonl", synthetic_pairs(24))
    return make_datamodule(path, tiny_tokenizer, batch_size=4, max_length=48, max_prompt_length=24, setup=True)


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_fits_from_ln2(family, family_data, tiny_tokenizer):
    """Two optimizer steps of DPO on a tiny random-init model of each family. Policy and reference are the same
    weights and dropout (0.5 in every config number) is zeroed, so the first loss is −log σ(0) = ln 2 exactly;
    the second step's loss moves (the step trained)."""
    config, _ = FAMILIES[family]
    pl.seed_everything(0, verbose=False)
    module = PreferenceModule(policy_config=config, lr=1e-2, warmup_steps=0, tokenizer=tiny_tokenizer)
    record = _Losses()
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[record]).fit(module, datamodule=family_data)
    assert record.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert record.losses[1] != pytest.approx(record.losses[0], abs=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_wrap_unit_and_dropout_of_each_family(family, tiny_tokenizer):
    """The FSDP unit is the family's own decoder layer (found from ``_no_split_modules``, not named here): one per
    layer of the model's layer list. Dropout: with the config's 0.5 live, two train-mode forwards differ; after
    ``disable_dropout`` they are equal, and no dropout number is left in the config or on any module (Llama-like
    attention passes ``self.attention_dropout``, a plain float, to the kernel)."""
    config, block = FAMILIES[family]
    torch.manual_seed(0)
    model = build_causal_lm(None, config, tiny_tokenizer).train()
    blocks = decoder_blocks(model)
    assert [type(b).__name__ for b in blocks] == [block, block]
    assert [id(b) for b in blocks] == [id(layer) for layer in _layers(model)]

    assert not torch.equal(model(IDS).logits, model(IDS).logits)  # the 0.5s are live
    disable_dropout(model)
    assert torch.equal(model(IDS).logits, model(IDS).logits)
    numbers = {k: v for k, v in model.config.to_dict().items() if ("dropout" in k or "pdrop" in k) and v}
    assert numbers == {}
    left = [(type(m).__name__, k) for m in model.modules() for k, v in vars(m).items()
            if ("dropout" in k or "pdrop" in k) and isinstance(v, float) and v]  # fmt: skip
    assert left == []


def test_wrap_unit_of_a_lora_model(tiny_tokenizer):
    """A LoRA PeftModel shards by the decoder layers of the model it wraps (adapters included in each unit)."""
    from dpo_lightning.lora import apply_lora

    model = apply_lora(build_causal_lm(None, FAMILIES["llama"][0], tiny_tokenizer), {"r": 2})
    blocks = decoder_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2
    assert all(any("lora_A" in n for n, _ in b.named_parameters()) for b in blocks)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    build_causal_lm(None, FAMILIES["llama"][0], tiny_tokenizer).save_pretrained(root)
    return root


def test_policy_dir_loading_settings(llama_dir, tiny_tokenizer):
    """``model.policy: DIR`` loads in float32 by default, in ``torch_dtype`` when asked (the reference too), with
    the attention kernel asked for (``sdpa`` by default)."""
    module = PreferenceModule(policy=str(llama_dir), tokenizer=tiny_tokenizer)
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    assert module.policy.config._attn_implementation == "sdpa"
    module = PreferenceModule(policy=str(llama_dir), torch_dtype="bfloat16", attn_implementation="eager")
    assert {p.dtype for m in (module.policy, module.reference) for p in m.parameters()} == {torch.bfloat16}
    assert module.policy.config._attn_implementation == "eager"


def test_policy_dir_loading_errors(llama_dir, tmp_path):
    """Clear errors naming the key: flash_attention_2 where flash-attn is not installed, an unknown dtype, and a
    model directory that needs its own code while ``trust_remote_code`` is off (the default)."""
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        with pytest.raises(ConfigError, match="attn_implementation: flash_attention_2 needs the flash-attn"):
            build_causal_lm(str(llama_dir), attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="model.torch_dtype must be"):
        build_causal_lm(str(llama_dir), torch_dtype="float8")
    custom = tmp_path / "custom"
    custom.mkdir()
    config = {"model_type": "my_custom_lm", "auto_map": {"AutoConfig": "configuration_my.MyConfig",
              "AutoModelForCausalLM": "modeling_my.MyModel"}}  # fmt: skip
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration_my.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ConfigError, match="trust_remote_code"):
        build_causal_lm(str(custom))
    with pytest.raises(ConfigError, match="model.reference: could not load"):
        PreferenceModule(policy=str(llama_dir), reference=str(tmp_path / "missing"))


def test_a_tokenizer_larger_than_the_embedding_is_a_config_error(llama_dir, tiny_tokenizer):
    """A tokenizer with more tokens than the model has embedding rows (a model directory without its tokenizer,
    read with a new BPE; a policy_config with a small vocab_size) is a ConfigError naming the setting, not an
    IndexError in the first forward. One token more than the rows is already too many; exactly as many is fine."""
    rows = len(tiny_tokenizer)

    class Larger:
        def __init__(self, n: int) -> None:
            self.n = n

        def __len__(self) -> int:
            return self.n

    assert build_causal_lm(str(llama_dir), tokenizer=Larger(rows)).get_input_embeddings().num_embeddings == rows
    with pytest.raises(ConfigError, match=rf"model.policy \(.*\): .* {rows} rows but the tokenizer {rows + 1} tokens"):
        PreferenceModule(policy=str(llama_dir), tokenizer=Larger(rows + 1))
    with pytest.raises(ConfigError, match=rf"model.policy_config: .* {rows - 1} rows .* leave vocab_size out"):
        build_causal_lm(None, {**FAMILIES["llama"][0], "vocab_size": rows - 1}, tiny_tokenizer)


def test_a_policy_directory_brings_its_tokenizer_or_a_warning(llama_dir, tiny_tokenizer, tmp_path):
    """data.tokenizer unset: a model.policy directory with tokenizer files gives its tokenizer; one without them
    (the saved model alone) warns that a new BPE, whose ids the model never saw, will be trained; a set
    data.tokenizer is left alone, without a warning."""
    from jsonargparse import Namespace

    from dpo_lightning.cli import tokenizer_from_policy

    def config(policy, tokenizer=None):
        return Namespace(model=Namespace(policy=str(policy)), data=Namespace(tokenizer=tokenizer))

    with pytest.warns(UserWarning, match="holds no tokenizer and data.tokenizer is unset"):
        tokenizer_from_policy(bare := config(llama_dir))
    assert bare.data.tokenizer is None
    with_tokenizer = tmp_path / "with_tokenizer"
    tiny_tokenizer.save_pretrained(with_tokenizer)
    tokenizer_from_policy(found := config(with_tokenizer))
    assert found.data.tokenizer == str(with_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer_from_policy(given := config(llama_dir, "elsewhere"))
    assert given.data.tokenizer == "elsewhere"
