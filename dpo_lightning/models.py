"""Causal LMs for the policy and the reference: from a local Hugging Face directory, or built from a config.

    dpo-lightning fit --config experiments/tiny_cpu.yaml --model.policy DIR --model.torch_dtype bfloat16

Building from a config (random init) is how tests and CPU runs get a model with no download: e.g.
``{model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4, n_positions: 256}``; any family Hugging Face knows
works the same way (``llama``, ``qwen2``, ``mistral``, ``gpt_neox``, ``gemma``, ...). :func:`build_models` makes
the policy and its reference from the module's settings: a frozen copy, a model of its own, none, or, for a
LoRA policy, the policy itself with its adapters off (:mod:`dpo_lightning.lora`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from dpo_lightning.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DType = Literal["float32", "bfloat16", "float16", "auto"]
Attention = Literal["sdpa", "eager", "flash_attention_2", "flex_attention"]
# config numbers and module attributes that hold a dropout probability: attention_dropout (Llama, Qwen2,
# Mistral, Gemma, GPT-NeoX), hidden_dropout (GPT-NeoX), attn_pdrop/resid_pdrop/embd_pdrop (GPT-2), ...
DROPOUT_NAME = re.compile(r"dropout|pdrop", re.IGNORECASE)


def check_attention(attn_implementation: str) -> None:
    """Fail early, naming the key, when the attention kernel asked for is not installed."""
    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ConfigError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package and a CUDA GPU, and "
                "it is not available here; use sdpa (the default) or eager"
            )
    elif attn_implementation not in ("sdpa", "eager", "flex_attention"):  # flex: for data.packing on a GPU
        raise ConfigError(
            "model.attn_implementation must be sdpa, eager, flash_attention_2 or flex_attention, "
            f"got {attn_implementation!r}"
        )


def _dtype(torch_dtype: str) -> Any:
    if torch_dtype == "auto":
        return "auto"
    if torch_dtype not in DTYPES:
        raise ConfigError(f"model.torch_dtype must be auto or one of {', '.join(DTYPES)}, got {torch_dtype!r}")
    return DTYPES[torch_dtype]


def build_causal_lm(
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    *,
    torch_dtype: DType = "float32",
    attn_implementation: Attention = "sdpa",
    trust_remote_code: bool = False,
    key: str = "model.policy",
) -> PreTrainedModel:
    """Load a causal LM from ``name_or_path`` or build one from ``config`` with random init.

    When building, the vocabulary size and BOS/EOS/pad ids come from ``tokenizer`` so the embedding matches it;
    either way a ``tokenizer`` with more tokens than the model has embedding rows is a ConfigError (its ids would
    index past the embedding). ``torch_dtype`` is the dtype of the weights (``auto``: as saved);
    ``trust_remote_code`` lets a model directory run its own Python code, so it is off unless asked for. ``key``
    names the setting in errors (``model.reference`` for a reference directory).
    """
    if (name_or_path is None) == (config is None):
        raise ConfigError("set exactly one of model.policy (a model directory) and model.policy_config")
    check_attention(attn_implementation)
    dtype = _dtype(torch_dtype)
    if name_or_path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, ImportError) as err:
            raise ConfigError(
                f"{key}: could not load a causal LM from {name_or_path!r} ({type(err).__name__}: {err})"
            ) from None
        check_vocabulary(model, tokenizer, f"{key} ({name_or_path})", "set data.tokenizer to the model's own tokenizer")
        return model
    settings = dict(config)
    model_type = settings.pop("model_type", "gpt2")
    if tokenizer is not None:
        settings.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                settings.setdefault(name, value)
    try:
        model_config = AutoConfig.for_model(model_type, **settings)
        model = AutoModelForCausalLM.from_config(
            model_config,
            dtype=torch.float32 if dtype == "auto" else dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.policy_config: {err}") from None
    check_vocabulary(model, tokenizer, "model.policy_config", "leave vocab_size out: it defaults to the tokenizer's")
    return model


def check_vocabulary(model: nn.Module, tokenizer: Any, what: str, fix: str) -> None:
    """A ConfigError when ``tokenizer`` has more tokens than ``model`` has embedding rows (``what`` names the
    model's setting, ``fix`` says what to do): its higher ids would fail deep in the forward with an IndexError."""
    if tokenizer is None:
        return
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(
            f"{what}: the model's embedding has {rows} rows but the tokenizer {len(tokenizer)} tokens; {fix}"
        )


def _zero_dropout_numbers(obj: Any) -> None:
    """Set every float attribute of ``obj`` named like a dropout probability to 0."""
    for name, value in list(vars(obj).items()):
        if DROPOUT_NAME.search(name) and isinstance(value, float) and not isinstance(value, bool):
            setattr(obj, name, 0.0)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, wherever it lives, so a policy and its copy give identical outputs.

    DPO implementations do this so that, at step 0, the policy equals the reference exactly and the loss is
    ln 2; with dropout on, the two forward passes differ by noise and the implicit rewards start non-zero.
    A probability lives in three places: ``nn.Dropout`` modules; plain numbers on modules (Llama's, Qwen2's,
    Mistral's, Gemma's and GPT-NeoX's attention modules pass ``self.attention_dropout`` to the attention kernel);
    and the model config (read by code that builds modules later, and saved with the model).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        _zero_dropout_numbers(module)
    config = getattr(model, "config", None)
    if config is not None:
        _zero_dropout_numbers(config)
        for sub in ("text_config", "decoder"):  # composite configs keep the LM's numbers one level down
            if hasattr(config, sub) and hasattr(getattr(config, sub), "__dict__"):
                _zero_dropout_numbers(getattr(config, sub))


def build_models(
    settings: Mapping[str, Any], tokenizer: Any, *, reference_free: bool
) -> tuple[nn.Module, nn.Module | None]:
    """The policy (in train mode) and its reference (frozen, eval mode; ``None`` when reference-free).

    ``settings`` are ``PreferenceModule``'s (its hyperparameters): ``policy`` or ``policy_config``,
    ``reference``, ``disable_dropout``, ``peft_config``, and ``torch_dtype``, ``attn_implementation``,
    ``trust_remote_code`` for :func:`build_causal_lm`. The reference is a frozen copy of the initial policy, or
    the model at ``reference``; with ``peft_config`` the policy gets LoRA adapters and the reference is the same
    model with them off (one copy of the base weights). Dropout is zeroed before the adapters are added, so a
    LoRA run keeps its own ``lora_dropout``.
    """
    load = {k: settings[k] for k in ("torch_dtype", "attn_implementation", "trust_remote_code") if k in settings}
    reference, peft_config = settings.get("reference"), settings.get("peft_config")
    disable_dropout_ = settings.get("disable_dropout", True)
    if peft_config is not None and reference is not None:  # before loading anything
        raise ConfigError(
            "model.reference with model.peft_config: the reference of a LoRA run is its base model with the "
            "adapters off (model.policy); drop model.reference, or train without LoRA"
        )
    model = build_causal_lm(settings.get("policy"), settings.get("policy_config"), tokenizer, **load)
    if disable_dropout_:
        disable_dropout(model)
    if peft_config is not None:
        from dpo_lightning.lora import AdapterOffReference, apply_lora

        model = apply_lora(model, peft_config)
        model.train()
        return model, None if reference_free else AdapterOffReference(model)
    # from_pretrained returns eval mode and Lightning keeps submodule modes: train mode, so dropout (when
    # not disabled) is live in training steps
    model.train()
    if reference_free:
        return model, None
    frozen = (
        copy.deepcopy(model)
        if reference is None
        else build_causal_lm(reference, None, tokenizer, **load, key="model.reference")
    )
    if disable_dropout_:
        disable_dropout(frozen)
    frozen.requires_grad_(False)
    frozen.eval()
    return model, frozen
