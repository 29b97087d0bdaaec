"""Sequence log-probs on hand-built logits, labels and masks."""

import math

import pytest
import torch

from dpo_lightning.logps import IGNORE_INDEX, sequence_logps, token_logps

X = IGNORE_INDEX


def _logits_favouring(targets: list[list[int]], vocab: int = 4, strong: float = 2.0) -> torch.Tensor:
    """Logits where position t puts ``strong`` on token targets[b][t] and 0 elsewhere.

    So log p(target) = strong − log(e^strong + (V−1)) and log p(other) = −log(e^strong + (V−1)).
    """
    B, T = len(targets), len(targets[0])
    logits = torch.zeros(B, T, vocab)
    for b in range(B):
        for t in range(T):
            logits[b, t, targets[b][t]] = strong
    return logits


def test_hand_built_batch_sum_and_mean():
    """Two sequences, T = 5, V = 4. Labels (already containing the input ids):
      row 0: [X, X, 2, 3, X]   prompt of 2 tokens, response 2 tokens, 1 pad
      row 1: [X, 1, 0, 0, 0]   prompt of 1 token, response 4 tokens, no pad
    After the shift, position t scores label t+1. Logits favour token 2 at t=1 and token 0 at t=2 in row 0
    (so label 2 is favoured, label 3 is not); in row 1 they favour the label everywhere.
    With Z = e² + 3: favoured = 2 − ln Z, other = −ln Z.
      row 0 sum = (2 − ln Z) + (−ln Z) = 2 − 2 ln Z,   mean over 2 tokens
      row 1 sum = 4 (2 − ln Z) = 8 − 4 ln Z,           mean over 4 tokens
    """
    labels = torch.tensor([[X, X, 2, 3, X], [X, 1, 0, 0, 0]])
    logits = _logits_favouring([[0, 2, 0, 0, 0], [1, 0, 0, 0, 0]])
    z = math.log(math.exp(2.0) + 3)
    total, n = sequence_logps(logits, labels, "sum")
    assert n.tolist() == [2, 4]
    assert total.tolist() == pytest.approx([2 - 2 * z, 8 - 4 * z], abs=1e-5)
    mean, _ = sequence_logps(logits, labels, "mean")
    assert mean.tolist() == pytest.approx([(2 - 2 * z) / 2, (8 - 4 * z) / 4], abs=1e-5)


def test_padding_and_prompt_logits_do_not_matter():
    """Changing logits at masked positions (prompt, padding) must not change the result."""
    torch.manual_seed(0)
    labels = torch.tensor([[X, X, 1, 2, X, X]])
    logits = torch.randn(1, 6, 5)
    before, _ = sequence_logps(logits, labels)
    logits[0, 0] += 100.0  # predicts label 1, which is X: prompt
    logits[0, 4:] = torch.randn(2, 5) * 50  # predict pad positions / past the end
    after, _ = sequence_logps(logits, labels)
    assert torch.allclose(before, after)


def test_matches_full_log_softmax():
    """gather − logsumexp equals the textbook log_softmax gather, in float32 and (row-wise) bfloat16."""
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logps(logits, labels), expected, atol=1e-5)
    bf16 = token_logps(logits.bfloat16(), labels)
    ref16 = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert bf16.dtype == torch.float32
    assert torch.allclose(bf16, ref16, atol=1e-2)


def test_bad_aggregation_and_shapes():
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        sequence_logps(torch.zeros(1, 3, 2), torch.zeros(1, 3, dtype=torch.long), "max")
    with pytest.raises(ValueError, match="disagree"):
        sequence_logps(torch.zeros(1, 3, 2), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_response_only_output_layer_matches_full_logits(aggregation):
    """Running the output layer only at response positions changes which rows the matmul sees, not the maths:
    log-probs equal sequence_logps over the full (B, T, V) logits, and so do their gradients w.r.t. the weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo_lightning.logps import response_logps

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_layer=2, n_embd=32, n_head=2, n_positions=16)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # two forwards must see the same network
    model = GPT2LMHeadModel(config)
    input_ids = torch.randint(0, 50, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding in row 1
    labels = input_ids.clone()
    labels[:, :3] = X  # prompt
    labels[1, 7:] = X  # padding
    labels[2, :6] = X  # a longer prompt

    full, _ = sequence_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels, aggregation)
    (grad_full,) = torch.autograd.grad(full.sum(), model.transformer.wte.weight)
    fast = response_logps(model, input_ids, attention_mask, labels, aggregation)
    (grad_fast,) = torch.autograd.grad(fast.sum(), model.transformer.wte.weight)
    assert torch.allclose(fast, full, atol=1e-5)
    assert torch.allclose(grad_fast, grad_full, atol=1e-5)
    assert not model.lm_head._forward_pre_hooks  # the hook is gone after the call


def test_a_minus_inf_logit_at_a_masked_position_leaves_the_sums_finite():
    """A -inf logit where nothing is scored (a prompt position, a padding position, or the masked token 0 that
    IGNORE_INDEX labels are clamped to) must not reach the sum: -inf · 0 is NaN, so masking multiplies nothing.
    Row 0: labels [X, X, 2, 3]; the logit of token 0 (the clamped label) at position 0 (predicting a prompt label) is
    -inf. Row 1: the same at a padding position. With all other logits 0, each scored token has log p = −ln V,
    so both sums are 2 · (−ln 5); the gradient is finite too."""
    labels = torch.tensor([[X, X, 2, 3], [X, 1, 2, X]])
    logits = torch.zeros(2, 4, 5, requires_grad=True)
    planted = logits.detach().clone()
    planted[0, 0, 0] = -math.inf  # position 0 predicts label 1 = X (prompt)
    planted[1, 2, 0] = -math.inf  # position 2 predicts label 3 = X (padding)
    planted.requires_grad_(True)
    total, n = sequence_logps(planted, labels, "sum")
    assert n.tolist() == [2, 2]
    assert total.tolist() == pytest.approx([-2 * math.log(5)] * 2, abs=1e-6)
    mean, _ = sequence_logps(planted, labels, "mean")
    assert mean.tolist() == pytest.approx([-math.log(5)] * 2, abs=1e-6)
    total.sum().backward()
    assert torch.isfinite(planted.grad).all()
