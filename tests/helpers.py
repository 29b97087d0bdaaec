"""Shared test helpers: plain constants and functions (the session fixtures built from them are in conftest.py).

Import them as ``from helpers import ...``; no test module imports another test module.

- data: ``synthetic_pairs``, ``write_jsonl``, ``make_datamodule`` (a PreferenceDataModule with the test defaults);
- models and trainers: ``TINY_GPT2``, ``QUIET_TRAINER``/``quiet_trainer`` (no logger, bar, summary or checkpoint);
- the command: ``cli_main`` (``dpo_lightning.cli.main`` in this process, for error paths and cheap commands),
  ``run_cli`` (a real subprocess, kept for one smoke test per command), ``cli_env``;
- the shared tiny-run assets: ``make_assets`` (policy, tokenizer, 64 + 16 pairs, ``base.yaml``), ``fit_args``,
  ``shared_run`` and the runs built on it (``fsdp_run``, ``ddp_run``, ``single_run``, ``plain_run``),
  ``in_process_fit`` and the metric-curve comparisons.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
IMDB = SHARED_DATA / "imdb"

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128}

GOOD_WORDS = ["great", "superb", "lovely", "wonderful", "brilliant", "fine", "excellent", "charming"]
BAD_WORDS = ["awful", "dreadful", "boring", "terrible", "clumsy", "dull", "poor", "weak"]

# the Trainer arguments of a test that only trains: CPU, no logger, no checkpoint, no console output
QUIET_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


# --------------------------------------------------------------------------- data
def synthetic_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs where chosen and rejected differ systematically: chosen uses GOOD_WORDS, rejected BAD_WORDS."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(["The film", "This book", "The meal", "Our trip"])
        rows.append(
            {
                "prompt": f"Review {i}: {subject} was",
                "chosen": " " + " ".join(rng.choice(GOOD_WORDS) for _ in range(rng.randint(2, 5))) + ".",
                "rejected": " " + " ".join(rng.choice(BAD_WORDS) for _ in range(rng.randint(2, 5))) + ".",
            }
        )
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_datamodule(source: Any, tokenizer: Any = None, *, setup: bool = False, **kwargs: Any):
    """A PreferenceDataModule on ``source`` (a path, or a load_dataset spec dict) with the tests' defaults
    (explicit format, max_length 64, max_prompt_length 32, val_fraction 0.25), any of them overridden by ``kwargs``.

    ``tokenizer``: a directory (passed as ``data.tokenizer``, as a user does), a tokenizer object (handed to the
    data module as if it had loaded it: the module has no public way to take an object, and training or loading a
    tokenizer per test costs time) or ``None`` (the module trains its BPE, as ``tokenizer: null`` does).
    """
    from dpo_lightning.data import PreferenceDataModule

    settings = {"format": "explicit", "max_length": 64, "max_prompt_length": 32, "val_fraction": 0.25, **kwargs}
    if isinstance(tokenizer, str | Path):
        settings["tokenizer"] = str(tokenizer)
    dm = PreferenceDataModule(str(source) if isinstance(source, Path) else source, **settings)
    if tokenizer is not None and not isinstance(tokenizer, str | Path):
        dm._tokenizer = tokenizer
    if setup:
        dm.setup()
    return dm


# --------------------------------------------------------------------------- trainers
def quiet_trainer(**overrides: Any):
    """``pl.Trainer(**QUIET_TRAINER, **overrides)``."""
    import lightning.pytorch as pl

    return pl.Trainer(**{**QUIET_TRAINER, **overrides})


# --------------------------------------------------------------------------- the command
def cli_env(threads: int | None = 1, **extra: str) -> dict[str, str]:
    """The environment of a ``dpo-lightning`` subprocess: this session's (hermetic caches, see conftest.py), wandb
    off, no hub; ``threads`` BLAS threads per process (1: two processes share two cores; None: torch's default)."""
    env = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_ranks(
    *args: str, ranks: int = 2, timeout: int = 420, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m dpo_lightning ARGS`` as ``ranks`` processes started together, as torchrun or SLURM starts them
    (LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT set; Lightning then launches nothing itself). The processes import
    torch and Lightning side by side, ~4 s less than Lightning's own launch, where the second rank starts only once
    the first has parsed its config. The one test of Lightning's own launch is
    test_resume.test_sigkill_and_resume_fsdp_is_exact. Returns rank 0's output; the exit status is the first
    non-zero one."""
    import socket

    with socket.socket() as sock:  # a free port for the process group's rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = []
    for rank in range(ranks):
        rank_env = dict(env or cli_env(), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(ranks),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "dpo_lightning", *args], cwd=ROOT, env=rank_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    outputs = [proc.communicate(timeout=timeout) for proc in procs]
    status = next((proc.returncode for proc in procs if proc.returncode), 0)
    stderr = outputs[0][1] + "".join(f"\n[rank {r}]\n{err}" for r, (_, err) in enumerate(outputs) if r and status)
    return subprocess.CompletedProcess(args, status, outputs[0][0], stderr)


def run_cli(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m dpo_lightning ARGS`` in a subprocess from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "dpo_lightning", *args],
        cwd=ROOT,
        env=env or cli_env(threads=None),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli_main(*args: str, cwd: Path = ROOT) -> CliResult:
    """``dpo_lightning.cli.main(ARGS)`` in this process, as the console script runs it: the exit status is main's
    return value or the SystemExit it raises (argparse errors, ``--help``, ``--print_config``), stdout and stderr
    are captured. The working directory, ``sys.argv`` and ``os.environ`` (the command sets WANDB_MODE and the run
    folder for its child processes) are restored afterwards.

    Saves the ~6 s a subprocess spends importing torch and Lightning; a real subprocess (``run_cli``) stays for
    one smoke test per command."""
    from dpo_lightning.cli import main

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        sys.argv = ["dpo-lightning"]  # LightningCLI reads args, not this; it warns when both are given
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:
                if isinstance(exit_.code, str):  # sys.exit("message") prints it and exits 1
                    print(exit_.code, file=sys.stderr)
                    code = 1
                else:
                    code = exit_.code or 0
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return CliResult(int(code), out.getvalue(), err.getvalue())


# --------------------------------------------------------------------------- the shared tiny-run assets
BASE_YAML = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: 5
  val_check_interval: 2
  limit_val_batches: 2
  check_val_every_n_epoch: null
  log_every_n_steps: 1
  gradient_clip_val: 10.0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true, save_top_k: 0, every_n_train_steps: 1}}
model:
  policy: {policy}
  lr: 1.0e-3
  warmup_steps: 2
data:
  train_files: {train}
  val_files: {val}
  format: explicit
  tokenizer: {tokenizer}
  max_length: 64
  max_prompt_length: 32
  batch_size: 4
  eval_batch_size: 8
run:
  wandb: false
  csv_flush_every: 1
"""
TIMEOUT = 420
NOT_COMPARED = {"train/tokens_per_sec", "epoch"}  # wall-clock values
FSDP = ("--config", "experiments/tiny_fsdp.yaml")  # 2 processes, strategy fsdp, a checkpoint every step
DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2")
HH_SUBSET_ROWS = 64


def make_assets(root: Path, tokenizer) -> Path:
    """A saved tiny GPT-2 (the policy and, copied, the reference), its tokenizer, 64 train + 16 val pairs, a base
    config and the first 64 records of the shared HH split (``hh.jsonl``, when the shared data is there). The
    policy is loaded from a folder, so its weights do not depend on any seed. Built once: a second call returns."""
    import gzip
    import itertools

    import torch

    from dpo_lightning.models import build_causal_lm

    if (root / "base.yaml").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    build_causal_lm(None, TINY_GPT2, tokenizer).save_pretrained(root / "policy")
    rows = synthetic_pairs(80, seed=1)
    write_jsonl(root / "train.jsonl", rows[:64])
    write_jsonl(root / "val.jsonl", rows[64:])
    if HH_TEST.exists():
        with gzip.open(HH_TEST, "rt") as f:
            (root / "hh.jsonl").write_text("".join(itertools.islice(f, HH_SUBSET_ROWS)))
    text = BASE_YAML.format(
        policy=root / "policy", train=root / "train.jsonl", val=root / "val.jsonl", tokenizer=root / "tokenizer"
    )
    (root / "base.yaml").write_text(text)
    return root


def fit_argv(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    """The arguments of ``dpo-lightning fit`` with the base config, ``extra`` and ``--run.dir run_dir``."""
    return ["fit", "--config", str(assets / "base.yaml"), *extra, "--run.dir", str(run_dir)]


def fit_args(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    """The same as a subprocess command line: ``python -m dpo_lightning fit ...``."""
    return [sys.executable, "-m", "dpo_lightning", *fit_argv(assets, run_dir, *extra)]


def shared_run(assets: Path, name: str, *extra: str, in_process: bool = False) -> Path:
    """``dpo-lightning fit`` with the base config and ``extra``, once per session (cached on disk by name): a
    subprocess, or ``cli_main`` in this process (``in_process``, for single-process runs)."""
    run_dir = assets.parent / "scale_runs" / name
    done = run_dir / "DONE.json"
    if not done.exists():
        start = time.perf_counter()
        if in_process:
            result = cli_main(*fit_argv(assets, run_dir, *extra))
        else:  # a 2-process run (every shared subprocess run is one)
            result = run_ranks(*fit_argv(assets, run_dir, *extra), timeout=TIMEOUT)
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"
        done.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return run_dir


def fsdp_run(assets: Path) -> Path:
    """2-process FSDP2, 4 pairs per rank, a sharded checkpoint every step."""
    return shared_run(assets, "fsdp_2x4", *FSDP)


TRDPO = ("--model.reference_sync", "{mode: soft, alpha: 0.5, every: 2}", "--model.loss", "[dpo, bco_pair]")


def fsdp_trdpo_run(assets: Path) -> Path:
    """The FSDP2 run with TR-DPO (soft sync every 2 steps) and a loss mixture: the reference changes mid-run."""
    return shared_run(assets, "fsdp_trdpo", *FSDP, *TRDPO)


def ddp_run(assets: Path) -> Path:
    """2-process DDP, 4 pairs per rank."""
    return shared_run(assets, "ddp_2x4", *DDP)


def single_run(assets: Path) -> Path:
    """1 process, 8 pairs per step (the same global batch as the 2-process runs), single-file checkpoints."""
    return shared_run(assets, "single_1x8", "--data.batch_size", "8", in_process=True)


def in_process_fit(
    assets: Path,
    log_dir: Path,
    batch_size: int = 8,
    accumulate: int = 1,
    seed: int = 0,
    data: dict | None = None,
    trainer: dict | None = None,
    **module_kwargs,
):
    """The base config's run in this process (no checkpoints), with a plain shuffled data order unless ``data``
    sets ``group_by_length``."""
    import lightning.pytorch as pl

    from dpo_lightning.module import PreferenceModule

    pl.seed_everything(seed, verbose=False)
    settings = {"max_length": 64, "max_prompt_length": 32, "eval_batch_size": 8, "group_by_length": False}
    settings.update(data or {})
    dm = make_datamodule(
        assets / "train.jsonl", assets / "tokenizer", val_files=str(assets / "val.jsonl"), batch_size=batch_size,
        **settings,
    )  # fmt: skip
    module = PreferenceModule(
        **{"policy": str(assets / "policy"), "lr": 1e-3, "warmup_steps": 2, **module_kwargs}, tokenizer=dm.tokenizer
    )
    trainer = quiet_trainer(
        **{
            "max_steps": 5,
            "accumulate_grad_batches": accumulate,
            "val_check_interval": 2 * accumulate,  # counts micro-batches: validate every 2 optimizer steps in both
            "limit_val_batches": 2,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "gradient_clip_val": 10.0,
            "logger": pl.loggers.CSVLogger(log_dir, name="", version=""),
            **(trainer or {}),
        }
    )
    trainer.fit(module, datamodule=dm)
    return trainer


def plain_run(assets: Path) -> Path:
    """The in-process base run (batch 8, reference every step), once per session: the baseline of the
    accumulation, activation-checkpointing and precomputed-reference tests."""
    log_dir = assets.parent / "scale_runs" / "in_process_1x8"
    if not (log_dir / "DONE").exists():
        in_process_fit(assets, log_dir)
        (log_dir / "DONE").touch()
    return log_dir


# --------------------------------------------------------------------------- metrics
def metric_rows(run_dir: Path | str, metrics_file: str = "metrics.csv") -> list[dict[str, str]]:
    with open(Path(run_dir) / metrics_file) as f:
        return list(csv.DictReader(f))


def curve(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def assert_same_curves(a: Path, b: Path, keys=("train/loss", "train/rewards/margins", "val/loss"), tol=1e-5):
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    for key in keys:
        ca, cb = curve(rows_a, key), curve(rows_b, key)
        assert ca and ca.keys() == cb.keys(), (key, ca, cb)
        worst = max(abs(ca[s] - cb[s]) for s in ca)
        assert worst <= tol, f"{key}: {a.name} vs {b.name} differ by {worst:.2e}\n{ca}\n{cb}"
    assert len(curve(rows_a, "train/loss")) == 5


def assert_exported(ckpt: Path, out: Path, tokenizer_source: Path, dtype=None) -> None:
    """``out`` is a Hugging Face directory holding exactly the checkpoint's policy (cast to ``dtype`` if given),
    with a tied output layer, the run's tokenizer and one safetensors file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_lightning.export import load_checkpoint

    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    trained, _ = load_checkpoint(ckpt)
    state = model.state_dict()
    assert set(trained) <= set(state)
    for key, value in trained.items():
        expected = value if dtype is None else value.to(dtype)
        assert state[key].dtype == expected.dtype and torch.equal(state[key], expected), key
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tokenizer_source).get_vocab()
    batch = tokenizer(["Review 3: The film was great."], return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


# --------------------------------------------------------------------------- tokenizers of every family
GPT2_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2"  # the real GPT-2 files (50,257 tokens)
TOKENIZER_FAMILIES = ("gpt2", "llama3", "qwen2", "llama2")  # dpo_lightning.tokenizer.FAMILIES, trained locally


def family_texts(n: int = 120) -> list[str]:
    """Training text for the family tokenizers: the first ``n`` HH chosen transcripts and ``n`` IMDb test reviews
    (synthetic pairs' text where the shared data is absent)."""
    import gzip
    import itertools

    texts = []
    for path, field in ((HH_TEST, "chosen"), (IMDB / "test.jsonl.gz", "text")):
        if path.exists():
            with gzip.open(path, "rt") as f:
                texts += [json.loads(line)[field] for line in itertools.islice(f, n)]
    return texts or [r[k] for r in synthetic_pairs(300) for k in ("prompt", "chosen", "rejected")]


def family_tokenizer(family: str, chat_template: str | None = "default", vocab_size: int = 1024):
    """A tokenizer of ``family``: one of TOKENIZER_FAMILIES trained on ``family_texts()`` (about 0.3 s), or
    ``gpt2-files`` (the real GPT-2 files from ../shared/data). ``chat_template`` as in
    ``dpo_lightning.tokenizer.train_family_tokenizer`` (gpt2-files has none by default)."""
    from dpo_lightning.tokenizer import CHAT_TEMPLATES, load_tokenizer, train_family_tokenizer

    if family == "gpt2-files":
        tokenizer = load_tokenizer(str(GPT2_TOKENIZER))
        template = None if chat_template == "default" else chat_template
        tokenizer.chat_template = CHAT_TEMPLATES.get(template, template) if template else None
        return tokenizer
    return train_family_tokenizer(family_texts(), family, vocab_size=vocab_size, chat_template=chat_template)


def part1_with(adam_runs, out: Path) -> int:
    """``python -m dpo_lightning.reproduce --part 1 --seed 0`` end to end, in this process, except that the 18,000-step
    Adam run is the session's (``adam_runs``: the same seed and settings)."""
    import pytest

    import dpo_lightning.reproduce.__main__ as cli
    from dpo_lightning.reproduce import bandit

    def cached(problems, *, seed, **sgd):
        assert seed == 0 and sgd == {k: bandit.SGD[k] for k in ("steps", "lr", "batch_size")}
        assert problems == [bandit.D1, bandit.TWO_ACTIONS]
        return adam_runs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bandit, "train_bandits", cached)
        return cli.main(["--part", "1", "--out", str(out), "--seed", "0"])


def record_wandb_logger(monkeypatch) -> dict:
    """Replace WandbLogger with a recorder of its keyword arguments (bound against WandbLogger's own signature, so
    a wrong name fails) and clear the run-folder variable ``build_loggers`` sets; returns the dict it fills."""
    import inspect

    import lightning.pytorch.loggers as pl_loggers

    from dpo_lightning.cli import RUN_DIR_ENV

    seen: dict = {}

    class Recorder:
        def __init__(self, **kwargs):
            inspect.signature(pl_loggers.WandbLogger).bind(**kwargs)
            seen.update(kwargs)

    monkeypatch.setattr(pl_loggers, "WandbLogger", Recorder)
    monkeypatch.setenv(RUN_DIR_ENV, "x")  # recorded, so the teardown restores its absence after build_loggers sets it
    monkeypatch.delenv(RUN_DIR_ENV)
    return seen
