"""Shared test set-up: CPU only, no network, no wandb, hermetic caches, and the session fixtures.

Hermetic: before anything imports ``datasets``, ``transformers`` or wandb (they read these variables at import
time), every cache and config folder the stack writes to (HOME, the Hugging Face and datasets caches, this
package's reference store, wandb, XDG, matplotlib, torch) points into one fresh folder of this session, removed
when the session ends. So the suite reads no state left by an earlier run, passes the same with a cold or a warm
``~/.cache``, and leaves nothing there. Subprocesses inherit the same environment.

Helpers (plain functions and constants) live in ``helpers.py``; the names below are re-exported for the test
files that still import them from here.
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

SESSION_ROOT = Path(tempfile.mkdtemp(prefix="dpo-lightning-tests-"))
HERMETIC_DIRS = {
    "HOME": "home",
    "XDG_CACHE_HOME": "home/.cache",
    "XDG_CONFIG_HOME": "home/.config",
    "XDG_DATA_HOME": "home/.local/share",
    "HF_HOME": "huggingface",
    "HF_HUB_CACHE": "huggingface/hub",
    "HF_DATASETS_CACHE": "huggingface/datasets",
    "DPO_LIGHTNING_CACHE": "dpo_lightning",
    "WANDB_DIR": "wandb",
    "WANDB_CACHE_DIR": "wandb/cache",
    "WANDB_CONFIG_DIR": "wandb/config",
    "WANDB_DATA_DIR": "wandb/data",
    "MPLCONFIGDIR": "matplotlib",
    "TORCH_HOME": "torch",
    "TORCHINDUCTOR_CACHE_DIR": "torch/inductor",
    "TRITON_CACHE_DIR": "torch/triton",
}
for _var, _sub in HERMETIC_DIRS.items():
    (SESSION_ROOT / _sub).mkdir(parents=True, exist_ok=True)
    os.environ[_var] = str(SESSION_ROOT / _sub)
os.environ.pop("NETRC", None)  # ~/.netrc is the session's empty HOME: not logged in to wandb
os.environ.pop("WANDB_API_KEY", None)
os.environ["WANDB_MODE"] = "disabled"  # a test that wants wandb (offline) sets it itself
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the hub
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
atexit.register(shutil.rmtree, SESSION_ROOT, ignore_errors=True)

from helpers import (  # noqa: E402 - after the environment above, before anything imports datasets
    BAD_WORDS,
    GOOD_WORDS,
    HH_TEST,
    IMDB,
    ROOT,
    SHARED_DATA,
    TINY_GPT2,
    make_assets,
    make_datamodule,
    part1_with,
    synthetic_pairs,
    write_jsonl,
)

__all__ = ["BAD_WORDS", "GOOD_WORDS", "HH_TEST", "IMDB", "ROOT", "SHARED_DATA", "TINY_GPT2", "SESSION_ROOT"]
__all__ += ["synthetic_pairs", "write_jsonl"]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 300-token byte-level BPE trained on the synthetic pairs' text, once per session."""
    from dpo_lightning.tokenizer import train_bpe_tokenizer

    texts = [r[k] for r in synthetic_pairs(300) for k in ("prompt", "chosen", "rejected")]
    return train_bpe_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """``tiny_tokenizer`` saved as a tokenizer directory (what ``data.tokenizer`` takes), once per session."""
    return assets_dir(tmp_path_factory, tiny_tokenizer) / "tokenizer"


def assets_dir(tmp_path_factory, tokenizer) -> Path:
    return make_assets(tmp_path_factory.getbasetemp() / "scale_assets", tokenizer)


@pytest.fixture(scope="session")
def assets(tmp_path_factory, tiny_tokenizer) -> Path:
    """The shared tiny-run folder (helpers.make_assets), built once per session: ``policy/`` (a 2-layer GPT-2),
    ``tokenizer/``, ``train.jsonl`` (64 pairs), ``val.jsonl`` (16), ``base.yaml`` and ``hh.jsonl`` (64 HH records)."""
    return assets_dir(tmp_path_factory, tiny_tokenizer)


@pytest.fixture(scope="session")
def hh_subset(assets) -> Path:
    """The first 64 records of the shared HH harmless-base split as a JSONL file."""
    if not (assets / "hh.jsonl").exists():
        pytest.skip("needs the shared HH data beside the checkout")
    return assets / "hh.jsonl"


@pytest.fixture(scope="session")
def hh_datamodule(hh_subset, tiny_tokenizer):
    """``hh_subset`` tokenized with the tiny tokenizer (format hh, max_length 128, batch 8), set up once."""
    return make_datamodule(hh_subset, tiny_tokenizer, setup=True, format="hh", max_length=128, max_prompt_length=96,
                           batch_size=8)  # fmt: skip


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(96))


@pytest.fixture(scope="session")
def adam_runs():
    """The paper's bandit setting, as `make reproduce` runs it: seed 0, Adam, 18,000 steps, lr 0.01, minibatch 9
    (bandit.SGD), for D1 and the two-action problem. The one expensive step of Part 1: run once per session."""
    from dpo_lightning.reproduce import bandit

    return bandit.train_bandits([bandit.D1, bandit.TWO_ACTIONS], seed=0, **paper_sgd())


def paper_sgd() -> dict:
    from dpo_lightning.reproduce import bandit

    return {k: bandit.SGD[k] for k in ("steps", "lr", "batch_size")}


@pytest.fixture
def cached_adam(monkeypatch, adam_runs):
    """``bandit.train_bandits`` answers the paper setting at seed 0 from ``adam_runs`` (any other call trains)."""
    from dpo_lightning.reproduce import bandit

    real = bandit.train_bandits

    def cached(problems, *, seed, **sgd):
        if problems == [bandit.D1, bandit.TWO_ACTIONS] and seed == 0 and sgd == paper_sgd():
            cached.hits += 1
            return adam_runs
        return real(problems, seed=seed, **sgd)

    cached.hits = 0
    monkeypatch.setattr(bandit, "train_bandits", cached)
    return cached


# Part 2 far below --quick: every stage runs, in seconds (a pipeline check; its claims' verdicts mean nothing)
TOY_PART2 = {
    "train_reviews": 400, "test_reviews": 200, "vocab_size": 300, "n_layer": 1, "n_embd": 32, "n_head": 2,
    "context": 24, "sft_steps": 4, "sft_batch": 16, "pref_prompts": 6, "max_new_tokens": 6, "betas": (0.1, 1.0),
    "method_steps": 2, "method_batch": 8, "warmup_steps": 1, "eval_steps": (1, 2), "eval_prompts": 12, "workers": 1,
}  # fmt: skip


@pytest.fixture(scope="session")
def part1_cli_run(tmp_path_factory, adam_runs) -> tuple[int, Path]:
    """``--part 1 --seed 0`` through the reproduce command, once per session (helpers.part1_with): (exit status,
    out folder with claims.json, README.md and the figures)."""
    out = tmp_path_factory.mktemp("reproduce-part1")
    return part1_with(adam_runs, out), out


@pytest.fixture(scope="session")
def toy_reproduction(tmp_path_factory, adam_runs):
    """``python -m dpo_lightning.reproduce --quick --seed 0`` end to end, once per session: Part 1 in full (with
    the session's Adam run) and Part 2 at toy size (TOY_PART2, one worker). Returns (exit status, out folder,
    run_methods's call: {"args": (cfg, work, eval_ids, seed), "runs": its result})."""
    import dataclasses

    import dpo_lightning.reproduce.__main__ as reproduce
    from dpo_lightning.reproduce import bandit, sentiment

    if not (IMDB / "train.jsonl.gz").exists():
        pytest.skip("../shared/data/imdb is absent")
    out = tmp_path_factory.mktemp("reproduce-quick")
    methods_call: dict = {}
    real_run_methods = sentiment.run_methods

    def recording(cfg, work, eval_ids, seed):
        methods_call["args"] = (cfg, work, eval_ids, seed)
        methods_call["runs"] = real_run_methods(cfg, work, eval_ids, seed)
        return methods_call["runs"]

    def cached_adam_run(problems, *, seed, **sgd):
        assert problems == [bandit.D1, bandit.TWO_ACTIONS] and seed == 0 and sgd == paper_sgd()
        return adam_runs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sentiment, "QUICK", dataclasses.replace(sentiment.QUICK, **TOY_PART2))
        mp.setattr(sentiment, "run_methods", recording)
        mp.setattr(bandit, "train_bandits", cached_adam_run)
        mp.chdir(ROOT)
        code = reproduce.main(["--quick", "--seed", "0", "--out", str(out)])
    return code, out, methods_call


@pytest.fixture(scope="session")
def family_tokenizers():
    """``get(family, chat_template="default")``: helpers.family_tokenizer, built once per session per argument
    (families: helpers.TOKENIZER_FAMILIES and ``gpt2-files``; templates: ``llama3``, ``chatml``, None, "default")."""
    from helpers import family_tokenizer

    built: dict = {}

    def get(family: str, chat_template: str | None = "default"):
        if (family, chat_template) not in built:
            built[family, chat_template] = family_tokenizer(family, chat_template)
        return built[family, chat_template]

    return get
