"""Throughput and memory of one full DPO training step: policy forward + backward, reference forward, optimizer.

    python -m dpo_lightning.bench.step --shape L2-d128 --seq-len 512 --pairs 8           # CPU, fp32
    python -m dpo_lightning.bench.step --device cuda --dtype bf16 --fsdp --shape gpt2-medium --seq-len 1024

Needs only torch, lightning and transformers (no datasets, no wandb), so it runs on a bare GPU image. The step
is ``PreferenceModule.model_step`` + ``backward`` + ``AdamW.step`` in a plain loop on synthetic batches laid out
like ``PairCollator``'s (2B rows: chosen then rejected, prompt and padding masked out of the labels). On CUDA it
also reports MFU = (6·trainable params + 2·reference params)·tokens/s / measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch

from dpo_lightning.logps import IGNORE_INDEX, response_lengths

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


# ---------------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size (VmHWM) of this process since start or the last :func:`reset_peak_rss`, MiB."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of chosen + rejected: the token count every tokens/s here uses."""
    return int(batch["attention_mask"].sum())


# ---------------------------------------------------------------------------------------------------- levers
def full_log_softmax_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook alternative to ``logps.token_logps``: build the (B, T, V) log-softmax, then gather."""
    return torch.gather(logits.log_softmax(-1), -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


@contextlib.contextmanager
def logps_variant(name: str):
    """Swap how per-token log-probs are computed: ``gather_lse`` (the package's), ``log_softmax``."""
    from dpo_lightning import logps

    original = logps.token_logps
    if name == "log_softmax":
        logps.token_logps = full_log_softmax_token_logps
    elif name != "gather_lse":
        raise ValueError(f"unknown logps variant {name!r}")
    try:
        yield
    finally:
        logps.token_logps = original


# ---------------------------------------------------------------------------------------------------- the loop
def build_module(shape: str, vocab: int, seq_len: int, *, lr: float = 1e-4, **module_kwargs: Any):
    """A PreferenceModule (DPO, β 0.1) whose policy is built from a ``SHAPES`` entry with random init."""
    from dpo_lightning.module import PreferenceModule

    config = dict(SHAPES[shape], vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config["n_positions" if config["model_type"] == "gpt2" else "max_position_embeddings"] = seq_len
    torch.manual_seed(0)
    return PreferenceModule(policy_config=config, loss="dpo", beta=0.1, lr=lr, warmup_steps=0, **module_kwargs)


def top_ops(prof: Any, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` operators with the most self CPU time in a ``torch.profiler`` run, with their share."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:n]
    ]


class ProfileStep(pl.Callback):
    """``torch.profiler`` over one training step (batch ``index``, after warm-up); ``table`` holds its top ops."""

    def __init__(self, index: int) -> None:
        self.index, self.table, self._prof = index, None, None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        if idx == self.index:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._prof.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if idx == self.index and self._prof is not None:
            self._prof.__exit__(None, None, None)
            self.table = top_ops(self._prof)


def phases(module: Any, batch: dict[str, torch.Tensor], repeats: int = 3) -> dict[str, float]:
    """Median seconds of each part of one DPO step on ``batch``: where a step's time goes.

    ``policy forward`` is split into the backbone (the decoder blocks) and the rest: the output layer over the
    vocabulary and the log-softmax, the part the response-only head shrinks.
    """
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=1e-6)
    module.train()
    parts: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        out = fn()
        parts.setdefault(name, []).append(time.perf_counter() - start)
        return out

    for _ in range(repeats + 1):
        with torch.no_grad():
            timed(
                "backbone forward (no grad)",
                lambda: module.policy.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
            )
            timed("policy forward (no grad)", lambda: module.concatenated_logps(module.policy, batch))
        logps = timed("policy forward", lambda: module.concatenated_logps(module.policy, batch))
        ref = timed("reference forward", lambda: module.reference_logps(batch))
        loss = module.objective((logps, ref), response_lengths(batch["labels"]), training=True)[0]
        timed("policy backward", loss.backward)
        timed("optimizer step", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    return {k: statistics.median(v[1:]) for k, v in parts.items()}


def count_params(model: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(module: Any, batches: list[dict[str, torch.Tensor]], *, steps: int, warmup: int) -> dict[str, Any]:
    """Time ``steps`` full DPO steps after ``warmup`` untimed ones, cycling over ``batches``."""
    device = next(module.policy.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=module.hparams.lr)
    module.train()
    times, tokens, losses = [], [], []
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
            tokens.append(real_tokens(batch))
        losses.append(float(loss.detach()))
    return {
        "tokens_per_s": sum(tokens) / sum(times),
        "step_s_median": statistics.median(times),
        "step_s": times,
        "tokens_per_step": statistics.mean(tokens),
        "losses": losses[:3],
    }


class StepTimer(pl.Callback):
    """Wall time between consecutive ``on_train_batch_end`` calls, and each batch's real tokens and loss.

    A step's interval covers everything the trainer does for it (data loading, forward, backward, optimizer,
    logging), which is what a user waits for. The first interval starts at ``on_train_start``.
    """

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[torch.Tensor] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.ends.append(time.perf_counter())
        self.tokens.append(real_tokens(batch))
        self.losses.append(outputs["loss"].detach())


def throughput(ends: list[float], tokens: list[int], warmup: int) -> dict[str, Any]:
    """tokens/s over the steps after ``warmup``, from step end times (``ends[0]`` is the start of step 1)."""
    times = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)][warmup:]
    counted = tokens[warmup:]
    return {
        "tokens_per_s": sum(counted) / sum(times),
        "step_s_median": statistics.median(times),
        "step_s": times,
        "tokens_per_step": statistics.mean(counted),
    }


def _batches(spec: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
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
    from dpo_lightning.bench.patches import patched_head

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    device = torch.device(spec.get("device", "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.get("dtype", "fp32")]
    batches = _batches(spec)
    width = max(b["input_ids"].shape[1] for b in batches)
    module = build_module(spec["shape"], spec["vocab"], max(width, spec.get("seq_len", 0)))
    if spec.get("fsdp"):
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
    params = count_params(module.policy)
    result.update(
        spec=spec,
        params=params,
        rss_before_mb=rss_before,
        peak_rss_mb=peak_rss_mb(),
        peak_rss_reset=peak_reset,
        threads=torch.get_num_threads(),
        model_flops_per_token=6 * count_params(module.policy, trainable=True) + 2 * params,
    )
    if device.type == "cuda":
        peak = spec.get("peak_tflops") or bf16_peak_tflops(device)
        result.update(
            cuda_peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30,
            device_name=torch.cuda.get_device_name(device),
            peak_tflops=peak,
            mfu=result["model_flops_per_token"] * result["tokens_per_s"] / (peak * 1e12),
        )
    return result


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


def bf16_peak_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul throughput (TFLOP/s) on ``device``: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def measure_phases(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`phases` on the first batch of ``spec``, with the full output layer and the response-only one."""
    from dpo_lightning.bench.patches import patched_head

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    batch = _batches(spec)[0]
    module = build_module(spec["shape"], spec["vocab"], batch["input_ids"].shape[1])
    out: dict[str, Any] = {
        "spec": spec,
        "rows": batch["input_ids"].shape[0],
        "width": batch["input_ids"].shape[1],
        "real_tokens": real_tokens(batch),
        "response_positions": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
    }
    for head in ("full", "response_only"):
        with patched_head(head):
            out[head] = phases(module, batch)
    return out


def measure_all(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several configurations in one process, in the given order (put them in increasing size: each peak RSS
    is taken after resetting the high-water mark, so memory a larger earlier run kept would show)."""
    results = []
    for spec in specs:
        if spec.get("phases"):
            results.append(measure_phases(spec))
            continue
        result = measure(spec)
        result.pop("step_s", None)
        results.append(result)
    return results


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
