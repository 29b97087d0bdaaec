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


def _tiny_head(hidden: int = 8, vocab: int = 37) -> torch.nn.Linear:
    """An output layer with a bias; token 0 gets a -inf bias, so it is never predicted and never a target."""
    torch.manual_seed(1)
    head = torch.nn.Linear(hidden, vocab)
    with torch.no_grad():
        head.bias[0] = -math.inf
    return head


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12, 50])  # N = 12: divides, does not, one chunk, larger than N
def test_chunked_token_logps_equal_one_shot_values_and_gradients(chunk_size):
    """Chunking the output layer + gather − logsumexp over positions changes which rows a matmul sees, not the
    maths: per-position log-probs and their gradients w.r.t. the hidden states, the output weight and its bias
    equal token_logps over the one-shot (N, V) logits (fp32, 1e-6), for a random upstream gradient. A -inf logit
    (token 0's bias) is in every row's logsumexp and leaves everything finite; a -inf *target* (row 3's label is
    token 0) gives -inf in both, and its row's gradient stays finite."""
    from dpo_lightning.logps import chunked_token_logps

    head = _tiny_head()
    hidden = torch.randn(12, 8, requires_grad=True)
    targets = torch.randint(1, 37, (12,))
    upstream = torch.randn(12)
    one_shot = token_logps(head(hidden).unsqueeze(0), targets.unsqueeze(0)).squeeze(0)
    wanted = torch.autograd.grad((one_shot * upstream).sum(), (hidden, head.weight, head.bias))
    chunked = chunked_token_logps(head, hidden, targets, chunk_size)
    got = torch.autograd.grad((chunked * upstream).sum(), (hidden, head.weight, head.bias))
    assert chunked.shape == (12,) and torch.isfinite(chunked).all()
    assert torch.allclose(chunked, one_shot, atol=1e-6, rtol=0)
    for g, w in zip(got, wanted, strict=True):
        assert torch.isfinite(g).all() and torch.allclose(g, w, atol=1e-6, rtol=0)

    targets[3] = 0  # the -inf logit is now a target
    inf_chunked = chunked_token_logps(head, hidden, targets, chunk_size)
    inf_one_shot = token_logps(head(hidden).unsqueeze(0), targets.unsqueeze(0)).squeeze(0)
    assert inf_chunked[3] == -math.inf and inf_one_shot[3] == -math.inf
    keep = torch.arange(12) != 3
    assert torch.allclose(inf_chunked[keep], inf_one_shot[keep], atol=1e-6, rtol=0)
    (g_hidden,) = torch.autograd.grad(inf_chunked[keep].sum(), hidden)
    assert torch.isfinite(g_hidden).all()
    with torch.no_grad():  # the reference's path: no checkpoint, the same numbers
        assert torch.allclose(chunked_token_logps(head, hidden, targets, chunk_size)[keep], inf_one_shot[keep])


@pytest.mark.parametrize(("aggregation", "chunk_size"), [("sum", 1), ("sum", 4), ("mean", 7), ("mean", 64)])
def test_chunked_response_logps_equal_one_shot_on_a_model(aggregation, chunk_size):
    """response_logps with chunk_size equals the one-shot response-only head (itself tested against the full
    logits above) on a tiny GPT-2 with prompt, padding and a row with no response token at all (its sum is 0):
    values and gradients w.r.t. the tied output weight (= the embeddings) and the final norm, which the hidden
    states pass through (fp32, 1e-5 as the test above: sums near -20 and gradients summed over two layers
    differ in their float32 rounding, up to 1.9e-6; the head alone is held to 1e-6 above). The 14 scored
    positions (6 + 4 + 4) make chunk 7 divide and 4 not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo_lightning.logps import response_logps

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_layer=2, n_embd=32, n_head=2, n_positions=16)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    model = GPT2LMHeadModel(config)
    input_ids = torch.randint(0, 50, (4, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    labels = input_ids.clone()
    labels[:, :3] = X
    labels[1, 7:] = X
    labels[2, :5] = X  # a longer prompt
    labels[3, :] = X  # nothing scored in row 3
    assert (labels[:, 1:] != X).sum() == 14
    params = (model.transformer.wte.weight, model.transformer.ln_f.weight)

    one_shot = response_logps(model, input_ids, attention_mask, labels, aggregation)
    wanted = torch.autograd.grad((one_shot * torch.arange(1.0, 5.0)).sum(), params)
    chunked = response_logps(model, input_ids, attention_mask, labels, aggregation, chunk_size)
    got = torch.autograd.grad((chunked * torch.arange(1.0, 5.0)).sum(), params)
    assert chunked[3] == 0
    assert torch.allclose(chunked, one_shot, atol=1e-5, rtol=0)
    for g, w in zip(got, wanted, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=0)
    assert "forward" not in model.lm_head.__dict__  # the output layer's own forward is back

    nothing = torch.full_like(labels, X)  # no response token in the whole batch
    assert response_logps(model, input_ids, attention_mask, nothing, aggregation, chunk_size).tolist() == [0.0] * 4


def test_chunked_head_refuses_a_model_that_changes_logits_after_its_output_layer():
    """A step after the output layer (here a hook doubling the logits, as softcapping or a logit scale would
    change them) is not in the chunked head's maths: a ConfigError naming model.logp_chunk_size, not wrong
    log-probs; a chunk size below 1 is one too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo_lightning.errors import ConfigError
    from dpo_lightning.logps import response_logps

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_layer=1, n_embd=16, n_head=2, n_positions=8))
    input_ids = torch.randint(0, 50, (2, 6))
    labels = input_ids.clone()
    labels[:, :2] = X
    with pytest.raises(ConfigError, match="logp_chunk_size"):
        response_logps(model, input_ids, torch.ones_like(input_ids), labels, "sum", 0)
    model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(ConfigError, match="logp_chunk_size.*after its output layer"):
        response_logps(model, input_ids, torch.ones_like(input_ids), labels, "sum", 3)


def test_preference_module_passes_logp_chunk_size_to_the_head(assets, tiny_tokenizer):
    """``model.logp_chunk_size`` reaches the policy's and the reference's head: on a collated batch of the test
    pairs the loss and the policy's gradients equal the one-shot module's (fp32, 1e-5), and the chunked head is
    the one that ran (its swapped forward is seen). Without ``score_response_only`` it is a ConfigError."""
    from dpo_lightning.errors import ConfigError
    from dpo_lightning.module import PreferenceModule
    from tests.helpers import make_datamodule

    dm = make_datamodule(assets / "train.jsonl", tiny_tokenizer, setup=True)
    rows = dm.datasets["train"].select_columns(dm.loader_columns).with_format(None)
    batch = dm.collator()([rows[i] for i in range(4)])
    losses, grads = [], []
    for chunk in (None, 5):
        torch.manual_seed(0)
        module = PreferenceModule(policy=str(assets / "policy"), tokenizer=dm.tokenizer, logp_chunk_size=chunk)
        swapped = []
        for model in (module.policy, module.reference):
            head = model.get_output_embeddings()
            head.register_forward_pre_hook(lambda m, args, seen=swapped: seen.append("forward" in m.__dict__))
        loss, _ = module.model_step(batch)
        loss.backward()
        assert swapped == [chunk is not None] * 2  # the policy's head, then the reference's
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None]))
    assert torch.allclose(losses[1], losses[0], atol=1e-5, rtol=0)
    assert torch.allclose(grads[1], grads[0], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="logp_chunk_size.*score_response_only"):
        PreferenceModule(
            policy=str(assets / "policy"), tokenizer=dm.tokenizer, score_response_only=False, logp_chunk_size=5
        )


def test_score_triples_of_a_padded_batch():
    """The padded batch as (source, target, sequence) triples: labels (T = 5)
      row 0: [X, X, 2, 3, X]  -> position 1 predicts 2, position 2 predicts 3: sources 0·5 + 1 = 1, 2
      row 1: [X, 1, 0, 0, 0]  -> positions 0..3 predict 1, 0, 0, 0: sources 5 + 0..3 = 5, 6, 7, 8
    in row-major order (the order ``hidden[:, :-1][mask]`` selected before triples), sequence = the row; summed
    by sequence they give sequence_logps's sums (the hand-built batch of the first test)."""
    from dpo_lightning.logps import gathered_logps, score_triples

    labels = torch.tensor([[X, X, 2, 3, X], [X, 1, 0, 0, 0]])
    source, target, sequence = score_triples(labels)
    assert source.tolist() == [1, 2, 5, 6, 7, 8]
    assert target.tolist() == [2, 3, 1, 0, 0, 0]
    assert sequence.tolist() == [0, 0, 1, 1, 1, 1]
    logits = _logits_favouring([[0, 2, 0, 0, 0], [1, 0, 0, 0, 0]])
    want, _ = sequence_logps(logits, labels, "sum")
    assert torch.allclose(gathered_logps(logits, (source, target, sequence), 2), want, atol=1e-6)
