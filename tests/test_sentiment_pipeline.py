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
from dpo_lightning.reproduce import sentiment, stats
from dpo_lightning.reproduce.sentiment_claims import Points, check_claims
from dpo_lightning.reproduce.sentiment_data import clean_review, load_imdb, make_prompts, prompt_slices
from dpo_lightning.reproduce.sentiment_settings import Method
from dpo_lightning.reproduce.sentiment_stages import flip_labels

from helpers import IMDB, TINY_GPT2

needs_imdb = pytest.mark.skipif(not (IMDB / "train.jsonl.gz").exists(), reason="../shared/data/imdb is absent")


def test_clean_review():
    assert clean_review("Good.<br /><br />Very  good.<br/>") == "Good. Very good."


def test_prompts_are_whole_words_of_at_least_2_tokens(tiny_tokenizer):
    """A prompt is the first 2–8 tokens extended to the end of their last word: a prefix of the text followed
    by a space (or the end), never a cut inside a word."""
    texts = ["The film was great and lovely and fine and charming, a superb brilliant thing indeed."] * 50
    prompts = make_prompts(tiny_tokenizer, texts, np.random.default_rng(0), 2, 8)
    lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert min(lengths) >= 2 and max(lengths) <= 8 + 2 and len(set(lengths)) > 3
    # a word too long to finish within hi + 2 tokens: cut back to the boundary before it
    long_word = ["Good " + "x" * 200 + " end"] * 20
    assert set(make_prompts(tiny_tokenizer, long_word, np.random.default_rng(0), 6, 6)) == {"Good"}
    assert all(texts[0].startswith(p) and texts[0][len(p) : len(p) + 1] in (" ", "") for p in prompts)
    assert len(set(prompts)) > 3


def test_tuning_and_deciding_prompts_come_from_disjoint_review_sets(tiny_tokenizer):
    """Tuning reviews have CRC-32 ≡ 0 mod 10, deciding ones ≡ 1: disjoint whatever subsample is loaded, and the
    same prompts every time. Each review starts with its own word, so a prompt names its review."""
    from dpo_lightning.reproduce.sentiment_data import review_set

    texts = [f"r{i}q is about a film" for i in range(400)]
    by_word = {t.split()[0]: t for t in texts}
    tuning, deciding = prompt_slices(tiny_tokenizer, texts, 10, 20, 2, 4)
    assert len(tuning) == 10 and len(deciding) == 20
    assert (tuning, deciding) == prompt_slices(tiny_tokenizer, texts, 10, 20, 2, 4)
    assert [review_set(by_word[p.split()[0]]) for p in tuning] == [0] * 10
    assert [review_set(by_word[p.split()[0]]) for p in deciding] == [1] * 20
    half = prompt_slices(tiny_tokenizer, texts[::2], 0, 5, 2, 4)[1]  # another subsample: still deciding reviews
    assert [review_set(by_word[p.split()[0]]) for p in half] == [1] * 5
    with pytest.raises(DataError, match="deciding test reviews"):
        prompt_slices(tiny_tokenizer, texts[:40], 0, 30, 2, 4)


def test_pairs_train_without_eos(tmp_path, tiny_tokenizer_dir):
    """The pairs' responses were cut, not ended: NoEosPreferenceData drops the EOS the data pipeline appends
    (the plain module keeps it, so this test can fail), and nothing else: the response ids are a prefix."""
    from dpo_lightning.data.datamodule import PreferenceDataModule
    from dpo_lightning.reproduce.sentiment_stages import NoEosPreferenceData

    rows = [{"prompt": f"The film {i} was", "chosen": " good and fine", "rejected": " dull and long"} for i in range(6)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = {"train_files": str(path), "format": "explicit", "tokenizer": str(tiny_tokenizer_dir), "max_length": 64,
          "max_prompt_length": 32, "batch_size": 2, "val_fraction": 0.0}  # fmt: skip
    plain, cut = PreferenceDataModule(**kw), NoEosPreferenceData(**kw)
    plain.prepare(), cut.prepare()
    eos = plain.tokenizer.eos_token_id
    for side in ("chosen", "rejected"):
        with_eos, without = plain.datasets["train"][f"{side}_input_ids"], cut.datasets["train"][f"{side}_input_ids"]
        assert all(list(a)[-1] == eos and list(a)[:-1] == list(b) for a, b in zip(with_eos, without, strict=True))
        assert [len(b) for b in without] == list(cut.datasets["train"][f"{side}_len"])


def test_flip_labels_swaps_a_fixed_share():
    pairs = [{"prompt": str(i), "chosen": "a", "rejected": "b"} for i in range(40)]
    noisy, n = flip_labels(pairs, 0.25, seed=0)
    assert n == 10 and sum(p["chosen"] == "b" for p in noisy) == 10 and noisy == flip_labels(pairs, 0.25, 0)[0]
    assert all(p["chosen"] == "a" for p in pairs)  # the clean pairs are not touched


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


def test_evaluate_policy_per_prompt_arrays(tiny_tokenizer):
    """per_prompt: one entry per prompt (the mean of its samples) whose mean is the overall mean; the NLL is
    −log π_ref per token, positive; distinct-2 in (0, 1]."""
    torch.manual_seed(0)
    model = build_causal_lm(None, TINY_GPT2, tiny_tokenizer)
    prompts = [[5, 6], [7, 8, 9], [10]]
    reward_fn = lambda texts: [float(len(t)) for t in texts]  # noqa: E731
    res = evaluate_policy(model, model, prompts, reward_fn, tiny_tokenizer, max_new_tokens=5, samples_per_prompt=2,
                          per_prompt=True)  # fmt: skip
    assert len(res["rewards"]) == len(res["kls"]) == len(res["ref_nll"]) == len(res["lengths"]) == 3
    assert np.mean(res["rewards"]) == pytest.approx(res["reward"]) and np.mean(res["kls"]) == pytest.approx(res["kl"])
    assert min(res["ref_nll"]) > 0 and 0 < res["distinct2"] <= 1 and len(res["samples"]) == 3


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


def _history(kl_reward_pairs, prompts=200, noise=0.5, seed=0):
    """Per-prompt records whose means are the given (KL, reward): N(mean, noise) around them."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (k, r) in enumerate(kl_reward_pairs):
        kls, rewards = k + rng.normal(0, noise, prompts), r + rng.normal(0, noise, prompts)
        kls, rewards = kls - kls.mean() + k, rewards - rewards.mean() + r
        out.append({"step": float(i + 1), "kl": k, "reward": r, "kls": kls.tolist(), "rewards": rewards.tolist()})
    return out


def _decide(runs, sft_mean=0.0, quick=False):
    cfg = dataclasses.replace(sentiment.QUICK, betas=(0.1, 1.0), bon_ns=(4,))
    sft = {"rewards": (sft_mean + np.random.default_rng(9).normal(0, 2.0, 200)).tolist()}
    sft["rewards"] = (np.asarray(sft["rewards"]) - np.mean(sft["rewards"]) + sft_mean).tolist()
    pts = Points([runs], sft, stats.Bootstrap(1, 200, n_boot=300, seed=0))
    note = " Quick mode" if quick else ""
    return {c.id: c for c in check_claims(cfg, pts, None, note, {"best-of-N": "not run"})}


def test_claims_pass_fail_and_stay_undecided_on_synthetic_histories():
    """Hand-made per-prompt histories: where the paper's effects hold clearly (PASS), where they are reversed
    (FAIL), and where a baseline is missing (INCONCLUSIVE, never dropped)."""
    good = {
        Method("DPO", "dpo", 0.1): _history([(2.0, 1.5), (4.0, 3.0)]),
        Method("DPO", "dpo", 1.0): _history([(0.5, 0.8), (1.0, 1.4)], seed=1),
        Method("IPO", "ipo", 0.1): _history([(1.5, 1.0), (1.6, 1.1)], seed=2),
        Method("DPO (noisy)", "dpo", 0.1, noisy=True): _history([(2.0, 0.5), (3.0, 0.6)], seed=3),
        Method("cDPO (noisy)", "cdpo", 0.1, 0.25, noisy=True): _history([(1.5, 1.0), (2.0, 1.5)], seed=4),
        Method("rDPO (noisy)", "rdpo", 0.1, 0.25, noisy=True): _history([(1.5, 1.0), (2.0, 1.5)], seed=5),
        Method("Preferred-FT", "sft", kind="sft"): _history([(1.0, 0.1), (3.0, 0.5)], seed=6),
        Method("Unlikelihood", "unlikelihood", 0.1): _history([(1.0, 0.0), (3.0, 0.2)], seed=7),
    }
    claims = _decide(good)
    want_pass = ["sentiment.dpo_beats_sft", "sentiment.dpo_kl_decreases_with_beta",
                 "sentiment.dpo_dominates_preferred_ft.pointwise", "sentiment.dpo_dominates_preferred_ft.envelope",
                 "sentiment.dpo_dominates_unlikelihood.pointwise", "sentiment.dpo_dominates_unlikelihood.envelope",
                 "sentiment.ipo_kl_bounded", "sentiment.cdpo_beats_dpo_noisy",
                 "sentiment.rdpo_beats_dpo_noisy"]  # fmt: skip
    assert {k: claims[k].verdict for k in want_pass} == dict.fromkeys(want_pass, "PASS")
    assert claims["sentiment.dpo_beats_sft"].measured == pytest.approx(3.0)  # DPO β=0.1 last step − SFT
    assert claims["sentiment.dpo_kl_decreases_with_beta"].measured == pytest.approx(3.0)  # 4 − 1
    assert claims["sentiment.dpo_dominates_ppo_gt.pointwise"].verdict == "INCONCLUSIVE"  # PPO-GT not run
    assert claims["sentiment.best_of_n_kl.N4"].verdict == "INCONCLUSIVE"
    assert all(c.interval is not None for k, c in claims.items() if k in want_pass)

    # reversed: Preferred-FT above DPO at matched KL, β order reversed, IPO ending further out, cDPO below DPO
    bad = dict(good)
    bad[Method("Preferred-FT", "sft", kind="sft")] = _history([(1.0, 2.0), (3.0, 4.0)], seed=6)
    bad[Method("DPO", "dpo", 1.0)] = _history([(5.0, 0.8), (6.0, 1.4)], seed=1)
    bad[Method("IPO", "ipo", 0.1)] = _history([(1.0, 1.0), (6.0, 1.1)], seed=2)
    bad[Method("cDPO (noisy)", "cdpo", 0.1, 0.25, noisy=True)] = _history([(1.5, 0.0), (2.0, -0.5)], seed=4)
    claims = _decide(bad)
    for k in (
        "sentiment.dpo_dominates_preferred_ft.pointwise",
        "sentiment.dpo_dominates_preferred_ft.envelope",
        "sentiment.dpo_kl_decreases_with_beta",
        "sentiment.ipo_kl_bounded",
        "sentiment.cdpo_beats_dpo_noisy",
    ):
        assert claims[k].verdict == "FAIL", (k, claims[k])

    # a gain of 0.02 with noise 0.5 per prompt on 200 prompts (s.e. 0.5 × √(2/200) = 0.05) straddles 0
    near = dict(good)
    near[Method("cDPO (noisy)", "cdpo", 0.1, 0.25, noisy=True)] = _history([(1.5, 0.6), (2.0, 0.62)], seed=4)
    assert _decide(near)["sentiment.cdpo_beats_dpo_noisy"].verdict == "INCONCLUSIVE"


def test_toy_pipeline_writes_figures_and_claims(toy_reproduction):
    """The whole of Part 2 at a size far below --quick (conftest's TOY_PART2, inside the session's
    `reproduce --quick` run): it must run and write everything, with a verdict per claim, not pass claims."""
    from test_reproduce_quick import PART2_CLAIMS

    _, out, methods_call = toy_reproduction
    claims = [c for c in json.loads((out / "claims.json").read_text()) if c["id"].startswith("sentiment.")]
    assert [c["id"] for c in claims] == PART2_CLAIMS
    for c in claims:
        assert all(c[k] not in (None, "") for k in ("id", "claim", "source", "expected", "tolerance"))
        assert c["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and c["passed"] == (c["verdict"] == "PASS")
    figures = ["sentiment_frontier.png", "sentiment_training.png"]
    assert all((out / f).stat().st_size > 5000 for f in figures)
    readme = (out / "README.md").read_text()
    assert all(f"({f})" in readme for f in figures)
    for section in (
        "| DPO β=0.1 |",
        "test accuracy",
        "### Not reproduced",
        "### Deviations",
        "### Samples",
        "### Decision rules (fixed before the run)",
        "GFLOP/s",
        "distinct-2",
        "tuning test prefixes",
    ):
        assert section in readme, section
    work = out / "sentiment"
    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    assert rows and set(rows[0]) == {"prompt", "chosen", "rejected"}
    noisy = [json.loads(line) for line in (work / "pairs_noisy.jsonl").read_text().splitlines()]
    assert sum(a != b for a, b in zip(rows, noisy, strict=True)) == round(0.25 * len(rows))
    runs = methods_call["runs"]
    names = {m.name for m in runs}
    assert {"DPO", "IPO", "DPO (noisy)", "cDPO (noisy)", "rDPO (noisy)", "Preferred-FT"} <= names
    evaluated = sum(h["step"] > 0 for hs in runs.values() for h in hs)
    assert len((work / "frontier.csv").read_text().splitlines()) == 1 + 1 + evaluated
    last = [max(hs, key=lambda h: h["step"]) for hs in runs.values()]
    assert all(len(h["rewards"]) == len(h["kls"]) == len(methods_call["args"][2]) for h in last)
    assert (work / "sft" / "config.json").exists() and (work / "reward.npz").exists()


def test_toy_pipeline_with_two_workers_matches_one(tmp_path, monkeypatch, toy_reproduction):
    """sentiment.py's promise: each method run is seeded and single-threaded, so its numbers do not depend on
    which process runs it. All of Part 2 at toy size again, its method runs in 2 spawned worker processes as
    `make reproduce` runs them (each worker pays for importing torch and Lightning): the same frontier.csv (every
    evaluated reward and KL), byte for byte, as the session's 1-worker run."""

    from conftest import TOY_PART2

    monkeypatch.setattr(sentiment, "QUICK", dataclasses.replace(sentiment.QUICK, **{**TOY_PART2, "workers": 2}))
    sentiment.run_part2(tmp_path, quick=True, seed=0, data_dir=IMDB)
    _, out, _ = toy_reproduction
    assert (tmp_path / "sentiment" / "frontier.csv").read_text() == (out / "sentiment" / "frontier.csv").read_text()
