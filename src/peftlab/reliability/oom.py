"""Out of GPU memory: one line that says which recipe knobs lower memory, biggest consumer first.

The ranking comes from the memory estimate the task recorded in summary.json before training
(`models.memory.estimate_memory`'s breakdown: weights, LoRA params + grads + AdamW, activations, logits).
"""

from __future__ import annotations

from typing import Any

from peftlab.config import Recipe


def _knobs(recipe: Recipe) -> dict[str, list[str]]:
    """Per part of the estimate, the recipe changes that shrink it."""
    t, lora = recipe.train, recipe.method.lora
    batch = (f"train.batch_size={max(t.batch_size // 2, 1)} with train.grad_accum={t.grad_accum * 2} "
             "(same effective batch)") if t.batch_size > 1 else None
    length = f"data.max_length={max(recipe.data.max_length // 2, 1)}"
    checkpointing = None if t.gradient_checkpointing else "train.gradient_checkpointing=true"
    quantize = "method.name=qlora" if recipe.method.name == "lora" else None
    optimizer = None if "8bit" in t.optimizer else "train.optimizer=paged_adamw_8bit"
    rank = f"method.lora.r={max(lora.r // 2, 1)}" if lora.r > 1 else None
    parts = {
        "activations_gib": [batch, checkpointing, length],
        "logits_gib": [batch, length],
        "weights_gib": [quantize],
        "trainable_state_gib": [optimizer, rank],
    }
    return {part: [k for k in knobs if k] for part, knobs in parts.items()}


def memory_advice(recipe: Recipe, estimate: dict[str, Any] | None, error: BaseException) -> str:
    """The one-line message for an out-of-memory error during training."""
    knobs = _knobs(recipe)
    order = sorted(knobs, key=lambda part: -(estimate or {}).get(part, 0.0)) if estimate else list(knobs)
    ranked = list(dict.fromkeys(k for part in order for k in knobs[part]))
    first = str(error).splitlines()[0][:120] if str(error) else error.__class__.__name__
    where = ""
    if estimate:
        where = (f"; estimate ~{estimate.get('total_gib', 0):.1f} GiB = activations {estimate.get('activations_gib', 0):.1f}"
                 f" + logits {estimate.get('logits_gib', 0):.1f} + weights {estimate.get('weights_gib', 0):.1f}"
                 f" + LoRA/optimizer {estimate.get('trainable_state_gib', 0):.1f}")
    fix = ", ".join(ranked) if ranked else "use a GPU with more memory"
    return (f"out of GPU memory at train.batch_size={recipe.train.batch_size} x data.max_length={recipe.data.max_length} "
            f"({first}){where}; fix, biggest saving first: {fix} (`peftlab doctor` re-estimates)")
