"""PreferenceModule: a policy, its frozen reference, and a preference loss, as a LightningModule.

    dpo-lightning fit --config experiments/tiny_cpu.yaml --model.loss ipo --model.beta 0.5

One training step: chosen and rejected sequences go through the policy in one forward pass (the collator
stacks them as 2B rows), the reference scores the same rows without gradient, and the loss turns the four
per-example log-probs into a loss and implicit rewards.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from dpo_lightning.errors import ConfigError
from dpo_lightning.logps import Aggregation, sequence_logps
from dpo_lightning.losses import LOSSES, get_loss, loss_params
from dpo_lightning.models import build_causal_lm
from dpo_lightning.models import disable_dropout as zero_dropout

# The frozen reference is in eval mode on purpose; Lightning warns about any eval-mode module at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# metric name -> key in the torchmetrics ModuleDict (ModuleDict keys may not contain '/' or '.')
METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    *(f"shadow/{name}" for name in LOSSES),
)


def _key(metric: str) -> str:
    return metric.replace("/", "__")


class PreferenceModule(pl.LightningModule):
    def __init__(
        self,
        policy: str | None = None,
        policy_config: dict[str, Any] | None = None,
        reference: str | None = None,
        reference_free: bool = False,
        loss: str = "dpo",
        beta: float = 0.1,
        label_smoothing: float | Literal["label_noise"] = 0.0,
        shadow_label_smoothing: float = 0.1,
        logp_aggregation: Aggregation = "sum",
        disable_dropout: bool = True,
        optimizer: Literal["adamw", "rmsprop"] = "adamw",
        lr: float = 5e-7,
        weight_decay: float = 0.0,
        warmup_steps: int = 150,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        tokenizer: Any = None,
    ):
        """The policy, its reference, and the preference loss.

        Args:
            policy: a local Hugging Face causal-LM directory (or hub name) for the initial policy.
            policy_config: instead of ``policy``, a model config to build with random init, e.g.
                ``{model_type: gpt2, n_layer: 2, n_embd: 128, n_head: 4}``; vocab size comes from the tokenizer.
            reference: a model directory for the reference; ``None`` makes it a frozen copy of the initial policy.
            reference_free: drop the reference (its log-probs are taken as 0), as in reference-free DPO variants.
            loss: one of the registered losses (``dpo``, ``ipo``, ``cdpo``).
            beta: β, the strength of the KL constraint to the reference (τ in the IPO paper).
            label_smoothing: ε of cDPO, the assumed probability that a preference label is flipped, in [0, 0.5).
                In a CLI config, ``label_noise`` sets it to ``data.label_noise`` (cDPO told the true flip rate).
            shadow_label_smoothing: ε used for the ``shadow/cdpo`` metric, so that runs of any loss log a
                comparable cDPO value (the shadow losses use this run's β).
            logp_aggregation: ``sum`` of response-token log-probs (log π(y|x), as in the DPO paper) or their
                per-token ``mean``.
            disable_dropout: set dropout to 0 in policy and reference, so the policy equals the reference at step 0.
            optimizer: ``adamw`` or ``rmsprop`` (the DPO paper's choice).
            lr: peak learning rate.
            weight_decay: decoupled weight decay (AdamW) or L2 penalty (RMSprop).
            warmup_steps: linear warmup from 0 to ``lr`` over this many optimizer steps.
            lr_schedule: after warmup, ``constant`` or ``cosine`` decay to 0 at the last step.
            tokenizer: set by the CLI from the data module (``data.tokenizer``); sizes a policy built from a config.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        try:
            self.loss_fn = get_loss(loss)
        except ValueError as err:
            raise ConfigError(f"model.loss: {err}") from None
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
        if label_smoothing > 0 and loss != "cdpo":
            rank_zero_warn(f"model.label_smoothing={label_smoothing} has no effect with loss {loss!r} (cdpo only)")
        self.loss_name = loss
        self.beta = beta
        self.loss_kwargs = loss_params(self.loss_fn, {"label_smoothing": label_smoothing})
        self.tokenizer = tokenizer

        self.policy = build_causal_lm(policy, policy_config, tokenizer)
        if reference_free:
            self.reference = None
        elif reference is None:
            self.reference = copy.deepcopy(self.policy)
        else:
            self.reference = build_causal_lm(reference, None, tokenizer)
        for model in (self.policy, self.reference):
            if model is not None and disable_dropout:
                zero_dropout(model)
        if self.reference is not None:
            self.reference.requires_grad_(False)
            self.reference.eval()

        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({_key(m): MeanMetric() for m in METRICS}) for stage in ("val", "test")}
        )
        self._batch_start = 0.0

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> PreferenceModule:
        """Lightning switches the whole module to train mode each epoch; the reference must stay in eval."""
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # ------------------------------------------------------------------ the step
    def concatenated_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sequence log-probs (2B,) of the chosen-then-rejected rows, in one forward pass."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
        logps, _ = sequence_logps(logits, batch["labels"], self.hparams.logp_aggregation)
        return logps

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.reference is None:
            return torch.zeros(batch["input_ids"].shape[0], device=self.device)
        with torch.no_grad():
            return self.concatenated_logps(self.reference, batch)

    def model_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (scalar, with grad) and per-example metric values (each (B,), no grad)."""
        n = batch["index"].shape[0]
        policy_logps = self.concatenated_logps(self.policy, batch)
        ref_logps = self.reference_logps(batch)
        pc, pr, rc, rr = policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:]
        losses, chosen_rewards, rejected_rewards = self.loss_fn(pc, pr, rc, rr, beta=self.beta, **self.loss_kwargs)
        values = {
            "loss": losses.detach(),
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": pc.detach(),
            "logps/rejected": pr.detach(),
        }
        detached = (pc.detach(), pr.detach(), rc, rr)
        smoothing = {"label_smoothing": self.hparams.shadow_label_smoothing}
        for name, fn in LOSSES.items():
            values[f"shadow/{name}"] = fn(*detached, beta=self.beta, **loss_params(fn, smoothing))[0]
        return losses.mean(), values

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, values = self.model_step(batch)
        n = batch["index"].shape[0]
        self.log("train/loss", loss.detach(), batch_size=n, prog_bar=True)
        self.log_dict({f"train/{k}": v.mean() for k, v in values.items() if k != "loss"}, batch_size=n)
        self.log("train/acc", values["rewards/accuracies"].mean(), batch_size=n, prog_bar=True, logger=False)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        _, values = self.model_step(batch)
        metrics = self.metrics[stage]
        for name, value in values.items():
            metrics[_key(name)].update(value)
            self.log(
                f"{stage}/{name}",
                metrics[_key(name)],
                on_step=False,
                on_epoch=True,
                prog_bar=name in ("loss", "rewards/accuracies"),
            )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # ------------------------------------------------------------------ throughput and lr
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._batch_start
        tokens = batch["attention_mask"].sum().item()  # real (non-pad) tokens of chosen + rejected
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
        warmup = hp.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if hp.lr_schedule == "cosine":
                progress = min((step - warmup) / max(total - warmup, 1), 1.0)
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ run folder
    def on_fit_start(self) -> None:
        """Save the tokenizer with the run so the run can be reloaded and exported as it was trained."""
        log_dir = self.trainer.log_dir
        # without a logger, log_dir falls back to the working directory: write nothing there
        if self.tokenizer is not None and self.trainer.loggers and log_dir and self.trainer.is_global_zero:
            self.tokenizer.save_pretrained(f"{log_dir}/tokenizer")
