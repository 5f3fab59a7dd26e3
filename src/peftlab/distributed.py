"""Several processes, one run: launching, who writes, and sums over ranks.

`peftlab train RECIPE --gpus N` re-launches itself under torch's elastic launcher (torchrun); the HF
Trainer then runs DDP through accelerate (gloo on CPUs, NCCL on GPUs). `accelerate launch -m peftlab
train ...` works too: both set RANK/WORLD_SIZE. The strategy (ddp, fsdp, zero2, zero3) is a property of
the launch, not the recipe: it travels to the ranks in PEFTLAB_STRATEGY and becomes Trainer arguments.
Rank 0 owns the run folder; the other ranks train and stay silent.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from peftlab.errors import PeftlabError

STRATEGIES = ("ddp", "fsdp", "zero2", "zero3")
STRATEGY_ENV = "PEFTLAB_STRATEGY"


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks() -> Ranks:
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def checked_strategy(value: str, source: str) -> str:
    if value not in STRATEGIES:
        raise PeftlabError(f"{source} {value!r}: unknown strategy; valid: {', '.join(STRATEGIES)}")
    return value


def strategy() -> str:
    return checked_strategy(os.environ.get(STRATEGY_ENV, "ddp"), STRATEGY_ENV)


def launch_command(argv: list[str], processes: int) -> list[str]:
    """torchrun over this same command line (without --gpus/--strategy, which are consumed here)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "peftlab", *argv]


def init_process_group() -> None:
    """Start the collective backend early (the Trainer would do it later), so ranks can agree on a run name."""
    if ranks().distributed:
        from accelerate import PartialState

        PartialState()


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not ranks().distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if ranks().distributed:
        import torch.distributed as dist

        dist.barrier()


def sum_over_ranks(values: list[int]) -> list[int]:
    """Element-wise sum of integer counters over all ranks (a collective: every rank must call it)."""
    if not ranks().distributed:
        return values
    import torch
    import torch.distributed as dist

    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def gather(value: Any) -> list[Any]:
    """Every rank's value, in rank order (e.g. peak memory per rank)."""
    if not ranks().distributed:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * ranks().world_size
    dist.all_gather_object(out, value)
    return out


def trainer_strategy_arguments() -> dict[str, Any]:
    """TrainingArguments for the launch's strategy. DDP needs none beyond what torchrun sets."""
    chosen = strategy()
    if not ranks().distributed or chosen == "ddp":
        # LoRA leaves most parameters frozen; DDP must not wait for their gradients.
        return {"ddp_find_unused_parameters": False} if ranks().distributed else {}
    if chosen == "fsdp":
        return {
            "fsdp": "full_shard auto_wrap",
            # use_orig_params lets frozen and trainable parameters share a flat FSDP unit (LoRA/QLoRA).
            "fsdp_config": {"use_orig_params": True, "cpu_ram_efficient_loading": True,
                            "sync_module_states": True, "activation_checkpointing": False},
        }
    stage = 2 if chosen == "zero2" else 3
    return {"deepspeed": {
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                              **({"stage3_gather_16bit_weights_on_model_save": True} if stage == 3 else {})},
        "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "train_batch_size": "auto",
    }}


def shards_weights() -> bool:
    """FSDP and ZeRO-3 shard the (frozen) weights themselves, not only gradients and optimizer state."""
    return ranks().distributed and strategy() in ("fsdp", "zero3")
