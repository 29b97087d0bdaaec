"""``python -m dpo_lightning.bench``: measure, then write reports/bench/{results.json,README.md,*.png}.

    python -m dpo_lightning.bench                      # the full run (~20 min on 2 idle cores): `make bench`
    python -m dpo_lightning.bench --quick --out /tmp/b # toy sizes, in one process: checks the harness only
    python -m dpo_lightning.bench --sections side_by_side --rounds 3

Sections: ``trl`` (ours vs TRL's DPOTrainer on HH, alternating, and our HH-path levers; vs_trl.py),
``side_by_side`` (our padded / packed / share_prompt layouts vs TRL, reference every step and precomputed, with
MFU and the issue-12 targets; side_by_side.py), ``profile`` (where the time goes, both sides; profile.py),
``levers`` (step-level levers in the bare step loop), ``sweep`` (GPT-2 shapes x sequence lengths, the step-time
fit), ``processes`` (1 vs 2 processes: DDP, FSDP2), ``pipeline`` (tokenization pairs/s; those four in
sections.py), ``gpu`` (what a GPU session runs; gpu.py), ``lora`` (LoRA r=8 vs full fine-tuning; lora.py).
Outside the suite: ``python -m dpo_lightning.bench.chunked_head`` (the log-prob head's memory) and
``python -m dpo_lightning.bench.ppo_vs_dpo`` (a PPO step against a DPO step).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dpo_lightning.bench import sections as run
from dpo_lightning.bench import suite
from dpo_lightning.bench.assets import prepare
from dpo_lightning.bench.gpu import section_gpu
from dpo_lightning.bench.lora import section_lora
from dpo_lightning.bench.profile import section_profile
from dpo_lightning.bench.report import write_report
from dpo_lightning.bench.side_by_side import section_side
from dpo_lightning.bench.vs_trl import section_trl

SECTIONS = ("trl", "side_by_side", "profile", "levers", "sweep", "processes", "pipeline", "gpu", "lora")
# the full run's default (make bench, ~20 min): side_by_side supersedes trl's comparison; --quick runs them all
FULL_DEFAULT = tuple(name for name in SECTIONS if name != "trl")


def machine() -> dict[str, Any]:
    """Date, CPU, memory, load and library versions: the context every number here needs."""
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = None
    try:
        mem_gb = int(open("/proc/meminfo").readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for name in ("torch", "lightning", "transformers", "datasets", "tokenizers", "trl", "accelerate"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": mem_gb,
        "load_average_at_start": os.getloadavg(),
        "gpu": None,
        "versions": versions,
        "worker_env": suite.WORKER_ENV,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_lightning.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, workers in this process (a harness check)")
    parser.add_argument("--out", default="reports/bench", help="where results.json, README.md and plots go")
    parser.add_argument("--work", help="scratch folder (tokenizer, weights, pairs, caches); default OUT/.work")
    parser.add_argument(
        "--sections", help=f"comma-separated subset of {SECTIONS} (default: all with --quick, else {FULL_DEFAULT})"
    )
    parser.add_argument("--rounds", type=int, help="alternations of trl and side_by_side (default 3 and 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process, both sides")
    parser.add_argument("--render", action="store_true", help="only rewrite README.md and plots from results.json")
    args = parser.parse_args(argv)
    chosen = args.sections or ",".join(SECTIONS if args.quick else FULL_DEFAULT)
    sections = [x.strip() for x in chosen.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")

    out = Path(args.out)
    if args.render:
        write_report(out, json.loads((out / "results.json").read_text()))
        return 0
    work = Path(args.work) if args.work else out / ".work"
    out.mkdir(parents=True, exist_ok=True)
    s = suite.settings(args.quick, args.rounds, args.threads)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[bench {time.perf_counter() - start:6.0f} s] {message}", flush=True)

    info = machine()
    results: dict[str, Any] = {"machine": info, "mode": "quick" if s.quick else "full", "settings": vars(s)}
    log(f"preparing tokenizer, weights and pairs in {work}")
    assets = prepare(
        work,
        vocab=s.vocab,
        shape=s.shape,
        max_length=s.max_length,
        max_prompt_length=s.max_prompt_length,
        max_rows=s.max_rows if s.quick else None,
    )
    results["assets"] = vars(assets)
    ctx = suite.Context(out=out, work=work, s=s, assets=assets, log=log)
    runners = {
        "trl": section_trl,
        "side_by_side": section_side,
        "profile": section_profile,
        "levers": run.section_levers,
        "sweep": run.section_sweep,
        "processes": run.section_processes,
        "pipeline": run.section_pipeline,
        "gpu": lambda _: section_gpu(),
        "lora": section_lora,
    }
    for name in SECTIONS:
        if name not in sections:
            why = "not in --sections" if args.sections else "not in the full run by default (--sections runs it)"
            results[name] = {"status": "skipped", "reason": why}
            continue
        log(f"section {name}")
        section_start = time.perf_counter()
        try:
            results[name] = runners[name](ctx)
        except Exception as err:  # noqa: BLE001 - a failed section is reported, the others still run
            results[name] = {
                "status": "error",
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc(),
            }
            log(f"section {name} failed: {err}")
        results[name]["seconds"] = time.perf_counter() - section_start
        _write(out, results)
    info["load_average_at_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - start
    _write(out, results)
    write_report(out, results)
    log(f"wrote {out / 'results.json'} and {out / 'README.md'}")
    return 0


def _write(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
