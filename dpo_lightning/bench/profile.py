"""Bench section ``profile``: where a step's time goes. torch.profiler's top operators over one step of each
side (ours, TRL; same HH batch), and our step split into phases with the full output layer and the
response-only one (a worker: ``python -m dpo_lightning.bench.profile SPEC.json OUT.json``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dpo_lightning.bench.patches import patched_head
from dpo_lightning.bench.probes import IGNORE_INDEX, real_tokens
from dpo_lightning.bench.report_format import fmt, status_line, table
from dpo_lightning.bench.step import batches_of, build_module
from dpo_lightning.bench.suite import Context, alternate, call
from dpo_lightning.bench.vs_trl import batch_order, ours_spec, trl_available, trl_spec
from dpo_lightning.logps import response_lengths


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


def measure_phases(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`phases` on the first batch of ``spec``, with the full output layer and the response-only one."""
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    batch = batches_of(spec)[0]
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


def section_profile(ctx: Context) -> dict[str, Any]:
    """Where the time goes: torch.profiler's top operators over one step of each side (HH, same batch), and our
    step split into phases with the full output layer and the response-only one."""
    s, a = ctx.s, ctx.assets
    pairs_file = ctx.work / "pairs-padded.json"
    if not pairs_file.exists():
        batch_order(ctx, False, s.warmup + s.steps)
    runs: dict[str, tuple[str, Any]] = {}
    if s.profile_ops:
        runs["ours"] = ("ours_side", ours_spec(ctx, profile=True, steps=1))
        if trl_available() is None:
            runs["trl"] = ("trl_side", {**trl_spec(ctx, str(pairs_file)), "profile": True, "steps": 1})
    results = alternate(ctx, runs, 1)
    spec = {"shape": s.shape, "vocab": a.vocab, "pairs_file": str(pairs_file), "pairs": s.batch_size}
    spec.update(n_batches=1, threads=s.threads, pad_id=a.pad_id)
    return {
        "status": "ok",
        "top_ops": {name: r[0].get("profile") for name, r in results.items()},
        "profiled_step_s": {name: r[0].get("step_s_median") for name, r in results.items()},
        "phases": call(ctx, "profile", spec),
    }


def head_share(phases: dict[str, Any]) -> float | None:
    """Share of the no-grad policy forward spent after the backbone: output layer + log-softmax."""
    full = phases.get("full", {})
    total, backbone = full.get("policy forward (no grad)"), full.get("backbone forward (no grad)")
    return (total - backbone) / total if total and backbone is not None else None


def render_findings(results: dict[str, Any]) -> list[str]:
    """The numbers behind the response-only head, in a few sentences (empty when the sections did not run)."""
    prof = results.get("profile", {})
    ph = prof.get("phases") or {}
    trl = results.get("trl", {})
    gains = trl.get("lever_gains", {}).get("response_only_head", {})
    if not ph.get("full") or gains.get("tokens_per_s_ratio") is None:
        return []
    slots = ph["rows"] * (ph["width"] - 1)
    share = head_share(ph)
    full, resp = ph["full"], ph["response_only"]
    step_full = sum(full[k] for k in ("policy forward", "reference forward", "policy backward", "optimizer step"))
    step_resp = sum(resp[k] for k in ("policy forward", "reference forward", "policy backward", "optimizer step"))
    return [
        "**Findings.** "
        f"In an HH batch of {ph['rows']} rows padded to {ph['width']} tokens, {ph['real_tokens']} of the "
        f"{ph['rows'] * ph['width']} slots are real tokens and only {ph['response_positions']} "
        f"({ph['response_positions'] / slots:.0%} of the scored positions) are response tokens, the only ones "
        "whose log-probs enter the loss. With the `full` head, `concatenated_logps` projects every position onto the "
        f"vocabulary and takes its log-softmax: that output layer is {share:.0%} of the policy's forward time "
        "(section 'Where the time goes'), and its (2B, T, V) logits, their softmax and their gradient are the "
        "peak memory. Projecting only the response positions (the shipped `logps.response_logps`, a forward "
        "pre-hook on the output layer; `model.score_response_only`) gives the same log-probs (to float "
        f"rounding) and cuts the step from {step_full:.2f} s to {step_resp:.2f} s on that batch; through the whole "
        f"Lightning loop on HH it is ×{gains['tokens_per_s_ratio']:.2f} tokens/s at "
        f"×{gains['peak_rss_ratio']:.2f} peak RSS.",
        "",
    ]


def render_profile(prof: dict[str, Any]) -> list[str]:
    lines = ["## Where the time goes", ""]
    if status_line(prof):
        return lines + [status_line(prof), ""]
    if not prof:
        return []
    ph = prof.get("phases") or {}
    if ph.get("full"):
        lines += [
            f"Our step in phases (seconds, median of 3) on one HH batch ({ph['rows']} rows × {ph['width']} tokens, "
            f"{ph['real_tokens']} real tokens, {ph['response_positions']} response positions), output layer as "
            "shipped vs response-only:",
            "",
        ]
        rows = [[k, ph["full"][k], ph["response_only"].get(k)] for k in ph["full"]]
        lines += table(["phase", "full head", "response-only head (shipped)"], rows)
        share = head_share(ph)
        if share is not None:
            lines += [f"Output layer + log-softmax: {share:.0%} of the policy forward with the full head.", ""]
    tops = prof.get("top_ops") or {}
    if any(tops.values()):
        names = [n for n in tops if tops[n]]
        depth = max(len(tops[n]) for n in names)
        header = []
        for n in names:
            header += [f"{n}: op", "ms", "share"]
        rows = []
        for i in range(min(depth, 10)):
            row: list[Any] = []
            for n in names:
                t = tops[n]
                row += [f"`{t[i]['op']}`", t[i]["self_cpu_ms"], f"{t[i]['share']:.0%}"] if i < len(t) else ["", "", ""]
            rows.append(row)
        steps = prof.get("profiled_step_s", {})
        lines += [
            "torch.profiler, one step after warm-up, same batch, top operators by self CPU time (step: "
            + ", ".join(f"{n} {fmt(steps.get(n))} s" for n in names)
            + "):",
            "",
        ]
        lines += table(header, rows)
    return lines


def main(argv: list[str] | None = None) -> int:
    spec_file, out_file = sys.argv[1:] if argv is None else argv
    Path(out_file).write_text(json.dumps(measure_phases(json.loads(Path(spec_file).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
