"""Causal LMs for the policy and the reference: from a local Hugging Face directory, or built from a config.

Building from a config (random init) is how tests and CPU runs get a model with no download: e.g.
``{model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4, n_positions: 256}``.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from dpo_lightning.errors import ConfigError


def build_causal_lm(
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> PreTrainedModel:
    """Load a causal LM from ``name_or_path`` (remote code off) or build one from ``config`` with random init.

    When building, the vocabulary size and BOS/EOS/pad ids come from ``tokenizer`` so the embedding matches it.
    """
    if (name_or_path is None) == (config is None):
        raise ConfigError("set exactly one of model.policy (a model directory) and model.policy_config")
    if name_or_path is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"model.policy: could not load a causal LM from {name_or_path!r} ({type(err).__name__}: {err})"
            ) from None
    settings = dict(config)
    model_type = settings.pop("model_type", "gpt2")
    if tokenizer is not None:
        settings.setdefault("vocab_size", len(tokenizer))
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                settings.setdefault(key, value)
    try:
        model_config = AutoConfig.for_model(model_type, **settings)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.policy_config: {err}") from None
    return AutoModelForCausalLM.from_config(model_config)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, so a policy and its copy give identical outputs.

    DPO implementations do this so that, at step 0, the policy equals the reference exactly and the loss is
    ln 2; with dropout on, the two forward passes differ by noise and the implicit rewards start non-zero.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
