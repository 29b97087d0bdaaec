"""The training objective of a run: which registered losses, their weights and settings, and their state.

``PreferenceModule`` hands this the per-row log-probs of a batch; it returns the loss and the per-example
values the module logs. Everything loss-specific that is not a pure function lives here:

- mixtures: ``model.loss: [dpo, bco_pair, sft]`` with ``model.loss_weights`` (as in MPO) — the weighted sum of
  the per-example losses; each component is logged as ``{stage}/loss/<name>``;
- BCO's reward shift δ: the running mean of the batch-mean implicit rewards (all ranks), updated in training
  steps before the loss is computed, as in Jung et al. 2024 and TRL; saved in checkpoints;
- KTO's reference point z₀ = max(0, mean KL estimate), from the mismatched (prompt_i, completion_{i+1}) rows
  of an unpaired batch (Ethayarajh et al. 2024, §4.1), detached and averaged over ranks;
- the shadow metrics: every registered loss computed from the same log-probs (``{stage}/shadow/<name>``).

Unpaired batches (``batch["desirable"]`` present) carry 2B rows: the B matched rows, then the B mismatched ones;
only losses registered ``unpaired=True`` can train on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from dpo_lightning.errors import ConfigError
from dpo_lightning.losses import LOSSES, SPECS, compute_loss, compute_mixture, get_loss
from dpo_lightning.losses.registry import declared_params

Tensor = torch.Tensor
# a logged value: per-example (B,), or (values, weights) when only some rows carry it (unpaired batches)
Value = Tensor | tuple[Tensor, Tensor]
Reduce = Callable[[Tensor], Tensor]  # sums a tensor over processes


def all_loss_params() -> set[str]:
    """Every keyword parameter some registered loss declares (the keys ``model.loss_params`` may use)."""
    state = {"chosen_lengths", "rejected_lengths", "chosen_mask", "rejected_mask", "kl_reference", "bco_delta"}
    state |= {"logp_aggregation"}  # a compute_loss argument, passed to the losses that declare it
    return set().union(*(declared_params(fn) for fn in LOSSES.values())) - state


def loss_settings(named: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """One settings dict from the module's named loss parameters (``None``: the loss's own default) and
    ``model.loss_params`` (parameters of losses added later), whose keys must be declared by some loss."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - all_loss_params())
    if unknown:
        raise ConfigError(
            f"model.loss_params: no registered loss takes {', '.join(unknown)}; "
            f"the parameters are: {', '.join(sorted(all_loss_params()))}"
        )
    return {**extra, **{k: v for k, v in named.items() if v is not None}}


class Objective:
    """The losses of one run, their weights, their settings and their state (see the module docstring).

    Args:
        loss: a registered loss name, or a list of them for a weighted mixture.
        loss_weights: one weight per loss (default all 1.0).
        beta: β of every component.
        settings: the losses' parameters (``label_smoothing``, ``simpo_gamma``, ...); a loss reads what it
            declares.
        shadow_settings: overrides for the shadow metrics (e.g. ``label_smoothing`` for ``shadow/cdpo``).
        logp_aggregation: ``sum`` or ``mean``, passed to ``compute_loss``.
    """

    def __init__(
        self,
        loss: str | Sequence[str],
        loss_weights: Sequence[float] | None,
        *,
        beta: float,
        settings: Mapping[str, Any],
        shadow_settings: Mapping[str, Any],
        logp_aggregation: str = "sum",
    ):
        self.names = [loss] if isinstance(loss, str) else list(loss)
        if not self.names:
            raise ConfigError("model.loss: give a loss name or a non-empty list of them")
        for name in self.names:
            try:
                get_loss(name)
            except ValueError as err:
                raise ConfigError(f"model.loss: {err}") from None
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"model.loss: a loss appears twice in {self.names}")
        if loss_weights is None:
            loss_weights = [1.0] * len(self.names)
        if len(loss_weights) != len(self.names):
            raise ConfigError(
                f"model.loss_weights: {len(loss_weights)} weights for {len(self.names)} losses {self.names}"
            )
        self.weights = [float(w) for w in loss_weights]
        self.beta = beta
        self.settings = dict(settings)
        self.shadow_settings = {**self.settings, **shadow_settings}
        self.logp_aggregation = logp_aggregation
        self.bco_sum, self.bco_count = 0.0, 0  # running mean of batch-mean rewards, for bco_pair's δ
        self._check_settings()

    # ------------------------------------------------------------------ what the run needs
    @property
    def name(self) -> str:
        """``dpo``, or ``dpo+bco_pair+sft`` for a mixture (run names, wandb job_type)."""
        return "+".join(self.names)

    @property
    def needs_reference(self) -> bool:
        """False when every component is reference-free (SimPO, ORPO, SFT): no reference is built or run."""
        return any(SPECS[n].reference for n in self.names)

    @property
    def unpaired(self) -> bool:
        """True when every component can train on unpaired rows (KTO)."""
        return all(SPECS[n].unpaired for n in self.names)

    def metric_names(self) -> list[str]:
        """Every metric this objective can log (the module creates one epoch-mean metric for each)."""
        base = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
        base += ["logps/chosen", "logps/rejected", "kl"]
        return base + [f"loss/{n}" for n in self.names] + [f"shadow/{n}" for n in LOSSES]

    def _check_settings(self) -> None:
        """Run every component once on a dummy pair, so an out-of-range parameter fails at start-up."""
        one = torch.zeros(1)
        for name in self.names:
            try:
                compute_loss(name, **self._inputs(one, one, one, one, one + 1, one + 1), **self._state())
            except ValueError as err:
                raise ConfigError(f"model.loss {name}: {err}") from None

    # ------------------------------------------------------------------ state
    @property
    def bco_delta(self) -> float:
        return self.bco_sum / self.bco_count if self.bco_count else 0.0

    def _state(self, kl_reference: Tensor | float = 0.0) -> dict[str, Any]:
        """The module-kept parameters: BCO's δ and KTO's z₀ (0 where the batch gives no estimate)."""
        return {"bco_delta": self.bco_delta, "kl_reference": kl_reference}

    def state_dict(self) -> dict[str, Any]:
        return {"bco_sum": self.bco_sum, "bco_count": self.bco_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bco_sum, self.bco_count = float(state.get("bco_sum", 0.0)), int(state.get("bco_count", 0))

    def _inputs(self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, lc: Tensor, lr: Tensor) -> dict[str, Any]:
        return {
            "policy_chosen_logps": pc,
            "policy_rejected_logps": pr,
            "reference_chosen_logps": rc,
            "reference_rejected_logps": rr,
            "chosen_lengths": lc,
            "rejected_lengths": lr,
            "beta": self.beta,
            "logp_aggregation": self.logp_aggregation,
        }

    def _update_bco(self, inputs: dict[str, Any], reduce: Reduce) -> None:
        """δ ← running mean of the batch-mean rewards β·Δ over chosen and rejected, all ranks (Jung et al. 2024)."""
        _, chosen, rejected = compute_loss("dpo", **inputs)
        sums = reduce(torch.stack([chosen.sum() + rejected.sum(), chosen.new_tensor(2.0 * chosen.numel())]))
        self.bco_sum += float(sums[0] / sums[1])
        self.bco_count += 1

    # ------------------------------------------------------------------ the step
    def __call__(
        self,
        logps: tuple[Tensor, Tensor],
        lengths: Tensor,
        *,
        desirable: Tensor | None = None,
        training: bool,
        reduce: Reduce = lambda t: t,
    ) -> tuple[Tensor, dict[str, Value]]:
        """Loss (scalar, with grad) and the values to log, from the 2B rows' log-probs.

        Args:
            logps: (policy, reference) log-prob sums of the 2B rows, each (2B,): chosen then rejected rows (or
                matched then mismatched rows of an unpaired batch).
            lengths: (2B,) response token counts of the rows.
            desirable: (B,) bool for an unpaired batch, else None.
            training: update the running state (BCO's δ) only in training steps.
            reduce: sums a tensor over processes (identity on one process).
        """
        policy, reference = logps
        n = lengths.shape[0] // 2
        if desirable is not None:
            return self._unpaired(policy, reference, lengths, desirable, reduce)
        pc, pr, rc, rr = policy[:n], policy[n:], reference[:n], reference[n:]
        inputs = self._inputs(pc, pr, rc, rr, lengths[:n], lengths[n:])
        detached = {**inputs, "policy_chosen_logps": pc.detach(), "policy_rejected_logps": pr.detach()}
        if training and ("bco_pair" in self.names):
            self._update_bco(detached, reduce)
        total, components, chosen_rewards, rejected_rewards = compute_mixture(
            self.names, self.weights, **inputs, **self.settings, **self._state()
        )
        values = {
            "loss": total.detach(),
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": pc.detach(),
            "logps/rejected": pr.detach(),
            **{f"loss/{name}": losses.detach() for name, losses in components.items()},
        }
        for name in LOSSES:  # KTO's shadow on pairs: z₀ = 0 (a paired batch has no mismatched rows)
            values[f"shadow/{name}"] = compute_loss(name, **detached, **self.shadow_settings, **self._state())[0]
        return total.mean(), values

    def _unpaired(
        self, policy: Tensor, reference: Tensor, lengths: Tensor, desirable: Tensor, reduce: Reduce
    ) -> tuple[Tensor, dict[str, Value]]:
        """KTO-style step on B matched rows; the B mismatched rows estimate z₀ (detached, all ranks)."""
        if not self.unpaired:
            raise ConfigError(
                f"model.loss {self.name!r} needs preference pairs, but the batch holds unpaired rows "
                f"(data.format: unpaired or data.unpair); losses for unpaired rows: "
                f"{', '.join(n for n in LOSSES if SPECS[n].unpaired)}"
            )
        n = lengths.shape[0] // 2
        p, p_kl, r, r_kl, lengths_matched = policy[:n], policy[n:], reference[:n], reference[n:], lengths[:n]
        kl_rows = (p_kl - r_kl).detach()
        if self.logp_aggregation == "mean":
            kl_rows = kl_rows / lengths[n:].clamp(min=1)
        sums = reduce(torch.stack([kl_rows.sum(), kl_rows.new_tensor(float(n))]))
        z0 = (sums[0] / sums[1]).clamp(min=0)
        masks = {"chosen_mask": desirable, "rejected_mask": ~desirable}
        inputs = self._inputs(p, p, r, r, lengths_matched, lengths_matched)
        total, components, chosen_rewards, rejected_rewards = compute_mixture(
            self.names, self.weights, **inputs, **masks, **self.settings, **self._state(z0)
        )
        weights_c, weights_r = desirable.float(), (~desirable).float()
        values = {
            "loss": total.detach(),
            "rewards/chosen": (chosen_rewards, weights_c),  # desirable rows only
            "rewards/rejected": (rejected_rewards, weights_r),  # undesirable rows only
            "logps/chosen": (p.detach(), weights_c),
            "logps/rejected": (p.detach(), weights_r),
            "kl": z0.expand(n),
            **{f"loss/{name}": losses.detach() for name, losses in components.items()},
        }
        detached = {**inputs, "policy_chosen_logps": p.detach(), "policy_rejected_logps": p.detach()}
        for name in (n_ for n_ in LOSSES if SPECS[n_].unpaired):
            values[f"shadow/{name}"] = compute_loss(
                name, **detached, **masks, **self.shadow_settings, **self._state(z0)
            )[0]
        return total.mean(), values
