"""LoRA policies (the ``peft`` library): the reference is the same model with its adapters off.

    model.peft_config: {r: 8, lora_alpha: 16, lora_dropout: 0.05, target_modules: [q_proj, v_proj]}

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) trains a low-rank update B·A beside each target weight
and freezes the base. Since B starts at 0, the initial policy *is* the base model, and DPO's reference π_ref is
that base: here it is the policy run under ``disable_adapter()`` without gradient (:class:`AdapterOffReference`),
so a LoRA run holds one copy of the base weights, not two. The keys of ``model.peft_config`` are those of
peft's ``LoraConfig`` (``task_type`` defaults to ``CAUSAL_LM``; without ``target_modules`` peft picks the
attention projections it knows for the model's family).

Checkpoints hold the adapters (the trainable parameters) and the optimizer state only
(:func:`keep_trainable_state`); the frozen base is rebuilt from ``model.policy`` on resume and checked against
the fingerprint saved with the checkpoint. ``dpo-lightning export`` merges the adapters into the base (or writes
the adapter directory with ``--adapter-only``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpo_lightning.errors import ConfigError


def adapter_names() -> tuple[str, ...]:
    """Names of the submodules/parameters that hold LoRA weights (``lora_A``, ``lora_B``, ...)."""
    from peft.tuners.lora import LoraLayer

    return LoraLayer.adapter_layer_names


def lora_config(settings: dict[str, Any]) -> Any:
    """peft's ``LoraConfig`` from ``model.peft_config``; an unknown key or a bad value is a ConfigError."""
    from peft import LoraConfig

    if not isinstance(settings, dict):
        raise ConfigError(f"model.peft_config must be a mapping of LoraConfig keys (r, lora_alpha, ...): {settings!r}")
    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **settings})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.peft_config: {err}") from None


def apply_lora(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """``model`` with LoRA adapters (a ``PeftModel``): only the adapters train."""
    from peft import get_peft_model

    config = lora_config(settings)
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError) as err:  # e.g. target_modules that the model does not have
        raise ConfigError(f"model.peft_config: {err}") from None


def is_adapter_key(key: str) -> bool:
    """True for a state-dict key of LoRA weights or of a ``modules_to_save`` copy (trained state)."""
    parts = key.split(".")
    return "modules_to_save" in parts or any(name in parts for name in adapter_names())


def base_key(key: str) -> str:
    """A PeftModel key of a base weight as the plain model names it (``base_model.model.`` prefix, and the
    ``base_layer``/``original_module`` level of wrapped layers, removed)."""
    if key.startswith("base_model.model."):
        key = key[len("base_model.model.") :]
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


class AdapterOffReference(nn.Module):
    """The reference of a LoRA policy: the policy's forward with its adapters disabled, in eval mode.

    Holds the policy outside its registered children, so it owns no parameters: nothing is copied, moved,
    cast, sharded or saved twice. Callers run it under ``torch.no_grad()`` (``PreferenceModule`` does).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.__dict__["policy"] = policy  # not a child module on purpose

    @property
    def config(self) -> Any:
        return self.policy.config

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        was_training = self.policy.training
        self.policy.eval()  # as a frozen reference runs: no dropout, whatever model.disable_dropout says
        try:
            with self.policy.disable_adapter():
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's weights under the plain model's names (so a LoRA run and a full fine-tuning run of
        the same base have the same reference fingerprint and share precomputed reference log-probs)."""
        return {base_key(k): v for k, v in self.policy.state_dict().items() if not is_adapter_key(k)}


def keep_trainable_state(module: nn.Module, prefix: str = "policy.") -> None:
    """Make ``module.state_dict()`` (what Lightning checkpoints, single-file or sharded) hold only the trainable
    parameters under ``prefix``: the adapters, not the frozen base. Loading then needs ``strict_loading = False``
    (the base keys are absent on purpose); the module checks that every adapter key was found."""

    def drop_frozen(mod: nn.Module, state: dict[str, Any], state_prefix: str, local_metadata: Any) -> None:
        policy = getattr(mod, prefix.rstrip("."))
        trainable = {f"{state_prefix}{prefix}{name}" for name, p in policy.named_parameters() if p.requires_grad}
        for key in [k for k in state if k.startswith(state_prefix + prefix) and k not in trainable]:
            del state[key]

    module.register_state_dict_post_hook(drop_frozen)


def check_adapter_state(module: Any, checkpoint: dict[str, Any], prefix: str = "policy.") -> None:
    """A single-file checkpoint loaded into a LoRA module must hold exactly its adapters (loading is not strict,
    as the frozen base is absent on purpose, so a wrong checkpoint would otherwise load nothing silently). A
    sharded checkpoint is checked by torch.distributed.checkpoint itself (every requested key must be there)."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        return
    saved = {k for k in state if k.startswith(prefix)}
    expected = {f"{prefix}{name}" for name, p in module.policy.named_parameters() if p.requires_grad}
    if saved != expected:
        missing, extra = sorted(expected - saved)[:3], sorted(saved - expected)[:3]
        raise ConfigError(
            "the checkpoint's policy weights are not this run's LoRA adapters (model.peft_config): "
            f"missing {missing}, unexpected {extra} (first 3 of each); resume with the checkpoint's own settings"
        )


def export_lora(checkpoint: Any, state: dict[str, torch.Tensor], meta: dict[str, Any], base: str | None,
                merge: bool, tokenizer: Any = None):  # fmt: skip
    """The trained LoRA policy of a checkpoint: its base model (``base``, else the run's ``model.policy``, else
    the run's ``model.policy_config`` rebuilt from the run's ``seed_everything``), checked against the base
    fingerprint saved in the checkpoint, with the saved adapters; merged into a plain model (``merge``) or left a
    ``PeftModel`` (whose ``save_pretrained`` writes the adapter directory)."""
    from dpo_lightning.errors import UserError
    from dpo_lightning.models import build_models
    from dpo_lightning.reference import model_fingerprint

    hp = meta.get("hyper_parameters") or {}
    settings = {**hp, "reference": None}
    if base is not None or hp.get("policy") is not None:
        settings.update(policy=base or hp["policy"], policy_config=None)
    else:  # a random-init base: the same init again from the run's seed (the fingerprint below checks it)
        seed = _run_seed(Path(checkpoint))
        if seed is None:
            raise UserError(
                f"{checkpoint}: this LoRA run's base was built from model.policy_config with no seed_everything in "
                "its run folder's config.yaml; pass --base DIR with a saved copy of that base model"
            )
        torch.manual_seed(seed)
    try:
        model, reference = build_models(settings, tokenizer, reference_free=False)
    except UserError as err:  # e.g. the run's model.policy, a relative path, from another folder
        raise UserError(f"{checkpoint}: could not rebuild the LoRA run's base model ({err}); pass --base DIR") from None
    saved = (meta.get("dpo_lightning") or {}).get("reference_fingerprint")
    if saved and model_fingerprint(reference) != saved:
        raise UserError(f"{checkpoint}: the base model is not the one this run was trained on (fingerprint differs)")
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise UserError(f"{checkpoint}: the adapters do not match model.peft_config (missing {missing}, extra {extra})")
    model.load_state_dict(state, strict=False)
    return model.merge_and_unload() if merge else model


def _run_seed(checkpoint: Path) -> int | None:
    """``seed_everything`` of the run whose folder holds ``checkpoint`` (its ``config.yaml``), if any."""
    import yaml

    for folder in list(checkpoint.resolve().parents)[:3]:
        if (folder / "config.yaml").is_file():
            seed = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("seed_everything")
            return seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    return None
