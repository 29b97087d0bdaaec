"""Our side of the comparison: PreferenceDataModule + PreferenceModule under a Lightning Trainer, as
``dpo-lightning fit`` runs them, timed step by step.

    python -m dpo_lightning.bench.ours_side SPEC.json OUT.json

The spec names the data module's and the module's arguments (``data``, ``module``), the trainer's process
count and strategy, and two bench-only switches (:mod:`dpo_lightning.bench.patches`): ``head``
(``response_only``, as shipped, or ``full``, every position through the output layer; the default here, for the
trl section's historical comparison) and ``logps``. A data argument this checkout lacks (``packing``, say) is
reported as not measured. Besides tokens/s and peak RSS it reports the processed and scored tokens per step and
the policy's parameter split (:mod:`dpo_lightning.bench.flops`), and the bytes of parameters this rank holds
(local shards under FSDP). Under DDP/FSDP, Lightning relaunches this same command for the other ranks; each
rank writes ``OUT.json.rank<r>`` (rank 0 writes ``OUT.json``).
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from dpo_lightning.bench.flops import parameter_split
from dpo_lightning.bench.patches import logps_variant, patched_head
from dpo_lightning.bench.probes import ProfileStep, StepTimer, peak_rss_mb, rss_mb, throughput

HH_DATA = {"format": "hh", "on_bad_row": "skip"}


class NotAvailable(RuntimeError):
    """A lever this checkout does not have (yet): the section records it as not measured."""


def missing_arguments(cls: type, names: list[str]) -> list[str]:
    """The names among ``names`` that ``cls.__init__`` does not take."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n in names if n not in params]


def datamodule(data: dict[str, Any]):
    from dpo_lightning.data import PreferenceDataModule

    missing = missing_arguments(PreferenceDataModule, list(data))
    if missing:
        raise NotAvailable(f"PreferenceDataModule has no argument {', '.join(missing)}")
    return PreferenceDataModule(**{**HH_DATA, **data})


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl

    from dpo_lightning.module import PreferenceModule

    missing = missing_arguments(PreferenceModule, list(spec["module"]))
    if missing:
        raise NotAvailable(f"PreferenceModule has no argument {', '.join(missing)}")
    torch.set_num_threads(spec["threads"])
    dm = datamodule(spec["data"])
    module = PreferenceModule(loss="dpo", warmup_steps=0, optimizer="adamw", **spec["module"])
    rss_before = rss_mb()
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    if spec.get("profile"):
        callbacks.append(ProfileStep(spec["warmup"]))
    with tempfile.TemporaryDirectory() as root, patched_head(spec.get("head", "full")):
        with logps_variant(spec.get("logps", "gather_lse")):
            trainer = pl.Trainer(
                accelerator="cpu",
                devices=spec.get("devices", 1),
                strategy=spec.get("strategy", "auto"),
                precision="32-true",
                max_steps=spec["warmup"] + spec["steps"],
                gradient_clip_val=1.0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
                default_root_dir=root,
                callbacks=callbacks,
            )
            if spec.get("devices", 1) == 1:
                torch.set_num_threads(spec["threads"])
            trainer.fit(module, datamodule=dm)
    result = throughput(timer.ends, timer.counts, spec["warmup"])
    result.update(
        side="ours",
        losses=[float(x) for x in timer.losses[:3]],
        rss_before_mb=rss_before,
        peak_rss_mb=peak_rss_mb(),
        threads=torch.get_num_threads(),
        rank=trainer.global_rank,
        params=parameter_split(module.policy),
        param_mb=param_mb(module.policy, module.reference),
    )
    if spec.get("profile"):
        result["profile"] = callbacks[-1].table
    return result


def param_mb(*models: Any) -> float:
    """MiB of the parameters this rank holds (a DTensor counts its local shard); a missing model counts 0."""
    total = 0
    for model in models:
        for p in model.parameters() if model is not None else ():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
    return total / 2**20


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_file, out_file = argv
    spec = json.loads(Path(spec_file).read_text())
    try:
        result = run_ours(spec)
    except NotAvailable as err:
        result = {"status": "not_measured", "reason": str(err), "rank": 0}
    rank = result.get("rank", 0)
    Path(out_file if rank == 0 else f"{out_file}.rank{rank}").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
