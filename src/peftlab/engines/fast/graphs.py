"""Whole micro-step CUDA graphs: forward, loss and backward of one packed row, captured once per row shape.

Why: at the recipe's step (8 Dolly rows, ~2k tokens) the H200 is idle about half of the time: ~4,100 kernels
per step, each launched from Python, autograd and peft's LoRA layers (bench/README.md "Issue 11, second pass").
A CUDA graph replays them with one launch. torch.compile(mode="reduce-overhead") cannot do it for regionally
compiled layers (every layer replays the same graph, whose outputs the next layer overwrites: it failed in
backward on the H200), and compiling the whole model costs minutes; torch.cuda.make_graphed_callables takes
tensors only (no BlockMask) and does not accumulate gradients. So the micro-step is captured here with
torch.cuda.graph, as in PyTorch's "whole-network capture" recipe (CUDA semantics notes), with these rules that
keep a replay equal to the eager step:
  * every input of the row lives in a static device buffer, copied in before each replay;
  * the trainable parameters' .grad exist before the capture, so autograd accumulates into them in place
    (gradient accumulation over the step's micro-batches); the loop zeroes them with set_to_none=False;
  * autocast's weight cache is off in the fast model (casts made during capture would be kept);
  * dropout draws from the CUDA generator's Philox offset, which torch advances at each replay;
  * warm-up runs and the capture itself touch the gradients: they are restored afterwards.
Not captured: activation checkpointing (its recompute saves and restores RNG state), CPU devices.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from peftlab.engines.fast.model import FastModel
from peftlab.engines.fast.packing import PackedBatch

WARMUP_RUNS = 2  # side-stream runs before capture: compile, autotune, cuBLAS workspaces (PyTorch's recipe uses 3)
PER_DOCUMENT = ("pooled_positions", "class_labels", "class_weights")  # classify: [D], D varies per row


def eager_micro_step(model: FastModel, batch: PackedBatch) -> torch.Tensor:
    """Forward + backward of one micro-batch (on the device) -> its detached loss (fp32 scalar)."""
    loss = model.loss(batch)
    loss.backward()
    return loss.detach()


class _Captured:
    """One row shape's graph, its static input row and its static loss."""

    def __init__(self, graph: torch.cuda.CUDAGraph, row: PackedBatch, loss: torch.Tensor) -> None:
        self.graph, self.row, self.loss = graph, row, loss

    def replay(self, batch: PackedBatch) -> torch.Tensor:
        for f in fields(PackedBatch):
            static = getattr(self.row, f.name)
            if not isinstance(static, torch.Tensor) or not static.numel():
                continue
            value = getattr(batch, f.name)
            if f.name in PER_DOCUMENT:  # padded to the budget: the rest weighs 0 (position 0, label 0)
                static.zero_()
                static = static[: value.shape[0]]
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.loss


def _static_row(batch: PackedBatch, device: torch.device) -> PackedBatch:
    """A device copy of `batch` whose per-document tensors are padded to `budget` entries (the most documents a
    row can hold), so every row of this budget fits the same buffers."""
    row = batch.to(device)
    padded = {}
    for name in PER_DOCUMENT:
        value = getattr(row, name)
        if value.numel():
            buffer = torch.zeros(batch.budget, dtype=value.dtype, device=device)
            buffer[: value.shape[0]] = value
            padded[name] = buffer
    return replace(row, **padded)


class MicroStepGraphs:
    """Callable like eager_micro_step, replaying a captured CUDA graph per row shape (budget).

    params: the trainable parameters (their gradients accumulate in place). The first row of each shape is
    captured (WARMUP_RUNS eager runs on a side stream, then the capture), then replayed. If a capture fails (an
    operation that cannot be captured), every later micro-step runs eagerly and `failure` says why.
    """

    def __init__(self, model: FastModel, params: list[torch.nn.Parameter]) -> None:
        self.model, self.params = model, params
        self.graphs: dict[int, _Captured] = {}
        self.pool: tuple[int, int] | None = None  # one memory pool for all shapes: they never run concurrently
        self.failure: str | None = None

    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        if self.failure is not None:
            return eager_micro_step(self.model, batch.to(self.model.device, non_blocking=True))
        captured = self.graphs.get(batch.budget)
        if captured is None:
            try:
                captured = self.graphs[batch.budget] = self._capture(batch)
            except RuntimeError as err:  # e.g. "operation not permitted when stream is capturing"
                self.failure = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                torch.cuda.synchronize()
                return eager_micro_step(self.model, batch.to(self.model.device, non_blocking=True))
        return captured.replay(batch)

    def _capture(self, batch: PackedBatch) -> _Captured:
        device = self.model.device
        row = _static_row(batch, device)
        saved = [None if p.grad is None else p.grad.clone() for p in self.params]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                eager_micro_step(self.model, row)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph allocates from a pool of its own
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                loss = eager_micro_step(self.model, row)
        finally:
            for p, grad in zip(self.params, saved, strict=True):
                if grad is None:
                    p.grad.zero_()
                else:
                    p.grad.copy_(grad)
        self.pool = graph.pool()
        return _Captured(graph, row, loss)
