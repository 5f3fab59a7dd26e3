"""GGUF checkpoints are dequantized on load; the leftover quantizer marker must not stop training."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from peftlab.errors import PeftlabError
from peftlab.models.gguf import forget_gguf_quantizer


def tiny_model() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))


def test_a_dequantized_gguf_model_loses_its_quantizer_marker() -> None:
    from transformers.trainer_utils import validate_quantization_for_training

    model = tiny_model()
    model.hf_quantizer, model.is_quantized, model.quantization_method = object(), True, "gguf"
    forget_gguf_quantizer(model)
    assert model.hf_quantizer is None and not model.is_quantized
    validate_quantization_for_training(model)  # what the Trainer runs: no "quantized with GGUF" refusal


def test_weights_left_in_gguf_blocks_are_a_clear_error() -> None:
    model = tiny_model()
    model.register_parameter("packed", torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False))
    with pytest.raises(PeftlabError, match="GGUF blocks"):
        forget_gguf_quantizer(model)
