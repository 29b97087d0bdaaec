"""PPOModule end to end: exact resume mid-rollout, the reward goes up, the command on IMDb prompts, FSDP2 over two
processes, and clear errors.

python -m pytest -q tests/test_ppo.py        # ~30 s (one 2-process FSDP2 run is most of it)
"""

from __future__ import annotations

import gzip
import json
import math

import lightning.pytorch as pl
import pytest
import torch
import yaml

from dpo_lightning.errors import ConfigError, DataError
from dpo_lightning.ppo import PPOModule, PromptDataModule

from helpers import (
    BAD_WORDS,
    GOOD_WORDS,
    IMDB,
    TINY_GPT2,
    cli_env,
    cli_main,
    metric_rows,
    run_cli,
    run_ranks,
    synthetic_pairs,
    write_jsonl,
)

REWARD = {"path": "dpo_lightning.reward:WordListReward", "kwargs": {"positive": GOOD_WORDS, "negative": BAD_WORDS}}
PPO_KEYS = ("reward", "kl", "entropy", "clipfrac", "value_loss", "approx_kl")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread costs more than it saves (17x slower measured on 2 busy cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rows = [{"prompt": r["prompt"]} for r in synthetic_pairs(64)]
    return write_jsonl(tmp_path_factory.mktemp("ppo") / "prompts.jsonl", rows)


def make_run(prompts_file, tokenizer, *, batch_size=8, **model):
    settings = dict(reward=REWARD, policy_config=TINY_GPT2, max_new_tokens=6, ppo_epochs=2, num_minibatches=2,
                    lr=3e-3, kl_coef=0.05, kl_target=1.0, tokenizer=tokenizer)  # fmt: skip
    settings.update(model)
    module = PPOModule(**settings)
    dm = PromptDataModule(str(prompts_file), batch_size=batch_size, updates_per_rollout=module.updates_per_rollout)
    dm._tokenizer = tokenizer  # as the CLI's link would hand it over (no training of a tokenizer per test)
    return module, dm


class Record(pl.Callback):
    """Every step's logged values."""

    def __init__(self):
        self.rows: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[trainer.global_step] = {k: float(v) for k, v in trainer.logged_metrics.items() if "tokens" not in k}


def _trainer(tmp_path, max_steps, callbacks):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks)  # fmt: skip


def test_resume_mid_rollout_batch_is_exact(tmp_path, prompts_file, tiny_tokenizer):
    """12 updates = 3 rollout batches of 4; a checkpoint after update 6 (rollout 2, 2 of its 4 updates done) resumed to
    12 ends with the same weights, bit for bit, and logs the same values at steps 7-12, as the run that never stopped.

    What must survive: the rollout buffer (every rank's), the adaptive β, the rollout counter (sampling and minibatch
    seeds derive from it), the optimizer and scheduler, and the data position (batch and phase). A reference rebuilt
    from another seed fails the checkpoint's reference fingerprint: a clear error, not a silent resume."""
    pl.seed_everything(0)
    module, dm = make_run(prompts_file, tiny_tokenizer)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    full = Record()
    _trainer(tmp_path, 12, [saver, full]).fit(module, dm)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    state = torch.load(ckpt, weights_only=False)["dpo_lightning"]["ppo"]
    assert state["rollouts_done"] == 2 and state["rollouts"][0]["index"] == 1  # saved in the middle of rollout 1

    pl.seed_everything(0)  # the reference is rebuilt from policy_config with the same seed
    resumed_module, resumed_dm = make_run(prompts_file, tiny_tokenizer)
    resumed = Record()
    _trainer(tmp_path, 12, [resumed]).fit(resumed_module, resumed_dm, ckpt_path=ckpt)
    assert sorted(resumed.rows) == list(range(7, 13))
    for step, row in resumed.rows.items():
        assert row == full.rows[step], step
    assert full.rows[12]["train/ppo/kl_coef"] != 0.05  # β moved: the controller's state was needed
    a, b = module.state_dict(), resumed_module.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    pl.seed_everything(1)  # another random init: the rebuilt reference is not the one trained against
    other_module, other_dm = make_run(prompts_file, tiny_tokenizer)
    with pytest.raises(ConfigError, match="the reference rebuilt for this run differs"):
        _trainer(tmp_path, 12, []).fit(other_module, other_dm, ckpt_path=ckpt)


def letter_e(prompts: list[str], completions: list[str]) -> list[float]:
    """A dense toy reward for the learning test: how many letters "e" the completion holds."""
    return [float(c.count("e")) for c in completions]


def test_reward_goes_up(tmp_path, prompts_file, tiny_tokenizer):
    """The reward is the number of "e"s in 6 sampled tokens (≈ 0.4 for the random initial policy). 40 updates (10
    rollout batches of 16 prompts) raise the mean reward of the last 3 batches above that of the first 3 by more than 1
    (measured: 0.37 -> 2.4), with KL to the reference growing from exactly 0. A sign error in the chain (advantages,
    ratio, KL penalty) stalls or lowers it instead."""
    pl.seed_everything(0)
    module, dm = make_run(prompts_file, tiny_tokenizer, batch_size=16, lr=1e-2, kl_target=None, kl_coef=0.01,
                          reward="test_ppo:letter_e")  # fmt: skip
    record = Record()
    _trainer(tmp_path, 40, [record]).fit(module, dm)
    rewards = [record.rows[s]["train/ppo/reward"] for s in range(1, 41, 4)]  # one per rollout batch
    kls = [record.rows[s]["train/ppo/kl"] for s in range(1, 41, 4)]
    assert kls[0] == 0.0 and kls[-1] > 0.0
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 1.0, rewards
    for key in PPO_KEYS:
        assert math.isfinite(record.rows[40][f"train/ppo/{key}"])


def test_cli_on_imdb_prompts(tmp_path):
    """``dpo-lightning ppo --config experiments/tiny_ppo.yaml`` on 200 IMDb reviews, 8 updates: the run folder holds the
    resolved config, the tokenizer, a checkpoint, and every ``train/ppo/*`` metric, finite, KL 0 at the first update;
    ``dpo-lightning export`` turns the checkpoint into a model directory, and a PPO run from it reads its tokenizer."""
    if not (IMDB / "train.jsonl.gz").exists():
        pytest.skip("needs ../shared/data/imdb")
    with gzip.open(IMDB / "train.jsonl.gz", "rt") as f:
        rows = [json.loads(next(f)) for _ in range(200)]
    data = write_jsonl(tmp_path / "imdb200.jsonl", rows)
    run = tmp_path / "run"
    result = cli_main("ppo", "--config", "experiments/tiny_ppo.yaml", "--data.train_files", str(data),
                      "--data.tokenizer_vocab_size", "512", "--data.batch_size", "8", "--trainer.max_steps", "8",
                      "--trainer.log_every_n_steps", "1", "--run.dir", str(run), "--run.wandb", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        (run / "config.yaml").exists() and (run / "tokenizer").is_dir() and (run / "checkpoints" / "last.ckpt").exists()
    )
    rows = metric_rows(run)
    assert len(rows) == 8
    for key in PPO_KEYS:
        assert all(math.isfinite(float(r[f"train/ppo/{key}"])) for r in rows), key
    assert float(rows[0]["train/ppo/kl"]) == 0.0 and float(rows[0]["train/ppo/approx_kl"]) < 1e-6  # π = π_ref, ρ = 1
    exported = cli_main("export", str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-2000:]  # the policy alone: the value head is left out
    assert (tmp_path / "export" / "model.safetensors").exists() and (tmp_path / "export" / "tokenizer.json").exists()
    # PPO from that model directory: data.tokenizer defaults to the directory's tokenizer, not a new BPE
    again = cli_main("ppo", "--config", "experiments/tiny_ppo.yaml", "--data.train_files", str(data),
                     "--model.policy_config", "null", "--model.policy", str(tmp_path / "export"),
                     "--data.batch_size", "8", "--trainer.max_steps", "1", "--run.dir", str(tmp_path / "again"),
                     "--run.wandb", "false")  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())["data"]["tokenizer"] == str(
        tmp_path / "export"
    )


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_processes(tmp_path, prompts_file, tiny_tokenizer_dir, strategy):
    """FSDP2 over 2 CPU processes, the sole guard of the sharded path (sampling on sharded weights, the value head
    sharded on its own, reductions over ranks), and DDP (slow: the same reductions, Lightning's DDP wrapper around a
    manual-optimization step): 4 updates run, and the two ranks sampled disjoint prompts."""
    run = tmp_path / strategy
    result = run_ranks("ppo", "--config", "experiments/tiny_ppo.yaml", "--data.train_files", str(prompts_file),
                     "--data.prompt_field", "prompt", "--data.prefix_tokens", "null", "--data.strip_html", "false",
                     "--data.tokenizer", str(tiny_tokenizer_dir), "--data.batch_size", "4",
                     "--model.policy_config", json.dumps(TINY_GPT2), "--model.max_new_tokens", "4",
                     "--model.reward", json.dumps(REWARD), "--trainer.max_steps", "4", "--trainer.devices", "2",
                     "--trainer.strategy", strategy, "--trainer.log_every_n_steps", "1", "--run.dir", str(run),
                     "--run.wandb", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metric_rows(run)
    assert len(rows) == 4 and all(math.isfinite(float(r["train/ppo/value_loss"])) for r in rows)
    ckpt = run / "checkpoints" / "last.ckpt"
    if strategy == "fsdp":
        assert (ckpt / ".metadata").exists()  # a distributed checkpoint
        ckpt = ckpt / "meta.pt"
    meta = torch.load(ckpt, weights_only=False)["dpo_lightning"]["ppo"]["rollouts"]
    prompts = [{tuple(ids[:n].tolist()) for ids, n in zip(r["tensors"]["input_ids"], r["tensors"]["prompt_lengths"],
                                                            strict=True)} for r in meta]  # fmt: skip
    assert len(meta) == 2 and not prompts[0] & prompts[1]


def test_errors(prompts_file, tiny_tokenizer, tmp_path):
    module, dm = make_run(prompts_file, tiny_tokenizer)
    dm.updates_per_rollout = 3
    with pytest.raises(ConfigError, match="updates_per_rollout is 3"):
        _trainer(tmp_path, 2, []).fit(module, dm)
    module, dm = make_run(prompts_file, tiny_tokenizer, batch_size=1)
    with pytest.raises(ConfigError, match=r"data.batch_size \(1 prompts per rollout batch\) must be >= model.num_mini"):
        _trainer(tmp_path, 2, []).fit(module, dm)
    small_vocab = {"policy_config": {**TINY_GPT2, "vocab_size": 8}}  # the tokenizer has more tokens
    for bad, match in (({"kl_coef": 0.0}, "model.kl_coef .the initial β. must be > 0"), ({"lam": 1.5}, "model.lam"),
                       ({"gamma": 0.0}, "model.gamma"), (small_vocab, "embedding has 8 rows")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            make_run(prompts_file, tiny_tokenizer, **bad)  # make_run's kl_target is 1.0: adaptive β
    result = cli_main("ppo", "--config", "experiments/tiny_ppo.yaml", "--model.reward", "no_such_module:fn",
                      "--data.train_files", str(prompts_file), "--data.prompt_field", "prompt",
                      "--data.prefix_tokens", "null", "--trainer.max_steps", "1", "--run.dir", str(tmp_path / "bad"),
                      "--run.wandb", "false")  # fmt: skip
    assert result.returncode == 2
    assert "reward 'no_such_module:fn': cannot import it" in result.stderr


@pytest.mark.slow
def test_fsdp_resume_mid_rollout_is_exact(tmp_path, prompts_file, tiny_tokenizer_dir):
    """FSDP2, 2 processes: a run of 8 updates writes a sharded checkpoint after update 6 (the middle of rollout 2); a
    second run resumed from it logs steps 7-8 exactly as the first did. Slow (two 2-process launches); the sharded
    path itself is guarded by ``test_two_processes[fsdp]``, exact resume in one process by the test above."""
    overlay = tmp_path / "every6.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args:\n"
        f"        dirpath: {tmp_path / 'ckpt'}\n        every_n_train_steps: 6\n        save_top_k: -1\n"
    )
    common = ["--data.train_files", str(prompts_file), "--data.prompt_field", "prompt", "--data.prefix_tokens", "null",
              "--data.strip_html", "false", "--data.tokenizer", str(tiny_tokenizer_dir), "--data.batch_size", "4",
              "--model.policy_config", json.dumps(TINY_GPT2), "--model.max_new_tokens", "4", "--model.kl_target", "1.0",
              "--model.reward", json.dumps(REWARD), "--trainer.max_steps", "8", "--trainer.devices", "2",
              "--trainer.strategy", "fsdp", "--trainer.log_every_n_steps", "1", "--run.wandb", "false"]  # fmt: skip
    config = ("ppo", "--config", "experiments/tiny_ppo.yaml", "--config", str(overlay))
    full = run_cli(*config, *common, "--run.dir", str(tmp_path / "full"), env=cli_env(threads=1))
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    resumed = run_cli(*config, *common, "--run.dir", str(tmp_path / "resumed"), "--ckpt_path", str(ckpt),
                      env=cli_env(threads=1))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before = {r["step"]: r for r in metric_rows(tmp_path / "full")}
    after = metric_rows(tmp_path / "resumed")
    assert [r["step"] for r in after] == ["6", "7"]  # steps 7 and 8, 0-based in the CSV
    for row in after:
        assert {k: v for k, v in row.items() if "tokens_per_sec" not in k} == {
            k: v for k, v in before[row["step"]].items() if "tokens_per_sec" not in k
        }


def test_prompt_data_errors_name_file_and_record(tmp_path, tiny_tokenizer):
    """A bad prompt record is named by its file and 1-based record number; a missing field lists the fields."""
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"prompt": "  "}, {"prompt": "also fine"}])
    with pytest.raises(DataError, match=r"prompts.jsonl, record 2, field 'prompt': empty or not text"):
        PromptDataModule(str(path)).texts()
    with pytest.raises(DataError, match=r"prompts.jsonl: no field 'text' \(fields: prompt\)"):
        PromptDataModule(str(path), prompt_field="text").texts()
