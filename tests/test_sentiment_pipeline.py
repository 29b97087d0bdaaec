"""Part 2 pieces: IMDb loading, prompts, pair labelling, reward/KL evaluation, claims, and a toy end-to-end run.

python -m pytest -q tests/test_sentiment_pipeline.py      # ~30 s on 2 CPU cores (the toy run is most of it)
"""

import dataclasses
import gzip
import json
import math

import numpy as np
import pytest
import torch

from dpo_lightning.errors import DataError
from dpo_lightning.evaluate import evaluate_policy, frontier, frontier_reward, plot_frontier
from dpo_lightning.models import build_causal_lm
from dpo_lightning.reproduce import sentiment
from dpo_lightning.reproduce.sentiment import Method, check_claims, clean_review, load_imdb, make_prompts

from helpers import IMDB, TINY_GPT2

needs_imdb = pytest.mark.skipif(not (IMDB / "train.jsonl.gz").exists(), reason="../shared/data/imdb is absent")


def test_clean_review():
    assert clean_review("Good.<br /><br />Very  good.<br/>") == "Good. Very good."


def test_prompts_are_2_to_8_tokens(tiny_tokenizer):
    texts = ["The film was great and lovely and fine and charming, a superb brilliant thing indeed."] * 50
    prompts = make_prompts(tiny_tokenizer, texts, np.random.default_rng(0), 2, 8)
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert min(lengths) >= 2 and max(lengths) <= 8 and len(set(lengths)) > 3
    assert all(texts[0].startswith(p) for p in prompts)


def test_missing_data_without_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="stanfordnlp/imdb"):
        load_imdb(tmp_path, "train")


def test_dpo_imdb_dir_sets_where_imdb_is_read(tmp_path, monkeypatch):
    """``DPO_IMDB_DIR`` overrides the default ../shared/data/imdb: the folder it names is the one read (a
    two-review stand-in here), for the default directory and for load_imdb without a directory."""
    with gzip.open(tmp_path / "test.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "A fine<br />film.", "label": "pos"}) + "\n")
        f.write(json.dumps({"text": "A dull film.", "label": "neg"}) + "\n")
    monkeypatch.setenv("DPO_IMDB_DIR", str(tmp_path))
    assert sentiment.default_imdb_dir() == tmp_path
    assert load_imdb(None, "test") == (["A fine film.", "A dull film."], [1, 0])
    monkeypatch.delenv("DPO_IMDB_DIR")
    assert sentiment.default_imdb_dir() != tmp_path


@needs_imdb
def test_load_imdb_subsample_is_seeded_and_mixed():
    texts, labels = load_imdb(IMDB, "test", limit=300, seed=1)
    again, _ = load_imdb(IMDB, "test", limit=300, seed=1)
    assert len(texts) == 300 and texts == again
    assert 0.3 < np.mean(labels) < 0.7
    assert not any("<br" in t for t in texts)


def test_evaluate_policy_against_itself_has_zero_kl(tiny_tokenizer):
    torch.manual_seed(0)
    model = build_causal_lm(None, TINY_GPT2, tiny_tokenizer)
    prompts = [[5, 6], [7, 8, 9], [10]]
    reward_fn = lambda texts: [float(len(t)) for t in texts]  # noqa: E731 - any texts -> floats callable works
    res = evaluate_policy(model, model, prompts, reward_fn, tiny_tokenizer, max_new_tokens=5, samples_per_prompt=2)
    assert res["n"] == 6 and res["kl"] == pytest.approx(0.0, abs=1e-5)
    assert res["reward"] > 0 and res["length"] <= 5 and {"reward_sem", "kl_sem", "logp", "eos_rate"} <= set(res)
    # without a reference there is no KL to measure: NaN, not a number that looks like one
    assert math.isnan(evaluate_policy(model, None, prompts, reward_fn, tiny_tokenizer, max_new_tokens=3)["kl"])


def test_frontier_is_the_concave_non_decreasing_envelope():
    """Points (KL, reward): (0, 0), (1, 2), (2, 1), (3, 2.5), (4, 3), (5, 2).
    (2, 1) is under the chord (1, 2)-(3, 2.5); (3, 2.5) is under the chord (1, 2)-(4, 3) (2.667 at KL 3);
    (5, 2) is past the best reward. Vertices: (0, 0), (1, 2), (4, 3); then flat at 3.
    """
    points = [(2.0, 1.0), (0.0, 0.0), (1.0, 2.0), (3.0, 2.5), (4.0, 3.0), (5.0, 2.0), (1.0, 0.5)]
    assert frontier(points) == [(0.0, 0.0), (1.0, 2.0), (4.0, 3.0)]
    assert frontier_reward(points, 0.5) == pytest.approx(1.0)
    assert frontier_reward(points, 2.5) == pytest.approx(2.5)  # 2 + (3 − 2) · 1.5 / 3
    assert frontier_reward(points, 10.0) == 3.0
    assert np.isnan(frontier_reward(points, -1.0))
    assert frontier([(1.0, 5.0), (2.0, 4.0)]) == [(1.0, 5.0)]


def test_plot_frontier_writes_png(tmp_path):
    path = plot_frontier({"DPO": [(1, 1), (2, 2)], "IPO": [(1, 0.5)]}, tmp_path / "f.png", title="t",
                         reference_point=(0.0, 0.0))  # fmt: skip
    assert path.exists() and path.stat().st_size > 5000


def _history(kl_reward_pairs):
    return [
        {"step": float(i + 1), "kl": k, "kl_sem": 0.1, "reward": r, "reward_sem": 0.05}
        for i, (k, r) in enumerate(kl_reward_pairs)
    ]


def test_claims_pass_and_fail_on_synthetic_histories():
    """Hand-made histories where the paper's effects hold, then where they do not."""
    cfg = sentiment.QUICK
    sft = {"reward": 0.0, "reward_std": 2.0, "reward_sem": 0.05}
    kls = dict(zip(cfg.betas, [8, 6, 4, 2], strict=True))
    good = {Method("DPO", "dpo", b): _history([(k / 2, k / 4), (k, k / 2)]) for b, k in kls.items()}
    good[Method("Preferred-FT", "sft")] = _history([(1.0, 0.1), (4.0, 0.5)])
    claims = {c.id: c for c in check_claims(cfg, sft, good, quick=False)}
    assert all(c.passed for c in claims.values()), claims
    assert claims["sentiment.dpo_beats_sft"].measured == pytest.approx(4.0)  # best DPO reward 8/2; threshold 1
    assert claims["sentiment.dpo_kl_decreases_with_beta"].measured == [8, 6, 4, 2]
    bad = {m: _history([(2.0, 0.1)]) for m in good if m.name == "DPO"}  # equal KL, tiny reward gain
    bad[Method("Preferred-FT", "sft")] = _history([(2.0, 0.5)])
    claims = check_claims(cfg, sft, bad, quick=True)
    assert not any(c.passed for c in claims)
    assert all("Quick mode" in c.tolerance for c in claims)


def test_toy_pipeline_writes_figures_and_claims(toy_reproduction):
    """The whole of Part 2 at a size far below --quick (conftest's TOY_PART2, inside the session's
    `reproduce --quick` run): it must run and write everything, not pass claims."""
    _, out, methods_call = toy_reproduction
    claims = [c for c in json.loads((out / "claims.json").read_text()) if c["id"].startswith("sentiment.")]
    assert [c["id"] for c in claims] == [
        "sentiment.reward_classifier_accuracy", "sentiment.dpo_beats_sft",
        "sentiment.dpo_kl_decreases_with_beta", "sentiment.dpo_frontier_dominates_preferred_ft",
    ]  # fmt: skip
    for c in claims:
        assert all(c[k] not in (None, "") for k in ("id", "claim", "source", "expected", "tolerance"))
        assert isinstance(c["passed"], bool) and c["measured"] is not None
    figures = ["sentiment_frontier.png", "sentiment_training.png"]
    assert all((out / f).stat().st_size > 5000 for f in figures)
    readme = (out / "README.md").read_text()
    assert all(f"({f})" in readme for f in figures)
    assert "| DPO β=0.1 |" in readme and "test accuracy" in readme
    work = out / "sentiment"
    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    assert rows and set(rows[0]) == {"prompt", "chosen", "rejected"}
    # header, SFT, then 7 runs (DPO, IPO, cDPO at 2 β + Preferred-FT) × 2 evaluations
    assert len((work / "frontier.csv").read_text().splitlines()) == 1 + 1 + 7 * 2
    assert len(methods_call["runs"]) == 7
    assert (work / "sft" / "config.json").exists() and (work / "reward.npz").exists()


def test_toy_pipeline_with_two_workers_matches_one(tmp_path, monkeypatch, toy_reproduction):
    """sentiment.py's promise: each method run is seeded and single-threaded, so its numbers do not depend on
    which process runs it. All of Part 2 at toy size again, its 7 method runs in 2 spawned worker processes as
    `make reproduce` runs them (each worker pays for importing torch and Lightning): the same frontier.csv (every
    evaluated reward and KL), byte for byte, as the session's 1-worker run."""

    from conftest import TOY_PART2

    monkeypatch.setattr(sentiment, "QUICK", dataclasses.replace(sentiment.QUICK, **{**TOY_PART2, "workers": 2}))
    sentiment.run_part2(tmp_path, quick=True, seed=0, data_dir=IMDB)
    _, out, _ = toy_reproduction
    assert (tmp_path / "sentiment" / "frontier.csv").read_text() == (out / "sentiment" / "frontier.csv").read_text()
