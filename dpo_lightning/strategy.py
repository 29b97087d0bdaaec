"""FSDP2 for the policy and the frozen reference, through Lightning's ModelParallelStrategy.

    dpo-lightning fit --config experiments/tiny_cpu.yaml --trainer.strategy fsdp --trainer.devices 2

Lightning's own ``fsdp`` strategy is FSDP1: it refuses a CPU accelerator and wraps modules itself. In this
project ``fsdp`` names :class:`FSDP2Strategy` instead (registered when this module is imported, which
``dpo_lightning.module`` does): Lightning's ``ModelParallelStrategy`` with every process one data-parallel
rank and no tensor parallelism, while ``PreferenceModule.configure_model`` applies ``fully_shard`` to each
decoder block and then to the whole model, for the policy and for the reference (:func:`shard_model`). The
same code runs over gloo on CPUs (the tests) and NCCL on GPUs.

Strategy names (``trainer.strategy``):

- ``fsdp``: FSDP2; checkpoints are distributed (a folder with one shard file per rank, written atomically).
- ``fsdp_single_file``: FSDP2; checkpoints are gathered to rank 0 into one file.
- ``ddp`` and ``auto`` (one device) are Lightning's own.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, StrategyRegistry
from torch import nn

STRATEGY_NAMES = {"fsdp": True, "fsdp_single_file": False}  # name -> save_distributed_checkpoint


# --------------------------------------------------------------------------- the wrap unit
def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a causal LM: the unit FSDP shards and gathers one at a time.

    Hugging Face models name their block class in ``_no_split_modules`` (``GPT2Block``, ``GPTNeoXLayer`` for
    Pythia, ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``MistralDecoderLayer``, ``GemmaDecoderLayer``, ...),
    so no class is hard-coded here; a LoRA ``PeftModel`` answers for the model it wraps. Only the outermost
    matches count (a listed class nested in another listed one is inside that unit already). A model without
    that attribute falls back to the children of its longest ``nn.ModuleList``.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # ids of modules within a block already taken
    for module in model.modules():  # pre-order: a block comes before the modules inside it
        if id(module) in inside or type(module).__name__ not in names:
            continue
        blocks.append(module)
        inside.update(id(m) for m in module.modules())
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__}: found no decoder blocks to shard (no _no_split_modules)")
    return list(max(lists, key=len))


def mixed_precision_policy(precision: str | None) -> Any:
    """FSDP2's mixed precision for ``bf16-mixed``: blocks are gathered and run in bf16, gradients are reduced in
    fp32 and the sharded master weights stay fp32. Other precisions need no policy (``bf16-true`` converts
    the module itself; ``32-true`` is fp32 throughout)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def shard_model(model: nn.Module, mesh: Any, *, precision: str | None = None, frozen: bool = False) -> nn.Module:
    """``fully_shard`` each decoder block, then the whole model (embeddings, final norm, output layer).

    Each block is then gathered just before its forward (and backward) and freed after, so a rank holds one
    full block at a time plus its 1/N shard of everything. FSDP2 keeps the root's parameters (embeddings,
    output layer) gathered after the forward, for the backward that follows; a ``frozen`` model (the
    reference) has no backward, so its root is resharded after the forward too.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):  # configure_model runs again on a second fit/validate call
        return model
    if next(model.parameters(), None) is None:  # a view of another model (a LoRA policy with adapters off)
        return model
    kwargs: dict[str, Any] = {"mesh": mesh}
    policy = mixed_precision_policy(precision)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for block in decoder_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs, **({"reshard_after_forward": True} if frozen else {}))
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them (memory for ~30% time).

    Hugging Face models do it per decoder block with non-reentrant checkpointing, which composes with FSDP2;
    other models get torch's checkpoint wrapper around each block.
    """
    # transformers 5 renamed gradient_checkpointing_enable (now deprecated) to activation_checkpointing_enable
    for method, kwargs_name in (
        ("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
        ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"),
    ):
        if hasattr(model, method):
            getattr(model, method)(**{kwargs_name: {"use_reentrant": False}})
            if getattr(model, "config", None) is not None:
                model.config.use_cache = False  # a KV cache is useless in training and clashes with recomputation
            return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    block_types = tuple({type(b) for b in decoder_blocks(model)})
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, block_types))


# --------------------------------------------------------------------------- the strategy
class FSDP2Strategy(ModelParallelStrategy):
    """Data-parallel FSDP2: ``ModelParallelStrategy`` with ``data_parallel_size`` = all processes and
    ``tensor_parallel_size`` = 1, whatever ``trainer.devices`` and ``trainer.num_nodes`` say.

    A distributed checkpoint is written to a hidden folder next to its target and renamed into place once
    every rank has finished, so a run killed mid-save keeps its previous checkpoint whole.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs: Any):
        """
        Args:
            save_distributed_checkpoint: ``True``: one shard file per rank in a checkpoint folder (fast, no
                gather); ``False``: the full state gathered on rank 0 into one file.
            **kwargs: ``process_group_backend``, ``timeout``, as for ``ModelParallelStrategy``.
        """
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # known before the process group exists
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        # hidden names without "last" in them, so `--ckpt_path last` never picks an unfinished folder
        tag = hashlib.sha1(path.name.encode()).hexdigest()[:10]
        partial, previous = path.parent / f".partial-{tag}", path.parent / f".previous-{tag}"
        if self.global_rank == 0:
            for stale in (partial, previous):
                if stale.exists():
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        self.barrier()
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier()  # every shard is on disk
        if self.global_rank == 0:
            if path.is_dir():
                path.rename(previous)
            elif path.exists():
                path.unlink()
            partial.rename(path)
            if previous.exists():
                shutil.rmtree(previous)
        self.barrier()


def register_strategies() -> None:
    """Make ``trainer.strategy: fsdp`` (and ``fsdp_single_file``) mean :class:`FSDP2Strategy`.

    Lightning rejects its FSDP1 names on a CPU accelerator; ``fsdp`` is taken off that FSDP1-only check, as it
    no longer names FSDP1 here (Lightning's FSDP1 stays reachable by class path).
    """
    registered = FSDPStrategy._registered_strategies
    if "fsdp" in registered:
        registered.remove("fsdp")
    for name, distributed in STRATEGY_NAMES.items():
        StrategyRegistry.register(
            name,
            FSDP2Strategy,
            description=f"FSDP2 (fully_shard per decoder block), {'sharded' if distributed else 'single-file'} "
            "checkpoints",
            override=True,
            save_distributed_checkpoint=distributed,
        )


register_strategies()


# --------------------------------------------------------------------------- distributed helpers
def is_fsdp(strategy: Any) -> bool:
    return isinstance(strategy, ModelParallelStrategy)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a one-element list outside a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (a run must stop on all ranks together)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --------------------------------------------------------------------------- RNG of the training step
def get_rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
