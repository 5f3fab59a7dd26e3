"""One call that trains a task's peft model with the fast engine: plan, compile, loop, and say what happened.

This is the surface the engine seam calls (FastTrainer(...).fit(...)); the skeleton keeps the run folder,
monitor, guard and checkpoints and reaches the loop through StepHooks. Compilation and the mask builder's
compile are CUDA-only: the CPU (tests, laptops) runs the same math eagerly.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from peftlab.distributed import broadcast, gather, ranks, sum_over_ranks
from peftlab.engines.fast.attention import attention_dropout_note
from peftlab.engines.fast.compile import (
    CompileCache,
    compile_layers,
    compile_loss_core,
    peft_cache_key,
    uncompile_layers,
)
from peftlab.engines.fast.flops import mfu, model_flops
from peftlab.engines.fast.loop import FastLoop, LoopSettings, StepHooks
from peftlab.engines.fast.model import SUPPORTED_FAMILIES, FastModel
from peftlab.engines.fast.packing import PackedBatch, Task, packed_steps, step_rows, total_steps
from peftlab.engines.fast.planner import (
    PLAN_RECORD,
    Plan,
    RecordedTrials,
    plan,
    read_record,
    trial_peak_gib,
    write_record,
)

PLAN_SAMPLE_STEPS = 64
GIB = 1024**3


def unsupported(model_type: str, task: str, precision: str, method: str) -> str | None:
    """Why the fast engine cannot run this combination (None: it can); `auto` falls back to hf on a reason."""
    if task not in ("sft", "classify"):
        return f"task {task} (the fast engine runs decoder-LM tasks: sft, classify)"
    if model_type not in SUPPORTED_FAMILIES:
        return f"model family {model_type} (supported: {', '.join(SUPPORTED_FAMILIES)})"
    if precision not in ("bf16", "fp32"):
        return f"precision {precision} (bf16 or fp32; fp16 needs a grad scaler)"
    if method not in ("lora", "qlora"):
        return f"method {method} (the fast engine trains LoRA on a bf16/fp32 or a bitsandbytes 4-bit base)"
    return None


@dataclass
class FastReport:
    """Summary fields of a fast-engine session (units in the names).

    Compilation is timed apart from training: compile_s is the planner's time (its trial step is the run's first
    compile; no trial when the plan record is reused) plus the wall time of every optimizer step that ran a
    micro-batch shape for the first time (compile or recompile, or a warm compile cache's loading); tokens/s and MFU
    are over the other, steady-state steps (steady_s, the time of hook work such as evaluations and checkpoints
    excluded). Under several processes the token and FLOP counts are every process's, steady_s the slowest
    process's, and MFU is per GPU: FLOPs / (steady_s x processes x peak)."""

    plan: Plan
    steps: int
    stopped: bool
    mean_loss: float | None
    train_s: float
    compile_s: float | None  # None: nothing compiled (CPU)
    first_step_s: float | None  # from the start of fit to the end of the first optimizer step
    compile_cache_hit: bool
    tokens: int
    model_flops: float  # of the whole session
    steady_tokens: int
    steady_flops: float  # over the steady-state steps, which took steady_s seconds
    steady_s: float
    processes: int = 1
    notes: list[str] = field(default_factory=list)

    def as_summary(self) -> dict[str, Any]:
        steady = self.steady_s > 0 and self.steady_tokens > 0
        return {"engine": "fast", "plan": self.plan.as_dict(), "plan_text": self.plan.describe(),
                "compile_s": None if self.compile_s is None else round(self.compile_s, 2),
                "first_step_s": None if self.first_step_s is None else round(self.first_step_s, 2),
                "compile_cache_hit": self.compile_cache_hit, "steady_s": round(self.steady_s, 3),
                "steady_tokens": self.steady_tokens,
                "steady_tokens_per_s": round(self.steady_tokens / self.steady_s, 2) if steady else None,
                "mfu": round(mfu(self.steady_flops, self.steady_s, self.processes), 4)
                if steady and torch.cuda.is_available() else None,
                "engine_notes": self.notes}


def graphs_note(loop: FastLoop, cuda: bool, chosen: Plan) -> str | None:
    """A summary line when the micro-steps did not run as CUDA graphs on a CUDA device (None: they did, or CPU)."""
    if not cuda:
        return None
    if loop.graphs is None:
        why = "activation checkpointing" if chosen.gradient_checkpointing else "train.cuda_graphs is false"
        return f"fast engine: CUDA graphs off ({why})"
    if loop.graph_failure:
        return f"fast engine: CUDA graph capture failed, micro-steps ran eagerly ({loop.graph_failure})"
    return None


class _StepClock:
    """StepHooks wrapper: counts tokens and FLOPs, splits the loop's wall time into compiling steps (a micro-batch
    shape seen for the first time: dynamo compiles it), steady steps and hook work, then passes everything on.

    The device is synchronised only around compiling steps and hook calls that took time (an evaluation or a
    checkpoint, which synchronise anyway): steady steps keep the host running ahead of the GPU.
    `compiled=False` (eager, CPU): no step counts as compiling."""

    HOOK_WORK_S = 0.01  # a hook call longer than this did work (evaluation, checkpoint): its time is not training

    def __init__(self, inner: StepHooks, compiled: bool, seen_shapes: set[int] | None = None) -> None:
        self.inner, self.compiled = inner, compiled
        self.seen = set(seen_shapes or ())
        self.tokens = self.sum_sq = self.steady_tokens = self.steady_sq = 0
        self.step_tokens = self.step_sq = 0
        self.compile_s = self.steady_s = 0.0
        self.compiling = False
        self.first_step_s: float | None = None
        self.started = self.mark = time.perf_counter()

    def _sync_now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_micro_batch(self, batch: PackedBatch) -> None:
        if self.compiled and batch.budget not in self.seen and not self.compiling:
            now = self._sync_now()  # what ran before this step was steady work
            self.steady_s += now - self.mark
            self.mark, self.compiling = now, True
        self.seen.add(batch.budget)
        self.step_tokens += batch.tokens
        self.step_sq += batch.sum_sq
        self.inner.on_micro_batch(batch)

    def on_log(self, record: dict[str, float]) -> None:
        self.inner.on_log(record)

    def on_step_end(self, step: int) -> bool:
        self.tokens, self.sum_sq = self.tokens + self.step_tokens, self.sum_sq + self.step_sq
        now = self._sync_now() if self.compiling or self.first_step_s is None else time.perf_counter()
        if self.first_step_s is None:
            self.first_step_s = now - self.started
        if self.compiling:
            self.compile_s += now - self.mark
        else:
            self.steady_s += now - self.mark
            self.steady_tokens, self.steady_sq = self.steady_tokens + self.step_tokens, self.steady_sq + self.step_sq
        self.step_tokens = self.step_sq = 0
        self.compiling = False
        stop = self.inner.on_step_end(step)
        after = time.perf_counter()
        if after - now > self.HOOK_WORK_S:  # hook work; it synchronised, so the steps before it are done
            self.mark = self._sync_now()
        else:
            self.steady_s += after - now
            self.mark = after
        return stop


def _step_rows(dataset: Sequence[Mapping[str, Any]], seed: int, train: Any, world: int) -> Iterator[list]:
    return step_rows(dataset, train.batch_size * world, train.grad_accum, seed)


def _plan_sample(dataset: Sequence[Mapping[str, Any]], seed: int, train: Any, rank: int, world: int) -> list[list]:
    """The planner's sample: the first optimizer steps' rows that process `rank` of `world` packs."""
    steps = itertools.islice(_step_rows(dataset, seed, train, world), PLAN_SAMPLE_STEPS)
    return [rows[rank::world] for rows in steps]


def compile_cache_key(peft_model: Any, task: Task, train: Any, precision: str, max_length: int,
                      dataset: Sequence[Mapping[str, Any]], seed: int, world: int = 1) -> str:
    """The compile-cache key `FastTrainer.fit` of this job loads under `world` processes: that of the budget the
    padding of rank 0's share prefers (every process computes it alike from the seeded order, so no collective).
    auto asks it before any trainer exists, to see whether the cache is warm."""
    preferred = plan(_plan_sample(dataset, seed, train, 0, world), task, train.batch_size, max_length, None,
                     getattr(train, "memory_limit_gib", None))
    return peft_cache_key(peft_model, task, precision, preferred.budget, False, preferred.sizes)


class FastTrainer:
    """The fast engine for one run.

    peft_model: the task's PeftModel (LoRA injected; classify: with its trained score head). task: "sft" |
    "classify". train: config.TrainConfig (batch_size, grad_accum, epochs, max_steps, lr, scheduler, warmup,
    weight_decay, max_grad_norm, logging_steps, and memory_limit_gib when the config has it). precision: "bf16" |
    "fp32". max_length: data.max_length (the longest row). pad_token_id: classify's pooling rule.
    Under an initialised process group (torchrun) it is data-parallel: batch_size x grad_accum rows per process
    per optimizer step, as the Trainer's DDP (FastLoop says how; tests/test_fast_trainer.py checks it with gloo).
    """

    def __init__(self, peft_model: Any, task: Task, train: Any, precision: str, max_length: int,
                 pad_token_id: int | None = None) -> None:
        cuda = torch.cuda.is_available()
        builder = None
        if cuda:
            from torch.nn.attention.flex_attention import create_block_mask

            builder = torch.compile(create_block_mask, dynamic=False)  # mask building is many small launches
        self.model = FastModel(peft_model, task, precision, mask_builder=builder)
        self.train, self.task, self.max_length, self.pad_token_id = train, task, max_length, pad_token_id
        self.loop: FastLoop | None = None
        self.cache: CompileCache | None = None
        proc = ranks()
        self.rank, self.world = proc.rank, proc.world_size

    def _steps(self, dataset: Sequence[Mapping[str, Any]], seed: int, skip: int) -> Iterator[list]:
        """The whole optimizer steps' rows (every process's share: batch_size x grad_accum rows per process)."""
        return itertools.islice(_step_rows(dataset, seed, self.train, self.world), skip, None)

    def plan(self, dataset: Sequence[Mapping[str, Any]], seed: int, measure: bool, record: Path | None = None) -> Plan:
        """The budget and checkpointing for this run (measure=True: trial steps on the device, none for the peaks
        that `record`, a plan record of this compile-cache key, holds: planner.py says when they count). Under
        several processes, rank 0's plan for all: the same row shapes everywhere (balanced steps, one compile-cache
        key); its budget holds any row (at least data.max_length), so it fits every process's share."""
        sample = _plan_sample(dataset, seed, self.train, self.rank, self.world)
        limit = getattr(self.train, "memory_limit_gib", None)
        if not measure:
            return broadcast(plan(sample, self.task, self.train.batch_size, self.max_length, None, limit))
        device_gib = torch.cuda.get_device_properties(0).total_memory / GIB
        trials = RecordedTrials(read_record(record, limit, device_gib) if record else {},
                                trial_peak_gib(self.model, self.task, self.max_length))
        chosen = plan(sample, self.task, self.train.batch_size, self.max_length, trials, limit, device_gib,
                      held_gib=torch.cuda.memory_allocated() / GIB)
        return broadcast(replace(chosen, reused=trials.measured == 0))

    def compile(self, dataset: Sequence[Mapping[str, Any]], seed: int) -> bool:
        """Load the compile cache of the budget the padding prefers (the usual plan), then compile the layers and
        the CE core; returns whether the cache had artifacts. The planner's first trial is then the compile."""
        self.cache = CompileCache(compile_cache_key(self.model.peft_model, self.task, self.train, self.model.precision,
                                                    self.max_length, dataset, seed, self.world))
        hit = self.cache.load()
        compile_layers(self.model)
        compile_loss_core(self.model)
        return hit

    def fit(self, dataset: Sequence[Mapping[str, Any]], seed: int, hooks: StepHooks,
            resume: dict[str, Any] | None = None) -> FastReport:
        """Train over `dataset` (rows as the task makes them) until total_steps or a hook stops; `resume`: a
        state_dict() saved at a checkpoint (continues step-exactly: same data order, optimizer, schedule, RNG)."""
        cuda = torch.cuda.is_available()
        began = time.perf_counter()
        hit = self.compile(dataset, seed) if cuda else False
        # On CUDA its trial step is the run's first compile; a warm cache's plan record spares the trial.
        chosen = self.plan(dataset, seed, measure=cuda, record=self.cache.folder / PLAN_RECORD if hit else None)
        plan_s = time.perf_counter() - began
        self.model.set_checkpointing(chosen.gradient_checkpointing)
        t = self.train
        settings = LoopSettings.from_train_config(t, total_steps(len(dataset), t.batch_size * self.world, t.grad_accum,
                                                                 t.epochs, t.max_steps))
        graphs = cuda and getattr(t, "cuda_graphs", True) and not chosen.gradient_checkpointing
        self.loop = FastLoop(self.model, settings, cuda_graphs=graphs)
        start = 0
        if resume:
            self.loop.load_state_dict(resume["loop"])
            torch.set_rng_state(resume["rng"][self.rank])
            if resume["cuda_rng"][self.rank] is not None:
                torch.cuda.set_rng_state_all(resume["cuda_rng"][self.rank])
            start = resume["step"]
        clock = _StepClock(hooks, compiled=cuda)
        steps = packed_steps(self._steps(dataset, seed, start), chosen.budget, self.task, t.batch_size,
                             self.pad_token_id, chosen.sizes, self.rank, self.world)
        try:
            result = self.loop.run(steps, clock, start_step=start)
        finally:
            self.model.restore_attention()
            uncompile_layers(self.model)  # evaluation and generation follow, in shapes of their own
        train_s = time.perf_counter() - began
        # One writer per cache folder (every process compiled the same graphs: rank 0's plan); the save replaces
        # the key's folder whole, so the plan record goes in after it.
        if cuda and self.rank == 0 and self.cache.save():
            write_record(self.cache.folder / PLAN_RECORD, chosen, getattr(t, "memory_limit_gib", None),
                         torch.cuda.get_device_properties(0).total_memory / GIB)

        def flops(tokens: int, sum_sq: int) -> float:
            return model_flops(self.model.config, tokens, sum_sq, chosen.gradient_checkpointing, self.task == "sft")

        notes = [n for n in (attention_dropout_note(self.model.config), graphs_note(self.loop, cuda, chosen)) if n]
        first_step_s = None if clock.first_step_s is None else clock.first_step_s + (clock.started - began)
        # Every process's work (a collective, once per session): tokens/s and MFU count all GPUs.
        tokens, sum_sq, steady_tokens, steady_sq = sum_over_ranks([clock.tokens, clock.sum_sq, clock.steady_tokens,
                                                                    clock.steady_sq])
        return FastReport(chosen, result.steps, result.stopped, result.mean_loss, train_s,
                          plan_s + clock.compile_s if cuda else None, first_step_s, hit, tokens,
                          flops(tokens, sum_sq), steady_tokens, flops(steady_tokens, steady_sq),
                          max(gather(clock.steady_s)), self.world, notes)

    def state_dict(self, step: int) -> dict[str, Any]:
        """What a checkpoint after optimizer step `step` needs to resume step-exactly (adapters are saved by peft):
        the loop's state (the same on every process) and every process's RNG states, in rank order (each draws its
        own dropout masks); a collective under several processes."""
        if self.loop is None:
            raise RuntimeError("state_dict() is for checkpoints taken during fit()")
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        return {"loop": self.loop.state_dict(), "rng": gather(torch.get_rng_state()), "cuda_rng": gather(cuda_rng),
                "step": step}
