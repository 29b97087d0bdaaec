"""What a GPU session runs: the bare step loop under FSDP2 in bf16 (``bench.step --fsdp``), and the section that
lists those commands (this CPU harness never runs them)."""

from __future__ import annotations

import os
from typing import Any

import torch

COMMANDS = [
    "python -m dpo_lightning.bench.step --device cuda --dtype bf16 --fsdp --shape gpt2-medium "
    "--vocab 50257 --seq-len 1024 --pairs 8 --threads 8",
    "python -m dpo_lightning.bench.step --device cuda --dtype bf16 --fsdp --shape llama-1b "
    "--vocab 32000 --seq-len 2048 --pairs 4 --threads 8",
]


def fully_shard_module(module: Any, device: torch.device, dtype: torch.dtype) -> None:
    """FSDP2 on this one process (world size 1), as ``trainer.strategy: fsdp`` does it: ``fully_shard`` each
    decoder block, then the whole model, for the policy and the reference; bf16 compute, fp32 master weights."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from dpo_lightning.strategy import shard_model

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (1,))
    module.to(device)
    precision = "bf16-mixed" if dtype == torch.bfloat16 else "32-true"
    for model in (module.policy, module.reference):
        if model is not None:
            shard_model(model, mesh, precision=precision)


def section_gpu() -> dict[str, Any]:
    """What a later session with a GPU runs; here, whether there is one."""
    have = torch.cuda.is_available()
    return {
        "status": "skipped" if not have else "not_run",
        "reason": "No GPU on this machine" if not have else "Run the commands below on the GPU machine",
        "device": torch.cuda.get_device_name(0) if have else None,
        "commands": COMMANDS,
        "mfu_formula": "(6 + 2 with a reference) x (N non-embedding params x tokens + d x V x response positions)"
        " per step x steps/s / measured bf16 matmul rate (bench/flops.py)",
    }
