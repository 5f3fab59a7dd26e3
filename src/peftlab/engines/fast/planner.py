"""The planner: the token budget per micro-batch and whether to checkpoint activations, from measurement.

Two measurements decide:
  * padding, on the host (cheap): the recipe's optimizer steps (a sample of them) packed at each candidate budget
    give the rows per step and the padded share; a budget far above a step's tokens is wasted work, one below it
    splits the step into more rows (more launches, less work per kernel);
  * memory, on the device: a trial forward+backward of a full row (documents of max_length: the worst case),
    read from torch.cuda.max_memory_allocated, with the model as it will train (compiled: the first trial is
    then the run's own compile).
Rule: candidates in order of cost (padded tokens per step, each row counted ROW_OVERHEAD_TOKENS more for its
fixed cost; a budget's rows that fit a half or three quarters of it are cut to those smaller static shapes),
without activation checkpointing first (it costs a third more compute); the first whose trial fits the cap
(train.memory_limit_gib, else 90% of the device) is the plan, so usually one trial runs. On the CPU there is no
memory to measure: the cheapest budget, and the plan says so.
Each trial on the device is a cold compile of its shape (about a minute for gemma-2-2b on an H200), so under a
tight cap a candidate is skipped untried when the measured trial nearest to it predicts it over the cap by more
than PREDICTION_MARGIN: a step's peak is the memory the model holds before it (`held_gib`: weights, adapters,
optimizer state) plus activations that grow with the row's tokens, peak(b) ~ held + (peak(b1) - held) x b / b1.

Reuse: the trial peaks are recorded (`plan.json`) beside the compile artifacts of the run's compile-cache key,
which covers the model, shapes, precision, versions and device. A later run with that key (its compile cache
hit) takes the peaks from the record instead of running trial steps, under the same memory_limit_gib and device
size; any other cap, a missing or unreadable record, or a budget the record lacks is measured again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.engines.fast.attention import BLOCK_SIZE
from peftlab.engines.fast.model import FastModel
from peftlab.engines.fast.packing import Task, pack_step
from peftlab.runs import atomic_write_json

GIB = 1024**3
# A row's fixed cost (launches, optimizer-independent work) in token-equivalents: an assumption, not a
# measurement; it only tips the choice between budgets with similar padding toward fewer, larger rows.
ROW_OVERHEAD_TOKENS = 1024
DEVICE_FRACTION = 0.9
# A prediction over the cap by less than this share is tried anyway: activations are not exactly linear in tokens
# (the CE chunk and the block mask are per row), and a wrong skip costs a larger budget, not an out-of-memory.
PREDICTION_MARGIN = 0.1
PLAN_RECORD = "plan.json"  # beside the compile artifacts of the same key (compile.py)


@dataclass(frozen=True)
class Candidate:
    budget: int
    rows_per_step: float
    padding_fraction: float
    peak_gib: float | None  # trial step peak (None: not measured)
    checkpointing: bool
    predicted_gib: float | None = None  # skipped untried: the peak the nearest trial predicts (module docstring)


@dataclass(frozen=True)
class Plan:
    """What the planner chose and why; `as_dict` goes to the run summary, `describe` to doctor and the console."""

    budget: int
    gradient_checkpointing: bool
    peak_gib: float | None  # the trial step's peak at this budget (None: not measured)
    sizes: tuple[int, ...]  # smaller static row shapes a packed row is cut to when it fits (packing.row_size)
    limit_gib: float | None
    rows_per_step: float
    padding_fraction: float
    measured_memory: bool
    candidates: tuple[Candidate, ...]
    reused: bool = False  # the peaks came from the compile cache's plan record: no trial step ran

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.peak_gib is None:
            memory = "memory not measured (no CUDA device)"
        else:
            memory = f"trial peak {self.peak_gib:.1f} GiB" + (f" under the {self.limit_gib:.1f} GiB cap"
                                                              if self.limit_gib else "")
            memory += ", reused from the compile cache's plan record (no trial step)" if self.reused else ""
        smaller = f" (rows that fit: {', '.join(map(str, self.sizes))})" if self.sizes else ""
        return (f"fast engine plan: {self.budget} tokens per micro-batch{smaller}, {self.rows_per_step:.2f} rows per optimizer "
                f"step, {100 * self.padding_fraction:.1f}% padding, activation checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}; {memory}")


def candidate_budgets(max_length: int, step_tokens_max: int, largest: int = 65536) -> list[int]:
    """Powers of two from the smallest budget that holds the longest row (a multiple of the flex block) up to
    the largest step (more is only padding) or `largest`."""
    smallest = BLOCK_SIZE * math.ceil(max_length / BLOCK_SIZE)
    top = max(smallest, min(largest, 2 ** math.ceil(math.log2(max(step_tokens_max, 1)))))
    budgets, b = [smallest], 2 ** math.ceil(math.log2(smallest))
    while b <= top:
        if b > smallest:
            budgets.append(b)
        b *= 2
    return budgets


def smaller_sizes(budget: int, smallest: int) -> tuple[int, ...]:
    """The row shapes below `budget`: a half and three quarters of it, those that still hold the longest document
    and are whole flex blocks. A step's last packed row is its padded one; with a half-size shape alone the recipe
    step of gemma2-dolly (8 Dolly rows, ~1.5k tokens in a 2,048 row) was 25% padding on the H200 (bench/README.md,
    Issue 11); the 3/4 shape takes the steps between. Two shapes only: each costs a compile (a minute cold on an
    H200) and, with CUDA graphs, a capture; a warm compile cache holds them all."""
    fits = {size for size in (budget // 2, 3 * budget // 4) if size >= smallest and size % BLOCK_SIZE == 0}
    return tuple(sorted(fits))


def padding_cost(steps: Sequence[Sequence[Mapping[str, Any]]], budget: int, task: Task, batch_size: int,
                 sizes: Sequence[int] = ()) -> tuple[float, float, float]:
    """(rows per step, padded share of the rows, cost per step: padded tokens + ROW_OVERHEAD_TOKENS per row) of the
    sample `steps` packed at `budget` with the smaller row shapes `sizes` (host only)."""
    rows = tokens = padded = 0
    for step in steps:
        packed = pack_step(step, budget, task, batch_size, sizes=sizes)
        rows += len(packed)
        tokens += sum(b.tokens for b in packed)
        padded += sum(b.budget for b in packed)
    return rows / len(steps), 1.0 - tokens / padded, (padded + rows * ROW_OVERHEAD_TOKENS) / len(steps)


def predicted_peak_gib(budget: int, checkpointing: bool, candidates: Sequence[Candidate],
                       held_gib: float) -> float | None:
    """The peak (GiB) of a `budget`-token step from the measured trial of the nearest budget with the same
    checkpointing: held + (peak - held) x budget / trial budget (module docstring); None without such a trial."""
    measured = [c for c in candidates if c.checkpointing == checkpointing and c.peak_gib is not None
                and math.isfinite(c.peak_gib)]
    if not measured:
        return None
    nearest = min(measured, key=lambda c: abs(math.log(c.budget / budget)))
    return held_gib + (nearest.peak_gib - held_gib) * budget / nearest.budget


def plan(steps: Sequence[Sequence[Mapping[str, Any]]], task: Task, batch_size: int, max_length: int,
         trial_peak_gib: Callable[[int, bool], float] | None = None, memory_limit_gib: float | None = None,
         device_gib: float | None = None, held_gib: float | None = None) -> Plan:
    """Choose the budget and checkpointing (rule in the module docstring).

    steps: a sample of the recipe's optimizer steps (rows as the task makes them); trial_peak_gib(budget,
    checkpointing) -> peak GiB of one trial step, None on the CPU; memory_limit_gib: train.memory_limit_gib;
    device_gib: the device's memory; held_gib: the memory allocated before a trial (None: every candidate is
    tried, none predicted). Errors: ValueError when even the smallest budget with checkpointing exceeds the cap
    (the message gives the measured peak).
    """
    step_tokens_max = max(sum(len(r["input_ids"]) for r in step) for step in steps)
    limit = memory_limit_gib or (DEVICE_FRACTION * device_gib if device_gib else None)
    budgets = candidate_budgets(max_length, step_tokens_max)
    sizes = {b: smaller_sizes(b, budgets[0]) for b in budgets}
    costs = {b: padding_cost(steps, b, task, batch_size, sizes[b]) for b in budgets}
    cheapest_first = sorted(costs, key=lambda b: costs[b][2])
    candidates: list[Candidate] = []
    for checkpointing in (False, True):  # checkpointing only when no plain step fits
        for budget in cheapest_first:
            predicted = (predicted_peak_gib(budget, checkpointing, candidates, held_gib)
                         if held_gib is not None and limit is not None else None)
            if predicted is not None and predicted > (1 + PREDICTION_MARGIN) * limit:
                candidates.append(Candidate(budget, *costs[budget][:2], None, checkpointing, predicted))
                continue
            peak = trial_peak_gib(budget, checkpointing) if trial_peak_gib else None
            candidates.append(Candidate(budget, *costs[budget][:2], peak, checkpointing))
            if peak is None or limit is None or peak <= limit:
                best = candidates[-1]
                return Plan(best.budget, checkpointing, peak, sizes[budget], limit, best.rows_per_step,
                            best.padding_fraction, trial_peak_gib is not None, tuple(candidates))
    smallest = min((c for c in candidates if c.peak_gib is not None), key=lambda c: c.peak_gib)
    raise ValueError(f"train.memory_limit_gib: even {smallest.budget} tokens per micro-batch with activation "
                     f"checkpointing peaks at {smallest.peak_gib:.1f} GiB > {limit:.1f} GiB")


def trial_peak_gib(model: FastModel, task: Task, max_length: int) -> Callable[[int, bool], float]:
    """The device measurement for `plan`: peak GiB of one forward+backward of a full row of `budget` tokens
    (documents of max_length tokens, the worst case), with activation checkpointing on or off. CUDA only."""

    def measure(budget: int, checkpointing: bool) -> float:
        lengths = [max_length] * (budget // max_length) + ([budget % max_length] if budget % max_length else [])
        rows = [{"input_ids": [1] * n, "labels": [1] * n if task == "sft" else 0} for n in lengths]
        (batch,) = pack_step(rows, budget, task, batch_size=len(rows))
        model.set_checkpointing(checkpointing)
        model.peft_model.train()  # as the loop runs it: dropout's memory, and the graph the loop reuses
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model.loss(batch.to(model.device)).backward()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / GIB
        except torch.OutOfMemoryError:
            return float("inf")
        finally:
            model.peft_model.zero_grad(set_to_none=True)
            model.set_checkpointing(False)

    return measure


class RecordedTrials:
    """`trial_peak_gib` for `plan` that answers from earlier trials' peaks and measures only what they lack.

    peaks: {(budget, checkpointing): GiB} (from `read_record`); measure: the device trial (`trial_peak_gib`)."""

    def __init__(self, peaks: Mapping[tuple[int, bool], float], measure: Callable[[int, bool], float]) -> None:
        self.peaks, self.measure, self.measured = dict(peaks), measure, 0

    def __call__(self, budget: int, checkpointing: bool) -> float:
        if (budget, checkpointing) not in self.peaks:
            self.peaks[budget, checkpointing] = self.measure(budget, checkpointing)
            self.measured += 1
        return self.peaks[budget, checkpointing]


def read_record(path: Path, memory_limit_gib: float | None, device_gib: float | None) -> dict[tuple[int, bool], float]:
    """The trial peaks recorded at `path` by a run under the same memory_limit_gib and device size; {} when there is
    no usable record (none, unreadable, another cap or device: measure again)."""
    try:
        record = json.loads(path.read_text())
        if record["memory_limit_gib"] != memory_limit_gib or record["device_gib"] != device_gib:
            return {}
        return {(int(budget), bool(checkpointing)): float(peak) for budget, checkpointing, peak in record["peaks"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_record(path: Path, chosen: Plan, memory_limit_gib: float | None, device_gib: float | None) -> None:
    """Record the measured peaks of `chosen`'s candidates at `path` (atomically) for the next run of the same key."""
    peaks = [[c.budget, c.checkpointing, c.peak_gib] for c in chosen.candidates if c.peak_gib is not None]
    atomic_write_json(path, {"memory_limit_gib": memory_limit_gib, "device_gib": device_gib, "peaks": peaks,
                             "budget": chosen.budget, "gradient_checkpointing": chosen.gradient_checkpointing})
