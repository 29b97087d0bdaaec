"""Part 2, PPO-GT: PPO from the SFT model on the ground-truth reward, at several KL coefficients (DPO paper, Fig. 2).

    history = ppo_job(cfg, Method("PPO-GT", "ppo", kind="ppo", kl_coef=0.1), work, eval_ids, seed)

Rafailov et al. 2023, §6.1: "PPO-GT" is PPO with access to the ground-truth reward (here the sentiment classifier,
``work/reward.npz``, scoring prompt + response as in evaluation), maximising E[r] − β KL(π ‖ π_ref) per sequence
from the SFT model, which is also π_ref. The PPO is the library's (:class:`dpo_lightning.ppo.PPOModule`: per-token
reward −β log π/π_ref plus the score at the last token, GAE, whitened advantages, clipped policy and value losses,
Ziegler et al. 2019; Stiennon et al. 2020), with a fixed β = ``method.kl_coef``.

One **PPO step** (the ``step`` of the returned records, and of ``cfg.ppo_steps`` / ``cfg.ppo_eval_steps``) is one
rollout batch: ``cfg.ppo_rollout_prompts`` training prompts (``work/train_prompts.json``, the pairs' prompts), one
response each of ``cfg.max_new_tokens`` tokens, then ``PPO_EPOCHS × PPO_MINIBATCHES`` AdamW updates on it (lr
``cfg.ppo_lr``, constant). Constants below, chosen once (not tuned on the deciding prompts):

- ``PPO_EPOCHS`` = 2, ``PPO_MINIBATCHES`` = 2: 4 updates per rollout, enough reuse of a batch whose sampling costs
  as much as its updates; the clip ε = 0.2 and the value clip 0.2 are the usual values (Schulman et al. 2017;
  TRL); ``VF_COEF`` = 0.1 and λ = 0.95, γ = 1 are ``PPOModule``'s defaults (Ziegler et al.'s γ = 1); gradient norm
  clipped at 1.

Evaluation: :class:`dpo_lightning.evaluate.RewardKLCallback` with the pipeline's ``eval_kwargs`` (the same prompts,
sampling seed and per-prompt record as every method run) at each of ``cfg.ppo_eval_steps``; KL is measured
against the SFT model, as for every method. Step 0 is not evaluated: it is the SFT model, whose evaluation the
pipeline makes once and shares.

Cost, measured at FULL size (4 × 128 GPT-2, vocabulary 4,096, 32 new tokens, one thread, nice'd on a loaded 2-core
AVX2 box): a PPO step costs 3.2 s CPU with 64 rollout prompts (sampling 1.1 s, policy and reference forwards 2 ×
0.55 s, 4 updates of 32 rows ≈ 0.3-0.55 s each) and 2.4 s with 48; an evaluation on 384 prompts ≈ 7 s. A probe
(a 150-step SFT at FULL size, β = 0.1, lr 5e-4, 24 steps × 48 prompts, evaluated on 128 prompts) took 64 s CPU
and moved the reward 0.35 → 0.76 → 1.34 at KL 0 → 2.4 → 6.2. So 24 steps × 48 prompts with 4 evaluations of 384
prompts is ≈ 85 s CPU per run (≈ 78 s with the three evaluations at steps 8, 16, 24), three runs ≈ 4 min.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_lightning.reproduce.sentiment_bon import best_of_n_points  # noqa: F401  (the pipeline's import path)

if TYPE_CHECKING:
    from torch import nn

    from dpo_lightning.reproduce.sentiment_settings import Method, Settings

PPO_EPOCHS = 2
PPO_MINIBATCHES = 2
CLIP = 0.2
VALUE_CLIP = 0.2
VF_COEF = 0.1
GAMMA = 1.0
LAM = 0.95
MAX_GRAD_NORM = 1.0


def train_ppo(
    policy_dir: str | Path,
    reward: str | Path | dict,
    prompts: list[list[int]],
    *,
    kl_coef: float,
    steps: int,
    rollout_prompts: int,
    lr: float,
    max_new_tokens: int,
    seed: int,
    evaluation: dict[str, Any] | None = None,
    eval_steps: tuple[int, ...] = (),
) -> tuple[nn.Module, list[dict]]:
    """PPO from ``policy_dir`` (model and tokenizer) on ``prompts`` for ``steps`` PPO steps (rollout batches).

    Args:
        policy_dir: the SFT model's directory; the reference is a frozen copy of it.
        reward: any :func:`dpo_lightning.reward.load_reward` spec (the classifier's ``.npz``).
        prompts: token ids of the training prompts.
        kl_coef: β of the per-token KL penalty (fixed).
        steps: rollout batches; each is followed by ``PPO_EPOCHS × PPO_MINIBATCHES`` updates.
        rollout_prompts: prompts per rollout batch (one response each; at most all of ``prompts``).
        lr: AdamW learning rate of the policy and its value head.
        max_new_tokens: the most tokens per response.
        seed: seeds the data order, the rollouts' sampling and the minibatch order.
        evaluation: ``{"reference", "prompts", "reward_fn", **eval_kwargs}`` for :class:`RewardKLCallback`;
            ``None``: no evaluation.
        eval_steps: PPO steps (rollouts done) at which to evaluate; 0 is before any update; those past
            ``steps`` are skipped.

    Returns:
        (the trained policy, its evaluation history with ``step`` in PPO steps).
    """
    import lightning.pytorch as pl

    from dpo_lightning.errors import ConfigError
    from dpo_lightning.evaluate import RewardKLCallback
    from dpo_lightning.ppo import PPOModule, PromptDataModule
    from dpo_lightning.tokenizer import load_tokenizer

    rollout_prompts = min(rollout_prompts, len(prompts))  # a toy run may have fewer prompts than one batch
    if steps < 1 or rollout_prompts < PPO_MINIBATCHES:
        raise ConfigError(f"PPO-GT: steps ({steps}) must be >= 1 and there must be at least {PPO_MINIBATCHES} "
                          f"rollout prompts (got {rollout_prompts}, from {len(prompts)} training prompts)")  # fmt: skip
    tokenizer = load_tokenizer(str(policy_dir))
    pl.seed_everything(seed, verbose=False)
    module = PPOModule(
        reward=str(reward) if isinstance(reward, Path) else reward, policy=str(policy_dir),
        max_new_tokens=max_new_tokens, ppo_epochs=PPO_EPOCHS, num_minibatches=PPO_MINIBATCHES, kl_coef=kl_coef,
        gamma=GAMMA, lam=LAM, clip_range=CLIP, value_clip=VALUE_CLIP, vf_coef=VF_COEF, lr=lr,
        max_grad_norm=MAX_GRAD_NORM, reward_batch_size=256, sample_batch_size=256, seed=seed, tokenizer=tokenizer,
    )  # fmt: skip
    updates = module.updates_per_rollout
    # the prompts are token ids already: hand them to the data module (its setup() then reads no file)
    data = PromptDataModule("<token ids>", batch_size=rollout_prompts, updates_per_rollout=updates, seed=seed)
    data.prompts, data._tokenizer = [list(map(int, p)) for p in prompts], tokenizer
    callbacks = []
    if evaluation is not None:
        ev = dict(evaluation)
        at = [s * updates for s in eval_steps if s <= steps]  # in optimizer updates, as the callback counts
        callbacks.append(RewardKLCallback(ev.pop("reference"), ev.pop("prompts"), ev.pop("reward_fn"), tokenizer,
                                          eval_steps=at, **ev))  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps * updates, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, data)
    history = []
    for record in callbacks[0].history if callbacks else []:
        history.append({**record, "step": record["step"] / updates})
    return module.policy, history


def ppo_job(cfg: Settings, method: Method, work: Path, eval_ids: list[list[int]], seed: int) -> list[dict]:
    """PPO-GT from ``work/sft`` at β = ``method.kl_coef`` for ``cfg.ppo_steps`` PPO steps; its evaluation history.

    Reads everything from ``work`` (a worker process can run it), single-threaded and seeded by ``seed``; the same
    evaluation as every method run (``eval_kwargs``), at ``cfg.ppo_eval_steps`` (PPO steps; step 0, the SFT model,
    is the pipeline's shared evaluation)."""
    from transformers import AutoModelForCausalLM

    from dpo_lightning.errors import ConfigError
    from dpo_lightning.reproduce.sentiment_methods import eval_kwargs, quiet_one_thread
    from dpo_lightning.reward import SentimentClassifier

    if method.kind != "ppo" or method.kl_coef is None:
        raise ConfigError(f"ppo_job runs PPO-GT methods (kind 'ppo' with a kl_coef), got {method}")
    with quiet_one_thread():
        reference = AutoModelForCausalLM.from_pretrained(work / "sft").eval()
        prompts = json.loads((work / "train_prompts.json").read_text())
        evaluation = {"reference": reference, "prompts": eval_ids,
                      "reward_fn": SentimentClassifier.load(work / "reward.npz"), **eval_kwargs(cfg, seed)}  # fmt: skip
        _, history = train_ppo(
            work / "sft", work / "reward.npz", prompts, kl_coef=float(method.kl_coef), steps=cfg.ppo_steps,
            rollout_prompts=cfg.ppo_rollout_prompts, lr=cfg.ppo_lr, max_new_tokens=cfg.max_new_tokens, seed=seed,
            evaluation=evaluation, eval_steps=tuple(cfg.ppo_eval_steps),
        )  # fmt: skip
    return history
