"""The FLOPs a DPO step needs, and the machine's measured matmul rate: the two halves of an MFU.

    python -m dpo_lightning.bench.flops SPEC.json OUT.json     # a worker: the matmul rate on SPEC's threads

Counted per step (``step_flops``), for a decoder of N non-embedding parameters and an output layer of d·V:

- every processed token (the non-pad tokens the model runs; with a shared prompt the prompt once per pair) goes
  through the blocks: 2N FLOPs forward, 4N backward (policy 6N), plus 2N for the reference's forward when it
  runs every step (8N; 6N with precomputed reference log-probs);
- every scored position (whose next token is a response token: where the response-only head runs the output
  layer) costs 2·d·V forward the same way (8·d·V, or 6·d·V precomputed).

N leaves out the token and position embeddings (lookups, no matmul) and the output layer (counted per scored
position instead). Attention's own matmuls (QKᵀ and AV, ≈ 4·d·context FLOPs per token and layer forward, i.e.
context/(6d) of a block's dense FLOPs) are not counted, so an MFU here errs low. MFU = (step FLOPs ÷ step
time) ÷ the fp32 matmul rate measured in the same run on the same thread count (:func:`matmul_rate`).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


def parameter_split(model: nn.Module) -> dict[str, int]:
    """``non_embedding`` (N: the blocks and final norm), ``head`` (d·V of the output layer) and ``total``."""
    embedding = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = {id(p): p.numel() for p in (out.parameters() if out is not None else ())}
    params = {id(p): p.numel() for p in model.parameters()}  # tied weights counted once
    return {
        "non_embedding": sum(n for i, n in params.items() if i not in embedding and i not in head),
        "head": sum(head.values()),
        "total": sum(params.values()),
    }


def step_flops(split: dict[str, int], processed: float, scored: float, *, reference_every_step: bool) -> float:
    """FLOPs one DPO step needs (module docstring): (6 + 2·ref)·(N·processed + d·V·scored)."""
    per = 8 if reference_every_step else 6
    return per * (split["non_embedding"] * processed + split["head"] * scored)


def matmul_rate(
    n: int = 2048, *, dtype: torch.dtype = torch.float32, device: str = "cpu", trials: int = 5, reps: int = 3
) -> dict[str, float]:
    """GFLOP/s of an n×n @ n×n matmul (2n³ FLOPs) on this process's threads: the best and the median of
    ``trials`` timings of ``reps`` products each, after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(2):
        a @ b
    sync()
    rates = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        rates.append(2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
    return {"gflops_best": max(rates), "gflops_median": statistics.median(rates), "n": n,
            "threads": torch.get_num_threads()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    spec_file, out_file = sys.argv[1:] if argv is None else argv
    spec: dict[str, Any] = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    result = matmul_rate(spec.get("n", 2048), trials=spec.get("trials", 5))
    Path(out_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
