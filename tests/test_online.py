"""Online DPO (``dpo_lightning/online.py``, ``model.online``): pairs sampled from the policy every step.

python -m pytest -q tests/test_online.py
"""

from __future__ import annotations

import gzip
import itertools
import json
import math

import pytest
import torch

from dpo_lightning.data.tokenize import PairCollator
from dpo_lightning.errors import ConfigError
from dpo_lightning.module import PreferenceModule
from dpo_lightning.online import OnlineSampler, batch_prompts, online_config, pick_pairs

from helpers import IMDB, TINY_GPT2, make_datamodule, metric_rows, quiet_trainer, write_jsonl


def test_pick_pairs_best_worst_and_ties():
    """Best = first highest, worst = last lowest; all-tied prompts still get two different samples."""
    rewards = torch.tensor([[0.1, 0.9, 0.5], [2.0, 2.0, -1.0], [3.0, 3.0, 3.0], [-1.0, 0.0, -1.0]])
    chosen, rejected = pick_pairs(rewards)
    assert chosen.tolist() == [1, 0, 0, 1]
    assert rejected.tolist() == [0, 2, 2, 2]


def test_pick_pairs_bradley_terry_frequency():
    """Sample 0 chosen with probability σ(r0 − r1): 20k draws at r0 − r1 = 1 give 0.731 within 4 standard errors."""
    n, gap = 20_000, 1.0
    rewards = torch.tensor([[gap, 0.0]]).repeat(n, 1)
    chosen, rejected = pick_pairs(rewards, "bradley_terry", torch.Generator().manual_seed(0))
    p = 1 / (1 + math.exp(-gap))
    assert (chosen != rejected).all()
    freq = float((chosen == 0).double().mean())
    assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), freq


def test_batch_prompts_are_the_collated_prompt_rows():
    features = [
        {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [1, 2], "rejected_input_ids": [3], "index": 0},
        {"prompt_input_ids": [8], "chosen_input_ids": [4], "rejected_input_ids": [9, 9, 9], "index": 1},
    ]
    assert batch_prompts(PairCollator(0)(features)) == [[5, 6, 7], [8]]


@pytest.mark.parametrize(
    ("online", "extra", "match"),
    [
        ({"reward": "m:f"}, {"precompute_reference": True}, "precompute_reference"),
        ({"reward": "m:f"}, {"loss": "kto"}, "unpaired"),
        ({"reward": "m:f", "samples": 2}, {}, "unknown key"),
        ({}, {}, "model.online.reward"),
        ({"reward": "m:f", "samples_per_prompt": 1}, {}, "samples_per_prompt"),
        ({"reward": "m:f", "samples_per_prompt": 3, "labels": "bradley_terry"}, {}, "samples_per_prompt: 2"),
        ({"reward": "m:f", "temperature": 0.0}, {}, "temperature"),
    ],
)
def test_config_errors(online, extra, match):
    with pytest.raises(ConfigError, match=match):
        PreferenceModule(policy_config=TINY_GPT2, online=online, **extra)


# ------------------------------------------------------------------ a bandit: one-token responses
def _good_ids(tokenizer) -> set[int]:
    return {i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip().startswith(("g", "s"))}


def test_online_dpo_on_a_bandit_moves_mass_to_high_reward_tokens(tiny_tokenizer, tmp_path):
    """One-token responses (max_new_tokens 1), reward 1 for tokens starting with g/s, else 0: a few online steps
    raise the policy's probability of the rewarded tokens after the prompt, and every sample is scored (good
    tokens start with 0.6% of the mass after the prompt; 8 steps took it to 17%). Planted bug: chosen and rejected
    swapped in pick_pairs -> the probability falls and the test fails."""
    good = _good_ids(tiny_tokenizer)
    seen: list[tuple[str, str]] = []

    def reward(prompts, completions):
        seen.extend(zip(prompts, completions, strict=True))
        return torch.tensor([float(tiny_tokenizer.encode(c)[:1] and tiny_tokenizer.encode(c)[0] in good)
                             for c in completions])  # fmt: skip

    rows = [{"prompt": "Review: it was", "chosen": " great.", "rejected": " awful."} for _ in range(32)]
    dm = make_datamodule(write_jsonl(tmp_path / "p.jsonl", rows), tiny_tokenizer, batch_size=8, val_fraction=0.125)
    torch.manual_seed(0)
    online = {"reward": reward, "samples_per_prompt": 4, "max_new_tokens": 1}
    module = PreferenceModule(
        policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, lr=3e-2, warmup_steps=0, beta=0.5, online=online
    )
    prompt = torch.tensor([tiny_tokenizer("Review: it was")["input_ids"]])
    mask = torch.tensor(sorted(good))

    def p_good() -> float:
        with torch.no_grad():
            return float(torch.softmax(module.policy(input_ids=prompt).logits[0, -1], -1)[mask].sum())

    before = p_good()
    quiet_trainer(max_steps=8, limit_val_batches=0).fit(module, datamodule=dm)
    after = p_good()
    assert len(seen) == sum(min(8, 28 - 8 * (s % 4)) for s in range(8)) * 4  # 28 pairs: batches of 8, 8, 8, 4
    assert after > 5 * before and after > 0.05, (before, after)  # measured 0.006 -> 0.17


# ------------------------------------------------------------------ IMDb prompts, the CSV log
def _imdb_pairs(n: int) -> list[dict[str, str]]:
    with gzip.open(IMDB / "train.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"].split() for line in itertools.islice(f, n)]
    return [{"prompt": " ".join(t[:4]), "chosen": " " + " ".join(t[4:8]), "rejected": " ."} for t in texts]


@pytest.mark.skipif(not (IMDB / "train.jsonl.gz").exists(), reason="needs the shared IMDb data")
def test_online_fit_on_imdb_prompts_logs_rewards(tiny_tokenizer, tmp_path):
    """A 2-step online fit on IMDb review prefixes with a length reward: the first loss is ln 2 (policy = reference
    on freshly sampled pairs), the chosen reward beats the rejected one at every step, lengths are the samples'."""
    import lightning.pytorch as pl

    def length_reward(prompts, completions):
        return torch.tensor([float(len(c)) for c in completions])

    dm = make_datamodule(write_jsonl(tmp_path / "imdb.jsonl", _imdb_pairs(40)), tiny_tokenizer, batch_size=4)
    pl.seed_everything(0, verbose=False)
    online = {"reward": length_reward, "max_new_tokens": 6, "samples_per_prompt": 3}
    module = PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer, lr=1e-3, warmup_steps=0, online=online)
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    quiet_trainer(max_steps=2, limit_val_batches=0, log_every_n_steps=1, logger=logger).fit(module, datamodule=dm)
    rows = [r for r in metric_rows(tmp_path) if r.get("train/online/reward_margin")]
    assert len(rows) == 2
    assert abs(float(rows[0]["train/loss"]) - math.log(2)) < 1e-5
    for r in rows:
        assert float(r["train/online/reward_chosen"]) >= float(r["train/online/reward_rejected"])
        assert float(r["train/online/reward_margin"]) > 0  # 3 samples of different lengths: a strict margin
        assert 1 <= float(r["train/online/length"]) <= 6


def test_pairs_are_the_sampled_ids_ranked_by_the_reward(tiny_tokenizer):
    """The new batch holds each prompt's best sample as chosen and worst as rejected, as sampled token ids."""
    torch.manual_seed(0)
    module = PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer)
    features = [{"prompt_input_ids": tiny_tokenizer("The film was")["input_ids"], "chosen_input_ids": [3],
                 "rejected_input_ids": [4], "index": i} for i in range(3)]  # fmt: skip
    batch = PairCollator(tiny_tokenizer.pad_token_id or 0)(features)
    config = online_config({"reward": "x:y", "samples_per_prompt": 4, "max_new_tokens": 5})
    scores: list[torch.Tensor] = []

    def reward(prompts, completions):
        scores.append(torch.tensor([float(len(c)) for c in completions]))
        return scores[-1]

    new, stats = OnlineSampler(config, reward).pairs(module.policy, tiny_tokenizer, batch)
    r = scores[0].view(3, 4)
    assert new["index"].tolist() == [0, 1, 2] and new["input_ids"].shape[0] == 6
    assert stats["reward_chosen"] == pytest.approx(float(r.max(1).values.mean()))
    assert stats["reward_rejected"] == pytest.approx(float(r.min(1).values.mean()))
    for i in range(3):  # rows 0-2 the chosen responses, rows 3-5 the rejected ones, of prompts 0-2
        chosen_text = tiny_tokenizer.decode(new["labels"][i][new["labels"][i] >= 0], skip_special_tokens=True)
        rejected_text = tiny_tokenizer.decode(new["labels"][3 + i][new["labels"][3 + i] >= 0], skip_special_tokens=True)
        assert (len(chosen_text), len(rejected_text)) == (r[i].max(), r[i].min()), i


def test_prompt_plus_new_tokens_beyond_the_context_is_refused(tiny_tokenizer):
    """TINY_GPT2 has 128 positions: a 10-token prompt + 200 new tokens cannot be sampled."""
    module = PreferenceModule(policy_config=TINY_GPT2, tokenizer=tiny_tokenizer)
    row = {"prompt_input_ids": list(range(3, 13)), "chosen_input_ids": [3], "rejected_input_ids": [4], "index": 0}
    sampler = OnlineSampler(online_config({"reward": "x:y", "max_new_tokens": 200}), lambda p, c: torch.zeros(len(c)))
    with pytest.raises(ConfigError, match="exceeds the policy's 128 positions"):
        sampler.pairs(module.policy, tiny_tokenizer, PairCollator(0)([row]))


def test_cli_refuses_online_with_precompute_reference(assets):
    """The config error reaches the command line as one line and exit status 2."""
    from helpers import cli_main, fit_argv

    argv = fit_argv(assets, assets.parent / "online_refused", "--model.online", "{reward: x:y}",
                    "--model.precompute_reference", "true")  # fmt: skip
    result = cli_main(*argv)
    assert result.returncode == 2 and "precompute_reference must be false" in result.stderr, result.stderr[-2000:]
