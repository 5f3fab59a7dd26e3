"""Which optimizer a machine can run: bitsandbytes optimizers (8-bit states, paged memory) need a CUDA GPU."""

from __future__ import annotations

import torch

GPU_ONLY_OPTIMIZERS = ("8bit", "paged", "bnb", "4bit")
CPU_OPTIMIZER = "adamw_torch"


def resolve_optimizer(name: str) -> tuple[str, str | None]:
    """(optimizer to use here, a note when it differs from the recipe's)."""
    if torch.cuda.is_available() or not any(part in name for part in GPU_ONLY_OPTIMIZERS):
        return name, None
    return CPU_OPTIMIZER, (f"optimizer: train.optimizer={name} needs a CUDA GPU (bitsandbytes); "
                           f"this CPU run uses {CPU_OPTIMIZER} instead")
