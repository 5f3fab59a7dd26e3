"""Which float format a run computes in, decided once from the recipe, the GPU and the model family."""

from __future__ import annotations

import torch

from peftlab.errors import PeftlabError

# Families whose activations overflow fp16's 65,504 (unsloth keeps the same list as FORCE_FLOAT32;
# torchtune refuses fp16 outright).
NO_FP16_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def real_bf16() -> bool:
    """bf16 in hardware: compute capability >= 8.0. A T4 (7.5) reports bf16 "supported" via emulation."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8


def resolve_precision(requested: str, model_type: str) -> str:
    """`auto` -> bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU; fp16 refused for Gemma."""
    if requested == "auto":
        if not torch.cuda.is_available():
            return "fp32"
        precision = "bf16" if real_bf16() else "fp16"
        if precision == "fp16" and model_type in NO_FP16_FAMILIES:
            return "fp32"
        return precision
    if requested == "fp16" and model_type in NO_FP16_FAMILIES:
        raise PeftlabError(
            f"train.precision: fp16 refused for model family '{model_type}' (its activations overflow fp16 and "
            "give NaN losses); fix: use bf16 on a GPU with compute capability >= 8.0, or fp32"
        )
    if requested == "fp16" and not torch.cuda.is_available():
        raise PeftlabError(
            "train.precision: fp16 mixed precision needs a CUDA GPU (a CPU has no fp16 autocast); "
            "fix: --set train.precision=fp32 (or auto, or bf16)"
        )
    if requested == "bf16" and torch.cuda.is_available() and not real_bf16():
        raise PeftlabError(
            "train.precision: bf16 requested but this GPU has no bf16 hardware (compute capability < 8.0; it is "
            "only emulated); fix: use fp32, or fp16 for families that tolerate it"
        )
    return requested
