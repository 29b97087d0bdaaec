"""The benchmark harness at toy size. No test asserts a speed: they check that the harness measures what it says."""

import json
import math

import pytest
import torch

from dpo_lightning.bench import suite, vs_trl
from dpo_lightning.bench.__main__ import SECTIONS, main
from dpo_lightning.bench.flops import parameter_split, step_flops
from dpo_lightning.bench.patches import full_logps
from dpo_lightning.bench.probes import token_counts
from dpo_lightning.bench.side_by_side import REFERENCES, TARGETS
from dpo_lightning.bench.step import build_module, synthetic_batch
from dpo_lightning.bench.trl_side import trl_version

from helpers import HH_TEST

# In --quick mode a section may be skipped only for these reasons, each legitimate on any machine.
QUICK_SKIPS = {"processes": "quick mode runs every worker in one process"}


def expected_status(name: str) -> tuple[str, str | None]:
    """(status, reason) that section ``name`` of a --quick run must have on this machine."""
    if name in QUICK_SKIPS:
        return "skipped", QUICK_SKIPS[name]
    if name == "gpu":  # the GPU section only lists commands; it never runs them in this harness
        return ("not_run", "Run the commands below") if torch.cuda.is_available() else ("skipped", "No GPU")
    return "ok", None


@pytest.mark.skipif(not HH_TEST.exists(), reason="needs the shared HH data beside the checkout")
def test_quick_run_writes_every_section(tmp_path):
    """`--quick` runs every section at toy size in one process and writes results.json and README.md. Each
    section is "ok" except the ones quick mode skips by design (QUICK_SKIPS) and the GPU section, which says
    whether this machine has a GPU. The TRL side runs when TRL is installed (`make test` installs the bench
    extra) and then both sides' first losses agree (equal work); without TRL it is recorded as skipped with the
    reason, and the test says so in its skip."""
    out = tmp_path / "bench"
    assert main(["--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for name in SECTIONS:
        status, reason = expected_status(name)
        assert results[name]["status"] == status, (name, results[name])
        if reason:
            assert results[name]["reason"].startswith(reason), (name, results[name]["reason"])
    trl = results["trl"]
    assert trl["summary"]["ours_padded"]["tokens_per_s"] > 0
    assert trl["summary"]["ours_padded"]["peak_rss_mb"] > 0
    assert results["sweep"]["step_time_fit"]
    assert results["pipeline"]["hh"]["cached"]["pairs"] > 0
    check_side_by_side(results["side_by_side"], results["settings"]["side_layouts"], trl_version() is not None)
    readme = (out / "README.md").read_text()
    gpu_line = f"**GPU: {torch.cuda.get_device_name(0)}**" if torch.cuda.is_available() else "**GPU: none.**"
    assert "## Targets (issue 12" in readme and "## Side by side" in readme and gpu_line in readme
    if trl_version() is None:
        assert trl["trl"]["status"] == "skipped" and "not installed" in trl["trl"]["reason"]
        pytest.skip("trl is not installed (pip install -e '.[bench]'): the TRL side and equal-work check did not run")
    assert trl["trl"]["status"] == "ok", trl["trl"]
    checks = trl["equal_work"].values()
    assert checks and all(c["ok"] for c in checks), trl["equal_work"]
    assert math.isclose(trl["runs"]["trl_padded"][0]["losses"][0], math.log(2), abs_tol=1e-6)


def check_side_by_side(side: dict, layouts: list[str], with_trl: bool) -> None:
    """Every layout x reference ran; a shared prompt processes fewer tokens than it counts as real (the prompt once
    per pair) and so needs fewer FLOPs per real token; precomputed needs 6/8 of them; every layout's first
    losses equal TRL's on the same batches (laid-out log-probs = padded ones); each target has a verdict."""
    main = side["main"]["summary"]
    for layout in layouts:
        for reference in REFERENCES:
            x = main[f"{layout}/{reference}"]
            assert x["status"] == "ok" and x["tokens_per_s"] > 0 and 0 < x["mfu"] < 1, (layout, reference, x)
    padded, both = main["padded/every_step"], main["both/every_step"]
    assert padded["processed_tokens_per_step"] == padded["tokens_per_step"] == both["tokens_per_step"]
    assert both["processed_tokens_per_step"] < both["tokens_per_step"]
    assert both["flops_per_real_token"] < padded["flops_per_real_token"]
    assert main["padded/precomputed"]["flops_per_real_token"] == pytest.approx(padded["flops_per_real_token"] * 0.75)
    assert side["matmul"]["gflops"] > 0
    if not with_trl:
        return
    checks = list(side["main"]["equal_work"].values()) + list(side["rss"]["equal_work"].values())
    assert len(checks) == len(layouts) * (len(REFERENCES) + 1) and all(c["ok"] for c in checks), checks
    assert len(side["targets"]) == len(TARGETS), side["targets"]
    assert all(t["verdict"] in ("PASS", "**MISS**") for t in side["targets"]), side["targets"]


def test_trl_missing_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr("dpo_lightning.bench.trl_side.trl_version", lambda: None)
    assert "not installed" in vs_trl.trl_available()


def test_flops_count_the_non_embedding_parameters():
    """GPT-2 L2/d64, vocab 128, 24 positions. A block holds ln_1 (2d), c_attn (3d² + 3d), attn c_proj (d² + d),
    ln_2 (2d), c_fc (4d² + 4d), mlp c_proj (4d² + d): 12d² + 13d = 49,984 at d 64; N = 2 blocks + ln_f (2d) =
    100,096. The output layer is tied to the token embedding: head = V·d = 8,192, counted once; the position
    embedding 24·64 = 1,536; total 100,096 + 8,192 + 1,536 = 109,824. A step on 100 processed tokens and 30 scored
    positions needs 8·(N·100 + 8,192·30) FLOPs with the reference every step, 6·(...) precomputed."""
    split = parameter_split(build_module("L2-d64", 128, 24).policy)
    assert split == {"non_embedding": 100_096, "head": 8_192, "total": 109_824}
    every = 8 * (100_096 * 100 + 8_192 * 30)
    assert step_flops(split, 100, 30, reference_every_step=True) == every
    assert step_flops(split, 100, 30, reference_every_step=False) == every * 6 // 8


def test_token_counts_of_both_layouts():
    """A padded batch: real = processed = its attention mask's sum, scored = response labels after the first
    position. A laid-out batch carries real_tokens; processed counts its non-pad slots (group ≥ 0)."""
    batch = synthetic_batch(2, 10, 64, fill=0.5, seed=3)
    real = int(batch["attention_mask"].sum())
    assert token_counts(batch) == (real, real, int((batch["labels"][:, 1:] != -100).sum()))
    laid = {"score_source": torch.arange(5), "real_tokens": torch.tensor(20)}
    laid["group_ids"] = torch.tensor([[0, 0, 1, -1]])
    assert token_counts(laid) == (20, 3, 5)


def test_full_head_gives_the_same_logps():
    """The bench's `full` head (every position through the output layer) and the shipped response-only head score
    the same tokens: their log-probs agree (sum and mean aggregation), and gradients flow to the policy."""
    batch = synthetic_batch(3, 24, 128, fill=0.5, seed=1)
    module = build_module("L2-d64", 128, 24)
    module.train()
    for aggregation in ("sum", "mean"):
        module.hparams.logp_aggregation = aggregation
        shipped = module.concatenated_logps(module.policy, batch)
        full = full_logps(module, module.policy, batch)
        torch.testing.assert_close(shipped, full, rtol=1e-5, atol=1e-4)
    shipped.sum().backward()
    assert module.policy.get_output_embeddings().weight.grad.abs().sum() > 0


def test_linear_fit_and_per_round_ratios():
    """y = 1 + 2x fits exactly; ratios pair runs of the same round and skip failed ones."""
    fit = suite.linear_fit([1, 2, 3], [3, 5, 7])
    assert fit["slope_s_per_token"] == pytest.approx(2) and fit["r2"] == pytest.approx(1)
    a = [{"round": 0, "status": "ok", "v": 4.0}, {"round": 1, "status": "error"}]
    b = [{"round": 0, "status": "ok", "v": 2.0}, {"round": 1, "status": "ok", "v": 1.0}]
    assert suite.ratio_per_round(a, b, "v") == [2.0]


def test_report_names_the_gpu_only_where_there_is_one():
    """The headline's GPU sentence follows the gpu section: "none" on a CPU machine, the device's name on a CUDA
    host (the report used to say "GPU: none" everywhere)."""
    from dpo_lightning.bench.report import _gpu_line

    machine = {"host": "box", "date": "2026-12-02T00:00:00"}
    assert _gpu_line({"status": "skipped", "device": None}, machine).startswith("**GPU: none.**")
    line = _gpu_line({"status": "not_run", "device": "NVIDIA H200"}, machine)
    assert line.startswith("**GPU: NVIDIA H200**") and "none" not in line
