"""Losses of the fast engine: the LM head + cross-entropy chunked over tokens, and pooled classification.

Chunked LM loss: the full [tokens x vocab] logits (for Gemma-2, 256k columns: 4 GiB in fp32 for 4k tokens)
never exist; each chunk's logits are built, turned into its loss and into the gradient w.r.t. the hidden states
at once (the LM head is frozen under LoRA, so no weight gradient is needed), and dropped. The head then costs
one forward and one backward matmul, as the MFU formula counts it. Gemma-2's final-logit softcap
(z = cap * tanh(x / cap)) is kept, in fp32 as transformers computes the loss. Liger's fused linear CE has no
softcap support for every family and is not in the GPU image; this is a few lines of torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from peftlab.engines.fast.packing import IGNORE_INDEX

DEFAULT_CHUNK = 4096
ChunkCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "float | None"], tuple[torch.Tensor, torch.Tensor]]


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                         softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [C, V], targets [C] (-100 = none), weights [C] -> (sum_i w_i CE_i in fp32, d/d logits [C, V])."""
    x = logits.float()
    if softcap:
        t = torch.tanh(x / softcap)
        z = t * softcap
    else:
        z = x
    log_probs = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    w = torch.where(valid, weights, torch.zeros_like(weights))
    loss = -(log_probs.gather(1, safe[:, None]).squeeze(1) * w).sum()
    grad = torch.exp(log_probs)
    grad.scatter_add_(1, safe[:, None], -torch.ones_like(w)[:, None])
    grad *= w[:, None]
    if softcap:
        grad *= 1.0 - t * t
    return loss, grad.to(logits.dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(softcap(h_i @ W^T), t_i), with the gradient w.r.t. h built chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, softcap, chunk, core):  # noqa: D102
        grad_hidden = torch.empty_like(hidden)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = hidden[start:end] @ weight.t()
            part, grad_logits = core(logits, targets[start:end], weights[start:end], softcap)
            loss = loss + part
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
        ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                    target_weights: torch.Tensor, softcap: float | None = None,
                    chunk: int = DEFAULT_CHUNK, core: ChunkCore | None = None) -> torch.Tensor:
    """Weighted LM loss without materialising all logits.

    hidden [N, H] (the decoder's last hidden states), head_weight [V, H] (frozen LM head / tied embedding),
    targets [N] int64 (-100 = no target), target_weights [N] float32 -> scalar fp32 sum_i w_i CE_i.
    With w_i = 1 / (trained tokens of the optimizer step) this is transformers' ForCausalLMLoss with
    num_items_in_batch. `core`: the per-chunk function (chunk_loss_and_grad, or a torch.compile of it that fuses
    its elementwise passes over the [chunk x vocab] logits). Errors: ValueError when the head weight requires
    grad (this function gives it none).
    """
    if head_weight.requires_grad:
        raise ValueError("chunked_lm_loss gives the LM head no gradient; it must be frozen (LoRA does not train it)")
    return ChunkedLinearCrossEntropy.apply(hidden, head_weight, targets, target_weights, softcap, chunk,
                                           core or chunk_loss_and_grad)


def full_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                 target_weights: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Reference for tests: the same loss from the full [N, V] logits (what transformers' models do)."""
    logits = (hidden @ head_weight.t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    per_token = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return (per_token * target_weights).sum()


def classification_loss(hidden: torch.Tensor, head: torch.nn.Module, pooled_positions: torch.Tensor,
                        class_labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """hidden [T, H] of a packed row; the last-token state of each document (pooled_positions [D]) -> the score
    head -> [D, C] logits -> sum_d w_d CE_d (fp32 scalar). GPT2ForSequenceClassification pools the same token
    and computes the same CE; w_d = 1 / rows of the recipe micro-batch (packing.py says why)."""
    logits = head(hidden[pooled_positions]).float()
    per_row = F.cross_entropy(logits, class_labels, reduction="none")
    return (per_row * class_weights).sum()
