"""Iterative DPO: rounds of sample → label → train, each round on pairs drawn from the last round's policy.

    dpo-lightning iterate --config experiments/tiny_cpu.yaml --policy runs/sft/policy \\
        --prompts ../shared/data/imdb/test.jsonl.gz --prompt-field text --prompt-words 4 --max-prompts 64 \\
        --reward '{path: dpo_lightning.reward:WordListReward, kwargs: {positive: [good, great], negative: [bad]}}' \\
        --rounds 2 --run-dir runs/iterative -- --trainer.max_steps 20

As in Xiong et al. 2024 (arXiv 2312.11456, "Iterative preference learning from human feedback", online iterative
DPO) and Pang et al. 2024 (arXiv 2404.19733, "Iterative reasoning preference optimization"): round r samples
``--samples-per-prompt`` responses per prompt from policy r, the reward ranks them, the best and the worst of each
prompt become a pair (``--pairs all``: every pair, as the DPO paper's sentiment data), and policy r + 1 is trained
by ``dpo-lightning fit`` on those pairs with the fit config given (any loss, any setting). The reference of a
round is its starting policy (``--reference round``, the default in both papers) or the initial one
(``--reference initial``: the config's ``model.reference``, else the round-0 policy, e.g. the SFT model).

The data path stays records → tokens → batch: each round's pairs are written as a JSONL preference file that the
round's fit reads through the data module. The run folder holds, per round ``round_<r>/``: ``pairs.jsonl``,
``train/`` (the fit's run folder: metrics.csv, config.yaml, checkpoints) and ``policy/`` (the trained policy as a
Hugging Face directory, by ``export``), and ``rounds.jsonl``: one line per round (reward of the round's samples,
of the chosen and rejected responses, pair count) and, last, the reward of the final policy's samples.
Arguments after ``--`` are passed to every round's ``fit`` (``--trainer.max_steps 20``). The round's fit must keep
checkpoints (``ModelCheckpoint`` with ``save_last``, as the shipped configs do): the policy is exported from them.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from dpo_lightning.errors import ConfigError, DataError, UserError
from dpo_lightning.online import pick_pairs, sample_and_score
from dpo_lightning.sampling import label_pairs


def read_prompts(
    path: str | Path, field: str = "prompt", words: int | None = None, limit: int | None = None
) -> list[str]:
    """Prompts from a JSON-lines file (``.gz`` too): the ``field`` of each record, cut to its first ``words``
    whitespace-separated words when given (IMDb review prefixes), the first ``limit`` records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such prompts file")
    prompts = []
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
        for line_no, line in enumerate(f, 1):
            if limit is not None and len(prompts) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {line_no}: not JSON ({err})") from None
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}, line {line_no}, field {field!r}: missing or not a non-empty string")
            prompts.append(" ".join(value.split()[:words]) if words else value)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def round_pairs(
    policy: Any, tokenizer: Any, prompts: list[str], reward: Any, *, samples_per_prompt: int, pairs: str,
    max_new_tokens: int, temperature: float, seed: int,
) -> tuple[list[dict[str, str]], dict[str, float]]:  # fmt: skip
    """One round's preference rows (``{prompt, chosen, rejected}``) from ``policy``'s samples, and the round's reward
    statistics. Ties, identical and empty responses make no pair (the preference loader would reject them)."""
    from dpo_lightning.data.tokenize import prompt_ids

    g = torch.Generator().manual_seed(seed)
    scored = sample_and_score(
        policy, tokenizer, prompt_ids(tokenizer, prompts), reward, samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens, temperature=temperature, generator=g, prompt_texts=prompts,
    )  # fmt: skip
    k = samples_per_prompt
    rows, chosen_r, rejected_r = [], [], []
    best, worst = pick_pairs(scored.rewards)
    for i, prompt in enumerate(prompts):
        texts, rewards = scored.completions[i * k : (i + 1) * k], scored.rewards[i].tolist()
        if pairs == "best_worst":
            picks = (int(best[i]), int(worst[i]))
            texts, rewards = [texts[j] for j in picks], [rewards[j] for j in picks]
        new = label_pairs(prompt, texts, rewards)
        rows += new
        for row in new:
            chosen_r.append(rewards[texts.index(row["chosen"])])
            rejected_r.append(rewards[texts.index(row["rejected"])])
    stats = {"prompts": len(prompts), "samples": len(scored.completions), "pairs": len(rows),
             "reward_mean": float(scored.rewards.mean()),
             "reward_chosen": sum(chosen_r) / max(len(chosen_r), 1),
             "reward_rejected": sum(rejected_r) / max(len(rejected_r), 1)}  # fmt: skip
    return rows, stats


def _config_value(configs: list[dict], overrides: list[str], key: str) -> Any:
    """``model.policy``-style ``key`` as the fit would see it: the last ``--key value`` override, else the last
    config that sets it."""
    flag = f"--{key}"
    for i in range(len(overrides) - 1, -1, -1):
        if overrides[i] == flag and i + 1 < len(overrides):
            return yaml.safe_load(overrides[i + 1])
        if overrides[i].startswith(flag + "="):
            return yaml.safe_load(overrides[i].split("=", 1)[1])
    value = None
    for config in configs:
        section, _, name = key.partition(".")
        if name in (config.get(section) or {}):
            value = config[section][name]
    return value


def _fit(args: list[str], round_no: int) -> None:
    import sys

    from dpo_lightning.cli import main as cli_main

    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it is given args and sys.argv holds others
    try:
        code = cli_main(["fit", *args])
    finally:
        sys.argv = saved
    if code != 0:
        raise UserError(f"iterate: round {round_no}'s fit failed (exit {code}); its output is above")


def _export_round(train_dir: Path, out: Path, tokenizer_dir: str) -> Path:
    from dpo_lightning.export import export

    checkpoints = train_dir / "checkpoints"
    last = checkpoints / "last.ckpt"
    found = [last] if last.exists() else sorted(checkpoints.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(
            f"iterate: the fit of {train_dir} wrote no checkpoint to export its policy from; keep a "
            "lightning.pytorch.callbacks.ModelCheckpoint with save_last: true in the config (as experiments/*.yaml do)"
        )
    return export(found[-1], out, tokenizer=tokenizer_dir)


def iterate(args: argparse.Namespace, overrides: list[str]) -> list[dict[str, Any]]:
    """Run the rounds (see the module docstring); returns the lines of ``rounds.jsonl``."""
    from dpo_lightning.models import build_causal_lm
    from dpo_lightning.reward import load_reward
    from dpo_lightning.tokenizer import load_tokenizer

    configs = []
    for path in args.config:
        if not Path(path).is_file():
            raise ConfigError(f"iterate --config {path}: no such file")
        configs.append(yaml.safe_load(Path(path).read_text()) or {})
    if _config_value(configs, overrides, "model.online") is not None:
        raise ConfigError("iterate samples once per round; model.online (per-step sampling) must be null")
    policy = args.policy or _config_value(configs, overrides, "model.policy")
    if not policy or not Path(policy).is_dir():
        raise ConfigError(
            f"iterate: the initial policy must be a model directory (--policy or model.policy), got {policy!r}"
        )
    tokenizer_dir = args.tokenizer or (
        policy
        if (Path(policy) / "tokenizer_config.json").exists()
        else _config_value(configs, overrides, "data.tokenizer")
    )
    if not tokenizer_dir:
        raise ConfigError("iterate: no tokenizer: pass --tokenizer DIR, or use a policy directory that holds one")
    initial_ref = _config_value(configs, overrides, "model.reference") or policy
    tokenizer = load_tokenizer(str(tokenizer_dir))
    prompts = read_prompts(args.prompts, args.prompt_field, args.prompt_words, args.max_prompts)
    reward = load_reward(yaml.safe_load(args.reward) if args.reward.lstrip().startswith("{") else args.reward)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sampling = {"samples_per_prompt": args.samples_per_prompt, "pairs": args.pairs,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}  # fmt: skip
    lines = []
    for r in range(args.rounds + 1):  # the extra pass samples the final policy, to report its reward
        model = build_causal_lm(str(policy), None, tokenizer)
        rows, stats = round_pairs(model, tokenizer, prompts, reward, seed=args.seed + r, **sampling)
        del model
        line = {"round": r, "policy": str(policy), **stats}
        if r == args.rounds:
            lines.append({**line, "final": True})
            break
        folder = run_dir / f"round_{r}"
        folder.mkdir(exist_ok=True)
        if not rows:
            raise DataError(f"iterate: round {r} made no pairs from {len(prompts)} prompts (all samples tied or empty)")
        pairs_file = folder / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
        reference = initial_ref if args.reference == "initial" else "null"  # null: a frozen copy of the round's start
        config_args = [a for path in args.config for a in ("--config", str(path))]
        _fit([*config_args, *overrides, "--model.policy", str(policy), "--model.policy_config", "null",
              "--model.reference", str(reference), "--data.train_files", str(pairs_file), "--data.format", "explicit",
              "--data.tokenizer", str(tokenizer_dir), "--run.dir", str(folder / "train")], r)  # fmt: skip
        policy = _export_round(folder / "train", folder / "policy", str(tokenizer_dir))
        lines.append({**line, "pairs_file": str(pairs_file), "trained": str(policy)})
        with (run_dir / "rounds.jsonl").open("w") as f:
            f.write("".join(json.dumps(x) + "\n" for x in lines))
        print(f"[iterate] round {r}: {stats['pairs']} pairs, sample reward {stats['reward_mean']:.3f} -> {policy}")
    with (run_dir / "rounds.jsonl").open("w") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
    print(f"[iterate] final policy {policy}: sample reward {lines[-1]['reward_mean']:.3f}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpo-lightning iterate", description="Iterative DPO: sample, label, train.")
    p.add_argument("--config", action="append", required=True, help="the fit config of every round (repeatable)")
    p.add_argument("--rounds", type=int, required=True, help="rounds of sample → label → train")
    p.add_argument("--prompts", required=True, help="JSON-lines file of prompts (.gz too)")
    p.add_argument("--reward", required=True, help="reward spec: .npz, model dir, module:callable or a {path: ...} map")
    p.add_argument("--policy", help="initial policy directory (default: the config's model.policy)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the policy's, else data.tokenizer)")
    p.add_argument("--run-dir", default="runs/iterative", help="where rounds are written")
    p.add_argument("--prompt-field", default="prompt", help="the prompts file's text field")
    p.add_argument("--prompt-words", type=int, help="keep each prompt's first N words (e.g. IMDb review prefixes)")
    p.add_argument("--max-prompts", type=int, help="use the first N prompts")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="responses sampled per prompt per round")
    p.add_argument("--pairs", choices=("best_worst", "all"), default="best_worst", help="pairs made per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens sampled per response")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--reference", choices=("round", "initial"), default="round",
                   help="each round's reference: its starting policy, or the initial one (SFT)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling seed of round 0 (round r uses seed + r)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``dpo-lightning iterate``: arguments after ``--`` go to every round's ``fit``."""
    argv = list(argv or [])
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    try:
        args = build_parser().parse_args(own)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.rounds < 1:
        raise ConfigError(f"iterate --rounds must be >= 1, got {args.rounds}")
    if args.samples_per_prompt < 2:
        raise ConfigError(f"iterate --samples-per-prompt must be >= 2, got {args.samples_per_prompt}")
    iterate(args, overrides)
    return 0
