"""Packed and prompt-shared batches (data/packing.py, logps.batch_logps) score every sequence as the padded batch does.

The equality tests run real HH pairs (the session's ``hh_datamodule``: the tiny tokenizer, max_length 128) through
tiny GPT-2, Llama and GPT-NeoX models. Their weights are drawn with ``initializer_range`` 0.3 rather than the
families' 0.02: at 0.02 a 2-layer model's next-token distribution barely depends on the context, so a mask that let
the rejected tokens see the chosen ones would move the log-probs by less than fp32 rounding and no equality test
could catch it; at 0.3 it moves them by units (the leak test below holds that).

Tolerance (fp32): a sequence's log-prob is a sum of up to ~100 per-token terms near −5.7, so |sum| reaches ~600,
whose float32 spacing is 6e-5: changing which padding or which neighbours a matmul row sits beside moves such a
sum by a few spacings. Sums are held to 1e-5 + 1e-6·|value| (≤ 10 spacings, 4 to 6e-4 below anything a leak does).
A gradient entry sums many such terms' contributions: entries are held to 1e-4·|entry| + 1e-5·(the tensor's
largest entry, at least 1).
"""

from __future__ import annotations

import pytest
import torch

from dpo_lightning import logps as logps_module
from dpo_lightning.data.packing import LayoutCollator, real_tokens, shared_unit
from dpo_lightning.data.tokenize import PairCollator
from dpo_lightning.errors import ConfigError
from dpo_lightning.logps import batch_logps, batch_response_lengths
from dpo_lightning.losses import LOSSES, SPECS
from dpo_lightning.models import build_causal_lm, disable_dropout
from dpo_lightning.objective import Objective

from helpers import FSDP, assert_same_curves, fsdp_run, in_process_fit, make_datamodule, shared_run

SMALL = {"initializer_range": 0.3, "max_position_embeddings": 256}
ROPE = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64, **SMALL}  # fmt: skip
FAMILIES = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 256, **SMALL},
    "llama": {"model_type": "llama", **ROPE},
    "gpt_neox": {"model_type": "gpt_neox", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                 "intermediate_size": 64, **SMALL},
}  # fmt: skip
LAYOUTS = {"packing": (True, False), "share_prompt": (False, True), "both": (True, True)}
HEADS = {"response_only": (True, None), "chunked": (True, 7), "full_logits": (False, None)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two contended ones (the suite shares two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6) -> None:
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5)


def tiny_model(family: str, tokenizer, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_causal_lm(config=FAMILIES[family], tokenizer=tokenizer, attn_implementation=attn)
    disable_dropout(model)
    return model


@pytest.fixture(scope="module")
def hh_datamodule(hh_subset, family_tokenizers):
    """The session's 64 HH records with a 1,024-token BPE trained on HH text (helpers.family_tokenizer), at
    max_length 192: pairs from 30 to 192 tokens, so there is something to pack."""
    return make_datamodule(hh_subset, family_tokenizers("gpt2"), setup=True, format="hh", max_length=192,
                           max_prompt_length=128)  # fmt: skip


@pytest.fixture(scope="module")
def features(hh_datamodule):
    """8 HH pairs of mixed lengths (the 3 longest and the 5 shortest of the split), so packing does pack."""
    return mixed_lengths(hh_datamodule, 8)


def mixed_lengths(dm, n: int, longest: int = 3) -> list[dict]:
    """``n`` training rows of ``dm``: its ``longest`` longest and the ``n - longest`` shortest, so packing packs."""
    rows = dm.datasets["train"].select_columns(dm.loader_columns).with_format(None)
    lengths = dm.pair_lengths("train")
    order = sorted(range(len(rows)), key=lambda i: -int(lengths[i]))
    return [rows[i] for i in order[:longest] + order[longest - n :]]


def logps_and_grads(model, batch, response_only=True, chunk=None):
    """Sequence log-probs (2B,) and the parameter gradients of a loss weighting each sequence differently."""
    model.zero_grad()
    values = batch_logps(model, batch, response_only, chunk)
    weights = torch.linspace(-1.0, 1.0, values.shape[0])
    (values * weights).sum().backward()
    return values.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_a_shared_pair_is_laid_out_as_the_padded_rows_see_it():
    """Prompt [5, 6, 7] (P = 3), chosen [8, 9], rejected [10, 11, 12]; one pair, so B = 1 (chosen = sequence 0,
    rejected = sequence 1). Row: 5 6 7 | 8 9 | 10 11 12. Positions: prompt 0..2, chosen 3..4 (P..P+C−1), rejected
    3..5 (P..P+R−1, as its padded row numbers them). Chosen token j is predicted at row position P−1+j: 2, 3.
    Rejected token 0 is predicted at the last prompt position (2), not at the last chosen token; token j ≥ 1 at
    P+C+j−1: 5, 6. Mask: row 5 (token 10, rejected) sees 0..2 and 5, not 3..4."""
    unit = shared_unit([5, 6, 7], [8, 9], [10, 11, 12], pair=0, pairs=1)
    assert unit.tokens == [5, 6, 7, 8, 9, 10, 11, 12]
    assert unit.positions == [0, 1, 2, 3, 4, 3, 4, 5]
    assert unit.branches == [0, 0, 0, 1, 1, 2, 2, 2]
    assert unit.scores == [(2, 8, 0), (3, 9, 0), (2, 10, 1), (5, 11, 1), (6, 12, 1)]
    batch = LayoutCollator(0, packing=False, share_prompt=True)([
        {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10, 11, 12], "index": 4}
    ])  # fmt: skip
    allowed = logps_module.layout_allowed(batch["group_ids"], batch["branch_ids"])[0, 0]
    assert allowed[5].tolist() == [True, True, True, False, False, True, False, False]
    assert allowed[4].tolist() == [True, True, True, True, True, False, False, False]
    assert batch["score_source"].tolist() == [2, 3, 2, 5, 6]
    assert batch["response_lengths"].tolist() == [2, 3] and int(batch["real_tokens"]) == 5 + 6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_logps_and_gradients_as_padded(family, features, hh_datamodule):
    """The 16 sequence log-probs and every parameter gradient equal the padded batch's (module docstring:
    tolerance): each layout (packing, share_prompt, both) with the response-only head, and packing + share_prompt
    with the chunked head (7 positions at a time) and with full logits (the heads read the same triples whatever
    the layout). Response lengths and the real-token count are the padded batch's too; packing packs (fewer rows
    than 16) and share_prompt holds each of the 8 prompts once (8 rows without packing)."""
    tokenizer = hh_datamodule.tokenizer
    model = tiny_model(family, tokenizer)
    padded = PairCollator(tokenizer.pad_token_id)(features)
    wanted = {head: logps_and_grads(model, padded, *settings) for head, settings in HEADS.items()}
    for name, (packing, share) in LAYOUTS.items():
        batch = LayoutCollator(tokenizer.pad_token_id, packing, share)(features)
        assert torch.equal(batch_response_lengths(batch), batch_response_lengths(padded))
        assert int(real_tokens(batch)) == int(padded["attention_mask"].sum())
        assert batch["input_ids"].shape[0] < 16 if packing else batch["input_ids"].shape[0] == 8, name
        for head in HEADS if name == "both" else ["response_only"]:
            got, got_grads = logps_and_grads(model, batch, *HEADS[head])
            want, want_grads = wanted[head]
            close(got, want)
            assert len(got_grads) == len(want_grads), (name, head)
            for g, w in zip(got_grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * max(1.0, w.abs().max().item()))


def test_eager_attention_takes_the_additive_mask(features, hh_datamodule):
    """``attn_implementation: eager`` gets the mask as 0 / dtype-min additions: the same log-probs as padded."""
    tokenizer = hh_datamodule.tokenizer
    model = tiny_model("llama", tokenizer, attn="eager")
    with torch.no_grad():
        want = batch_logps(model, PairCollator(tokenizer.pad_token_id)(features))
        close(batch_logps(model, LayoutCollator(tokenizer.pad_token_id, True, True)(features)), want)


def test_flex_attention_gets_the_same_mask(features, hh_datamodule):
    """``attn_implementation: flex_attention`` gets a BlockMask whose ``mask_mod`` is the same rule: evaluated at
    every (row, query, key) it is the sdpa bool mask. (Running flex here would compile it with inductor, ~30 s on
    this box, and it has no backward on CPU in this torch: a packed training forward with it on CPU is a
    ConfigError naming the key, raised before any compile.)"""
    from torch.nn.attention.flex_attention import create_mask

    tokenizer = hh_datamodule.tokenizer
    batch = LayoutCollator(tokenizer.pad_token_id, True, True)(features)
    group_ids, branch_ids = batch["group_ids"], batch["branch_ids"]
    rows, width = group_ids.shape
    dense = create_mask(logps_module.layout_mask_mod(group_ids, branch_ids), rows, 1, width, width, device="cpu")
    assert torch.equal(dense, logps_module.layout_allowed(group_ids, branch_ids))
    with pytest.raises(ConfigError, match="flex_attention has no backward on CPU"):
        batch_logps(tiny_model("llama", tokenizer, attn="flex_attention"), batch)


def test_module_step_on_a_laid_out_batch(features, hh_datamodule):
    """PreferenceModule dispatches on the batch, not on flags: a reference-free loss (SimPO: no reference is
    built, its log-probs are zeros of the 2B sequences, not of the rows) gives the padded batch's loss; online DPO,
    which samples its own padded pairs from the data's prompts, refuses a laid-out batch naming the keys."""
    from dpo_lightning.module import PreferenceModule

    tokenizer = hh_datamodule.tokenizer
    torch.manual_seed(0)
    module = PreferenceModule(policy_config=FAMILIES["gpt2"], loss="simpo", tokenizer=tokenizer)
    assert module.reference is None
    batch = LayoutCollator(tokenizer.pad_token_id, True, True)(features)
    with torch.no_grad():
        want = module.model_step(PairCollator(tokenizer.pad_token_id)(features))[0]
        close(module.model_step(batch)[0], want)
    module.online = object()  # as model.online sets it
    with pytest.raises(ConfigError, match="model.online.*data.packing"):
        module.training_step(batch, 0)


def test_a_lora_policy_and_its_adapters_off_reference(features, hh_datamodule):
    """A LoRA policy (peft wrapper) and its reference (the policy with adapters off, a wrapper owning no
    parameters) take the laid-out batch through their wrappers: the padded batch's log-probs, adapters trained
    away from zero so policy and reference differ."""
    from dpo_lightning.module import PreferenceModule

    tokenizer = hh_datamodule.tokenizer
    torch.manual_seed(0)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}
    module = PreferenceModule(policy_config=FAMILIES["gpt2"], peft_config=lora, tokenizer=tokenizer)
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    padded = PairCollator(tokenizer.pad_token_id)(features)
    batch = LayoutCollator(tokenizer.pad_token_id, True, True)(features)
    with torch.no_grad():
        for model in (module.policy, module.reference):
            close(module.concatenated_logps(model, batch), module.concatenated_logps(model, padded))
        gap = module.concatenated_logps(module.policy, batch) - module.concatenated_logps(module.reference, batch)
    assert gap.abs().min() > 0.01


def test_a_planted_leak_breaks_the_equality(features, hh_datamodule, monkeypatch):
    """A mask that lets the rejected tokens see the chosen ones (branches ignored) is what packed DPO elsewhere
    shipped with: the equality check must fail on it, by far more than the tolerance (units, not 1e-5), on the
    rejected sequences only (the chosen ones see no more than before)."""
    tokenizer = hh_datamodule.tokenizer
    model = tiny_model("gpt2", tokenizer)
    batch = LayoutCollator(tokenizer.pad_token_id, True, True)(features)
    with torch.no_grad():
        want = batch_logps(model, PairCollator(tokenizer.pad_token_id)(features))
        real = logps_module.layout_allowed
        monkeypatch.setattr(logps_module, "layout_allowed", lambda g, b: real(g, torch.zeros_like(b)))
        leaked = batch_logps(model, batch)
    with pytest.raises(AssertionError):
        close(leaked, want)
    assert (leaked - want)[8:].abs().max() > 0.5
    close(leaked[:8], want[:8])


def test_unpaired_rows_pack(hh_subset, hh_datamodule):
    """Unpaired rows (KTO, ``unpair``): packing gives the padded UnpairedCollator's log-probs (matched and
    mismatched rows) and its ``desirable``; share_prompt has no pair to share and is a ConfigError naming it."""
    tokenizer = hh_datamodule.tokenizer
    dm = make_datamodule(hh_subset, tokenizer, setup=True, format="hh", unpair=True, max_length=96,
                         max_prompt_length=64, packing=True)  # fmt: skip
    features = mixed_lengths(dm, 6)
    packed = dm.collator()(features)
    assert packed["input_ids"].shape[0] < 12  # matched and mismatched rows share rows
    dm.packing = False
    padded = dm.collator()(features)
    model = tiny_model("gpt2", tokenizer)
    with torch.no_grad():
        close(batch_logps(model, packed), batch_logps(model, padded))
    assert torch.equal(packed["desirable"], padded["desirable"])
    dm.share_prompt = True
    with pytest.raises(ConfigError, match="data.share_prompt.*unpaired"):
        dm.collator()


def test_attention_that_cannot_take_the_mask_is_a_config_error(features, hh_datamodule):
    """flash_attention_2 (varlen kernels read no 4D mask) and a forward without ``position_ids`` are refused with
    the keys named, not run with a mask they would ignore."""
    tokenizer = hh_datamodule.tokenizer
    batch = LayoutCollator(tokenizer.pad_token_id, True, False)(features[:2])
    model = tiny_model("gpt2", tokenizer)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="data.packing.*flash_attention_2.*attn_implementation"):
        batch_logps(model, batch)

    class NoPositions(torch.nn.Module):
        config = tiny_model("gpt2", tokenizer).config

        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("never called")

    with pytest.raises(ConfigError, match="position_ids"):
        batch_logps(NoPositions(), batch)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_is_the_same(loss, layout_logps):
    """Every registered loss gives the same loss and logged values (its shadow metrics: every other loss too) from
    the laid-out batch's log-probs and lengths as from the padded batch's: packed + shared pairs, or for an
    unpaired loss (KTO) packed unpaired rows."""
    results = []
    runs = layout_logps[SPECS[loss].unpaired]
    for values, lengths, desirable in runs:
        objective = Objective(loss, None, beta=0.1, settings={}, shadow_settings={})
        results.append(objective(values, lengths, desirable=desirable, training=False))
    # a value built from a difference of two sums carries their rounding: 1e-6 of the largest sum, twice
    atol = 2e-6 * max(v.abs().max().item() for v in runs[0][0])
    (loss_a, logged_a), (loss_b, logged_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=atol)
    for key, value in logged_a.items():
        torch.testing.assert_close(logged_b[key], value, rtol=1e-6, atol=atol, msg=key)


@pytest.fixture(scope="module")
def layout_logps(features, hh_datamodule, hh_subset):
    """{unpaired: [((policy, reference) log-probs, lengths, desirable) of the padded batch, of the laid-out one]}:
    a tiny GPT-2 policy and a reference with other weights, on 8 HH pairs (packed + shared) and 8 unpaired rows."""
    tokenizer = hh_datamodule.tokenizer
    policy, reference = tiny_model("gpt2", tokenizer), tiny_model("gpt2", tokenizer)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(0.9)
    unpaired = make_datamodule(hh_subset, tokenizer, setup=True, format="hh", unpair=True, max_length=96,
                               max_prompt_length=64, packing=True)  # fmt: skip
    packed_rows = unpaired.collator()
    unpaired.packing = False
    pad = tokenizer.pad_token_id
    collators = {False: (PairCollator(pad), LayoutCollator(pad, True, True)), True: (unpaired.collator(), packed_rows)}
    out = {}
    for kind, pair in collators.items():
        feats = mixed_lengths(unpaired, 8) if kind else features
        out[kind] = []
        for collate in pair:
            batch = collate(feats)
            with torch.no_grad():
                values = (batch_logps(policy, batch), batch_logps(reference, batch))
            out[kind].append((values, batch_response_lengths(batch), batch.get("desirable")))
    return out


def test_a_packed_run_reads_the_reference_table_of_a_padded_one(assets, tmp_path, caplog):
    """``precompute_reference``: a packed + prompt-shared run finds the table a padded run stored (the store key
    holds no layout: the values agree within fp32 rounding), re-scores a few random rows in its own layout and
    accepts them (no new file, none rewritten), and trains on the same curves as the padded run within 1e-5."""
    cache = tmp_path / "store"
    common = {"precompute_reference": True, "reference_cache_dir": cache}
    in_process_fit(assets, tmp_path / "padded", **common)
    stored = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(stored) == 2  # train and val
    caplog.clear()
    in_process_fit(assets, tmp_path / "packed", data={"packing": True, "share_prompt": True}, **common)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == stored
    assert "reference log-probs (train): reusing" in caplog.text and "re-scored" in caplog.text
    assert_same_curves(tmp_path / "packed", tmp_path / "padded")


def test_fsdp2_packed_shared_run_matches_the_padded_one(assets):
    """FSDP2 over 2 processes (the shared helpers.fsdp_run, padded) and the same run with packing + share_prompt:
    train loss, reward margins and validation loss agree within 1e-5 at every step (so do the gradients the steps
    took), with the reference live every step. One launch (the padded run is shared with test_strategy)."""
    layout = ("--data.packing", "true", "--data.share_prompt", "true")
    packed = shared_run(assets, "fsdp_2x4_packed_shared", *FSDP, *layout)
    assert_same_curves(packed, fsdp_run(assets))
