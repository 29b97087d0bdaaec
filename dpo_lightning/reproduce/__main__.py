"""Re-check the papers' claims and write a report: the engine of `make reproduce` and `make reproduce-quick`.

    python -m dpo_lightning.reproduce [--quick] [--out DIR] [--seed N] [--seeds S] [--part 1|2|all]

Part 1 (``bandit.py``) checks exact claims of DPO, IPO and cDPO against closed forms (~15 s). Part 2
(``sentiment.py``) runs the IMDb controlled-sentiment experiment; ``--quick`` runs it at toy size; ``--seeds S``
trains every Part-2 method with S seeds (the bootstrap then resamples seeds too). The run writes
``claims.json``, the figures and ``README.md`` under ``--out``.

Exit status: 0 when no checked claim FAILs (an INCONCLUSIVE Part-2 claim, an interval that straddles its
threshold, is reported, not an error); 1 when a claim's verdict is FAIL, a requested part could not run (other
than Part 2 being absent from this installation, which is reported as not run) or no claim was checked at all;
2 for a usage error, such as ``--scale paper`` without the paper's weights.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from dpo_lightning.errors import UserError
from dpo_lightning.reproduce.claims import write_claims
from dpo_lightning.reproduce.report import PartResult, matmul_gflops, write_report

# What --scale paper needs (Rafailov et al. 2023, §6.1): the policy and the ground-truth reward classifier.
PAPER_MODELS = ("gpt2-large", "siebert/sentiment-roberta-large-english")
PART2_MODULE = "dpo_lightning.reproduce.sentiment"
PART2_ABSENT = "dpo_lightning/reproduce/sentiment.py is not in this installation"


def _hf_cache_dir() -> Path:
    """The hub cache folder, resolved from the environment now (not at import time, so tests can redirect it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(hf_home).expanduser() / "hub"


def _in_hf_cache(repo_id: str) -> bool:
    """True when a snapshot of ``repo_id`` with a config and weights is in the local hub cache."""
    snapshots = _hf_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    for snap in snapshots.glob("*"):
        weights = any((snap / f).exists() for f in ("model.safetensors", "pytorch_model.bin"))
        if weights and (snap / "config.json").exists():
            return True
    return False


def _hub_reachable(timeout_s: float) -> bool:
    """Can we open a TCP connection to the hub? Runs in a daemon thread so a stuck DNS lookup cannot hang us."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return bool(result and result[0])


def paper_weights_problem(timeout_s: float = 3.0) -> str | None:
    """None when ``--scale paper`` can get its weights (cached, or the hub answers); else why not, in one line."""
    missing = [m for m in PAPER_MODELS if not _in_hf_cache(m)]
    if not missing:
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if not offline and _hub_reachable(timeout_s):
        return None
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is not reachable"
    return (
        f"--scale paper needs the weights of {' and '.join(missing)}, which are not in the local cache "
        f"({_hf_cache_dir()}) and {why}; use --scale cpu, or run where the hub is reachable"
    )


def _load_part2() -> tuple[Callable | None, str]:
    """(run_part2, "") when Part 2 is installed; (None, why) when it is not or cannot be imported."""
    try:
        module = importlib.import_module(PART2_MODULE)
    except ModuleNotFoundError as err:
        if err.name == PART2_MODULE:
            return None, PART2_ABSENT
        return None, f"{PART2_MODULE} cannot be imported: {err} (is the `reproduce` extra installed?)"
    except ImportError as err:
        return None, f"{PART2_MODULE} cannot be imported: {err}"
    return module.run_part2, ""


def _part2(out_dir: Path, *, quick: bool, seed: int, scale: str, seeds: int = 1) -> tuple[PartResult, bool]:
    """Run Part 2 if it can run. Returns (result, counts_as_failure)."""
    title = "IMDb controlled sentiment (Rafailov et al. 2023, §6.1)"
    run_part2, why = _load_part2()
    if run_part2 is None:
        print(f"warning: Part 2 not run: {why}", file=sys.stderr, flush=True)
        # an absent Part 2 is reported and does not fail the run; a broken one (import error) does
        return PartResult("2", title, ran=False, note=why + "."), why != PART2_ABSENT
    kwargs: dict = {"quick": quick, "seed": seed}
    if seeds != 1:
        kwargs["seeds"] = seeds
    if scale != "cpu":
        if "scale" not in inspect.signature(run_part2).parameters:
            note = f"this version of {PART2_MODULE} runs only --scale cpu"
            print(f"error: {note}", file=sys.stderr, flush=True)
            return PartResult("2", title, ran=False, note=note + "."), True
        kwargs["scale"] = scale
    start = time.perf_counter()
    try:
        claims, extra = run_part2(out_dir, **kwargs)
    except UserError as err:  # a clear message (missing data, bad setting), not a bug: report and go on
        print(f"error: Part 2: {err}", file=sys.stderr, flush=True)
        return PartResult("2", title, ran=False, note=str(err), seconds=time.perf_counter() - start), True
    seconds = time.perf_counter() - start
    print(f"[part 2] {_tally(claims)} ({seconds:.1f} s)", flush=True)
    result = PartResult(
        "2",
        title,
        ran=True,
        claims=claims,
        figures=list(extra.get("figures", [])),
        markdown=extra.get("markdown", ""),
        seconds=seconds,
    )
    return result, False


def _tally(claims: list) -> str:
    """ "12 PASS, 3 INCONCLUSIVE, 1 FAIL of 16 claims"."""
    counts = {v: sum(c.verdict == v for c in claims) for v in ("PASS", "INCONCLUSIVE", "FAIL")}
    return ", ".join(f"{n} {v}" for v, n in counts.items() if n) + f" of {len(claims)} claims"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_lightning.reproduce",
        description="Re-check the DPO / IPO / cDPO papers' claims; writes claims.json, figures and README.md.",
    )
    parser.add_argument("--quick", action="store_true", help="Part 2 at toy size (Part 1 always runs in full)")
    parser.add_argument("--out", type=Path, default=Path("reports/reproduce"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="base seed; the same seed gives the same claims")
    parser.add_argument(
        "--scale",
        choices=("cpu", "paper"),
        default="cpu",
        help="cpu: small models, runs anywhere; paper: gpt2-large and the paper's reward classifier (needs hub)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="Part 2: training seeds per method (seed, seed+1, ...); default 1"
    )
    parser.add_argument("--part", choices=("1", "2", "all"), default="all", help="which part to run")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the requested parts, write the report, and return the exit status (see the module docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse has already explained: return, don't exit
        return int(exit_.code or 0)
    argv = sys.argv[1:] if argv is None else argv
    if args.seeds < 1:
        print(f"error: --seeds must be at least 1, got {args.seeds}", file=sys.stderr, flush=True)
        return 2
    parts_wanted = ("1", "2") if args.part == "all" else (args.part,)
    if args.scale == "paper" and "2" in parts_wanted:  # Part 1 needs no weights; fail fast before any work
        problem = paper_weights_problem()
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            return 2
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    parts: list[PartResult] = []
    failed_to_run = False
    if "1" in parts_wanted:
        from dpo_lightning.reproduce.bandit import run_part1

        t0 = time.perf_counter()
        claims, extra = run_part1(out_dir, quick=args.quick, seed=args.seed, log=lambda m: print(m, flush=True))
        parts.append(
            PartResult(
                "1",
                "exact claims on bandits",
                ran=True,
                claims=claims,
                figures=extra["figures"],
                markdown=extra["markdown"],
                seconds=time.perf_counter() - t0,
            )
        )
    if "2" in parts_wanted:
        result, failed = _part2(out_dir, quick=args.quick, seed=args.seed, scale=args.scale, seeds=args.seeds)
        parts.append(result)
        failed_to_run |= failed
    claims = [c for p in parts for c in p.claims]
    write_claims(claims, out_dir / "claims.json")
    command = shlex.join(["python", "-m", "dpo_lightning.reproduce", *argv])
    wall_s = time.perf_counter() - start
    report = write_report(
        out_dir, parts, command=command, seed=args.seed, quick=args.quick, wall_s=wall_s, gflops=matmul_gflops()
    )
    for c in claims:
        if not c.passed:
            interval = "" if c.interval is None else f", 95% interval {c.interval}"
            print(f"{c.verdict} {c.id}: expected {c.expected}, measured {c.measured}{interval} "
                  f"(tolerance {c.tolerance})")  # fmt: skip
    if not claims:
        print("error: no claim was checked (see the warnings above)", file=sys.stderr, flush=True)
    print(f"{_tally(claims)} in {wall_s:.1f} s; report: {report}", flush=True)
    # --quick runs Part 2 at toy size to check its pipeline: its claims are reported, but only Part 1's decide
    gating = [c for p in parts for c in p.claims if not (args.quick and p.key == "2")]
    if args.quick and len(gating) < len(claims):
        print("quick mode: Part 2 ran at toy size; its claims are informational, Part 1's decide the exit code")
    return 0 if claims and not any(c.verdict == "FAIL" for c in gating) and not failed_to_run else 1


if __name__ == "__main__":
    sys.exit(main())
