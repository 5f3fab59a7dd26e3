"""The fast engine's training loop: packed micro-batches in, optimizer steps out, nothing else.

Same optimizer and schedule as the hf engine (the Trainer): AdamW over the trainable (LoRA + head) parameters,
weight decay except on biases and norms (the Trainer's own rule), transformers' get_scheduler with the same
warmup, max_grad_norm clipping. Losses and grad norms stay on the device until a logging step: no host sync per
step, so the host can run ahead of the GPU. The run folder, guard, progress and checkpoints belong to the
caller's skeleton, reached through `StepHooks`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from peftlab.distributed import ranks
from peftlab.engines.fast.graphs import MicroStepGraphs, eager_micro_step
from peftlab.engines.fast.model import FastModel
from peftlab.engines.fast.packing import PackedBatch


class StepHooks(Protocol):
    """What the loop calls; the skeleton's monitor/guard/checkpointer satisfy it."""

    def on_micro_batch(self, batch: PackedBatch) -> None:
        """Every micro-batch the loop consumes (host-side counts only: tokens, documents, trained)."""

    def on_log(self, record: dict[str, float]) -> None:
        """At each logging step: {"step", "loss" (mean over the steps since the last log), "grad_norm" (before
        clipping, of the last step), "learning_rate" (for the next step)} -- the Trainer's log fields."""

    def on_step_end(self, step: int) -> bool:
        """After optimizer step `step` (1-based); checkpoint here if wanted. Return True to stop the loop."""


@dataclass(frozen=True)
class LoopSettings:
    """The recipe's optimizer settings (config.TrainConfig fields), with warmup resolved to steps."""

    lr: float
    weight_decay: float
    scheduler: str
    warmup_steps: int
    max_grad_norm: float
    total_steps: int
    logging_steps: int

    @classmethod
    def from_train_config(cls, train: Any, total_steps: int) -> LoopSettings:
        """train: config.TrainConfig. Warmup as TrainingArguments.get_warmup_steps: warmup_steps when set,
        else ceil(total_steps * warmup_ratio)."""
        warmup = train.warmup_steps if train.warmup_steps is not None else math.ceil(total_steps * train.warmup_ratio)
        return cls(train.lr, train.weight_decay, train.scheduler, warmup, train.max_grad_norm, total_steps,
                   train.logging_steps)


@dataclass
class LoopResult:
    steps: int  # optimizer steps done, in all (including those before a resume)
    stopped: bool  # a hook asked to stop
    mean_loss: float | None  # mean step loss of this session (one host sync, at the end)


def param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups as Trainer.create_optimizer makes them: decay, and no decay for biases and norms."""
    # Trainer.get_decay_parameter_names' name patterns (its LayerNorm-type rule adds nothing: LoRA trains none)
    no_decay = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
    decay = [p for n, p in named if not no_decay.search(n)]
    rest = [p for n, p in named if no_decay.search(n)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` over the processes in place, in ONE collective (the LoRA tensors are hundreds of small ones)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class FastLoop:
    """Optimizer + schedule over a FastModel's trainable parameters, and the loop that steps them.

    Data parallel under an initialised process group: rank 0's trainable weights are broadcast once, each process
    runs its share of every step (packing.packed_steps, weighted for the whole step), and the gradients and the
    step loss are summed over the processes in one all-reduce before clipping: every process then takes the
    same optimizer step. (DDP's module wrapper is not used: the loop calls the backbone itself, and one
    all-reduce per optimizer step is what gradient accumulation needs.)

    Stopping together: a process that wants to stop (a signal, a hook) cannot just leave, or the others would wait
    in the next all-reduce forever. Its vote rides in the same flat all-reduce as the gradients, and every process
    reads the summed votes one step late, when that step's all-reduce has long finished: no extra collective and
    no wait on the step in flight. All processes read the same sum at the same step, so they stop together, at
    most two optimizer steps after the request.

    cuda_graphs: replay each micro-batch's forward and backward as a CUDA graph per row shape (graphs.py);
    `graph_failure` then says why if a capture failed and the loop fell back to eager micro-steps."""

    def __init__(self, model: FastModel, settings: LoopSettings, cuda_graphs: bool = False) -> None:
        from transformers import get_scheduler

        self.model, self.settings = model, settings
        named = model.trainable_parameters()
        self.params = [p for _, p in named]
        self.world = ranks().world_size
        if self.world > 1:
            with torch.no_grad():
                for p in self.params:
                    torch.distributed.broadcast(p, src=0)
        fused = model.device.type == "cuda"  # one kernel for all LoRA tensors instead of a few per tensor
        self.optimizer = torch.optim.AdamW(param_groups(named, settings.weight_decay), lr=settings.lr, fused=fused)
        self.scheduler = get_scheduler(settings.scheduler, self.optimizer, num_warmup_steps=settings.warmup_steps,
                                       num_training_steps=settings.total_steps)
        self.graphs = MicroStepGraphs(model, self.params) if cuda_graphs else None

    @property
    def graph_failure(self) -> str | None:
        return self.graphs.failure if self.graphs else None

    def micro_step(self, batch: PackedBatch) -> torch.Tensor:
        """Forward + backward of one micro-batch (gradients accumulate) -> its detached loss, on device."""
        if self.graphs is not None:
            return self.graphs(batch)
        return eager_micro_step(self.model, batch.to(self.model.device, non_blocking=True))

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def step(self, micro_batches: Sequence[PackedBatch], hooks: StepHooks,
             stop_vote: bool = False) -> tuple[torch.Tensor, torch.Tensor, _Votes | None]:
        """One optimizer step over the packed micro-batches of one recipe step -> (loss, grad norm) on the device,
        and, under several processes, the processes' summed stop votes (`stop_vote`: this process's) on their way to
        the host."""
        device = self.model.device
        loss = torch.zeros((), device=device)
        for batch in micro_batches:
            hooks.on_micro_batch(batch)
            loss += self.micro_step(batch)
        votes = None
        if self.world > 1:  # a process with no row in this step still takes part (zero gradients)
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            vote = torch.full((1,), float(stop_vote), device=device)  # a fill kernel: no copy from the host
            all_reduce_sum([*(p.grad for p in self.params), loss.view(1), vote])
            votes = _Votes(vote)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=self.graphs is None)  # graphs accumulate into the same tensors
        return loss, grad_norm, votes

    def run(self, steps: Iterable[Sequence[PackedBatch]], hooks: StepHooks, start_step: int = 0) -> LoopResult:
        """Run optimizer steps start_step+1, ... over `steps` (each: the packed micro-batches of one recipe step)
        until they end, total_steps is reached, or a hook stops it."""
        self.model.peft_model.train()
        device = self.model.device
        since_log, total = torch.zeros((), device=device), torch.zeros((), device=device)
        step, done, last_log = start_step, 0, start_step
        requested, pending = False, None  # this process asked to stop; the last step's votes, not read yet
        for micro_batches in steps:
            if step >= self.settings.total_steps:
                break
            loss, grad_norm, votes = self.step(micro_batches, hooks, requested)
            step, done = step + 1, done + 1
            since_log += loss
            total += loss
            if step % self.settings.logging_steps == 0 or step == self.settings.total_steps:  # the last step too
                hooks.on_log({"step": step, "loss": since_log.item() / (step - last_log), "grad_norm": grad_norm.item(),
                              "learning_rate": self.scheduler.get_last_lr()[0]})
                since_log.zero_()
                last_log = step
            requested |= hooks.on_step_end(step)
            if (votes is None and requested) or (pending is not None and pending.any()):
                return LoopResult(step, True, total.item() / done)
            pending = votes
        return LoopResult(step, False, total.item() / done if done else None)


class _Votes:
    """A step's summed stop votes, copied to the host without blocking; `any()` waits for that copy only."""

    def __init__(self, votes: torch.Tensor) -> None:
        self.event = None
        if votes.device.type == "cuda":
            self.host = torch.empty(votes.shape, dtype=votes.dtype, pin_memory=True)
            self.host.copy_(votes, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = votes

    def any(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host.item() > 0)
