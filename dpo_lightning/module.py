"""PreferenceModule: a policy, its frozen reference, and a preference loss, as a LightningModule.

    dpo-lightning fit --config experiments/tiny_cpu.yaml --model.loss ipo --model.beta 0.5

One training step: chosen and rejected sequences go through the policy in one forward pass (the collator
stacks them as 2B rows), the reference scores the same rows without gradient, and the loss turns the four
per-example log-probs into a loss and implicit rewards.

The reference is held outside the module's registered children (``reference_holder.py``): it is never in the
optimizer or the state dict, and a fixed one never in a checkpoint (it is rebuilt from its source on resume, and
checked against a fingerprint of its config and weights; TR-DPO's, which training changes, is saved), yet it
moves and casts with the module. Under ``trainer.strategy: fsdp`` both models are sharded in
``configure_model``; with ``precompute_reference`` its log-probs are computed once and it leaves memory.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from dpo_lightning import reference as ref_store
from dpo_lightning.data.packing import is_laid_out, real_tokens
from dpo_lightning.errors import ConfigError
from dpo_lightning.eval_means import EvalMeans
from dpo_lightning.guards import NonFiniteGuard
from dpo_lightning.logps import Aggregation, batch_logps, batch_response_lengths
from dpo_lightning.models import Attention, DType, build_models
from dpo_lightning.objective import Objective, loss_settings
from dpo_lightning.online import online_sampler
from dpo_lightning.progress import step_progress_bar
from dpo_lightning.reference_holder import FrozenReference
from dpo_lightning.reference_sync import ReferenceSync, SyncConfig
from dpo_lightning.schedule import lr_factor
from dpo_lightning.strategy import (
    all_gather_objects,
    enable_activation_checkpointing,
    get_rng_state,
    is_fsdp,
    rank_and_world,
    set_rng_state,
    shard_model,
)

# The frozen reference is in eval mode on purpose; Lightning warns about any eval-mode module at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class PreferenceModule(FrozenReference, pl.LightningModule):  # the reference's handling: reference_holder.py
    def __init__(
        self,
        policy: str | None = None,
        policy_config: dict[str, Any] | None = None,
        reference: str | None = None,
        reference_free: bool = False,
        loss: str | list[str] = "dpo",
        loss_weights: list[float] | None = None,
        beta: float = 0.1,
        label_smoothing: float | Literal["label_noise"] = 0.0,
        shadow_label_smoothing: float = 0.1,
        simpo_gamma: float | None = None,
        orpo_lambda: float | None = None,
        rpo_alpha: float | None = None,
        dpop_lambda: float | None = None,
        f_divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] | None = None,
        f_alpha: float | None = None,
        desirable_weight: float | None = None,
        undesirable_weight: float | None = None,
        loss_params: dict[str, Any] | None = None,
        reference_sync: SyncConfig | dict[str, Any] | None = None,
        logp_aggregation: Aggregation = "sum",
        disable_dropout: bool = True,
        optimizer: Literal["adamw", "rmsprop"] = "adamw",
        lr: float = 5e-7,
        weight_decay: float = 0.0,
        warmup_steps: int = 150,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        precompute_reference: bool = False,
        reference_cache_dir: str | None = None,
        activation_checkpointing: bool = False,
        guard_non_finite: bool = True,
        score_response_only: bool = True,
        logp_chunk_size: int | None = None,
        torch_dtype: DType = "float32",
        attn_implementation: Attention = "sdpa",
        trust_remote_code: bool = False,
        peft_config: dict[str, Any] | None = None,
        online: dict[str, Any] | None = None,
        tokenizer: Any = None,
    ):
        """The policy, its reference, and the preference loss.

        Args:
            policy: a local Hugging Face causal-LM directory (or hub name) for the initial policy.
            policy_config: instead of ``policy``, a model config to build with random init, e.g.
                ``{model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4}``; vocab size comes from the tokenizer.
            reference: a model directory for the reference; ``None`` makes it a frozen copy of the initial policy.
            reference_free: drop the reference (its log-probs are taken as 0), as in reference-free DPO variants.
            loss: a registered loss (README, "Loss variants": ``dpo``, ``ipo``, ``cdpo``, ``simpo``, ``kto``, ...),
                or a list of them, e.g. ``[dpo, bco_pair, sft]``: the weighted sum of their per-example losses.
            loss_weights: one weight per loss of the list (default 1.0 each).
            beta: β, the strength of the KL constraint to the reference (τ in the IPO paper).
            label_smoothing: ε, the assumed probability that a preference label is flipped, in [0, 0.5)
                (cdpo, rdpo; exo_pair's ε). In a CLI config, ``label_noise`` sets it to ``data.label_noise``.
            shadow_label_smoothing: ε used for the ``shadow/{cdpo,rdpo,exo_pair}`` metrics, so that runs of any loss
                log comparable values (the shadow losses use this run's β and other settings).
            simpo_gamma: SimPO's target margin γ (null: the loss's paper default).
            orpo_lambda: ORPO's weight λ of the odds-ratio term (null: paper default).
            rpo_alpha: RPO's weight α of the chosen NLL (null: paper default).
            dpop_lambda: DPO-Positive's penalty λ (null: paper default).
            f_divergence: f-DPO's divergence, ``reverse_kl`` (= DPO), ``forward_kl``, ``js`` or ``alpha``.
            f_alpha: α of the ``alpha`` divergence (null: default).
            desirable_weight: KTO's λ_D (null: 1.0).
            undesirable_weight: KTO's λ_U (null: 1.0).
            loss_params: parameters of losses beyond the ones above (a loss added later), by the name its
                function declares.
            reference_sync: TR-DPO (Gorbatovski et al. 2024): update the reference from the policy,
                ``{mode: soft, alpha: 0.6, every: 512}`` (π_ref ← α·π + (1−α)·π_ref every ``every`` optimizer
                steps) or ``{mode: hard, every: 512}`` (copy). Saved in checkpoints; not with precompute_reference.
            logp_aggregation: ``sum`` of response-token log-probs (log π(y|x), as in the DPO paper) or their
                per-token ``mean``.
            disable_dropout: set dropout to 0 in policy and reference, so the policy equals the reference at step 0.
            optimizer: ``adamw`` or ``rmsprop`` (the DPO paper's choice).
            lr: peak learning rate.
            weight_decay: decoupled weight decay (AdamW) or L2 penalty (RMSprop).
            warmup_steps: linear warmup from 0 to ``lr`` over this many optimizer steps.
            lr_schedule: after warmup, ``constant`` or ``cosine`` decay to 0 at the last step.
            precompute_reference: score every train/val pair with the reference once before training, store
                the log-probs on disk (reused by any run with the same reference, tokenizer, data, lengths,
                aggregation and precision) and train without the reference in memory.
            reference_cache_dir: where precomputed reference log-probs are stored; default
                ``$DPO_LIGHTNING_CACHE/reference_logps`` or ``~/.cache/dpo_lightning/reference_logps``.
            activation_checkpointing: recompute the policy's block activations in the backward pass (less
                memory, ~30% more compute).
            guard_non_finite: stop at the first NaN/inf loss or gradient, naming the step and the batch's rows,
                before anything non-finite is saved.
            score_response_only: run the output layer (hidden -> vocabulary) only at positions whose next token
                is a response token; the log-probs are the same, the step is ~3x faster and lighter on HH at small
                model sizes. Turn off for a model whose forward does not end in its output embeddings.
            logp_chunk_size: with ``score_response_only``, score that many response positions at a time (each chunk
                recomputed in the backward), so the (positions x vocab) logits never exist at once; null: all at once.
            online: online DPO (``dpo_lightning.online``): ``{reward: SPEC, samples_per_prompt: 2, labels:
                best_worst, max_new_tokens: 32, temperature: 1.0}`` samples every step's pairs from the policy and
                ranks them with the reward (the data supplies the prompts); null trains on the data's pairs.
            torch_dtype: dtype of the loaded weights (``auto``: as saved); ``bfloat16`` with ``precision: bf16-true``.
            attn_implementation: ``sdpa`` (default), ``eager``, ``flash_attention_2`` (GPU), ``flex_attention``.
            trust_remote_code: let a model directory run its own Python code (off: only transformers' models).
            peft_config: LoRA (``dpo_lightning.lora``): peft ``LoraConfig`` keys, e.g. ``{r: 8, lora_alpha: 16,
                target_modules: [q_proj, v_proj]}``; the reference is the policy with its adapters off, and
                checkpoints hold the adapters only. null: full fine-tuning.
            tokenizer: set by the CLI from the data module (``data.tokenizer``); sizes a policy built from a config.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        if isinstance(reference_sync, dict):
            reference_sync = SyncConfig.from_mapping(reference_sync)
        if reference_sync is not None:  # plain values in hparams: checkpoints load with weights_only=True
            self.hparams["reference_sync"] = dataclasses.asdict(reference_sync)
        if beta <= 0:
            raise ConfigError(f"model.beta must be > 0, got {beta}")
        if label_smoothing == "label_noise":
            raise ConfigError(
                "model.label_smoothing: 'label_noise' (match data.label_noise) is resolved by the CLI; "
                "pass a number when building PreferenceModule directly"
            )
        for key, eps in (
            ("label_smoothing", label_smoothing),
            ("shadow_label_smoothing", shadow_label_smoothing),
        ):
            if not 0.0 <= eps < 0.5:
                raise ConfigError(f"model.{key} must be in [0, 0.5), got {eps}")
        named = dict(simpo_gamma=simpo_gamma, orpo_lambda=orpo_lambda, rpo_alpha=rpo_alpha, dpop_lambda=dpop_lambda)
        named.update(f_divergence=f_divergence, f_alpha=f_alpha, desirable_weight=desirable_weight)
        named.update(undesirable_weight=undesirable_weight, label_smoothing=label_smoothing)
        settings = loss_settings(named, loss_params)
        self.objective = Objective(
            loss,
            loss_weights,
            beta=beta,
            settings=settings,
            shadow_settings={"label_smoothing": shadow_label_smoothing},
            logp_aggregation=logp_aggregation,
        )
        if label_smoothing > 0 and not {"cdpo", "rdpo", "exo_pair"} & set(self.objective.names):
            rank_zero_warn(
                f"model.label_smoothing={label_smoothing} has no effect with loss {self.objective.name!r} "
                "(cdpo, rdpo, exo_pair only)"
            )
        self.loss_name = self.objective.name
        self.online = online_sampler(online, precompute_reference, self.objective)  # None: offline pairs
        self.beta = beta
        self.tokenizer = tokenizer

        if logp_chunk_size is not None and not score_response_only:
            raise ConfigError("model.logp_chunk_size chunks the response-only head: it needs model.score_response_only")
        if precompute_reference and reference_free:
            raise ConfigError("model.precompute_reference needs a reference; it is off with model.reference_free")
        if reference_sync is not None and (precompute_reference or reference_free):
            raise ConfigError(
                "model.reference_sync (TR-DPO) updates the reference during training: it cannot be used with "
                "model.precompute_reference or model.reference_free"
            )
        if reference_sync is not None and peft_config is not None:
            raise ConfigError(
                "model.reference_sync (TR-DPO) with model.peft_config: a LoRA run's reference is its base model with "
                "the adapters off, which cannot move toward the policy without a second copy; drop one of the two"
            )
        if reference_sync is not None and not self.objective.needs_reference:
            raise ConfigError(f"model.reference_sync: loss {self.objective.name!r} uses no reference")
        # SimPO, ORPO, SFT (and mixtures of them) never read a reference: none is built or run
        reference_free = reference_free or not self.objective.needs_reference
        if precompute_reference and reference_free:
            raise ConfigError(f"model.precompute_reference: loss {self.objective.name!r} uses no reference")

        self.policy, frozen = build_models(self.hparams, tokenizer, reference_free=reference_free)  # models.py
        if peft_config is not None:  # checkpoints hold the adapters only (lora.py); the base is rebuilt on resume
            from dpo_lightning.lora import keep_trainable_state

            keep_trainable_state(self)
            self.strict_loading = False
        self._set_reference(frozen)
        self.reference_fingerprint: str | None = None  # set in setup(), before any sharding
        self._reference_tables: dict[str, ref_store.ReferenceLogps] = {}
        self._model_configured = False
        self._train_rng: dict[str, torch.Tensor] | None = None  # the training step's own RNG stream
        self._outer_rng: dict[str, torch.Tensor] | None = None
        self._window_step, self._window_sums, self._window_start = -1, None, 0.0  # one optimizer step's batches

        self.metric_names = self.objective.metric_names()
        # val/test epoch means: repeats of a distributed sampler left out, a NaN an error (eval_means.py)
        self.eval_means = EvalMeans(self.metric_names, prog_bar=("loss", "rewards/accuracies"))

    # ------------------------------------------------------------------ the step
    def concatenated_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sequence log-prob sums (2B,) of the chosen-then-rejected sequences, in one forward pass, of a padded or
        a packed / prompt-shared batch (``data/packing.py``; ``logps.batch_logps`` dispatches on its keys).
        ``compute_loss`` turns them into per-token means where a loss or ``logp_aggregation: mean`` asks."""
        chunk = self.hparams.get("logp_chunk_size")
        return batch_logps(model, batch, self.hparams.get("score_response_only", True), chunk)

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (identity on one), for the objective's batch statistics."""
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(tensor, reduce_op="sum")
        return tensor

    def model_step(
        self, batch: dict[str, torch.Tensor], split: str = "train"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]]:
        """Loss (scalar, with grad) and per-example metric values (each (B,), or (values, weights), no grad)."""
        policy_logps = self.concatenated_logps(self.policy, batch)
        ref_logps = self.reference_logps(batch, split)
        lengths = batch_response_lengths(batch)
        return self.objective(
            (policy_logps, ref_logps),
            lengths,
            desirable=batch.get("desirable"),
            training=split == "train",
            reduce=self._reduce,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.online is not None:  # online DPO: this step's pairs are sampled from the policy (online.py)
            if is_laid_out(batch):
                raise ConfigError("model.online samples its own padded pairs: set data.packing/share_prompt false")
            batch = self.online.pair_batch(self, batch)
        loss, values = self.model_step(batch)
        n = batch["index"].shape[0]
        means = self._global_means(values, n, real_tokens(batch))
        self.log("train/loss", means.pop("loss"), batch_size=n, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in means.items()}, batch_size=n)
        if "rewards/accuracies" in means:
            self.log("train/acc", means["rewards/accuracies"], batch_size=n, prog_bar=True, logger=False)
        return loss

    def _global_means(self, values: dict[str, Any], n: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Means over every pair of the optimizer step: all ranks' batches (one all-reduce) and all micro-batches
        accumulated so far, so a logged training value does not depend on the number of processes or on
        gradient accumulation (Lightning logs the last micro-batch of each step). A value given as
        (values, weights) is a weighted mean (the desirable rows of an unpaired batch, say)."""
        names = list(values)
        pairs = [v if isinstance(v, tuple) else (v, None) for v in values.values()]
        totals = [(torch.where(w != 0, v.float() * w, 0.0) if w is not None else v.float()).sum() for v, w in pairs]
        counts = [w.float().sum() if w is not None else tokens.new_tensor(n).float() for _, w in pairs]
        sums = torch.stack([*totals, *counts, tokens.float()])
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self._window_sums = sums if self._window_sums is None else self._window_sums + sums
        k = len(names)
        return {name: self._window_sums[i] / self._window_sums[k + i].clamp(min=1e-12) for i, name in enumerate(names)}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.eval_means.update(self, "val", self.model_step(batch, "val")[1], batch_idx, batch["index"])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.eval_means.update(self, "test", self.model_step(batch, "test")[1], batch_idx, batch["index"])

    def on_validation_epoch_end(self) -> None:
        self.eval_means.check_finite(self, "val")

    def on_test_epoch_end(self) -> None:
        self.eval_means.check_finite(self, "test")

    # ------------------------------------------------------------------ throughput and lr
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # the training step draws from its own RNG stream (saved in checkpoints), so dropout masks do not
        # depend on what validation or data loading drew in between: resuming replays the same masks
        self._outer_rng = get_rng_state()
        if self._train_rng is not None:
            set_rng_state(self._train_rng)
        if self._window_step != self.trainer.global_step:  # first micro-batch of an optimizer step
            self._window_step, self._window_sums = self.trainer.global_step, None
            self._window_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._train_rng = get_rng_state()
        set_rng_state(self._outer_rng)
        self._outer_rng = None
        elapsed = time.perf_counter() - self._window_start
        tokens = float(self._window_sums[-1])  # real (non-pad) tokens of chosen + rejected, all ranks
        self.log("train/tokens_per_sec", tokens / max(elapsed, 1e-9), on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]  # never the reference
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.RMSprop(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, total, hp.lr_schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ sharding
    def configure_model(self) -> None:
        """Lightning calls this on every process before building the optimizer: activation checkpointing, and
        under ``trainer.strategy: fsdp`` ``fully_shard`` per decoder block and per model, policy and reference."""
        if self._model_configured:
            return
        self._model_configured = True
        if self.hparams.activation_checkpointing:
            enable_activation_checkpointing(self.policy)
        if self._trainer is not None and is_fsdp(self.trainer.strategy):
            mesh = self.device_mesh["data_parallel"]
            shard_model(self.policy, mesh, precision=self.trainer.precision)
            if self.reference is not None:
                shard_model(self.reference, mesh, precision=self.trainer.precision, frozen=True)

    def configure_callbacks(self) -> list[pl.Callback]:
        callbacks: list[pl.Callback] = [NonFiniteGuard()] if self.hparams.guard_non_finite else []
        callbacks += step_progress_bar(self.trainer)  # `Epoch 0/-2` -> optimizer steps out of max_steps
        if self.hparams.get("reference_sync") is not None:
            callbacks.append(ReferenceSync(self.hparams.reference_sync))
        return callbacks

    # ------------------------------------------------------------------ run folder and checkpoints
    def on_fit_start(self) -> None:
        """Save the tokenizer with the run so the run can be reloaded and exported as it was trained; load or
        compute the precomputed reference log-probs."""
        log_dir = self.trainer.log_dir
        # without a logger, log_dir falls back to the working directory: write nothing there
        if self.tokenizer is not None and self.trainer.loggers and log_dir and self.trainer.is_global_zero:
            self.tokenizer.save_pretrained(f"{log_dir}/tokenizer")
        self._prepare_reference_logps(("train", "val"))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Beside the policy and optimizer: the policy's HF config (for export), the reference's fingerprint
        (the reference itself is rebuilt from its source on resume) and every rank's training RNG stream."""
        # mid-step (a checkpoint saved in on_train_batch_end) the stream is the live global RNG state
        rng = get_rng_state() if self._outer_rng is not None else self._train_rng
        checkpoint["dpo_lightning"] = {
            "hf_config": self.policy.config.to_dict(),
            "reference_fingerprint": self.reference_fingerprint,
            "train_rng": all_gather_objects(rng),
            "objective": self.objective.state_dict(),
        }
        if self.hparams.get("reference_sync") is not None:  # TR-DPO's reference is trained state: keep it
            checkpoint["dpo_lightning"]["reference_state"] = ReferenceSync.full_state(self.reference)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):  # checkpoints from before the reference left the state dict
            for key in [k for k in state if k.startswith("reference.")]:
                del state[key]
        meta = checkpoint.get("dpo_lightning") or {}
        self.check_reference_fingerprint(meta.get("reference_fingerprint"))  # reference_holder.py
        if self.hparams.get("peft_config") is not None:  # strict_loading is off for the absent base weights
            from dpo_lightning.lora import check_adapter_state

            check_adapter_state(self, checkpoint)
        self.objective.load_state_dict(meta.get("objective") or {})
        if meta.get("reference_state") is not None and self.reference is not None:
            # TR-DPO: the reference as it was when the checkpoint was saved (sharded or not; collective)
            ReferenceSync.load_full_state(self.reference, meta["reference_state"])
        streams = meta.get("train_rng") or []
        rank, world = rank_and_world()
        if streams and streams[0] is not None:
            self._train_rng = streams[rank] if len(streams) == world else streams[0]
