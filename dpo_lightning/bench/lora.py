"""Bench section ``lora``: LoRA r=8 vs full fine-tuning on one GPT-2 shape (d512, 8 layers by default).

    python -m dpo_lightning.bench --sections lora            # this section alone (plus the shared assets)
    python -m dpo_lightning.bench.lora SPEC.json OUT.json    # one worker: one configuration, its own process

Each configuration runs in a worker process of its own (peak RSS is that process's), in turns over rounds, and
reports trainable and total parameters, the checkpoint size (what Lightning saves: the module's state dict and
the AdamW state; for LoRA the adapters alone), peak RSS and tokens/s of the full DPO step (policy forward +
backward, reference forward, AdamW). Full fine-tuning holds two copies of the weights (policy and frozen
reference) plus AdamW's two moments of every weight; LoRA holds one copy of the base, whose adapters-off forward
is the reference, and moments of the adapters only. The base must be wide enough that this shows: at d512 L8
the weights are ~29M parameters (~110 MiB in fp32) against a few hundred MiB of torch and activations.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from dpo_lightning.bench.probes import peak_rss_mb, rss_mb
from dpo_lightning.bench.report_format import fmt
from dpo_lightning.bench.step import build_module, run_steps, synthetic_batch
from dpo_lightning.bench.suite import Context, alternate, ok, ratio_per_round, summary

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["c_attn", "c_proj", "c_fc"]}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration: ``spec`` has shape, vocab, seq_len, pairs, warmup, steps, threads and ``peft_config``
    (null: full fine-tuning)."""
    torch.set_num_threads(spec["threads"])
    rss_start = rss_mb()
    module = build_module(spec["shape"], spec["vocab"], spec["seq_len"], lr=1e-4, peft_config=spec["peft_config"])
    params = list(module.policy.parameters())
    trainable = [p for p in params if p.requires_grad]
    reference_params = sum(p.numel() for p in module.reference.parameters())  # 0 for LoRA: adapters off
    batch = synthetic_batch(spec["pairs"], spec["seq_len"], spec["vocab"], fill=1.0)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    result = run_steps(module, [batch], steps=spec["steps"], warmup=spec["warmup"], optimizer=optimizer)
    buffer = io.BytesIO()  # the parts of a Lightning checkpoint that grow with the model
    torch.save({"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()]}, buffer)
    result.pop("step_s")
    return {
        **result,
        "peak_rss_mb": peak_rss_mb(),
        "rss_at_start_mb": rss_start,
        "trainable_params": sum(p.numel() for p in trainable),
        "policy_params": sum(p.numel() for p in params),
        "reference_params": reference_params,
        "checkpoint_mb": buffer.tell() / 2**20,
        "threads": torch.get_num_threads(),
    }


def section_lora(ctx: Context) -> dict[str, Any]:
    """LoRA r=8 vs full fine-tuning, alternating rounds; ratios LoRA / full per round."""
    s = ctx.s
    base = {"shape": "L2-d64" if s.quick else "L8-d512", "vocab": ctx.assets.vocab, "threads": s.threads}
    # 2 pairs x 128 tokens: activations small enough that the weights (policy, reference, gradients, AdamW's two
    # moments: ~5 x 113 MiB for full fine-tuning at d512 L8) show in the peak; at 4 x 256 they drown in the noise
    base.update(seq_len=64 if s.quick else 128, pairs=2, warmup=1, steps=1 if s.quick else 3)
    runs = {
        "full_finetuning": ("lora", {**base, "peft_config": None}),
        "lora_r8": ("lora", {**base, "peft_config": LORA}),
    }
    results = alternate(ctx, runs, 1 if s.quick else 2)
    ratios = {}
    for key in ("tokens_per_s", "peak_rss_mb", "checkpoint_mb", "trainable_params"):
        values = ratio_per_round(results["lora_r8"], results["full_finetuning"], key)
        ratios[f"{key}_lora_over_full"] = statistics.median(values) if values else None
    facts = {
        name: {k: r[0][k] for k in ("trainable_params", "policy_params", "reference_params", "checkpoint_mb")}
        for name, runs_ in results.items()
        if (r := ok(runs_))
    }
    return {"status": "ok", "settings": base, "lora": LORA, "summary": summary(results), "facts": facts,
            "ratios": ratios, "runs": results}  # fmt: skip


def render_lora(section: dict[str, Any]) -> list[str]:
    """The report's LoRA section (markdown lines)."""
    lines = ["## LoRA r=8 vs full fine-tuning", ""]
    if section.get("status") != "ok":
        return lines + [f"*{section.get('status', 'not run')}: {section.get('reason') or section.get('error')}*", ""]
    st = section["settings"]
    lines += [
        f"GPT-2 {st['shape']}, vocab {st['vocab']}, {st['pairs']} pairs × {st['seq_len']} tokens, {st['threads']} "
        f"threads, fp32; LoRA {json.dumps(section['lora'])}. Each configuration in its own process, rounds taken "
        "in turns; medians over rounds (timings move with the machine's load). Full fine-tuning holds a reference "
        "copy, gradients and AdamW's two moments of every weight (≈ 4 × 113 MiB here) that LoRA does not.",
        "",
        "| configuration | trainable params | policy params | reference params | checkpoint MiB | peak RSS MiB "
        "| tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, x in section["summary"].items():
        f = section["facts"].get(name, {})
        lines.append(
            f"| {name} | {f.get('trainable_params', '')} | {f.get('policy_params', '')} | "
            f"{f.get('reference_params', '')} | {fmt(f.get('checkpoint_mb'))} | {fmt(x['peak_rss_mb'], 0)} | "
            f"{fmt(x['tokens_per_s'], 0)} |"
        )
    r = section["ratios"]
    lines += [
        "",
        f"LoRA / full: tokens/s × {fmt(r['tokens_per_s_lora_over_full'])}, peak RSS × "
        f"{fmt(r['peak_rss_mb_lora_over_full'])}, checkpoint × {fmt(r['checkpoint_mb_lora_over_full'], 4)}, "
        f"trainable parameters × {fmt(r['trainable_params_lora_over_full'], 4)}.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    spec_file, out_file = sys.argv[1:] if argv is None else argv
    result = measure(json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
