"""Bench section ``trl``: ours vs TRL's DPOTrainer on HH, alternating, plus our HH-path levers, each on vs off in
the same run; and the specs of both sides' workers (``ours_side``, ``trl_side``), which the other sections reuse.
"""

from __future__ import annotations

import json
from typing import Any

from dpo_lightning.bench.suite import Context, alternate, call, ok, ratios, summary

# (ratio name, ours, TRL): the configurations each ratio compares
RATIOS = (
    ("reference_every_step", "ours_padded", "trl_padded"),
    ("precomputed_and_grouped", "ours_levers", "trl_levers"),
    ("reference_every_step_response_only", "ours_padded_response_only", "trl_padded"),
    ("precomputed_and_grouped_response_only", "ours_levers_response_only", "trl_levers"),
    ("ours_levers_vs_trl_plain", "ours_levers", "trl_padded"),
)
LEVERS = (  # (lever, the run with it on; off: ours_padded)
    ("length_grouping", "ours_grouped"),
    ("precomputed_reference", "ours_precomputed"),
    ("response_only_head", "ours_padded_response_only"),
    ("precomputed_and_grouped", "ours_levers"),
)


# ---------------------------------------------------------------------------------------------------- specs
def ours_spec(
    ctx: Context, *, grouped: bool = False, precompute: bool = False, data: dict[str, Any] | None = None,
    module: dict[str, Any] | None = None, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """An ``ours_side`` worker spec: the run's data module and module arguments (``data`` / ``module`` add to or
    override them), the thread count and steps; ``extra`` are the worker's own keys (head, devices, ...)."""
    s, a = ctx.s, ctx.assets
    data = {
        "train_files": a.data_file,
        "tokenizer": a.tokenizer_dir,
        "max_length": s.max_length,
        "max_prompt_length": s.max_prompt_length,
        "max_rows": s.max_rows,
        "batch_size": extra.pop("batch_size", s.batch_size),
        "seed": 0,
        "group_by_length": grouped,
        **(data or {}),
    }
    module = {"policy": a.model_dir, "beta": s.beta, "lr": s.lr, **(module or {})}
    if precompute:
        module.update(precompute_reference=True, reference_cache_dir=str(ctx.work / "reference_logps"))
    return {"data": data, "module": module, "threads": s.threads, "warmup": s.warmup, "steps": s.steps, **extra}


def trl_spec(ctx: Context, pairs_file: str, *, precompute: bool = False, **extra: Any) -> dict[str, Any]:
    """A ``trl_side`` worker spec on the pairs of ``pairs_file`` (:func:`batch_order`), same settings as ours."""
    s, a = ctx.s, ctx.assets
    return {
        "model_dir": a.model_dir,
        "tokenizer_dir": a.tokenizer_dir,
        "pairs_file": pairs_file,
        "batch_size": s.batch_size,
        "max_length": s.max_length,
        "warmup": s.warmup,
        "steps": s.steps,
        "lr": s.lr,
        "beta": s.beta,
        "threads": s.threads,
        "reference": "precomputed" if precompute else "every_step",
        **extra,
    }


def batch_order(
    ctx: Context, grouped: bool, n_batches: int, *, data: dict[str, Any] | None = None, name: str | None = None
) -> str:
    """Write the pairs of our data module's first ``n_batches`` training batches, in order, for TRL (whose
    sequential sampler then sees the same batches) to ``WORK/pairs-NAME.json``; ``data`` as :func:`ours_spec`'s."""
    from dpo_lightning.bench.ours_side import datamodule

    spec = ours_spec(ctx, grouped=grouped, data=data)
    dm = datamodule(spec["data"])
    dm.setup("fit")
    train = dm.datasets["train"]
    position = {int(i): p for p, i in enumerate(train["index"])}
    rows = []
    for b, batch in enumerate(dm.train_dataloader()):
        if b == n_batches:
            break
        for i in batch["index"].tolist():
            row = train[position[int(i)]]
            rows.append({k: list(row[k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")})
    path = ctx.work / f"pairs-{name or ('grouped' if grouped else 'padded')}.json"
    path.write_text(json.dumps(rows))
    return str(path)


def trl_available() -> str | None:
    """None when TRL can be imported, else why not."""
    from dpo_lightning.bench.trl_side import trl_version

    if trl_version() is None:
        return "trl is not installed (it comes with the `bench` extra: pip install -e '.[bench]', or `make bench`)"
    return None


# ---------------------------------------------------------------------------------------------------- section
def section_trl(ctx: Context) -> dict[str, Any]:
    """Ours vs TRL's DPOTrainer on HH, alternating; plus our HH-path levers, each on vs off in the same run."""
    s = ctx.s
    n_batches = s.warmup + s.steps
    trl_missing = trl_available()
    core: dict[str, tuple[str, Any]] = {
        "ours_padded": ("ours_side", ours_spec(ctx)),
        "ours_levers": ("ours_side", ours_spec(ctx, grouped=True, precompute=True)),
    }
    if trl_missing is None:
        core["trl_padded"] = ("trl_side", trl_spec(ctx, batch_order(ctx, False, n_batches)))
        core["trl_levers"] = ("trl_side", trl_spec(ctx, batch_order(ctx, True, n_batches), precompute=True))
    extra: dict[str, tuple[str, Any]] = {}
    if s.single_levers:
        extra["ours_grouped"] = ("ours_side", ours_spec(ctx, grouped=True))
        extra["ours_precomputed"] = ("ours_side", ours_spec(ctx, precompute=True))
        extra["ours_levers_response_only"] = (
            "ours_side",
            ours_spec(ctx, grouped=True, precompute=True, head="response_only"),
        )
    extra["ours_padded_response_only"] = ("ours_side", ours_spec(ctx, head="response_only"))
    if not s.quick:  # fill the reference cache outside timed runs
        call(ctx, "ours_side", ours_spec(ctx, precompute=True, warmup=0, steps=1))
    ctx.log(f"ours vs TRL: {len(core)} configurations x {s.rounds} rounds, {len(extra)} x {s.extra_rounds}")
    runs = alternate(ctx, core, s.rounds)
    runs.update(alternate(ctx, extra, s.extra_rounds))
    compared = {
        label: {"ours": ours, "trl": trl, **ratios(runs[ours], runs[trl])}
        for label, ours, trl in RATIOS
        if ours in runs and trl in runs
    }
    gains: dict[str, Any] = {}
    for lever, name in LEVERS:
        if name in runs and ok(runs[name]):
            gains[lever] = {"on": name, "off": "ours_padded", **ratios(runs[name], runs["ours_padded"])}
        elif name in runs:
            first = runs[name][0]
            gains[lever] = {"status": "not_measured", "reason": first.get("reason") or first.get("error")}
        else:
            gains[lever] = {"status": "skipped", "reason": "single-lever runs are off (Settings.single_levers)"}
    return {
        "status": "ok",
        "trl": {"status": "skipped", "reason": trl_missing} if trl_missing else {"status": "ok"},
        "trl_version": None if trl_missing else _trl_version(),
        "equal_work": equal_work(runs, (("ours_padded", "trl_padded"), ("ours_levers", "trl_levers"))),
        "settings": {
            "shape": s.shape,
            "batch_size": s.batch_size,
            "max_length": s.max_length,
            "max_prompt_length": s.max_prompt_length,
            "warmup_steps": s.warmup,
            "timed_steps": s.steps,
            "rounds": s.rounds,
            "extra_rounds": s.extra_rounds,
            "lr": s.lr,
            "beta": s.beta,
            "threads": s.threads,
        },  # fmt: skip
        "summary": summary(runs),
        "ratios": compared,
        "lever_gains": gains,
        "runs": runs,
    }


def _trl_version() -> str | None:
    from dpo_lightning.bench.trl_side import trl_version

    return trl_version()


def equal_work(runs: dict[str, list[dict[str, Any]]], pairs: Any) -> dict[str, Any]:
    """Same batches, same weights, same settings: the first steps' losses of both sides must agree (≤ 1e-4)."""
    out = {}
    for ours, trl in pairs:
        a, b = ok(runs.get(ours, [])), ok(runs.get(trl, []))
        if a and b:
            la, lb = a[0]["losses"], b[0]["losses"]
            diff = max(abs(x - y) for x, y in zip(la, lb, strict=False))
            out[f"{ours} vs {trl}"] = {"ours_losses": la, "trl_losses": lb, "max_abs_diff": diff, "ok": diff <= 1e-4}
    return out
