"""Part 1 of `make reproduce` (exact claims on bandits) and the report machinery around it.

    python -m pytest -q tests/test_reproduce_exact.py        # ~20 s on 2 idle CPU cores; +40 s for `slow`

The one expensive step, the 18,000-step Adam run behind the D1 and two-action claims (~12 s), runs once per
session (conftest's ``adam_runs``, shared with test_reproduce_quick.py); the CLI test reuses it instead of
training again. Its determinism is tested on a short run and the rest of Part 1 twice through the CLI; the slow
test runs the whole CLI twice, real Adam runs included, for byte-identical claims.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

import dpo_lightning.reproduce.__main__ as cli
from dpo_lightning.reproduce import bandit
from dpo_lightning.reproduce.claims import Claim, deviation, format_claims_table, within

from helpers import part1_with

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_the_adam_setting_is_the_papers():
    """Azar et al. §5.4: Adam, 18,000 steps, learning rate 0.01, minibatches of 9 pairs, 10 seeds (replicas)."""
    assert bandit.SGD == {"steps": 18_000, "lr": 0.01, "batch_size": 9, "n_seeds": 10}


# --- the claim groups, against the closed forms ----------------------------------------------------------


def test_dpo_optimum_is_softmax_of_ref_plus_reward_over_beta():
    """Rafailov et al. Eq. 4: the per-pair DPO loss is the cross-entropy between P_BT(i≻j) = σ(r_i − r_j) and
    σ(β h_ij); it is minimised when β h_ij = r_i − r_j for every pair, i.e. θ = log π_ref + r/β + const, so
    π* = softmax(log π_ref + r/β) whatever the pair distribution μ. L-BFGS in float64 gets there to ~1e-9."""
    claims = bandit.dpo_optimum_claims(seed=0)
    assert [c.id for c in claims] == [f"bandit.dpo_optimum.beta{b}" for b in (0.1, 0.5, 1.0)]
    assert all(c.passed for c in claims)
    b = bandit.make_bandit(seed=0)
    assert len(b["rewards"]) >= 4 and b["log_ref"].exp().std() > 0.05  # K ≥ 4, reference not uniform
    for beta in (0.1, 0.5, 1.0):
        closed = torch.softmax(b["log_ref"] + b["rewards"] / beta, 0)
        pi = bandit.population_dpo_policy(b, beta)
        assert (pi - closed).abs().max() < 1e-6


def test_d1_ipo_and_dpo_limits(adam_runs):
    """Azar et al. §5.4. D1 = {a≻b, b≻c, a≻c}, x = θ_a − θ_b, y = θ_b − θ_c, c = 1/(2τ): the IPO loss
    (x − c)² + (y − c)² + (x + y − c)² is stationary where 2x + y = 2c = x + 2y, so x = y = 1/(3τ) and
    π = softmax([2, 1, 0]/(3τ)): (.9644, .0344, .0012), (.5627, .2889, .1483), (.4484, .3213, .2302) for
    τ = 0.1, 0.5, 1 (the paper prints these to 3 decimals). DPO has no stationary point: π → (1, 0, 0)."""
    (_, thetas), _ = adam_runs
    claims = {c.id: c for c in bandit.d1_claims(thetas[-1])}
    assert len(claims) == 9 and all(c.passed for c in claims.values())
    mean_pi = torch.softmax(thetas[-1], -1).mean(2)  # (loss, τ, action)
    for t, tau in enumerate((0.1, 0.5, 1.0)):
        closed = torch.softmax(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64) / (3 * tau), 0)
        assert (closed - torch.tensor(bandit.PAPER_D1_IPO[tau], dtype=torch.float64)).abs().max() < 1e-3
        assert (mean_pi[1, t] - closed).abs().max() < 0.01  # IPO, stochastic minibatches
        assert mean_pi[0, t, 0] > 0.99  # DPO: all mass on a
        assert claims[f"d1.ipo.population_optimum.tau{tau}"].measured == pytest.approx(closed.tolist(), abs=1e-6)


def test_two_actions_ipo_sigmoid_and_dpo_unbounded(adam_runs):
    """Azar et al. §5.3.1, one pair y1≻y2, h = θ_1 − θ_2. IPO: (h − 1/(2τ))² is 0 at h = 1/(2τ), so
    π(y1) = σ(1/(2τ)) = .9933, .7311, .6225, .5622 for τ = 0.1, 0.5, 1, 2. DPO: d/dh[−log σ(τh)] = −τσ(−τh) < 0
    for every finite h, so training keeps raising h and π(y1) → 1."""
    _, (steps, thetas) = adam_runs
    claims = {c.id: c for c in bandit.two_action_claims(steps, thetas)}
    assert len(claims) == 9 and all(c.passed for c in claims.values())
    for tau, printed in bandit.PAPER_TWO_IPO.items():
        assert _sigmoid(0.5 / tau) == pytest.approx(printed, abs=5e-5)
        assert claims[f"two_actions.ipo.tau{tau}"].measured == pytest.approx(_sigmoid(0.5 / tau), abs=1e-3)
        assert claims[f"two_actions.dpo.tau{tau}"].measured > 0.99
    h = torch.tensor(claims["two_actions.dpo.margin_unbounded"].measured)  # (τ, 4 checkpoints)
    assert (h[:, 1:] > h[:, :-1]).all()


def test_per_pair_optima_of_cdpo_and_ipo():
    """Mitchell's cDPO note: −β[(1−ε)σ(−βh) − εσ(βh)] = 0 ⇔ σ(βh*) = 1 − ε ⇔ βh* = log((1−ε)/ε):
    log 9 = 2.1972 at ε = 0.1, log 3 = 1.0986 at ε = 0.25; there the loss is H(ε) = −(1−ε)log(1−ε) − ε log ε
    = 0.3251 nats at ε = 0.1 (0.5623 at 0.25). IPO: h* = 1/(2β) = 5, 1, 0.5 for β = 0.1, 0.5, 1."""
    claims = {c.id: c for c in bandit.per_pair_optimum_claims()}
    assert all(c.passed for c in claims.values())
    assert claims["cdpo.optimum.eps0.1.beta_h"].measured == pytest.approx([math.log(9)] * 3, abs=1e-4)
    assert claims["cdpo.optimum.eps0.25.beta_h"].measured == pytest.approx([math.log(3)] * 3, abs=1e-4)
    assert claims["cdpo.optimum.eps0.1.loss"].measured == pytest.approx([0.325083] * 3, abs=1e-4)
    assert claims["ipo.optimum.h"].measured == pytest.approx([5.0, 1.0, 0.5], abs=1e-6)


def test_minibatch_weights_are_frequencies_of_nine_draws():
    """Each row is n_p/9 with Σ n_p = 9; replicas draw differently; the same seed draws the same."""
    w = bandit.minibatch_weights(bandit.D1, seed=3, steps=50, batch_size=9)
    assert w.shape == (50, bandit.D1.n_seeds, 3)
    assert torch.allclose(w.sum(-1), torch.ones(50, bandit.D1.n_seeds, dtype=torch.float64))
    assert torch.equal(w * 9, (w * 9).round())
    assert not torch.equal(w[:, 0], w[:, 1])
    assert torch.equal(w, bandit.minibatch_weights(bandit.D1, seed=3, steps=50, batch_size=9))


# --- the command line and the report ---------------------------------------------------------------------


# The claims of the DPO, IPO and cDPO papers, first in claims.json: 3 DPO optima (β = 0.1, 0.5, 1) + 9 on D1
# (3 τ × {IPO population optimum, DPO, IPO}) + 9 on two actions (4 τ × {DPO, IPO} + DPO's unbounded margin)
# + 5 per-pair optima (cDPO at ε = 0.1 and 0.25 × {βh*, loss at h*} + IPO's h*) = 3 + 9 + 9 + 5 = 26.
PAPER_GROUPS = {"bandit.dpo_optimum.": 3, "d1.": 9, "two_actions.": 9, "cdpo.optimum.": 4, "ipo.optimum.": 1}
N_PAPER_CLAIMS = sum(PAPER_GROUPS.values())


def paper_claims(rows: list[dict]) -> list[dict]:
    """The first 26 rows, checked to be the paper groups in order (other loss families' groups follow them)."""
    head = rows[:N_PAPER_CLAIMS]
    counts = {prefix: sum(r["id"].startswith(prefix) for r in head) for prefix in PAPER_GROUPS}
    assert counts == PAPER_GROUPS, counts
    return head


def test_cli_part1_writes_claims_figures_and_report(part1_cli_run):
    """Every claim passes and is reported, the papers' 26 first (PAPER_GROUPS), with both figures."""
    rc, out = part1_cli_run
    assert rc == 0
    rows = json.loads((out / "claims.json").read_text())
    names = {f.name for f in fields(Claim)}
    assert len(paper_claims(rows)) == 26 and all(set(r) == names for r in rows)
    assert all(r["passed"] is True for r in rows)
    for png in ("bandit_d1_trajectories.png", "bandit_two_actions.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    readme = (out / "README.md").read_text()
    assert readme.count("| **PASS** |") == len(rows) and "**FAIL**" not in readme
    assert "![bandit_d1_trajectories](bandit_d1_trajectories.png)" in readme
    assert "| torch |" in readme and "Seed: 0" in readme and "wall time" in readme


def test_adam_runs_are_deterministic_per_seed():
    """Same seed → bit-identical trajectories; another seed → other minibatches, other D1 trajectories."""
    run = [bandit.train_bandits([bandit.D1, bandit.TWO_ACTIONS], seed=s, steps=150, lr=0.01, batch_size=9)
           for s in (0, 0, 1)]  # fmt: skip
    for (s_a, th_a), (s_b, th_b) in zip(run[0], run[1], strict=True):
        assert torch.equal(s_a, s_b) and torch.equal(th_a, th_b)
    assert not torch.equal(run[0][0][1], run[2][0][1])
    assert torch.equal(run[0][1][1], run[2][1][1])  # the two-action problem has no sampling at all


def test_cli_claims_are_the_claim_groups_output(part1_cli_run, adam_runs):
    """claims.json starts with exactly the paper claim groups' output at the same seed, serialised by
    write_claims (the same ``json.dumps`` of the dataclass rows)."""
    _, out = part1_cli_run
    (s1, th1), (s2, th2) = adam_runs
    claims = (
        bandit.dpo_optimum_claims(seed=0)
        + bandit.d1_claims(th1[-1])
        + bandit.two_action_claims(s2, th2)
        + bandit.per_pair_optimum_claims()
    )
    written = json.loads((out / "claims.json").read_text())[:N_PAPER_CLAIMS]
    assert written == json.loads(json.dumps([asdict(c) for c in claims], default=float))
    assert len(claims) == N_PAPER_CLAIMS
    assert not torch.equal(bandit.make_bandit(1)["rewards"], bandit.make_bandit(0)["rewards"])


def test_same_seed_same_claims_through_the_cli(part1_cli_run, adam_runs, tmp_path):
    """The fast half of "the same seed gives the same claims": a second `--part 1 --seed 0` (every claim group
    recomputed: L-BFGS optima, per-pair optima, claims from the Adam trajectories, serialisation) writes a
    byte-identical claims.json; the Adam run itself is deterministic per seed (above). The slow test below runs
    the whole thing twice, Adam included (make test-full)."""
    assert part1_with(adam_runs, tmp_path) == 0
    assert (tmp_path / "claims.json").read_bytes() == (part1_cli_run[1] / "claims.json").read_bytes()


@pytest.mark.slow
def test_two_full_cli_runs_give_identical_claims(tmp_path):
    """Determinism end to end: `--part 1 --seed 0` twice (two real 18k-step runs) → identical claims.json."""
    for name in ("a", "b"):
        assert cli.main(["--part", "1", "--seed", "0", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a" / "claims.json").read_bytes() == (tmp_path / "b" / "claims.json").read_bytes()


def test_scale_paper_without_weights_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "dpo_lightning.reproduce", "--scale", "paper", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --scale paper needs the weights of gpt2-large")
    assert not (tmp_path / "o" / "claims.json").exists()  # failed before doing any work


def _fake_part2(claim_passes: bool):
    def run_part2(out_dir: Path, *, quick: bool, seed: int):
        (out_dir / "part2.png").write_bytes(PNG_MAGIC)
        claim = Claim("imdb.fake", "a stand-in claim", "test", 1.0, 1.0 if claim_passes else 2.0, 0.1, claim_passes)
        return [claim], {"figures": ["part2.png"], "markdown": f"Fake Part 2 (quick={quick}, seed={seed})."}

    return run_part2


def test_part2_absent_present_and_failing(tmp_path, monkeypatch):
    """Absent sentiment.py: reported as not run, and --part 2 alone (no claims) exits 1. Present: its claims,
    figures and markdown join the report; a failing claim makes the exit status 1."""
    monkeypatch.setattr(cli, "_load_part2", lambda: (None, cli.PART2_ABSENT))
    assert cli.main(["--part", "2", "--out", str(tmp_path / "absent")]) == 1
    assert "**Not run.** " + cli.PART2_ABSENT in (tmp_path / "absent" / "README.md").read_text()
    assert json.loads((tmp_path / "absent" / "claims.json").read_text()) == []

    monkeypatch.setattr(cli, "_load_part2", lambda: (_fake_part2(True), ""))
    assert cli.main(["--part", "2", "--quick", "--seed", "7", "--out", str(tmp_path / "ok")]) == 0
    readme = (tmp_path / "ok" / "README.md").read_text()
    assert "Fake Part 2 (quick=True, seed=7)." in readme and "![part2](part2.png)" in readme

    monkeypatch.setattr(cli, "_load_part2", lambda: (_fake_part2(False), ""))
    assert cli.main(["--part", "2", "--out", str(tmp_path / "bad")]) == 1
    assert "| **FAIL** | `imdb.fake` |" in (tmp_path / "bad" / "README.md").read_text()


def test_claims_table_helpers():
    assert deviation([1.0, 0.5], [0.9, 0.5]) == pytest.approx(0.1)
    assert deviation("strictly increasing", "x") is None and deviation([1.0], [1.0, 2.0]) is None
    assert within(torch.tensor([0.3333]), [1 / 3], 1e-3) and not within([float("nan")], [0.0], 1.0)
    c = Claim("a", "x | y", "s", [1.0, 0.0], [0.99951, 1e-7], 0.01, True)
    row = format_claims_table([c]).splitlines()[-1]
    assert row.startswith("| **PASS** | `a` | x \\| y |") and "[0.9995, 1e-07]" in row
