"""Tokens/s of a PPO step against a DPO step on the same tiny GPT-2, on CPU, rollout generation included.

    python -m dpo_lightning.bench.ppo_vs_dpo [--threads 1] [--steps 48]

Both are real ``Trainer.fit`` runs on IMDb text (``bench.assets.IMDB_FILE``) with a 2-layer d64 GPT-2 built from a
config and a 2,048-token BPE trained on 1,000 reviews:

- DPO (``PreferenceModule``): 8 pairs per step, an 8-token prompt and two 32-token responses cut from reviews
  (16 sequences of ~40 tokens: policy forward + backward, reference forward). Rate: real tokens per second.
- PPO (``PPOModule``): rollout batches of 16 prompts (the same 8-token prefixes), 32 sampled tokens each, scored by a
  word-list reward, then 2 epochs × 2 minibatches of updates. Rates: trained tokens per second (every rollout token
  is trained once per epoch) and rollout tokens per second (each sequence counted once), both over the whole cycle
  (sampling, scoring, the policy/value and reference passes, the updates); the rollout's share is a phase-0 step
  minus the update-only step after it.

The first steps are left out (warm-up). Benchmarks, not tests: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import sys
import time
from pathlib import Path

from dpo_lightning.bench.assets import IMDB_FILE

POLICY = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}
NEW_TOKENS, WARMUP_STEPS, WARMUP_CYCLES = 32, 5, 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=48, help="optimizer steps of each run (PPO: a multiple of 4)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_ppo"), help="folder for the generated data")
    args = parser.parse_args(argv)

    import lightning.pytorch as pl
    import torch

    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.module import PreferenceModule
    from dpo_lightning.ppo import PPOModule, PromptDataModule
    from dpo_lightning.tokenizer import train_bpe_tokenizer

    torch.set_num_threads(args.threads)
    with gzip.open(IMDB_FILE, "rt") as f:
        texts = [
            " ".join(json.loads(line)["text"].replace("<br />", " ").split()) for line in itertools.islice(f, 1000)
        ]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=2048)
    args.work.mkdir(parents=True, exist_ok=True)
    pairs = [{"prompt": tokenizer.decode(x[:8]), "chosen": tokenizer.decode(x[8 : 8 + NEW_TOKENS]),
              "rejected": tokenizer.decode(x[40 : 40 + NEW_TOKENS])}
             for x in tokenizer(texts, add_special_tokens=False)["input_ids"] if len(x) > 80]  # fmt: skip
    (args.work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (args.work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs))

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.tokens: list[int] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.seconds.append(time.perf_counter() - self.start)
            if "attention_mask" in batch:  # DPO: the pairs' real tokens
                self.tokens.append(int(batch["attention_mask"].sum()))
            elif int(batch["phase"]) == 0:  # PPO: the rollout batch's tokens, once per rollout
                self.tokens.append(int(module.rollout.batch.attention_mask.sum()))

    def fit(module, datamodule) -> Clock:
        clock = Clock()
        pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                   num_sanity_val_steps=0, callbacks=[clock]).fit(module, datamodule)  # fmt: skip
        return clock

    pl.seed_everything(0)
    dm = PreferenceDataModule(str(args.work / "pairs.jsonl"), format="explicit", max_length=64, max_prompt_length=16,
                              val_fraction=0, batch_size=8)  # fmt: skip
    dm._tokenizer = tokenizer  # the BPE above (the module has no public way to take a tokenizer object)
    dpo = fit(PreferenceModule(policy_config=POLICY, lr=1e-4, warmup_steps=0, tokenizer=tokenizer), dm)
    dpo_rate = sum(dpo.tokens[WARMUP_STEPS:]) / sum(dpo.seconds[WARMUP_STEPS:])

    pl.seed_everything(0)
    reward = {"path": "dpo_lightning.reward:WordListReward", "kwargs": {"positive": ["good", "great"],
                                                                         "negative": ["bad"]}}  # fmt: skip
    module = PPOModule(reward=reward, policy_config=POLICY, max_new_tokens=NEW_TOKENS, ppo_epochs=2, num_minibatches=2,
                       lr=1e-4, tokenizer=tokenizer)  # fmt: skip
    pdm = PromptDataModule(str(args.work / "prompts.jsonl"), batch_size=16, updates_per_rollout=4)
    pdm._tokenizer = tokenizer
    ppo = fit(module, pdm)
    k = module.updates_per_rollout
    cycles = [sum(ppo.seconds[i : i + k]) for i in range(0, len(ppo.seconds), k)][WARMUP_CYCLES:]
    rollout = [ppo.seconds[i] - ppo.seconds[i + 1] for i in range(0, len(ppo.seconds), k)][WARMUP_CYCLES:]
    tokens = sum(ppo.tokens[WARMUP_CYCLES:])
    print(f"threads {torch.get_num_threads()}")
    print(f"DPO: {dpo_rate:8.0f} tokens/s")
    print(f"PPO: {module.hparams.ppo_epochs * tokens / sum(cycles):8.0f} trained tokens/s, "
          f"{tokens / sum(cycles):8.0f} rollout tokens/s (rollout generation and scoring: "
          f"{sum(rollout) / sum(cycles):.0%} of the time)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
