"""Fast engine losses: the chunked LM loss equals full-logit cross-entropy (value and gradient), with and without
Gemma-2's final softcap; the pooled classification loss equals GPT2ForSequenceClassification's."""

from __future__ import annotations

import pytest
import torch

from peftlab.engines.fast import chunked_lm_loss, classification_loss
from peftlab.engines.fast.loss import full_lm_loss
from peftlab.engines.fast.packing import IGNORE_INDEX


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_lm_loss_equals_full_logit_cross_entropy(softcap, chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v = 50, 16, 300
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g)  # frozen head; large logits so the softcap saturates
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = IGNORE_INDEX
    weights = torch.rand(n, generator=g)
    got = chunked_lm_loss(hidden, weight, targets, weights, softcap, chunk)
    (grad_got,) = torch.autograd.grad(3.0 * got, hidden)
    want = full_lm_loss(hidden, weight, targets, weights, softcap)
    (grad_want,) = torch.autograd.grad(3.0 * want, hidden)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5)
    assert torch.allclose(grad_got, grad_want, rtol=1e-5, atol=1e-5)  # fp32 rounding of |grad| ~ 10
    assert grad_got[::4].abs().max() == 0  # an ignored target gets no gradient


def test_chunked_lm_loss_refuses_a_trained_head():
    with pytest.raises(ValueError, match="frozen"):
        chunked_lm_loss(torch.randn(2, 4), torch.randn(8, 4, requires_grad=True), torch.zeros(2, dtype=torch.long),
                        torch.ones(2))


def test_classification_loss_equals_the_models_own():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, num_labels=5, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2ForSequenceClassification(config).eval()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])  # right padding with the pad id, as the collator makes it
    labels = torch.tensor([3, 1])
    out = model(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)
    hidden = torch.cat([model.transformer(input_ids=ids[:1, :3]).last_hidden_state[0],
                        model.transformer(input_ids=ids[1:, :2]).last_hidden_state[0]])
    got = classification_loss(hidden, model.score, torch.tensor([2, 4]), labels, torch.full((2,), 0.5))
    assert torch.allclose(got, out.loss, rtol=1e-6, atol=1e-6)
