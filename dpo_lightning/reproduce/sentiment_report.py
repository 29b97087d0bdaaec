"""Part 2's report section: settings, decision rules, controls (length, EOS, fluency, samples), tables, figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dpo_lightning.reproduce.sentiment_claims import THRESHOLDS
from dpo_lightning.reproduce.sentiment_settings import Method, Settings

NOT_REPRODUCED = """\
- GPT-4 win rates on TL;DR summarization and Anthropic HH dialogue (§6.2–6.4, Fig. 2 right, Fig. 3): no GPT-4
  judge and no model able to write summaries here.
- GPT-2-large (774 M parameters) as the policy, and the paper's SiEBERT (RoBERTa-large) sentiment classifier as
  the ground-truth reward: a tiny GPT-2 trained from scratch and a TF-IDF + logistic-regression classifier stand
  in (`--scale paper` is not offered; see Deviations).
- The paper's PPO (trlx, with its reward from the learned reward model) — only PPO-GT, PPO on the ground-truth
  classifier reward, is run; the paper's "PPO" curve (a learned reward model) is not.
- Fig. 2's 22 runs per method and the paper's β grid; the paper's sampling temperatures (§6.3, Fig. 3)."""


def deviations(cfg: Settings, facts: dict[str, Any]) -> str:
    return f"""\
- Model and data size: GPT-2 {cfg.n_layer} layers × {cfg.n_embd} ({facts["n_params"] / 1e6:.2f} M parameters),
  trained from scratch ({cfg.sft_steps} SFT steps) on review openings of {cfg.context} tokens; continuations of
  {cfg.max_new_tokens} tokens (the paper: GPT-2-large fine-tuned on IMDb, longer samples).
- Steps: every offline method {cfg.method_steps} steps × {cfg.method_batch} pairs (≈
  {cfg.method_steps * cfg.method_batch / max(facts["pairs"], 1):.1f} epochs); PPO-GT {cfg.ppo_steps} steps ×
  {cfg.ppo_rollout_prompts} prompts. The paper trains to convergence.
- Reward: TF-IDF + logistic regression (test accuracy {facts["accuracy"]:.3f}), not SiEBERT.
- Responses are cut at {cfg.max_new_tokens} tokens and no method trains on an EOS after them; samples that ended
  early ({facts["ended"]:.0f} of {facts["samples"]:.0f}) are left out of the pairs.
- Label noise (e): {cfg.flip_rate:.0%} of the pairs ({facts["flipped"]} of {facts["pairs"]:.0f}) have chosen and
  rejected swapped, the same pairs for DPO, cDPO and rDPO, fixed by the seed before any run.
- `--scale paper` (GPT-2-large with the paper's classifier) is not implemented: it would need local weights and
  hours of GPU time; the CPU scale above is the only one."""


def plot_training(runs: dict[Method, list[dict]], sft: dict, path: Path) -> Path:
    """Reward and KL against step, one panel per method family, one line per run."""
    from dpo_lightning.reproduce.report import Panel, Series, line_figure

    families = list(dict.fromkeys(m.name for m in runs))
    panels = []
    for what, label in (("reward", "mean reward"), ("kl", "KL(π ‖ π_ref)")):
        for fam in families:
            series = []
            for m, hist in runs.items():
                if m.name == fam:
                    steps = [0.0] + [h["step"] for h in hist if h["step"] > 0]
                    values = [sft[what]] + [h[what] for h in hist if h["step"] > 0]
                    series.append(Series(m.key, steps, values, style="o-"))
            panels.append(Panel(f"{fam}: {label}", series, "step", label))
    return line_figure(path, panels, ncols=len(families), title="IMDb sentiment: held-out evaluation during training")


def _frontier_table(runs: dict[Method, list[dict]], sft: dict) -> str:
    steps = sorted({h["step"] for hs in runs.values() for h in hs if h["step"] > 0})
    lines = ["| run | " + " | ".join(f"step {s:g}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    lines.append(f"| SFT (π_ref, step 0) | {sft['reward']:.2f} @ 0 |" + " |" * (len(steps) - 1))
    for m, hist in runs.items():
        by_step = {h["step"]: h for h in hist}
        cells = [f"{by_step[s]['reward']:.2f} @ {by_step[s]['kl']:.2f}" if s in by_step else "" for s in steps]
        lines.append(f"| {m.key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _controls_table(runs: dict[Method, list[dict]], sft: dict, bon: list[dict]) -> str:
    """Per run, at its last step: length, EOS rate, the SFT model's NLL of the samples, distinct-2."""
    nan = float("nan")
    lines = ["| run (last step) | reward | KL | mean length | EOS rate | SFT NLL / token | distinct-2 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip

    def row(name: str, h: dict) -> str:
        nll = float(np.mean(h["ref_nll"])) if h.get("ref_nll") else float("nan")
        cells = [h["reward"], *(h.get(k, nan) for k in ("kl", "length", "eos_rate")), nll, h.get("distinct2", nan)]
        return f"| {name} | " + " | ".join(f"{v:.{d}f}" for v, d in zip(cells, (2, 2, 1, 3, 2, 3), strict=True)) + " |"

    lines.append(row("SFT", sft))
    for m, hist in runs.items():
        lines.append(row(m.key, max(hist, key=lambda h: h["step"])))
    for r in bon:
        lines.append(row(f"best-of-{int(r['n'])} (KL: formula)", r))
    return "\n".join(lines)


def _samples(runs: dict[Method, list[dict]], sft: dict, prompts: list[str]) -> str:
    def clip(text: str) -> str:
        return text.replace("|", "/").replace("\n", " ")[:140]

    lines = ["| run (last step) | prompt | continuation |", "|---|---|---|"]
    seen = [("SFT", sft)] + [(m.key, max(h, key=lambda r: r["step"])) for m, h in runs.items()]
    for name, h in seen:
        for i, text in enumerate(h.get("samples", [])[:2]):
            lines.append(f"| {name} | {clip(prompts[i])} | {clip(text)} |")
    return "\n".join(lines)


def write_points(runs: dict[Method, list[dict]], sft: dict, path: Path) -> Path:
    """Every evaluated point as CSV: run, method, beta, step, reward, reward_sem, kl, kl_sem, length."""
    cols = ("step", "reward", "reward_sem", "kl", "kl_sem", "length")
    rows = ["run,method,beta," + ",".join(cols), "SFT,SFT,," + ",".join(f"{sft.get(c, 0.0):.6g}" for c in cols)]
    for m, hist in runs.items():
        for h in hist:
            if h["step"] > 0:
                beta = "" if m.beta is None else m.beta
                rows.append(f"{m.key},{m.name},{beta}," + ",".join(f"{h[c]:.6g}" for c in cols))
    path.write_text("\n".join(rows) + "\n")
    return path


def markdown(cfg: Settings, facts: dict[str, Any], runs: dict, sft: dict, bon: list[dict], timings: dict) -> str:
    timing = ", ".join(f"{k} {wall:.0f} s" for k, (wall, _) in timings.items())
    total_wall = sum(t[0] for t in timings.values())
    rules = "\n".join(f"| `{k}` | {v} |" for k, v in THRESHOLDS.items())
    slice_name = "tuning" if facts["quick"] else "deciding"  # the set the prompts come from
    return f"""Controlled sentiment generation on IMDb (Rafailov et al. 2023, §6.1, Appendix C.1) at CPU scale:
a tiny GPT-2 trained from scratch stands in for GPT-2-large, and a TF-IDF + logistic-regression classifier for
the paper's sentiment model. Reward = the classifier's positive-class logit; KL(π ‖ π_ref) = mean over samples
of log π(y|x) − log π_ref(y|x), in nats per sequence, with y ~ π at temperature 1.

- **Data**: {facts["train_reviews"]} IMDb train reviews (classifier, tokenizer, SFT); {facts["test_reviews"]}
  test reviews; source `{facts["source"]}`. Classifier test accuracy **{facts["accuracy"]:.4f}**.
- **SFT**: final train loss {facts["sft_loss"]:.3f} nats/token; samples score {sft["reward"]:.3f} ±
  {sft["reward_sem"]:.3f}.
- **Preference data**: {cfg.pref_prompts} train prefixes ({cfg.min_prefix}–{cfg.max_prefix} tokens, cut forward
  to a word boundary) × {cfg.samples_per_prompt} samples → {facts["pairs"]:.0f} pairs; mean reward gap within a
  pair {facts["pair_gap"]:.3f}.
- **Evaluation prompts**: {facts["eval_prompts"]} {slice_name} test prefixes, one sample each, the same
  sampling seed at every checkpoint of every run. A test review is a *tuning* review when the CRC-32 of its text is
  0 mod 10 and a *deciding* one when it is 1 mod 10 (disjoint by construction): every `--quick` and development run
  evaluates on tuning reviews, only the full run on deciding ones; no setting was chosen on the deciding reviews.
- **Seeds**: base seed {facts["seed"]}; training seeds {facts["train_seeds"]} (each runs every method; the
  classifier, tokenizer, SFT model and pairs come from the base seed); bootstrap seed 0, {cfg.n_boot} replicates.
- **Wall time**: {total_wall:.0f} s on this machine (fp32 matmul {facts["gflops"]:.0f} GFLOP/s on
  {facts["threads"]} threads): {timing}. SFT runs {cfg.sft_threads} thread(s); everything else one thread, the
  method runs and best-of-N {cfg.workers} at a time.

### Decision rules (fixed before the run)

PASS when the 95% bootstrap interval (over evaluation prompts, and over training seeds where there are several)
clears the threshold; FAIL when it lies wholly on the wrong side; INCONCLUSIVE when it straddles it. Point-wise:
each curve read (linear interpolation of its points sorted by KL) at both methods' KL points inside the
overlap of their KL ranges. Envelope: the concave frontiers (SFT at KL 0 included) read at the same points.

| claim | threshold |
|---|---|
{rules}

### Controls: length, EOS and fluency per run

The SFT model's NLL of a run's samples rises, and distinct-2 falls, when a run hacks the reward with repetitive
or broken text.

{_controls_table(runs, sft, bon)}

### Samples

{_samples(runs, sft, facts["eval_prompt_texts"])}

### Every evaluated point

*mean reward @ KL* on the {slice_name} prompts (the same points in `sentiment/frontier.csv`):

{_frontier_table(runs, sft)}

### Not reproduced

{NOT_REPRODUCED}

### Deviations

{deviations(cfg, facts)}
"""
