"""Iterative DPO (``dpo_lightning/iterative.py``, ``dpo-lightning iterate``): rounds of sample → label → train.

python -m pytest -q tests/test_iterative.py
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from dpo_lightning import iterative
from dpo_lightning.errors import DataError

from helpers import cli_main, write_jsonl


def length_reward(prompts, completions):
    """A reward for tests, imported by name (``test_iterative:length_reward``): the completion's length."""
    return torch.tensor([float(len(c)) for c in completions])


def _prompts(tmp_path, n=8):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Review {i}: The film was"} for i in range(n)])


def _argv(assets, tmp_path, *extra):
    return ["iterate", "--config", str(assets / "base.yaml"), "--prompts", str(_prompts(tmp_path)),
            "--reward", "test_iterative:length_reward", "--rounds", "2", "--samples-per-prompt", "3",
            "--max-new-tokens", "6", "--run-dir", str(tmp_path / "run"), *extra]  # fmt: skip


@pytest.mark.parametrize("rounds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_rounds_write_pairs_train_and_export(assets, tmp_path, rounds):
    """Real rounds (2 fit steps each) and the final pass: each round's pairs are a JSONL preference file ranked by
    the reward (chosen longer), its fit reads them, its policy is exported, trained, and is what the next round (or
    the final pass) samples; --reference initial makes the initial policy every fit's reference. The fast run has
    one round (two rounds' chaining is also checked, without training, by the next test). Planted bug: a round
    sampling the initial policy again -> the chain assertion fails."""
    from transformers import AutoModelForCausalLM

    argv = _argv(assets, tmp_path, "--reference", "initial", "--rounds", str(rounds), "--", "--trainer.max_steps",
                 "2", "--trainer.limit_val_batches", "0")  # fmt: skip
    result = cli_main(*argv)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(rounds + 1)) and lines[-1]["final"]
    assert [x["policy"] for x in lines] == [str(assets / "policy")] + [
        str(run / f"round_{r}" / "policy") for r in range(rounds)
    ]
    for r in range(rounds):
        rows = [json.loads(x) for x in (run / f"round_{r}" / "pairs.jsonl").read_text().splitlines()]
        assert 0 < len(rows) <= 8 and len(rows) == lines[r]["pairs"]
        assert all(len(row["chosen"]) > len(row["rejected"]) for row in rows)
        assert lines[r]["reward_chosen"] > lines[r]["reward_rejected"]
        config = yaml.safe_load((run / f"round_{r}" / "train" / "config.yaml").read_text())
        assert config["data"]["train_files"] == str(run / f"round_{r}" / "pairs.jsonl")
        assert config["model"]["reference"] == str(assets / "policy")
    before = AutoModelForCausalLM.from_pretrained(assets / "policy").state_dict()
    after = AutoModelForCausalLM.from_pretrained(run / f"round_{rounds - 1}" / "policy").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def test_two_rounds_chain_policies_with_the_rounds_reference(assets, tmp_path, monkeypatch):
    """Two rounds, --reference round (default): round 1 trains from round 0's exported policy, and each fit gets
    model.reference null (a frozen copy of the round's starting policy). Training and export are stubbed (the
    "export" hands back the initial policy's folder under a new name), so this checks what each round's fit gets."""
    import shutil

    calls = []
    monkeypatch.setattr(iterative, "_fit", lambda args, r: calls.append(args))

    def fake_export(train, out, tok):
        shutil.copytree(assets / "policy", out)
        return out

    monkeypatch.setattr(iterative, "_export_round", fake_export)
    assert cli_main(*_argv(assets, tmp_path, "--pairs", "all")).returncode == 0
    run = tmp_path / "run"
    assert len(calls) == 2
    starts = [args[args.index("--model.policy") + 1] for args in calls]
    assert starts == [str(assets / "policy"), str(run / "round_0" / "policy")]
    assert all(args[args.index("--model.reference") + 1] == "null" for args in calls)
    lines = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert lines[-1]["policy"] == str(run / "round_1" / "policy")
    rows = (tmp_path / "run" / "round_0" / "pairs.jsonl").read_text().splitlines()
    assert len(rows) > 8  # all pairs: up to 3 per prompt


def test_read_prompts_words_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "one two three four five"}, {"text": "six seven"}])
    assert iterative.read_prompts(path, "text", words=3) == ["one two three", "six seven"]
    assert iterative.read_prompts(path, "text", limit=1) == ["one two three four five"]
    with pytest.raises(DataError, match=r"p.jsonl, line 1, field 'prompt'"):
        iterative.read_prompts(path)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--", "--model.online", "{reward: x:y}"], "model.online"),
        (["--policy", "no/such/dir"], "model directory"),
        (["--samples-per-prompt", "1"], "samples-per-prompt"),
    ],
)
def test_errors_are_one_line(assets, tmp_path, extra, match):
    result = cli_main(*_argv(assets, tmp_path, *extra))
    assert result.returncode == 2 and match in result.stderr, result.stderr[-2000:]
