"""Export a training checkpoint's policy as a Hugging Face model directory.

    dpo-lightning export runs/<run>/checkpoints/last.ckpt out/my-dpo-model [--dtype bfloat16] [--tokenizer DIR]
    dpo-lightning export runs/<lora-run>/checkpoints/last.ckpt out/adapter --adapter-only   (LoRA: adapters alone)

Reads a single-file checkpoint (one device, DDP, ``fsdp_single_file``) or a sharded one (the folder that
``trainer.strategy: fsdp`` writes), and from either only the policy's weights (never the optimizer state).
Writes ``model.safetensors`` (sharded when large), ``config.json``, ``generation_config.json`` and the
tokenizer, so that ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads the trained policy. The model
config comes from the checkpoint itself; the tokenizer from ``--tokenizer``, else the run folder's
``tokenizer/`` (saved at fit start), else the run's ``config.yaml`` (``data.tokenizer``).

A LoRA run's checkpoint holds the adapters only: export loads the base model (``--base DIR``, else the run's
``model.policy``, else its ``model.policy_config`` rebuilt from the run's seed), checks it against the base
fingerprint saved in the checkpoint, adds the adapters and writes the merged model (a plain Hugging Face model,
no peft needed to load it); ``--adapter-only`` writes peft's adapter directory instead (``adapter_config.json``
and ``adapter_model.safetensors``, for ``PeftModel.from_pretrained``).

Checkpoints are read with ``weights_only=False`` (they hold the run's hyperparameters): export only
checkpoints you trust, as with any pickle.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from dpo_lightning.errors import ConfigError, UserError

PREFIX = "policy."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The policy's state dict (keys without the ``policy.`` prefix) and the checkpoint's other contents."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    if is_sharded(path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        # only the model weights: the planner reads the keys under "state_dict" and skips optimizer shards
        loaded: dict[str, Any] = {}
        _load_state_dict(
            loaded,
            storage_reader=FileSystemReader(str(path)),
            planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
            no_dist=True,
        )
        state = loaded["state_dict"]
        meta = (
            torch.load(path / META_FILE, map_location="cpu", weights_only=False) if (path / META_FILE).exists() else {}
        )
    elif path.is_file():
        meta = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        state = meta.pop("state_dict")
    else:
        raise UserError(f"{path}: neither a checkpoint file nor a distributed checkpoint folder (.metadata)")
    policy = {}
    for key, value in state.items():
        if key.startswith(PREFIX):
            policy[key[len(PREFIX) :].replace("_orig_mod.", "")] = value
    if not policy:
        raise UserError(f"{path}: holds no policy weights (no '{PREFIX}*' keys)")
    return policy, meta


def model_config(meta: dict[str, Any]) -> Any:
    """The policy's Hugging Face config: stored by PreferenceModule in every checkpoint, else the model directory
    named by the run's ``model.policy``."""
    from transformers import CONFIG_MAPPING, AutoConfig

    stored = (meta.get("dpo_lightning") or {}).get("hf_config")
    if stored:
        stored = dict(stored)
        if stored.get("model_type") not in CONFIG_MAPPING:  # a model with its own code (trust_remote_code)
            raise UserError(
                f"the checkpoint's model type {stored.get('model_type')!r} is not one transformers knows: a model "
                "with its own code (trust_remote_code) cannot be exported from its checkpoint"
            )
        return CONFIG_MAPPING[stored["model_type"]].from_dict(stored)
    policy = (meta.get("hyper_parameters") or {}).get("policy")
    if policy:
        return AutoConfig.from_pretrained(policy)
    raise UserError("the checkpoint holds no model config (it predates dpo_lightning's export support)")


def find_tokenizer(checkpoint: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    for folder in list(checkpoint.resolve().parents)[:3]:
        if (folder / "tokenizer").is_dir():
            return str(folder / "tokenizer")
        config = folder / "config.yaml"
        if config.is_file():
            import yaml

            tokenizer = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("tokenizer")
            if tokenizer:
                return str(tokenizer)
    raise UserError(f"found no tokenizer for {checkpoint} (no tokenizer/ in its run folder); pass --tokenizer DIR")


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    tokenizer: str | None = None,
    adapter_only: bool = False,
    base: str | None = None,
) -> Path:
    """Write the policy of ``checkpoint`` to ``out_dir`` as a Hugging Face model directory (a LoRA run's: merged,
    or its adapter directory with ``adapter_only``)."""
    from transformers import AutoModelForCausalLM

    from dpo_lightning.tokenizer import load_tokenizer

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    state, meta = load_checkpoint(checkpoint)
    tokenizer_path = find_tokenizer(checkpoint, tokenizer)
    peft_config = (meta.get("hyper_parameters") or {}).get("peft_config")
    if peft_config is not None:
        from dpo_lightning.lora import export_lora

        loaded = load_tokenizer(tokenizer_path)
        model = export_lora(checkpoint, state, meta, base, merge=not adapter_only, tokenizer=loaded)
        _save(model, out_dir, dtype, loaded)
        return out_dir
    for flag, given in (("--adapter-only", adapter_only), ("--base", base is not None)):
        if given:
            raise UserError(f"{checkpoint}: {flag} is for LoRA runs (model.peft_config); this one has none")
    config = model_config(meta)
    with torch.device("meta"):  # no random init: the weights come from the checkpoint
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if not _tied(model, k)]:
        raise UserError(f"{checkpoint}: weights do not match the model config (missing {missing}, extra {unexpected})")
    model.tie_weights()  # tied output layer = input embedding again after assign
    _save(model, out_dir, dtype, load_tokenizer(tokenizer_path))
    return out_dir


def _save(model: Any, out_dir: Path, dtype: str, tokenizer: Any) -> None:
    if dtype != "auto":
        model.to(DTYPES[dtype])
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _tied(model: Any, key: str) -> bool:
    """A missing key that is a tied weight (e.g. the output layer = input embedding) is not missing."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-lightning export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a .ckpt file or a distributed checkpoint folder (e.g. last.ckpt)")
    parser.add_argument("out_dir", help="output folder for the Hugging Face model")
    parser.add_argument("--dtype", default="auto", help="auto (as trained), float32, bfloat16 or float16")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's tokenizer/)")
    parser.add_argument("--adapter-only", action="store_true", help="LoRA runs: write the adapter directory only")
    parser.add_argument("--base", default=None, help="LoRA runs: the base model directory (default: model.policy)")
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.out_dir, args.dtype, args.tokenizer, args.adapter_only, args.base)
    what = "the LoRA adapters" if args.adapter_only else "the policy"
    print(f"exported {what} of {args.checkpoint} to {out}")
    return 0
