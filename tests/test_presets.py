"""Presets behave like their real counterparts where training depends on it: special-token ids agree with the
tokenizer, and no EOS sits on a zeroed padding row (issue 12 item 6: the tiny Gemma-2 twin could not stop)."""

from __future__ import annotations

import pytest
import torch

from peftlab.config import ModelConfig
from peftlab.models import loader, presets

TINY = [name for name, p in presets.PRESETS.items() if name.startswith("tiny-")]


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_config_agrees_with_its_tokenizer(name):
    config = loader.load_model_config(ModelConfig(source=f"preset:{name}"))
    tokenizer = presets.bundled_tokenizer(presets.PRESETS[name].tokenizer)
    assert config.eos_token_id == tokenizer.eos_token_id and config.bos_token_id == tokenizer.bos_token_id
    # the padding row (nn.Embedding padding_idx) is zero and never trained: never on a token the model must emit
    assert config.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert config.vocab_size >= len(tokenizer)


@pytest.mark.parametrize("name", TINY)
def test_tiny_twins_can_learn_to_emit_eos(name):
    torch.manual_seed(0)
    model = loader.load_causal_lm(ModelConfig(source=f"preset:{name}"), torch.float32, "eager")
    eos = presets.bundled_tokenizer(presets.PRESETS[name].tokenizer).eos_token_id
    assert model.get_input_embeddings().weight[eos].abs().sum() > 0
    inputs = torch.randint(1, 4000, (4, 12))
    logits = model(input_ids=inputs).logits[:, -1, eos]
    assert logits.std() > 1e-3, logits  # the EOS logit depends on the input, not pinned at a constant

    # a few steps on "emit EOS here" raise its logit (LoRA-free: the output row itself must be trainable)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = torch.log_softmax(model(input_ids=inputs).logits[:, -1], -1)[:, eos].mean().item()
    for _ in range(5):
        loss = -torch.log_softmax(model(input_ids=inputs).logits[:, -1], -1)[:, eos].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = torch.log_softmax(model(input_ids=inputs).logits[:, -1], -1)[:, eos].mean().item()
    assert after > before + 0.5, (before, after)
