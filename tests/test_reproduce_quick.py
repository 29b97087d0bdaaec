"""`make reproduce-quick` as part of the test suite: Part 1 in full, Part 2 as a pipeline check.

The fast suite runs the command with Part 2 at toy size (conftest's ``toy_reproduction``, shared with
test_sentiment_pipeline.py) and the session's 18,000-step Adam run; ``make test-full`` runs it exactly as
``make reproduce-quick`` does (Part 2 at --quick size, its own Adam run).
"""

import json

import pytest

from dpo_lightning.reproduce.__main__ import main

from helpers import IMDB

PART2_CLAIMS = [
    "sentiment.reward_classifier_accuracy",
    "sentiment.dpo_beats_sft",
    "sentiment.dpo_kl_decreases_with_beta",
    *[f"sentiment.dpo_dominates_{b}.{k}" for b in ("ppo_gt", "preferred_ft", "unlikelihood")
      for k in ("pointwise", "envelope")],
    "sentiment.ipo_kl_bounded",
    "sentiment.cdpo_beats_dpo_noisy",
    "sentiment.rdpo_beats_dpo_noisy",
    *[f"sentiment.best_of_n_kl.N{n}" for n in (4, 16, 64)],
]  # fmt: skip
CLAIM_FIELDS = {"id", "claim", "source", "expected", "measured", "tolerance", "passed", "verdict", "interval",
                "threshold"}  # fmt: skip


def check_quick_report(out, code: int) -> None:
    """Part 1's claims (the papers' 26 and the other loss families') all hold and decide the exit status; Part 2
    ran its whole pipeline and reports exactly its claims (a)–(f), each measured (a number, NaN when undecided)
    with a verdict that is not gated, marked as quick in its tolerance; README.md shows both parts."""
    assert code == 0
    claims = json.loads((out / "claims.json").read_text())
    part1 = [c for c in claims if not c["id"].startswith("sentiment.")]
    part2 = [c for c in claims if c["id"].startswith("sentiment.")]
    assert len(part1) >= 26 and all(c["passed"] is True for c in part1)  # the papers' 26, then other families'
    assert {c["id"] for c in part1} >= {"d1.ipo.tau0.1", "two_actions.dpo.margin_unbounded", "ipo.optimum.h"}
    assert [c["id"] for c in part2] == PART2_CLAIMS
    assert all(set(c) == CLAIM_FIELDS for c in claims)
    for c in part2:
        assert c["measured"] is not None and isinstance(c["passed"], bool), c
        assert c["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and c["passed"] == (c["verdict"] == "PASS")
    assert all(c["verdict"] == "PASS" for c in part1)
    assert all("Quick mode" in c["tolerance"] for c in part2 if c["id"] != "sentiment.reward_classifier_accuracy")
    readme = (out / "README.md").read_text()
    assert readme.count("| **PASS** |") >= 26 and "sentiment_frontier.png" in readme and "95% interval" in readme
    assert (out / "bandit_d1_trajectories.png").exists() and (out / "sentiment_frontier.png").exists()


def test_reproduce_quick_end_to_end_toy_part2(toy_reproduction):
    code, out, _ = toy_reproduction
    check_quick_report(out, code)


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path):
    """Exactly `make reproduce-quick`: Part 2 at --quick size, Part 1's own 18,000-step Adam run."""
    assert (IMDB / "train.jsonl.gz").exists()
    check_quick_report(tmp_path, main(["--quick", "--out", str(tmp_path)]))
