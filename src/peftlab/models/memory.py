"""Peak training memory of a loaded model, estimated before training (doctor, the OOM advice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3


@dataclass
class MemoryEstimate:
    """Peak training memory, from the loaded model's real tensor sizes plus an activation formula."""

    weights_gib: float
    trainable_state_gib: float
    activations_gib: float
    logits_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.trainable_state_gib + self.activations_gib + self.logits_gib


def estimate_memory(model: Any, batch_size: int, max_length: int, gradient_checkpointing: bool,
                    act_bytes: int) -> MemoryEstimate:
    """GiB of a causal LM's training step at `batch_size` rows of `max_length` tokens, activations of
    `act_bytes` bytes (2 for bf16/fp16, 4 for fp32)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    b, s, h = batch_size, max_length, cfg.hidden_size
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    # Per-layer activations of a transformer block (Korthikanti et al. 2022, 16-bit): 34*s*b*h + 5*a*s^2*b
    # bytes; scaled by the activation width. With checkpointing only each block's input is kept, plus
    # one block recomputed at a time.
    per_layer = (34 * s * b * h + 5 * heads * s * s * b) * act_bytes / 2
    activations = layers * s * b * h * act_bytes + per_layer if gradient_checkpointing else layers * per_layer
    logits = 2 * b * s * cfg.vocab_size * 4  # fp32 logits and their gradient
    return MemoryEstimate(
        weights_gib=weights / GIB,
        trainable_state_gib=trainable * 16 / GIB,  # fp32 weight + grad + two AdamW moments
        activations_gib=activations / GIB,
        logits_gib=logits / GIB,
    )
