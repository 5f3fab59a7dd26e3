"""Several processes, one run: launching, who writes, and sums over ranks.

`peftlab train RECIPE --gpus N` re-launches itself under torch's elastic launcher (torchrun); the HF
Trainer then runs DDP through accelerate (gloo on CPUs, NCCL on GPUs), the fast engine its own data-parallel
loop (engines/fast/loop.py). `accelerate launch -m peftlab train ...` works too: both set RANK/WORLD_SIZE.
The strategy (ddp, fsdp, zero2, zero3) is a property of the launch, not the recipe: it travels to the ranks
in PEFTLAB_STRATEGY and becomes Trainer arguments.
Rank 0 owns the run folder; the other ranks train and stay silent.

A single process trains on one GPU even when several are visible (`use_one_gpu`): a recipe's batch is per
process, so silently spreading over every GPU would change the global batch, the step count and the
results with the machine, and `--resume` needs the same world size. `--gpus N` asks for N processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
        raise PeftlabError(f"{source} {value!r}: unknown strategy; fix: use one of {', '.join(STRATEGIES)}")
    return value


def strategy() -> str:
    return checked_strategy(os.environ.get(STRATEGY_ENV, "ddp"), STRATEGY_ENV)


@dataclass(frozen=True)
class Nodes:
    """Several machines, as torchrun names it: `nnodes` machines each start `--gpus` processes and meet at
    the c10d rendezvous `endpoint` (host:port of any one of them, the same on every machine) under `id`."""

    nnodes: int = 1
    node_rank: int | None = None
    endpoint: str | None = None
    id: str | None = None

    def check(self) -> None:
        """One line for a combination torchrun would reject late, or would hang on."""
        if self.nnodes < 1:
            raise PeftlabError(f"--nnodes {self.nnodes}: must be >= 1")
        if self.nnodes == 1:
            if self.node_rank not in (None, 0) or self.endpoint or self.id:
                raise PeftlabError("--node-rank/--rdzv-endpoint/--rdzv-id need --nnodes > 1; fix: add --nnodes N, "
                                   "or drop them for one machine")
            return
        if not self.endpoint or ":" not in self.endpoint:
            raise PeftlabError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT (a machine all nodes reach, "
                               "the same on each); fix: e.g. --rdzv-endpoint node0:29400")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise PeftlabError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}")

    def torchrun_args(self) -> list[str]:
        if self.nnodes == 1:
            return ["--standalone"]
        return [f"--nnodes={self.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id={self.id or 'peftlab'}",
                *([f"--node-rank={self.node_rank}"] if self.node_rank is not None else [])]


def launch_command(argv: list[str], processes: int, nodes: Nodes = Nodes()) -> list[str]:
    """torchrun over this same command line (without the launch options, which are consumed here);
    `processes` per machine."""
    return [sys.executable, "-m", "torch.distributed.run", *nodes.torchrun_args(), f"--nproc_per_node={processes}",
            "-m", "peftlab", *argv]


def init_process_group() -> None:
    """Start the collective backend early (the Trainer would do it later), so ranks can agree on a run name;
    a single process takes one GPU (`use_one_gpu`)."""
    if ranks().distributed:
        from accelerate import PartialState

        PartialState()
    else:
        use_one_gpu()


def use_one_gpu() -> None:
    """Several GPUs visible to one process: train on the first and say how to use them all. Without this the
    Trainer would wrap the model in nn.DataParallel, which trl's SFTTrainer refuses (and which is slower than
    DDP anyway). Must run before CUDA initialises: CUDA_VISIBLE_DEVICES is read once, at that moment.
    `torch.cuda.device_count` asks NVML and does not initialise CUDA."""
    import torch

    visible = torch.cuda.device_count()
    if visible <= 1 or torch.cuda.is_initialized():
        return
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    os.environ["CUDA_VISIBLE_DEVICES"] = first
    from peftlab.watch.console import say

    say(f"note: {visible} GPUs visible; this process trains on GPU {first} only (the recipe's batch is per "
        f"process); use all of them with --gpus {visible}")


def one_gpu_per_process(args: Any) -> Any:
    """TrainingArguments that drive one GPU per process. `use_one_gpu` hides the other GPUs only while CUDA is
    not initialised yet; once it is (anything calling torch.cuda.is_available() first), the Trainer would still
    count them and wrap the model in nn.DataParallel. transformers has no public switch: it sets this same
    field itself for a model split over devices (Trainer.__init__, is_model_parallel)."""
    if args.n_gpu > 1 and not ranks().distributed:
        args._n_gpu = 1
    return args


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


def full_trainable_state_dict(model: Any) -> dict[str, Any] | None:
    """The trainable weights (the adapter), whole, on rank 0's CPU, when FSDP or ZeRO-3 shard them; None when
    every rank holds them whole (one process, DDP), where peft reads the model itself.

    A collective: every rank must call it. Each rank holds only its shard of every parameter (FSDP2, the
    Trainer's default: a DTensor, which has no storage of its own: peft's save of it failed with "Attempted to
    access the data pointer on an invalid python storage"), so the shards are gathered first, as the
    Trainer's own FSDP save does. Only trainable tensors
    travel (ignore_frozen_params): gathering a frozen 2B base to rank 0 would cost seconds and gigabytes.
    Keys are the model's own names (no FSDP prefixes), which peft's save_pretrained(state_dict=...) expects.
    Other ranks get an empty dict."""
    if not shards_weights():
        return None
    if strategy() == "zero3":
        import deepspeed  # ZeRO-3 needs it installed anyway

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named} if ranks().is_main else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


@contextmanager
def root_unsharded(model: Any) -> Iterator[None]:
    """FSDP2's root weights (embeddings, final norm, LM head) whole for the duration. `generate()` calls the
    inner model's forward, which bypasses the root's pre-forward hook that would gather them ("got mixed
    torch.Tensor and DTensor"); the decoder layers still gather their own. Every rank must enter it."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
