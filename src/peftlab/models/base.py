"""The base model an adapter was trained on: the same precision, attention, 4-bit config and k-bit
preparation for inference as for training. A QLoRA adapter served on an unquantized base scores
differently from what its run recorded (issue 12: eval loss 17.6659 against 17.6597)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peftlab.config import Recipe


def trained_base(recipe: Recipe, load: Callable[..., Any], shards_weights: bool = False,
                 **load_kwargs: Any) -> tuple[Any, list[str]]:
    """(model, notes): `load(recipe.model, dtype, attn_implementation, quantization_config=..., **load_kwargs)`
    (a models.loader function) with this recipe's precision, attention and, for qlora, its bitsandbytes
    4-bit config, then the same k-bit preparation (`method.quant.kbit_prep: peft` upcasts weights, which
    changes the numbers). Training builds its base here too, so inference cannot drift from it;
    `shards_weights`: the launch shards the weights (FSDP, ZeRO-3)."""
    from peftlab.models import adapt, loader
    from peftlab.models.precision import DTYPES, resolve_precision

    model_type = loader.load_model_config(recipe.model).model_type
    dtype = DTYPES[resolve_precision(recipe.train.precision, model_type)]
    attn = loader.attention_implementation(recipe.model.attn_implementation, model_type)
    quant = None
    if recipe.method.name == "qlora":
        quant = adapt.bnb_quantization_config(recipe.method.quant, compute_dtype=dtype, shards_weights=shards_weights)
    model = load(recipe.model, dtype, attn, quantization_config=quant, shards_weights=shards_weights, **load_kwargs)
    if quant is None:
        return model, []
    return model, adapt.prepare_kbit(model, recipe.method.quant.kbit_prep, recipe.train.gradient_checkpointing)
