"""Throughput and memory of one full DPO training step: policy forward + backward, reference forward, optimizer.

    python -m dpo_lightning.bench.step --shape L2-d128 --seq-len 512 --pairs 8           # CPU, fp32
    python -m dpo_lightning.bench.step --device cuda --dtype bf16 --fsdp --shape gpt2-medium --seq-len 1024

Needs only torch, lightning and transformers (no datasets, no wandb), so it runs on a bare GPU image. The step
is ``PreferenceModule.model_step`` + ``backward`` + ``AdamW.step`` in a plain loop on synthetic batches laid out
like ``PairCollator``'s (2B rows: chosen then rejected, prompt and padding masked out of the labels), or on
real pairs padded to one width (``pairs_file``). It reports the FLOPs the step needs per real token
(:func:`dpo_lightning.bench.flops.step_flops`) and, on CUDA, MFU: those FLOPs × tokens/s ÷ the measured bf16
matmul rate (:func:`dpo_lightning.bench.flops.matmul_rate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from dpo_lightning.bench.flops import matmul_rate, parameter_split, step_flops
from dpo_lightning.bench.probes import IGNORE_INDEX, peak_rss_mb, rates, reset_peak_rss, rss_mb, token_counts

# GPT-2 shapes for the CPU sweep, plus the two GPU shapes of the issue. vocab/positions are set per run.
SHAPES: dict[str, dict[str, Any]] = {
    "L2-d64": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2},
    "L2-d128": {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4},
    "L2-d256": {"model_type": "gpt2", "n_layer": 2, "n_embd": 256, "n_head": 4},
    "L4-d128": {"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4},
    "L4-d256": {"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4},
    "L8-d512": {"model_type": "gpt2", "n_layer": 8, "n_embd": 512, "n_head": 8},  # the LoRA section's (bench/lora.py)
    "gpt2-medium": {"model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16},
    # ~1.1B parameters at vocab 32k (TinyLlama's shape)
    "llama-1b": {
        "model_type": "llama",
        "num_hidden_layers": 22,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
}


# ---------------------------------------------------------------------------------------------------- inputs
def synthetic_batch(
    pairs: int, seq_len: int, vocab: int, *, fill: float = 1.0, prompt_frac: float = 0.5, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A PairCollator-shaped batch of 2·pairs rows of width ``seq_len`` with random token ids.

    The longest row fills ``seq_len``; with ``fill`` < 1 the others have random lengths down to ``fill·seq_len``
    (right padding). Each pair shares a prompt of ``prompt_frac`` of its length; the labels cover the responses.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(int(fill * seq_len), 4), seq_len + 1, (2 * pairs,), generator=g)
    lengths[0] = seq_len
    input_ids = torch.randint(1, vocab, (2 * pairs, seq_len), generator=g)
    attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    for i in range(pairs):
        prompt = int(prompt_frac * min(lengths[i], lengths[pairs + i]))
        input_ids[pairs + i, :prompt] = input_ids[i, :prompt]  # chosen and rejected share the prompt
        labels[i, :prompt] = IGNORE_INDEX
        labels[pairs + i, :prompt] = IGNORE_INDEX
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "index": torch.arange(pairs)}


def collate_pairs(rows: list[dict[str, list[int]]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """``PairCollator``'s layout (chosen rows, then rejected) without importing the data package (no datasets);
    ``width`` pads every batch to one shape (for ``torch.compile``)."""
    seqs, labels = [], []
    for key in ("chosen_input_ids", "rejected_input_ids"):
        for r in rows:
            seqs.append(r["prompt_input_ids"] + r[key])
            labels.append([IGNORE_INDEX] * len(r["prompt_input_ids"]) + r[key])
    width = width or max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    label_ids = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(seqs, labels, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        label_ids[i, : len(lab)] = torch.tensor(lab)
    attention_mask = (torch.arange(width) < torch.tensor([len(s) for s in seqs])[:, None]).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": label_ids,
        "index": torch.arange(len(rows)),
    }


# ---------------------------------------------------------------------------------------------------- the loop
def shape_config(shape: str, positions: int, **ids: Any) -> dict[str, Any]:
    """A ``SHAPES`` entry as a model config with ``positions`` positions (and vocab / token ids in ``ids``)."""
    config = dict(SHAPES[shape], **ids)
    config["n_positions" if config["model_type"] == "gpt2" else "max_position_embeddings"] = positions
    return config


def build_module(shape: str, vocab: int, seq_len: int, *, lr: float = 1e-4, **module_kwargs: Any):
    """A PreferenceModule (DPO, β 0.1) whose policy is built from a ``SHAPES`` entry with random init."""
    from dpo_lightning.module import PreferenceModule

    config = shape_config(shape, seq_len, vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return PreferenceModule(policy_config=config, loss="dpo", beta=0.1, lr=lr, warmup_steps=0, **module_kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(
    module: Any, batches: list[dict[str, torch.Tensor]], *, steps: int, warmup: int, optimizer: Any = None
) -> dict[str, Any]:
    """Time ``steps`` full DPO steps after ``warmup`` untimed ones, cycling over ``batches`` (AdamW at the
    module's lr unless an ``optimizer`` is given)."""
    device = next(module.policy.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    trainable = [p for p in module.policy.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(trainable, lr=module.hparams.lr)
    module.train()
    times, counts, losses = [], [], []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        _sync(device)
        start = time.perf_counter()
        loss, _ = module.model_step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            counts.append(token_counts(batch))
        losses.append(float(loss.detach()))
    return {**rates(times, counts), "losses": losses[:3]}


def batches_of(spec: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
    """Synthetic batches, or (``pairs_file``) real tokenized pairs padded to one common width."""
    n, pairs = spec.get("n_batches", 2), spec["pairs"]
    if spec.get("pairs_file"):
        rows = json.loads(open(spec["pairs_file"]).read())[: n * pairs]
        chunks = [rows[i * pairs : (i + 1) * pairs] for i in range(n)]
        width = max(
            len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows
        )
        return [collate_pairs(c, spec.get("pad_id", 0), width) for c in chunks]
    return [
        synthetic_batch(pairs, spec["seq_len"], spec["vocab"], fill=spec.get("fill", 1.0), seed=s) for s in range(n)
    ]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: build, warm up, time. The keys are :func:`main`'s options."""
    from dpo_lightning.bench.patches import logps_variant, patched_head

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    device = torch.device(spec.get("device", "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.get("dtype", "fp32")]
    batches = batches_of(spec)
    width = max(b["input_ids"].shape[1] for b in batches)
    module = build_module(spec["shape"], spec["vocab"], max(width, spec.get("seq_len", 0)))
    if spec.get("fsdp"):
        from dpo_lightning.bench.gpu import fully_shard_module

        fully_shard_module(module, device, dtype)
    else:
        module.to(device=device, dtype=dtype)
    if spec.get("compile"):
        module.policy.forward = torch.compile(module.policy.forward)
        module.reference.forward = torch.compile(module.reference.forward)
    rss_before = rss_mb()
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with logps_variant(spec.get("logps", "gather_lse")), patched_head(spec.get("head", "full")):
        result = run_steps(module, batches, steps=spec["steps"], warmup=spec["warmup"])
    split = parameter_split(module.policy)
    per_step = step_flops(split, result["processed_tokens_per_step"], result["scored_positions_per_step"],
                          reference_every_step=module.reference is not None)  # fmt: skip
    result.update(
        spec=spec,
        params=split["total"],
        rss_before_mb=rss_before,
        peak_rss_mb=peak_rss_mb(),
        peak_rss_reset=peak_reset,
        threads=torch.get_num_threads(),
        flops_per_real_token=per_step / result["tokens_per_step"],
    )
    if device.type == "cuda":
        peak = spec.get("peak_tflops") or matmul_rate(8192, dtype=torch.bfloat16, device="cuda")["gflops_best"] / 1e3
        result.update(
            cuda_peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30,
            device_name=torch.cuda.get_device_name(device),
            peak_tflops=peak,
            mfu=result["flops_per_real_token"] * result["tokens_per_s"] / (peak * 1e12),
        )
    return result


def measure_all(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several configurations in one process, in the given order (put them in increasing size: each peak RSS
    is taken after resetting the high-water mark, so memory a larger earlier run kept would show)."""
    return [{k: v for k, v in measure(spec).items() if k != "step_s"} for spec in specs]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and not argv[0].startswith("-"):  # the bench's worker call: SPEC.json OUT.json
        argv = ["--spec", argv[0], "--out", argv[1]]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="L2-d128", choices=sorted(SHAPES))
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step (2x rows)")
    parser.add_argument("--fill", type=float, default=1.0, help="shortest row as a fraction of --seq-len")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) over this one process")
    parser.add_argument("--compile", action="store_true", help="torch.compile policy and reference")
    parser.add_argument("--logps", default="gather_lse", choices=["gather_lse", "log_softmax"])
    parser.add_argument("--head", default="response_only", choices=["response_only", "full"])
    parser.add_argument("--spec", help="a JSON configuration or list of them (the options above as keys)")
    parser.add_argument("--out", help="where --spec writes its JSON list of results")
    args = parser.parse_args(argv)
    if args.spec:  # a list of configurations gives a list of results; one gives one
        specs = json.loads(open(args.spec).read())
        results = measure_all(specs if isinstance(specs, list) else [specs])
        with open(args.out, "w") as f:
            json.dump(results if isinstance(specs, list) else results[0], f)
        return 0
    spec = {k: v for k, v in vars(args).items() if k not in ("spec", "out")}
    print(json.dumps(measure_all([spec])[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
