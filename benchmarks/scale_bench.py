"""Step time and memory at scale settings, on CPU: reference every step vs precomputed, 1 vs 2 processes, FSDP vs
DDP per-rank parameter memory.

    python benchmarks/scale_bench.py [--json scale.json] [--steps 15] [--layers 4 --width 256 --max-length 256]

Each configuration is a real ``Trainer.fit`` of ``PreferenceModule`` on Anthropic HH (``../shared/data``; a
synthetic set when absent) with a GPT-2 built from a config and a 4k BPE (small vocab: on CPU the output layer
would otherwise dominate, see ../shared/NOTES.md). Two processes split the machine's cores (one BLAS thread
each on 2 cores), one process gets them all, so the comparisons hold the hardware fixed. Reported per
configuration, median over the timed steps (after ``--warmup`` untimed ones):

- ``step_s``: wall time per optimizer step (data loading included); ``pairs_per_s``: global pairs per second;
- ``setup_s``: fit start to first step (for ``precomputed``: the one reference pass over train + val);
- ``rss_peak_mb``: per rank, the largest resident set size seen at a step end (training, not set-up);
- ``param_mb``: per rank, bytes of the parameters the rank holds (local shards under FSDP), policy and
  reference (none once precomputed).

Benchmarks, not tests: numbers depend on the machine and its load (run it on an idle one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
CONFIGS = {  # name -> (strategy, devices, precompute_reference)
    "reference_every_step": ("auto", 1, False),
    "precomputed": ("auto", 1, True),
    "ddp_2proc": ("ddp", 2, False),
    "fsdp_2proc": ("fsdp", 2, False),
}


# --------------------------------------------------------------------------- assets (parent process)
def prepare(work: Path, args: argparse.Namespace) -> dict[str, str]:
    """Tokenizer, data file and initial policy, shared by every configuration (identical starting points)."""
    import torch

    from dpo_lightning.models import build_causal_lm
    from dpo_lightning.tokenizer import train_bpe_tokenizer

    data = work / "pairs.jsonl"
    if HH.exists():
        import gzip

        with gzip.open(HH, "rt") as f:
            lines = [next(f) for _ in range(args.rows)]
        data.write_text("".join(lines))
        fmt = "hh"
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import synthetic_pairs, write_jsonl

        write_jsonl(data, synthetic_pairs(args.rows))
        fmt = "explicit"
    texts = [json.loads(line).get("chosen", "") for line in data.read_text().splitlines()]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab)
    tokenizer.save_pretrained(work / "tokenizer")
    torch.manual_seed(0)
    config = {"model_type": "gpt2", "n_layer": args.layers, "n_embd": args.width, "n_head": max(args.width // 64, 1),
              "n_positions": args.max_length}  # fmt: skip
    build_causal_lm(None, config, tokenizer).save_pretrained(work / "policy")
    return {"data": str(data), "format": fmt, "tokenizer": str(work / "tokenizer"), "policy": str(work / "policy")}


# --------------------------------------------------------------------------- one configuration (worker)
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _param_mb(module) -> float:
    total = 0
    for model in (module.policy, module.reference):
        for p in model.parameters() if model is not None else ():
            local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor: this rank's shard
            total += local.numel() * local.element_size()
    return total / 2**20


def worker(spec: dict) -> None:
    import lightning.pytorch as pl
    import torch

    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.module import PreferenceModule
    from dpo_lightning.strategy import all_gather_objects

    class Probe(pl.Callback):
        def __init__(self):
            self.ends, self.rss, self.start, self.first = [], [], 0.0, 0.0

        def on_fit_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.first = self.first or time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter())
            self.rss.append(_rss_mb())

        def on_train_end(self, trainer, pl_module):
            steps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][spec["warmup"] :]
            mine = {"rss_peak_mb": max(self.rss), "param_mb": _param_mb(pl_module)}
            ranks = all_gather_objects(mine)
            if trainer.is_global_zero:
                step_s = statistics.median(steps)
                result = {
                    "step_s": step_s,
                    "pairs_per_s": spec["batch"] * trainer.world_size / step_s,
                    "setup_s": self.first - self.start,
                    "rss_peak_mb": [r["rss_peak_mb"] for r in ranks],
                    "param_mb": [r["param_mb"] for r in ranks],
                }
                Path(spec["out"]).write_text(json.dumps(result))

    torch.set_num_threads(max(spec["cores"] // spec["devices"], 1))
    pl.seed_everything(0)
    dm = PreferenceDataModule(
        spec["data"],
        format=spec["format"],
        tokenizer=spec["tokenizer"],
        max_length=spec["max_length"],
        max_prompt_length=spec["max_length"] // 2,
        on_bad_row="skip",
        batch_size=spec["batch"],
        val_fraction=0.05,
    )
    module = PreferenceModule(
        policy=spec["policy"],
        tokenizer=dm.tokenizer,
        lr=1e-5,
        warmup_steps=0,
        precompute_reference=spec["precompute"],
        reference_cache_dir=spec["cache"],
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy=spec["strategy"],
        devices=spec["devices"],
        max_steps=spec["warmup"] + spec["steps"] + 1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Probe()],
    )
    trainer.fit(module, datamodule=dm)


# --------------------------------------------------------------------------- driver
def run(name: str, assets: dict, args: argparse.Namespace, work: Path) -> dict:
    strategy, devices, precompute = CONFIGS[name]
    spec = {**assets, "strategy": strategy, "devices": devices, "precompute": precompute, "batch": args.batch,
            "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup, "cores": os.cpu_count() or 1,
            "cache": str(work / "cache"), "out": str(work / f"{name}.json")}  # fmt: skip
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS=str(max((os.cpu_count() or 1) // devices, 1)))
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True, env=env, cwd=ROOT)
    result = json.loads(Path(spec["out"]).read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--steps", type=int, default=15, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step per process")
    parser.add_argument("--rows", type=int, default=400, help="HH records read (the precompute pass scores all)")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run only these configurations")
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        assets = prepare(work, args)
        for name in args.only or CONFIGS:
            results[name] = run(name, assets, args, work)
            print(f"{name:22s} {json.dumps(results[name])}", flush=True)
    if "reference_every_step" in results and "precomputed" in results:
        results["precompute_speedup"] = results["reference_every_step"]["step_s"] / results["precomputed"]["step_s"]
    if "ddp_2proc" in results and "fsdp_2proc" in results:
        results["fsdp_param_mb_vs_ddp"] = [results["fsdp_2proc"]["param_mb"][0], results["ddp_2proc"]["param_mb"][0]]
    results["settings"] = vars(args) | {"cores": os.cpu_count()}
    print(json.dumps({k: v for k, v in results.items() if k not in CONFIGS}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
