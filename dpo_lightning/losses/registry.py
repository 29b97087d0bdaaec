"""The loss registry and ``compute_loss``, the one entry the module, the tests and outside tools call.

Every loss is a small pure function with one signature::

    fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
       *, beta, **params) -> (losses, chosen_rewards, rejected_rewards)

The four inputs and three outputs are per-example tensors of shape (B,); the caller takes the mean. A loss
declares the parameters it reads as keyword-only arguments (``label_smoothing``, ``simpo_gamma``, ...,
``chosen_lengths`` / ``rejected_lengths`` if it wants the response lengths, ``logp_aggregation`` if it must know
whether its inputs are sums or per-token means); ``compute_loss`` passes each
loss only what it declares, so one settings dict serves every loss and every shadow metric.

What a loss is defined on is said once, at registration (:func:`register`):

- ``per_token=True``: the loss is defined on per-token mean log-probs (SimPO, ORPO, length-normalised DPO,
  SFT). ``compute_loss`` divides all four sums by the response lengths before calling it, whatever the
  ``logp_aggregation``.
- otherwise the loss is defined on sequence log-probs: the sums, or the per-token means when
  ``logp_aggregation="mean"``.
- ``reference=False``: the loss never reads the reference log-probs (the module then builds no reference).
- ``unpaired=True``: the loss also takes ``chosen_mask`` / ``rejected_mask`` (B,) bools, so a batch of
  unpaired rows (each either desirable or undesirable) can be scored (KTO).

Adding a loss: write the function in the file of its kind, decorate it with ``@register("name", ...)``, import
nothing anywhere else; ``--model.loss name`` then works and every run logs ``shadow/name``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]
LossFn = Callable[..., LossOutput]
AGGREGATIONS = ("sum", "mean")


@dataclass(frozen=True)
class LossSpec:
    """What a registered loss is defined on; see the module docstring."""

    name: str
    reference: bool = True
    per_token: bool = False
    unpaired: bool = False


LOSSES: dict[str, LossFn] = {}
SPECS: dict[str, LossSpec] = {}


def register(name: str, *, reference: bool = True, per_token: bool = False, unpaired: bool = False):
    """Decorator: add ``fn`` to ``LOSSES`` under ``name`` with its :class:`LossSpec`."""

    def add(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice ({LOSSES[name].__qualname__}, {fn.__qualname__})")
        LOSSES[name] = fn
        SPECS[name] = LossSpec(name, reference=reference, per_token=per_token, unpaired=unpaired)
        fn.spec = SPECS[name]  # type: ignore[attr-defined]
        return fn

    return add


def get_loss(name: str) -> LossFn:
    """Look a loss up by name; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; valid losses are: {', '.join(sorted(LOSSES))}") from None


def get_spec(name: str) -> LossSpec:
    get_loss(name)
    return SPECS[name]


def declared_params(fn: LossFn) -> set[str]:
    """The keyword-only parameters ``fn`` declares beyond ``beta``."""
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "beta"
    }


def loss_params(fn: LossFn, params: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only the keyword parameters ``fn`` declares (beyond ``beta``), so one settings dict serves all."""
    accepted = declared_params(fn)
    return {k: v for k, v in params.items() if k in accepted}


def compute_loss(
    name: str,
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float,
    logp_aggregation: str = "sum",
    **params: Any,
) -> LossOutput:
    """Per-example losses and implicit rewards of the registered loss ``name``.

    Args:
        name: a key of ``LOSSES``.
        policy_chosen_logps, policy_rejected_logps: (B,) sums of response-token log-probs under the policy.
        reference_chosen_logps, reference_rejected_logps: (B,) the same under the reference (zeros when the run
            is reference-free; never read by losses registered with ``reference=False``).
        chosen_lengths, rejected_lengths: (B,) response token counts (the number of tokens summed above).
        beta: β of the loss (for ORPO, which has no β, it only scales the logged rewards).
        logp_aggregation: ``sum`` (log π(y|x), as in the DPO paper) or ``mean`` (divide by the length) for the
            losses defined on sequence log-probs; losses defined on per-token means divide regardless.
        **params: settings of any loss (``label_smoothing``, ``simpo_gamma``, ...); those ``name`` does not
            declare are ignored.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards are detached.
    """
    fn = get_loss(name)
    spec = SPECS[name]
    if logp_aggregation not in AGGREGATIONS:
        raise ValueError(f"logp_aggregation must be 'sum' or 'mean', got {logp_aggregation!r}")
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if spec.per_token or logp_aggregation == "mean":
        lc = chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
        lr = rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1)
        logps = (logps[0] / lc, logps[1] / lr, logps[2] / lc, logps[3] / lr)
    # ``logp_aggregation`` travels too: a loss that mixes a sequence term with a per-token one (RPO's NLL) must
    # know whether its inputs were already divided by the lengths.
    settings = {
        **params,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "logp_aggregation": logp_aggregation,
    }
    return fn(*logps, beta=beta, **loss_params(fn, settings))


def compute_mixture(
    names: Sequence[str], weights: Sequence[float], **inputs: Any
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """A weighted sum of registered losses, as in MPO's ``[dpo, bco_pair, sft]``.

    Returns ``(losses, components, chosen_rewards, rejected_rewards)``: ``losses`` (B,) is
    Σ_k w_k · loss_k, ``components`` maps each name to its own (B,) loss (unweighted), and the rewards are
    those of the first component.
    """
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} losses but {len(weights)} weights")
    total, components, rewards = None, {}, None
    for name, weight in zip(names, weights, strict=True):
        losses, chosen_rewards, rejected_rewards = compute_loss(name, **inputs)
        components[name] = losses
        total = weight * losses if total is None else total + weight * losses
        if rewards is None:
            rewards = (chosen_rewards, rejected_rewards)
    assert total is not None and rewards is not None, "compute_mixture needs at least one loss"
    return total, components, rewards[0], rewards[1]
