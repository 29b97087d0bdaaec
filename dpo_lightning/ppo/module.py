"""PPOModule: RLHF with PPO (Ziegler et al. 2019; Stiennon et al. 2020) as a LightningModule.

    dpo-lightning ppo --config experiments/tiny_ppo.yaml

One rollout batch, then ``ppo_epochs × num_minibatches`` updates on it, one per training step:

1. phase 0: sample a response per prompt from the policy (:func:`dpo_lightning.sampling.sample`), decode and score
   it with the reward (:func:`dpo_lightning.reward.load_reward`), and compute per-token log-probs and values under
   the policy and log-probs under the frozen reference;
2. per-token rewards −β log π/π_ref plus the score at the last token; GAE advantages and λ-returns; advantages
   whitened over the whole rollout batch (all ranks); β then moves if adaptive (Ziegler et al. Eq. 2);
3. every phase: the clipped policy loss + ``vf_coef`` × the clipped value loss on one minibatch, one AdamW step.

The data module serves each prompt batch once per phase (:mod:`dpo_lightning.ppo.data`), so a checkpoint can land
between two updates of one rollout; the rollout buffer (every rank's), β and the rollout counter are saved with
it, and sampling and the minibatch order are drawn from generators seeded by (seed, rollout, rank) and (seed,
rollout, epoch): a resumed run repeats the uninterrupted one exactly. Logged: ``train/ppo/{reward,kl,kl_coef,
entropy,clipfrac,value_loss,approx_kl,policy_loss,response_length}``, ``train/tokens_per_sec``, ``train/lr``.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from dpo_lightning.errors import ConfigError
from dpo_lightning.models import build_causal_lm
from dpo_lightning.models import disable_dropout as zero_dropout
from dpo_lightning.ppo.functions import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalised_rewards,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from dpo_lightning.ppo.rollout import Rollout, ValueHead, pack, policy_outputs
from dpo_lightning.reference_holder import ReferenceHolder
from dpo_lightning.sampling import sample
from dpo_lightning.schedule import lr_factor
from dpo_lightning.strategy import all_gather_objects, is_fsdp, rank_and_world, shard_model

# Lightning warns that a checkpoint of a manual-optimization step holds the weights after the update: that is
# what PPO's checkpoints are meant to hold (the step, its update and the rollout buffer, all saved together)
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

STAT_KEYS = ("entropy", "clipfrac", "approx_kl", "value_loss", "policy_loss", "loss")


def derived_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (run seed, rollout index, rank, ...), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class PPOModule(ReferenceHolder, pl.LightningModule):  # the reference outside the state dict
    def __init__(
        self,
        reward: str | dict[str, Any],
        policy: str | None = None,
        policy_config: dict[str, Any] | None = None,
        reference: str | None = None,
        max_new_tokens: int = 32,
        ppo_epochs: int = 4,
        num_minibatches: int = 4,
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_k_beta: float = 0.1,
        kl_horizon: int | None = None,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_range: float = 0.2,
        value_clip: float = 0.2,
        vf_coef: float = 0.1,
        whiten_advantages: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        reward_batch_size: int = 32,
        sample_batch_size: int = 256,
        disable_dropout: bool = True,
        seed: int = 0,
        tokenizer: Any = None,
    ):
        """The policy with its value head, the frozen reference, the reward and PPO's settings.

        Args:
            reward: the reward, any spec :func:`dpo_lightning.reward.load_reward` takes (a sentiment ``.npz``, a
                sequence-classification model directory, ``package.module:callable``, or ``{path: ..., ...}``).
            policy: a local Hugging Face causal-LM directory for the initial policy.
            policy_config: instead of ``policy``, a config built with random init (vocabulary from the tokenizer).
            reference: a model directory for the reference; ``null``: a frozen copy of the initial policy.
            max_new_tokens: the most tokens sampled per response (EOS ends one earlier).
            ppo_epochs: passes over each rollout batch.
            num_minibatches: minibatches per pass; one optimizer step each.
            kl_coef: β, the per-token KL penalty's coefficient (the initial one when adaptive).
            kl_target: a target KL (nats per response): β adapts towards it (Ziegler et al. 2019, Eq. 2);
                ``null`` keeps β fixed.
            kl_k_beta: K_β of the adaptive controller (the paper's 0.1).
            kl_horizon: TRL's form of K_β instead, rollout samples / horizon (e.g. 10000).
            gamma: discount γ over response tokens (1: none, as in the RLHF papers).
            lam: GAE's λ.
            clip_range: ε of the clipped policy objective.
            value_clip: how far a value may move from its rollout-time estimate per update.
            vf_coef: weight of the value loss.
            whiten_advantages: normalise advantages to mean 0, std 1 over the rollout batch.
            lr: AdamW learning rate (policy and value head).
            weight_decay: AdamW's decoupled weight decay.
            warmup_steps: linear warmup of the lr over this many updates.
            max_grad_norm: clip the global gradient norm (``null``: no clipping).
            reward_batch_size: texts per reward call.
            sample_batch_size: prompts per sampling forward pass.
            disable_dropout: dropout off in policy and reference (log-prob ratios then start at exactly 1).
            seed: seeds sampling and the minibatch order (with the rollout index and the rank).
            tokenizer: set by the CLI from the data module; decodes samples, sizes a policy built from a config.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.automatic_optimization = False  # several updates per rollout, one per step, written out below
        for key, value in (("max_new_tokens", max_new_tokens), ("ppo_epochs", ppo_epochs),
                           ("num_minibatches", num_minibatches)):  # fmt: skip
            if value < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {value}")
        if kl_coef < 0 or clip_range <= 0 or value_clip <= 0:
            raise ConfigError("model.kl_coef must be >= 0, model.clip_range and model.value_clip > 0")
        if kl_target is not None and kl_coef == 0:
            raise ConfigError("model.kl_target adapts β by scaling it, so model.kl_coef (the initial β) must be > 0")
        if not (0 < gamma <= 1 and 0 <= lam <= 1):
            raise ConfigError(f"model.gamma must be in (0, 1] and model.lam in [0, 1], got {gamma} and {lam}")
        if tokenizer is None:
            raise ConfigError("PPOModule needs the tokenizer (the ppo command links it from data.tokenizer)")
        self.tokenizer = tokenizer
        self.policy = build_causal_lm(policy, policy_config, tokenizer)  # a tokenizer too large is a ConfigError
        self.policy.train()
        frozen = (copy.deepcopy(self.policy) if reference is None
                  else build_causal_lm(reference, None, tokenizer, key="model.reference"))  # fmt: skip
        if disable_dropout:
            zero_dropout(self.policy)
            zero_dropout(frozen)
        frozen.requires_grad_(False).eval()
        self._set_reference(frozen)  # outside the state dict and the optimizer, as in PreferenceModule
        self.value_head = ValueHead(self.policy.config.hidden_size)
        if kl_target is None:
            self.kl_controller: FixedKLController = FixedKLController(kl_coef)
        else:
            self.kl_controller = AdaptiveKLController(kl_coef, kl_target, kl_k_beta, kl_horizon)
        self.reward = None  # loaded at fit start, on the policy's device
        self.rollout: Rollout | None = None
        self.rollouts_done = 0
        self.reference_fingerprint: str | None = None  # set in setup(), before any sharding
        self._model_configured = False
        self._step_start = 0.0

    @property
    def updates_per_rollout(self) -> int:
        return self.hparams.ppo_epochs * self.hparams.num_minibatches

    # ------------------------------------------------------------------ rollouts
    def _reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(x, reduce_op="sum") if self._trainer is not None else x

    @torch.no_grad()
    def make_rollout(self, prompts: list[list[int]]) -> Rollout:
        """Sample, score and evaluate one rollout batch of this rank (steps 1-2 of the module docstring)."""
        hp, tok = self.hparams, self.tokenizer
        rank, _ = rank_and_world()
        index = self.rollouts_done
        generator = torch.Generator().manual_seed(derived_seed(hp.seed, index, rank))
        fsdp = self._trainer is not None and is_fsdp(self.trainer.strategy)
        out = sample(self.policy, prompts, max_new_tokens=hp.max_new_tokens, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, batch_size=hp.sample_batch_size, generator=generator,
                     stop_when_done=not fsdp)  # fmt: skip
        batch = pack(prompts, out.continuations, tok.pad_token_id).to(self.device)
        scores = self.reward(
            tok.batch_decode(prompts, skip_special_tokens=True),
            tok.batch_decode(out.continuations, skip_special_tokens=True),
        ).to(self.device)
        mine = policy_outputs(self.policy, self.value_head, batch)
        ref = policy_outputs(self.reference, None, batch)
        mask = batch.response_mask
        beta = self.kl_controller.value
        rewards = kl_penalised_rewards(scores, mine["logps"], ref["logps"], mask, beta)
        advantages, returns = gae(rewards, mine["values"], mask, gamma=hp.gamma, lam=hp.lam)
        if hp.whiten_advantages:
            advantages = whiten(advantages, mask, reduce=self._reduce_sum)
        kl = ((mine["logps"] - ref["logps"]) * mask).sum(-1)  # (B,) log π(y|x) − log π_ref(y|x)
        sums = torch.stack([scores.sum(), kl.sum(), batch.response_lengths.sum().to(kl), kl.new_tensor(len(kl))])
        sums = self._reduce_sum(sums)
        n = float(sums[3])
        stats = {"reward": float(sums[0]) / n, "kl": float(sums[1]) / n, "kl_coef": beta,
                 "response_length": float(sums[2]) / n}  # fmt: skip
        self.kl_controller.update(stats["kl"], int(n))
        self.rollouts_done += 1
        return Rollout(batch, mine["logps"], mine["values"], advantages, returns, stats, index)

    def minibatch_rows(self, rollout: Rollout, phase: int) -> torch.Tensor:
        """This phase's rows of the rollout batch: epoch = phase // M draws a permutation, split into M parts."""
        epoch, part = divmod(phase, self.hparams.num_minibatches)
        n = rollout.batch.input_ids.shape[0]
        generator = torch.Generator().manual_seed(derived_seed(self.hparams.seed, rollout.index, epoch, 1))
        order = torch.randperm(n, generator=generator)
        return torch.tensor_split(order, self.hparams.num_minibatches)[part].to(rollout.batch.input_ids.device)

    # ------------------------------------------------------------------ the step
    def on_fit_start(self) -> None:
        from dpo_lightning.reward import load_reward

        if self.reward is None:
            self.reward = load_reward(
                self.hparams.reward, device=self.device, batch_size=self.hparams.reward_batch_size
            )
        dm = self.trainer.datamodule
        repeats = getattr(dm, "updates_per_rollout", None)
        if repeats is not None and repeats != self.updates_per_rollout:
            raise ConfigError(
                f"data.updates_per_rollout is {repeats}, but model.ppo_epochs × model.num_minibatches is "
                f"{self.updates_per_rollout}: set them to agree (the ppo command does)"
            )
        batch = getattr(dm, "batch_size", None)
        if batch is not None and batch < self.hparams.num_minibatches:
            raise ConfigError(
                f"data.batch_size ({batch} prompts per rollout batch) must be >= model.num_minibatches "
                f"({self.hparams.num_minibatches}): every minibatch needs a response"
            )
        log_dir = self.trainer.log_dir
        if self.trainer.loggers and log_dir and self.trainer.is_global_zero:
            self.tokenizer.save_pretrained(f"{log_dir}/tokenizer")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        hp = self.hparams
        phase = int(batch["phase"])
        if phase >= self.updates_per_rollout:
            raise ConfigError(
                f"data served phase {phase}; model.ppo_epochs × num_minibatches is {self.updates_per_rollout}"
            )
        if phase == 0:
            self.rollout = self.make_rollout(batch["prompt_ids"])
        elif self.rollout is None:
            raise ConfigError(
                f"update {phase} of a rollout batch, but its rollout is not held: a run resumed mid-rollout needs "
                "the number of processes it was saved with"
            )
        rollout = self.rollout
        rows = self.minibatch_rows(rollout, phase)
        mini = rollout.batch.select(rows)
        mask = mini.response_mask
        width = mask.shape[1]

        def part(x: torch.Tensor) -> torch.Tensor:
            return x[rows, :width]

        out = policy_outputs(self.policy, self.value_head, mini)
        pg_loss, stats = policy_loss(out["logps"], part(rollout.old_logps), part(rollout.advantages), mask,
                                     clip=hp.clip_range)  # fmt: skip
        vf_loss = value_loss(out["values"], part(rollout.old_values), part(rollout.returns), mask, clip=hp.value_clip)
        loss = pg_loss + hp.vf_coef * vf_loss

        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        if hp.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()

        stats.update(entropy=masked_mean(out["entropy"].detach(), mask), value_loss=vf_loss.detach(),
                     policy_loss=pg_loss.detach(), loss=loss.detach())  # fmt: skip
        tokens = mini.attention_mask.sum().to(loss)
        _, world = rank_and_world()
        summed = self._reduce_sum(torch.stack([*(stats[k].float() for k in STAT_KEYS), tokens]))
        logged = {f"train/ppo/{k}": summed[i] / world for i, k in enumerate(STAT_KEYS) if k != "loss"}
        logged.update({f"train/ppo/{k}": v for k, v in rollout.stats.items()})
        logged["train/loss"] = summed[STAT_KEYS.index("loss")] / world
        logged["train/tokens_per_sec"] = summed[-1] / max(time.perf_counter() - start, 1e-9)
        logged["train/lr"] = optimizer.param_groups[0]["lr"]
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=len(rows))
        return loss.detach()

    # ------------------------------------------------------------------ optimizer and sharding
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]  # policy and value head; never the reference
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, 1, "constant")
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """Under ``trainer.strategy: fsdp``: ``fully_shard`` the policy and the reference per decoder block and
        whole, and the value head on its own (it runs after the policy's forward, on its hidden states)."""
        if self._model_configured or self._trainer is None or not is_fsdp(self.trainer.strategy):
            return
        from torch.distributed.fsdp import fully_shard

        self._model_configured = True
        mesh = self.device_mesh["data_parallel"]
        shard_model(self.policy, mesh, precision=self.trainer.precision)
        shard_model(self.reference, mesh, precision=self.trainer.precision, frozen=True)
        fully_shard(self.value_head, mesh=mesh)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Beside the weights and optimizer: every rank's rollout buffer, β, the rollout counter, the reference's
        fingerprint (the reference is rebuilt from its source on resume) and the policy's Hugging Face config
        (``dpo-lightning export`` reads it; the value head is left out of an export)."""
        rollout = self.rollout.state_dict() if self.rollout is not None else None
        checkpoint["dpo_lightning"] = {
            "hf_config": self.policy.config.to_dict(),
            "reference_fingerprint": self.reference_fingerprint,
            "ppo": {
                "rollouts": all_gather_objects(rollout),
                "kl_controller": self.kl_controller.state_dict(),
                "rollouts_done": self.rollouts_done,
            },  # fmt: skip
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("dpo_lightning") or {}
        self.check_reference_fingerprint(meta.get("reference_fingerprint"))
        state = meta.get("ppo")
        if not state:
            return
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.rollouts_done = int(state["rollouts_done"])
        rank, world = rank_and_world()
        rollouts = state["rollouts"]
        # another number of processes can resume at a rollout boundary only (training_step says so otherwise)
        mine = rollouts[rank] if len(rollouts) == world else None
        self.rollout = Rollout.from_state_dict(mine, "cpu") if mine is not None else None

    def on_train_start(self) -> None:
        if self.rollout is not None:  # restored from a checkpoint on the CPU: to the policy's device
            self.rollout = self.rollout.to(self.device)
