"""Differential test against TRL's own loss code (trl==1.16.0, the ``bench`` extra): same tensors in, ≤ 1e-6 apart.

No model or trainer is built. TRL 1.16 computes the DPO and KTO losses inline in ``DPOTrainer._compute_loss`` /
``KTOTrainer._compute_loss``; those are called as plain functions on a ``SimpleNamespace`` that carries the
attributes they read, with a stand-in LM whose forward returns the per-token log-probs we choose (a leaf tensor, so
gradients reach it through TRL's code and through ours alike) and precomputed reference log-probs. SimPO, cDPO and
ORPO live in ``trl.experimental`` (``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss``), already pure methods.

Every loss TRL implements is compared, value and gradient with respect to every per-token policy log-prob and
every reference log-prob. ``dpop`` is ours only (TRL has no DPO-Positive). Known convention differences, each
exercised below where it bites:

- ``ipo``: TRL divides the log-ratios by the response lengths = our ``ipo`` with ``logp_aggregation: mean``.
- ``rdpo`` is TRL's ``robust``; ``fdpo`` is TRL's ``sigmoid`` with ``f_divergence_type``; our ``js`` is TRL's
  ``js_divergence``, and our α-divergence ``f_alpha = α`` is TRL's ``f_alpha_divergence_coef = 1 − α`` (TRL's
  f′(u) = (u^{a−1} − 1)/(a − 1)); our ψ drop the additive constants (TRL's forward-KL 1 − e^{−Δ}, JS log 2 + …).
- ``exo_pair``: TRL 1.16 raises for ``label_smoothing = 0``; ours then uses the paper's ε = 1e-3.
- ``bco_pair``: TRL 1.16 has no running reward mean, i.e. δ = 0 (our ``bco_delta`` default).
- ``sft`` and the NLL of ``rpo`` (TRL: ``["sigmoid", "sft"]`` with weights ``[1, α]``): TRL averages the NLL over all
  chosen tokens of the batch, ours per pair; equal per pair, and TRL's batch value is the length-weighted mean of ours.
- ``cdpo``: TRL 1.16's DPOTrainer has no label-smoothed sigmoid; CPOTrainer's ``sigmoid`` is that formula on
  reference-free logits, so it is fed the log-ratios Δc, Δr.
- ``orpo``: TRL's ORPOTrainer uses its ``beta`` as λ and returns +λ log σ(·) (subtracted later); its NLL is a
  cross-entropy over prompt and response of the whole batch. The odds-ratio term is compared; the NLL is ``sft``'s.
- ``kto``: TRL averages over rows; ours is per row, so the means agree on unpaired rows, and a pair scored with both
  masks True is one desirable plus one undesirable row (its mean is twice TRL's over the 2B split rows).
"""

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[bench]'); the TRL comparison needs it")
if trl.__version__ != "1.16.0":
    pytest.skip(f"the conventions pinned here are TRL 1.16.0's, found trl {trl.__version__}", allow_module_level=True)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental

from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from dpo_lightning.losses import compute_loss  # noqa: E402

pytestmark = pytest.mark.slow

ATOL = 1e-6
BETA = 0.5
CHOSEN_LENGTHS = [2, 4, 3, 5]
REJECTED_LENGTHS = [1, 4, 6, 2]
B = len(CHOSEN_LENGTHS)


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


class _LM(torch.nn.Module):
    """Stands in for TRL's model: ``forward`` returns the given per-token log-probs (and zeros for the metrics)."""

    def __init__(self, per_token_logps: torch.Tensor):
        super().__init__()
        self.per_token_logps = per_token_logps

    def forward(self, input_ids=None, **kwargs):
        zeros = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=self.per_token_logps.dtype)
        return SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


def _trainer(model, **attrs):
    """The attributes TRL's ``_compute_loss`` reads from ``self``."""
    base = {
        "beta": BETA,
        "ld_alpha": None,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "label_smoothing": 0.0,
        "use_weighting": False,
        "precompute_ref_logps": True,
        "aux_loss_enabled": False,
        "accelerator": _Accelerator(),
        "model": model.train(),
        "args": SimpleNamespace(gradient_checkpointing_kwargs=None),
        "_metrics": defaultdict(lambda: defaultdict(list)),
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }
    return SimpleNamespace(**{**base, **attrs})


def _batch(dtype=torch.float64, seed=0):
    """Per-token policy log-probs (2B, T−1), reference sums (2B,), completion mask (2B, T). Rows 0..B−1 are the
    chosen responses, B..2B−1 the rejected, as in TRL's concatenated batch. The log-probs are a leaf; what the LM
    returns is that leaf times the shifted completion mask (zeros off the completion, as TRL's model gives)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(CHOSEN_LENGTHS + REJECTED_LENGTHS)
    width = int(lengths.max()) + 1  # position 0 is the prompt
    completion = torch.zeros(2 * B, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion[i, 1 : 1 + n] = 1
    per_token = -(torch.rand(2 * B, width - 1, generator=gen, dtype=torch.float64) * 2.5 + 0.05)
    per_token = per_token.to(dtype).requires_grad_(True)
    ref = (-(torch.rand(2 * B, generator=gen, dtype=torch.float64) * 8 + 1)).to(dtype).requires_grad_(True)
    return per_token, ref, completion


def _masked(per_token, completion):
    return per_token * completion[:, 1:].to(per_token.dtype)


def _rows(per_token, ref, completion, pairs):
    rows = list(pairs) + [B + i for i in pairs]
    return per_token[rows], ref[rows], completion[rows]


def _trl_dpo(per_token, ref, completion, loss_types, loss_weights=None, **attrs):
    """TRL 1.16's DPO loss: the mean over the batch of Σ_k w_k · per-sequence loss_k."""
    n = per_token.shape[0] // 2
    model = _LM(_masked(per_token, completion))
    inputs = {
        "input_ids": torch.zeros_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
        "ref_chosen_logps": ref[:n],
        "ref_rejected_logps": ref[n:],
    }
    weights = loss_weights or [1.0] * len(loss_types)
    trainer = _trainer(model, loss_types=loss_types, loss_weights=weights, **attrs)
    return DPOTrainer._compute_loss(trainer, model, inputs, False)


def _ours(name, per_token, ref, completion, **params):
    n = per_token.shape[0] // 2
    sums, lengths = _masked(per_token, completion).sum(1), completion[:, 1:].sum(1)
    losses, _, _ = compute_loss(
        name,
        policy_chosen_logps=sums[:n],
        policy_rejected_logps=sums[n:],
        reference_chosen_logps=ref[:n],
        reference_rejected_logps=ref[n:],
        chosen_lengths=lengths[:n],
        rejected_lengths=lengths[n:],
        beta=BETA,
        **params,
    )
    return losses


def _assert_same(ours, theirs, leaves):
    """Values and gradients with respect to every leaf within ATOL (TRL's ORPO computes in float32: compared in
    float64 after casting)."""
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=ATOL, rtol=0)
    for leaf, a, b in zip(
        leaves,
        torch.autograd.grad(ours, leaves, allow_unused=True, retain_graph=True),
        torch.autograd.grad(theirs, leaves, allow_unused=True, retain_graph=True),
        strict=True,
    ):
        zeros = torch.zeros_like(leaf)
        torch.testing.assert_close(zeros if a is None else a, zeros if b is None else b, atol=ATOL, rtol=0)


# our name, our params, TRL loss_type, TRL trainer attributes, dtype
DPO_CASES = [
    ("dpo", {}, "sigmoid", {}, torch.float64),
    ("ipo", {"logp_aggregation": "mean"}, "ipo", {}, torch.float64),
    ("rdpo", {"label_smoothing": 0.2}, "robust", {"label_smoothing": 0.2}, torch.float64),
    ("hinge", {}, "hinge", {}, torch.float64),
    ("exo_pair", {"label_smoothing": 0.1}, "exo_pair", {"label_smoothing": 0.1}, torch.float64),
    ("exo_pair", {"label_smoothing": 0.0}, "exo_pair", {"label_smoothing": 1e-3}, torch.float64),
    ("nca_pair", {}, "nca_pair", {}, torch.float64),
    ("bco_pair", {"bco_delta": 0.0}, "bco_pair", {}, torch.float64),
    ("sppo_hard", {}, "sppo_hard", {}, torch.float64),
    ("apo_zero", {}, "apo_zero", {}, torch.float64),
    ("apo_down", {}, "apo_down", {}, torch.float64),
    ("sigmoid_norm", {}, "sigmoid_norm", {}, torch.float64),
    ("fdpo", {"f_divergence": "forward_kl"}, "sigmoid", {"f_divergence_type": "forward_kl"}, torch.float64),
    ("fdpo", {"f_divergence": "js"}, "sigmoid", {"f_divergence_type": "js_divergence"}, torch.float64),
    # TRL's alpha branch only handles float16/bfloat16/float32; f_alpha = α is TRL's coefficient 1 − α
    (
        "fdpo",
        {"f_divergence": "alpha", "f_alpha": 0.7},
        "sigmoid",
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        torch.float32,
    ),
]


@pytest.mark.parametrize(
    "name,params,loss_type,attrs,dtype", DPO_CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(DPO_CASES)]
)
def test_pairwise_losses_match_trl_dpo_trainer(name, params, loss_type, attrs, dtype):
    """Per pair (batches of one) and over the batch (mean, and its gradient with respect to every per-token policy
    log-prob and every reference log-prob), our loss equals TRL's to 1e-6."""
    per_token, ref, completion = _batch(dtype)
    ours = _ours(name, per_token, ref, completion, **params)
    _assert_same(ours.mean(), _trl_dpo(per_token, ref, completion, [loss_type], **attrs), [per_token, ref])
    for i in range(B):
        theirs = _trl_dpo(*_rows(per_token, ref, completion, [i]), [loss_type], **attrs)
        torch.testing.assert_close(ours[i], theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "name,trl_types,trl_weights", [("sft", ["sft"], [1.0]), ("rpo", ["sigmoid", "sft"], [1.0, 0.7])]
)
def test_nll_terms_match_trl_per_pair_and_as_a_token_mean(name, trl_types, trl_weights):
    """TRL's ``sft`` is −Σ_tokens log π / Σ lc over the batch; ours is −Sc/lc per pair. Per pair they are equal; over
    the batch TRL's NLL is Σ lc_i · nll_i / Σ lc_i, the length-weighted mean of ours (RPO = DPO + 0.7 · that)."""
    per_token, ref, completion = _batch()
    params = {"rpo_alpha": 0.7} if name == "rpo" else {}
    ours = _ours(name, per_token, ref, completion, **params)
    for i in range(B):
        theirs = _trl_dpo(*_rows(per_token, ref, completion, [i]), trl_types, trl_weights)
        torch.testing.assert_close(ours[i], theirs, atol=ATOL, rtol=0)
    nll = _ours("sft", per_token, ref, completion)
    lc = torch.tensor(CHOSEN_LENGTHS, dtype=nll.dtype)
    token_mean_nll = (lc * nll).sum() / lc.sum()
    expected = (
        token_mean_nll if name == "sft" else _ours("dpo", per_token, ref, completion).mean() + 0.7 * token_mean_nll
    )
    _assert_same(expected, _trl_dpo(per_token, ref, completion, trl_types, trl_weights), [per_token, ref])
    assert not torch.allclose(nll.mean(), token_mean_nll)  # the lengths differ, so the conventions do too


def _means(per_token, ref, completion):
    lengths = completion[:, 1:].sum(1).to(per_token.dtype)
    return _masked(per_token, completion).sum(1) / lengths, ref / lengths


def _cpo(loss_type, chosen, rejected, **attrs):
    trainer = SimpleNamespace(
        alpha=0.0, beta=BETA, loss_type=loss_type, simpo_gamma=0.5, label_smoothing=0.0, accelerator=_Accelerator()
    )
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return CPOTrainer.cpo_loss(trainer, chosen, rejected)[0]


def test_simpo_matches_trl_cpo_trainer():
    """TRL's SimPO (CPOTrainer, ``loss_type="simpo"``) on average log-probs: −log σ(β(m_c − m_r − γ/β))."""
    per_token, ref, completion = _batch()
    ours = _ours("simpo", per_token, ref, completion, simpo_gamma=0.8)
    means, _ = _means(per_token, ref, completion)
    theirs = _cpo("simpo", means[:B], means[B:], simpo_gamma=0.8)
    _assert_same(ours.sum(), theirs.sum(), [per_token, ref])
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_cdpo_matches_trl_label_smoothed_sigmoid():
    """cDPO's Eq. 3 is CPOTrainer's ``sigmoid`` with ``label_smoothing``, a reference-free loss on pc − pr: given the
    log-ratios Δc, Δr as its "log-probs", it computes −(1−ε) log σ(βh) − ε log σ(−βh)."""
    per_token, ref, completion = _batch()
    ours = _ours("cdpo", per_token, ref, completion, label_smoothing=0.2)
    sums = _masked(per_token, completion).sum(1)
    theirs = _cpo("sigmoid", sums[:B] - ref[:B], sums[B:] - ref[B:], label_smoothing=0.2)
    _assert_same(ours.sum(), theirs.sum(), [per_token, ref])
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_orpo_odds_ratio_term_matches_trl_orpo_trainer():
    """ORPO = −m_c + λ L_OR. TRL's ``odds_ratio_loss`` (its ``beta`` is λ) returns λ log σ(log odds ratio), which the
    trainer subtracts from its NLL: our loss minus our NLL −m_c must equal minus TRL's."""
    per_token, ref, completion = _batch()
    lam = 0.3
    ours = _ours("orpo", per_token, ref, completion, orpo_lambda=lam) - _ours("sft", per_token, ref, completion)
    means, _ = _means(per_token, ref, completion)
    trainer = SimpleNamespace(beta=lam, accelerator=_Accelerator())
    theirs = -ORPOTrainer.odds_ratio_loss(trainer, means[:B], means[B:])[0]
    _assert_same(ours.sum(), theirs.sum(), [per_token, ref])
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=ATOL, rtol=0)


def _trl_kto(per_token, ref, labels, kl_logps, ref_kl_logps, desirable_weight, undesirable_weight):
    """TRL 1.16's KTO loss on unpaired rows: the KL reference point z₀ = max(0, mean(KL_logps − ref_KL_logps)) from
    the mismatched completions (their log-probs given: ``_compute_kl_logps`` is replaced by a constant)."""
    n, width = per_token.shape
    completion = torch.ones(n, width + 1, dtype=torch.long)
    completion[:, 0] = 0  # the prompt; every other position is a completion token
    model = _LM(per_token)
    trainer = _trainer(
        model,
        loss_type="kto",
        calculate_KL=True,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _compute_kl_logps=lambda model, batch: kl_logps,
    )
    batch = {
        "input_ids": torch.zeros_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl_logps,
    }
    return KTOTrainer._compute_loss(trainer, model, batch, False)


@pytest.mark.parametrize("kl_shift", [0.3, -0.3])
def test_kto_matches_trl_kto_trainer_on_unpaired_rows(kl_shift):
    """Unpaired rows, labels mixed, λ_D = 1.3, λ_U = 0.8: ours with chosen = rejected = the row, chosen_mask = label,
    rejected_mask = ~label and z₀ computed as TRL does (clamped at 0: ``kl_shift = −0.3`` tests the clamp) has TRL's
    mean and gradients."""
    per_token, ref, _ = _batch()
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    gen = torch.Generator().manual_seed(1)
    ref_kl = -(torch.rand(2 * B, generator=gen, dtype=torch.float64) * 5 + 1)
    kl_logps = ref_kl + kl_shift + 0.1 * torch.randn(2 * B, generator=gen, dtype=torch.float64)
    z0 = (kl_logps - ref_kl).mean().clamp(min=0)
    sums = per_token.sum(1)
    ours, _, _ = compute_loss(
        "kto",
        policy_chosen_logps=sums,
        policy_rejected_logps=sums,
        reference_chosen_logps=ref,
        reference_rejected_logps=ref,
        chosen_lengths=torch.ones(2 * B),
        rejected_lengths=torch.ones(2 * B),
        beta=BETA,
        kl_reference=z0,
        desirable_weight=1.3,
        undesirable_weight=0.8,
        chosen_mask=labels,
        rejected_mask=~labels,
    )
    theirs = _trl_kto(per_token, ref, labels, kl_logps, ref_kl, 1.3, 0.8)
    _assert_same(ours.mean(), theirs, [per_token, ref])


def test_kto_on_pairs_is_one_desirable_and_one_undesirable_row():
    """Paired data as KTO: TRL splits each pair into a desirable and an undesirable row and averages the 2B rows;
    ours scores the pair with both masks True, so our mean over B pairs is twice TRL's."""
    per_token, ref, _ = _batch()
    z0 = torch.tensor(0.2, dtype=torch.float64)
    sums = per_token.sum(1)
    ours, _, _ = compute_loss(
        "kto",
        policy_chosen_logps=sums[:B],
        policy_rejected_logps=sums[B:],
        reference_chosen_logps=ref[:B],
        reference_rejected_logps=ref[B:],
        chosen_lengths=torch.ones(B),
        rejected_lengths=torch.ones(B),
        beta=BETA,
        kl_reference=z0,
    )
    labels = torch.tensor([True] * B + [False] * B)
    zeros = torch.zeros(2 * B, dtype=torch.float64)
    theirs = _trl_kto(per_token, ref, labels, zeros + z0, zeros, 1.0, 1.0)
    _assert_same(ours.mean() / 2, theirs, [per_token, ref])
