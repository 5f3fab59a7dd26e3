"""Model FLOPs and MFU, with the formula of the plain-stack reference (../shared/bench-hf/sft_gemma2.py
`model_flops`), so that peftlab's MFU and the reference's compare directly.

Per token: (2 forward + 2 activation-gradient [+ 2 recompute with activation checkpointing]) x N_layers
         + (2 + 2) x N_head                        (LM head: vocab x hidden, a real matmul even when tied)
Per document of length L: (4 forward + 8 backward [+ 4 recompute]) x layers x heads x head_dim x L^2 (attention)
N_layers = parameters of the decoder layers' linear maps. Frozen weights get no weight-gradient FLOPs; LoRA's
own FLOPs (<1%) are not counted. MFU = FLOPs / seconds / (GPUs x peak); peak = 989 TFLOP/s (H100/H200 dense bf16).
"""

from __future__ import annotations

from typing import Any

PEAK_FLOPS = 989.4e12  # H100/H200 SXM dense bf16 (datasheet, without sparsity), as bench-hf/common.py


def layer_shapes(config: Any) -> tuple[int, int, int]:
    """(layers, linear-map parameters of one layer, query width heads x head_dim) for Gemma 2/3 and GPT-2."""
    if config.model_type == "gpt2":
        h = config.n_embd
        inner = config.n_inner or 4 * h
        return config.n_layer, 4 * h * h + 2 * h * inner, h
    h = config.hidden_size
    qd, kvd = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    return config.num_hidden_layers, h * qd + 2 * h * kvd + qd * h + 3 * h * config.intermediate_size, qd


def model_flops(config: Any, tokens: int, sum_sq: int, checkpointing: bool, lm_head: bool = True) -> float:
    """FLOPs of training on `tokens` tokens whose documents' squared lengths sum to `sum_sq` (formula above).
    lm_head=False for classification (the score head is negligible)."""
    layers, per_layer, qd = layer_shapes(config)
    n_layers = layers * per_layer
    n_head = config.vocab_size * (config.n_embd if config.model_type == "gpt2" else config.hidden_size) if lm_head else 0
    dense = ((6 if checkpointing else 4) * n_layers + 4 * n_head) * tokens
    attention = (16 if checkpointing else 12) * layers * qd * sum_sq
    return float(dense + attention)


def mfu(flops: float, seconds: float, gpus: int = 1, peak: float = PEAK_FLOPS) -> float:
    """Model FLOPs utilisation per GPU: `flops` done by `gpus` GPUs together in `seconds`, over their summed peak."""
    return flops / seconds / (gpus * peak)
