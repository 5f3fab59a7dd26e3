"""How a loaded model is adapted: 4-bit quantization config, k-bit preparation, LoRA injection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.config import LoraSettings, QuantSettings
from peftlab.errors import PeftlabError
from peftlab.models.precision import DTYPES

GIB = 1024**3


def bnb_quantization_config(quant: QuantSettings, compute_dtype: torch.dtype, shards_weights: bool = False) -> Any:
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # ImportError, or a broken CUDA library inside bitsandbytes
        raise PeftlabError(
            f"method.name: qlora needs bitsandbytes, which cannot run here ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'import failed'}); fix: `pip install bitsandbytes` or use method.name=lora"
        ) from None
    if quant.compute_dtype != "auto":
        compute_dtype = DTYPES[quant.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # FSDP / ZeRO-3 flatten each unit into one tensor of one dtype: the packed 4-bit weights must then be
        # stored in the compute dtype, like the unquantized ones beside them.
        bnb_4bit_quant_storage=compute_dtype if shards_weights else torch.uint8,
    )


def upcast_cost_bytes(model: nn.Module) -> tuple[int, list[str]]:
    """Extra bytes peft's prepare_model_for_kbit_training would add by casting 16-bit weights to fp32,
    and the largest such tensors (for Gemma-2-2B: the 256k x 2304 embedding)."""
    extra, names = 0, []
    for name, param in model.named_parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            extra += param.numel() * 2
            names.append((param.numel(), name))
    return extra, [n for _, n in sorted(names, reverse=True)[:3]]


def prepare_kbit(model: nn.Module, mode: str, gradient_checkpointing: bool) -> list[str]:
    """k-bit preparation; returns the notes to print. 'peft' upcasts, 'lean' keeps dtypes."""
    extra, largest = upcast_cost_bytes(model)
    if mode == "peft":
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        return [f"k-bit prep 'peft': upcast 16-bit weights to fp32, +{extra / GIB:.2f} GiB (largest: {', '.join(largest)})"]
    # 'lean': what training on a frozen 4-bit base actually needs. Inputs must require grad so that
    # checkpointed blocks (whose frozen weights need no grad) still propagate gradients to LoRA.
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    note = f"k-bit prep 'lean': dtypes kept; 'peft' would add +{extra / GIB:.2f} GiB of fp32 copies"
    return [note + (f" (largest: {', '.join(largest)})" if largest else "")]


def linear_layer_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers LoRA can target (incl. bitsandbytes' Linear4bit and GPT-2's Conv1D,
    a linear layer with a transposed weight)."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and name:
            parts = name.split(".")
            # an indexed child (diffusers' attention `to_out.0`) goes by its parent too, as peft matches it
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(names)


def check_targets(model: nn.Module, lora: LoraSettings) -> None:
    if lora.target_modules == "all-linear":
        return
    available = linear_layer_names(model)
    missing = [t for t in lora.target_modules if t not in available]
    if missing:
        raise PeftlabError(
            f"method.lora.target_modules: {missing} match no module of this model; fix: choose among its linear "
            f"layers: {', '.join(available)} (or all-linear)"
        )


def lora_config(lora: LoraSettings, **extra: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        use_dora=lora.use_dora,
        layers_to_transform=lora.layers_to_transform,
        **extra,
    )


def apply_lora(model: nn.Module, lora: LoraSettings, task_type: str = "CAUSAL_LM") -> nn.Module:
    from peft import get_peft_model

    check_targets(model, lora)
    return get_peft_model(model, lora_config(lora, task_type=task_type))


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:  # the line peft prints, computed the same way
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_params(model: nn.Module) -> ParamCount:
    trainable, total = model.get_nb_trainable_parameters()
    return ParamCount(trainable, total)
