"""`peftlab doctor`: look at a recipe before spending GPU hours on it.

Shows what the loss sees (one example with masked and trained tokens marked), how many tokens are
masked, lengths and truncation, runs one forward+backward, counts parameters and estimates peak memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from peftlab.config import Recipe
from peftlab.data.instructions import IGNORE_INDEX, adds_bos
from peftlab.tasks.common import announce
from peftlab.watch.console import say

GIB = 1024**3
# Real data has a long tail (Dolly at the seed's 768 tokens: ~2% of prompts alone fill it, ~4% are cut):
# a few such rows are normal, this many means max_length is wrong for the data.
MAX_DROPPED_RATE = 0.05
MAX_TRUNCATION_RATE = 0.2
# A response-less row trains only the end-of-sequence token: a few are noise, many teach the model to stop at once.
MAX_EMPTY_RATE = 0.05


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


def estimate_memory(model: Any, recipe: Recipe, act_bytes: int) -> MemoryEstimate:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    b, s, h = recipe.train.batch_size, recipe.data.max_length, cfg.hidden_size
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    # Per-layer activations of a transformer block (Korthikanti et al. 2022, 16-bit): 34*s*b*h + 5*a*s^2*b
    # bytes; scaled by the activation width. With checkpointing only each block's input is kept, plus
    # one block recomputed at a time.
    per_layer = (34 * s * b * h + 5 * heads * s * s * b) * act_bytes / 2
    if recipe.train.gradient_checkpointing:
        activations = layers * s * b * h * act_bytes + per_layer
    else:
        activations = layers * per_layer
    logits = 2 * b * s * cfg.vocab_size * 4  # fp32 logits and their gradient
    return MemoryEstimate(
        weights_gib=weights / GIB,
        trainable_state_gib=trainable * 16 / GIB,  # fp32 weight + grad + two AdamW moments
        activations_gib=activations / GIB,
        logits_gib=logits / GIB,
    )


@dataclass
class Checkup:
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, good: str, bad: str) -> None:
        say(("ok    " if ok else "FAIL  ") + (good if ok else bad))
        if not ok:
            self.problems.append(bad)


def show_example(tokenizer: Any, example: dict[str, Any]) -> None:
    ids, labels = example["input_ids"], example["labels"]
    masked = [i for i, label in zip(ids, labels, strict=True) if label == IGNORE_INDEX]
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    say(f"example: {len(masked)} prompt tokens masked (-100), {len(trained)} tokens trained")
    say("  masked  | " + tokenizer.decode(masked).replace("\n", "\n          | "))
    say("  TRAINED | " + tokenizer.decode(trained).replace("\n", "\n          | "))


def forward_backward(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[float, bool]:
    """Loss of one padded batch and whether every LoRA gradient is finite."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = tokenizer.pad_token_id

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], device=model.device)

    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows], device=model.device)
    model.train()
    out = model(input_ids=padded("input_ids", pad), attention_mask=mask, labels=padded("labels", IGNORE_INDEX))
    out.loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return float(out.loss.detach()), grads_finite


def run_doctor(recipe: Recipe) -> list[str]:
    """Print the checkup; return the list of problems (empty = healthy)."""
    from peftlab.tasks import sft

    if recipe.task == "diffusion":  # images and a UNet: its own checks
        from peftlab.tasks.diffusion import doctor

        return doctor(recipe)
    if recipe.task == "classify":  # labels, not masked tokens
        from peftlab.tasks.classify import doctor as classify_doctor

        return classify_doctor(recipe)
    setup = sft.build(recipe)
    c, s = setup.context, setup.data.stats
    announce(recipe, c, setup.params, setup.notes)
    show_example(setup.tokenizer, setup.data.train[0])
    up = Checkup()
    say(f"lengths (tokens, after truncation at {recipe.data.max_length}): mean {s.tokens_mean}, median {s.tokens_median}, "
        f"p90 {s.tokens_p90}, max {s.tokens_max}; truncated {s.truncated}/{s.rows} ({100 * s.truncation_rate:.1f}%)")
    total = s.trained_tokens + s.masked_tokens
    say(f"label tokens over {s.rows} rows: {s.trained_tokens} trained, {s.masked_tokens} masked "
        f"({100 * s.masked_tokens / max(total, 1):.1f}% masked)")
    dropped = s.dropped_fully_masked / max(s.rows, 1)
    up.check(dropped <= MAX_DROPPED_RATE,
             f"{s.dropped_fully_masked}/{s.rows} examples fully masked and dropped ({100 * dropped:.1f}% <= "
             f"{100 * MAX_DROPPED_RATE:.0f}%)",
             f"{s.dropped_fully_masked}/{s.rows} examples ({100 * dropped:.1f}%) have every label masked (prompt fills "
             "data.max_length) and are dropped: raise data.max_length")
    empty = s.empty_responses / max(s.rows, 1)
    up.check(empty <= MAX_EMPTY_RATE, f"{s.empty_responses}/{s.rows} responses empty ({100 * empty:.1f}% <= "
             f"{100 * MAX_EMPTY_RATE:.0f}%)",
             f"{s.empty_responses}/{s.rows} responses ({100 * empty:.1f}%) are empty and train the end-of-sequence token "
             "alone: check data.columns.response")
    first = setup.data.train[0]["input_ids"]
    bos = setup.tokenizer.bos_token_id
    up.check(not (len(first) > 1 and first[0] == first[1] == bos and adds_bos(setup.tokenizer)),
             "prompts start with at most one BOS", "prompts start with <bos><bos>: drop the BOS from data.template")
    up.check(s.truncation_rate < MAX_TRUNCATION_RATE,
             f"truncation rate {100 * s.truncation_rate:.1f}% < {100 * MAX_TRUNCATION_RATE:.0f}%",
             f"{100 * s.truncation_rate:.1f}% of examples are truncated: raise data.max_length")
    batch = [setup.data.train[i] for i in range(min(recipe.train.batch_size, len(setup.data.train)))]
    loss, grads_ok = forward_backward(setup.model, setup.tokenizer, batch)
    up.check(math.isfinite(loss) and loss > 0, f"forward: loss {loss:.4f} is finite and > 0",
             f"forward: loss {loss} is not finite and > 0 (see the guard's causes: precision, attention, masking)")
    up.check(grads_ok, "backward: all LoRA gradients finite", "backward: non-finite LoRA gradients")
    act_bytes = 4 if c.precision == "fp32" else 2
    est = estimate_memory(setup.model, recipe, act_bytes)
    say(f"memory estimate at batch {recipe.train.batch_size} x {recipe.data.max_length} tokens: ~{est.total_gib:.2f} GiB "
        f"(weights {est.weights_gib:.2f}, LoRA params+grads+AdamW {est.trainable_state_gib:.2f}, "
        f"activations {est.activations_gib:.2f}, logits {est.logits_gib:.2f})")
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0] / GIB
        up.check(est.total_gib < free, f"fits: {free:.1f} GiB free on the GPU",
                 f"estimate {est.total_gib:.1f} GiB > {free:.1f} GiB free: lower train.batch_size or data.max_length, "
                 "turn on train.gradient_checkpointing, or use method.name=qlora")
    return up.problems
