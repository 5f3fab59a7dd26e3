"""Per-document causal attention over packed rows: flex attention block masks, per layer type.

The masks go to the model through transformers' own mask path: a BlockMask is a "prepared 4D mask" that
masking_utils returns as-is, and Gemma2/Gemma3 models take a dict {"full_attention": ..., "sliding_attention": ...}
keyed by `config.layer_types`, so transformers builds no mask of its own. Sliding layers get the same window
semantics as transformers (masking_utils.sliding_window_overlay: q - kv < window). Gemma-2's attention-logit
softcap reaches the attention function as `softcap` and becomes flex's score_mod there.

Why a registered attention function (ATTENTION_NAME) rather than attn_implementation="flex_attention" as is:
  * flex attention has no backward on the CPU (torch raises): there, training evaluates the SAME mask_mod
    densely (materialising [heads, T, T]; fine for the tiny twins the CPU runs), so CPU tests check the masks
    that the GPU uses;
  * flex has no attention-probability dropout, and transformers' flex_attention_forward raises when a model
    passes one (GPT-2's attn_pdrop is 0.1): the fast engine drops that dropout (residual and embedding dropout
    are kept) and `attention_dropout_note` says so.
Everything else is transformers' flex_attention_forward (its compiled flex kernel, its softcap score_mod).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

ATTENTION_NAME = "peftlab_packed"
MASK_KWARG = "packed_block_mask"
BLOCK_SIZE = 128  # flex's default block; the token budget is a multiple of it on the GPU

MaskMod = Callable[[Any, Any, torch.Tensor, torch.Tensor], torch.Tensor]


def document_mask_mod(document_ids: torch.Tensor, sliding_window: int | None = None) -> MaskMod:
    """mask_mod for flex attention: query q sees key kv iff both are in the same document (padding is its own
    segment, so no row is empty), kv <= q, and, on a sliding layer, q - kv < sliding_window."""

    def same_document_causal(b: Any, h: Any, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (document_ids[q] == document_ids[kv]) & (q >= kv)

    if sliding_window is None:
        return same_document_causal

    def same_document_sliding(b: Any, h: Any, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return same_document_causal(b, h, q, kv) & (q - kv < sliding_window)

    return same_document_sliding


def layer_windows(config: Any) -> dict[str, int | None]:
    """Attention window per layer type of a model config: {"full_attention": None, "sliding_attention": W} for
    Gemma 2/3 (from config.layer_types), {"full_attention": None} for models without layer types (GPT-2)."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    unknown = types - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"the fast engine has no mask for layer types {sorted(unknown)}")
    return {t: (config.sliding_window if t == "sliding_attention" else None) for t in sorted(types)}


class PackedMasks:
    """block_masks for every micro-batch of one token budget, reading ONE device buffer of document ids.

    Compiled code (the mask builder, the flex kernel inside compiled layers) then sees the same mask_mod
    functions at every micro-batch, whose document ids are a tensor input: no recompilation per micro-batch.
    `builder` may be torch.compile(create_block_mask) (building masks eagerly costs milliseconds of launches).
    """

    def __init__(self, config: Any, budget: int, device: torch.device, block_size: int = BLOCK_SIZE,
                 builder: Callable[..., BlockMask] = create_block_mask) -> None:
        self.document_ids = torch.full((budget,), -1, dtype=torch.int32, device=device)
        self.layer_types = bool(getattr(config, "layer_types", None))
        self.mask_mods = {t: document_mask_mod(self.document_ids, w) for t, w in layer_windows(config).items()}
        self.kw = dict(B=None, H=None, Q_LEN=budget, KV_LEN=budget, device=device, BLOCK_SIZE=block_size)
        self.builder = builder

    def __call__(self, document_ids: torch.Tensor) -> BlockMask | dict[str, BlockMask]:
        self.document_ids.copy_(document_ids, non_blocking=True)
        masks = {t: self.builder(mod, **self.kw) for t, mod in self.mask_mods.items()}
        return masks if self.layer_types else masks["full_attention"]


def block_masks(config: Any, document_ids: torch.Tensor, block_size: int = BLOCK_SIZE,
                builder: Callable[..., BlockMask] = create_block_mask) -> BlockMask | dict[str, BlockMask]:
    """The attention_mask argument for one packed row: a dict of BlockMasks per layer type when the config has
    layer types (Gemma 2/3), else one BlockMask (GPT-2). document_ids: [T] int32 on the model's device."""
    masks = PackedMasks(config, document_ids.shape[0], document_ids.device, block_size, builder)
    return masks(document_ids)


def mask_arguments(config: Any, masks: BlockMask | dict[str, BlockMask]) -> dict[str, Any]:
    """How the masks enter the backbone's forward. Gemma 2/3: as attention_mask (transformers' mask path).
    GPT-2 in transformers 5.23 reads `attention_mask.ndim`, which a BlockMask lacks; its forward passes extra
    keyword arguments down to the attention function, so the mask travels as MASK_KWARG and attention_mask
    stays None (transformers then builds no mask for an attention it does not know)."""
    if isinstance(masks, dict):
        return {"attention_mask": masks}
    return {MASK_KWARG: masks}


def _dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
                     scaling: float | None, softcap: float | None) -> torch.Tensor:
    """The block mask's mask_mod and the softcap evaluated densely; same math as flex (score = q.k * scale,
    then softcap, then mask). q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, T, Hq, D]."""
    T = query.shape[-2]
    index = torch.arange(T, device=query.device)
    allowed = block_mask.mask_mod(0, 0, index[:, None], index[None, :])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    return out.transpose(1, 2).contiguous()


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: BlockMask | None, scaling: float | None = None, softcap: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q [B, Hq, T, D], k/v [B, Hkv, T, D], attention_mask a BlockMask (or
    None and the BlockMask in kwargs[MASK_KWARG]) -> ([B, T, Hq, D], None). `dropout` is ignored (module doc)."""
    if attention_mask is None:
        attention_mask = kwargs.pop(MASK_KWARG, None)
    kwargs.pop(MASK_KWARG, None)
    if not isinstance(attention_mask, BlockMask):
        raise TypeError("packed attention needs a flex BlockMask (fast engine batches); got "
                        f"{type(attention_mask).__name__}")
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if query.device.type == "cpu" and needs_grad:
        return _dense_attention(query, key, value, attention_mask, scaling, softcap), None
    if query.device.type == "cpu":  # forward only: flex's unfused CPU path, no compile (tests stay quick)
        score_mod = None
        if softcap:
            def score_mod(score, b, h, q, kv):
                return softcap * torch.tanh(score / softcap)
        out = flex_attention(query, key, value, score_mod=score_mod, block_mask=attention_mask, scale=scaling,
                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.flex_attention import flex_attention_forward

    out, _ = flex_attention_forward(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap,
                                    **kwargs)
    return out, None


def use_packed_attention(model: torch.nn.Module) -> None:
    """Register packed_attention with transformers (idempotent) and switch `model` (a transformers model, or a
    peft model around one) to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(ATTENTION_NAME)


def attention_dropout_note(config: Any) -> str | None:
    """A line for the run summary when the model's attention-probability dropout is not applied."""
    p = next((getattr(config, k) for k in ("attn_pdrop", "attention_dropout") if getattr(config, k, 0.0)), 0.0)
    if not p:
        return None
    return (f"fast engine: attention-probability dropout {p} is not applied (flex attention has none); "
            "residual and embedding dropout are")
