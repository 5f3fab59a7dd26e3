"""Engines: how the optimisation loop runs. A task never knows which engine runs it.

`train.engine` picks one: `hf` (engines/hf.py: trl's SFTTrainer for causal LMs, the Trainer for sequence
classification, an accelerate loop for a task's own loss) or any other registered engine; `auto` takes
the registered engine of highest `auto_rank` whose `supports(job)` says yes.

The interface (a new engine is one module plus one `register_engine` line below):

    class MyEngine:
        name = "my"
        @classmethod
        def supports(cls, job: TrainJob) -> str | None:   # None = can run it, else why not (one line)
        def train(self, job: TrainJob, hooks: TrainingHooks, resume_from: Path | None) -> EngineResult

What the engine receives (`TrainJob`): the adapted model (a PeftModel, on its device), the tokenizer, the
tokenized train/eval datasets, the loss kind (`causal_lm`: rows of input_ids + labels with -100 on masked
positions, loss normalised over the step's trained tokens; `sequence_classification`: input_ids +
attention_mask + one class id per row; `custom`: the task's `loss_fn(model, batch) -> scalar` per
micro-batch), `recipe.train` (batch_size x grad_accum sequences per optimizer step, lr, schedule, ...),
the precision, the checkpoints folder, and task options (collator, max_length, compute_metrics).

What the engine must do: call the hooks (engines/hooks.py) - `train_begin(max_steps, step)`, `micro_batch(batch)`
for every micro-batch it trains on, `step_end(step)`, `log_train(...)` every `train.logging_steps` optimizer
steps, `log_eval(...)` for every evaluation, stop when `hooks.should_stop()`, `train_end()`; write resumable
`checkpoint-N/` folders every `train.save_steps` (reliability/checkpoints.py says what complete means; the
carried state is `hooks.carry()` plus the engine's own open logging window) and continue from `resume_from` so
that every record equals the uninterrupted run's (no forced record at a stop; a checkpoint taken at the last
step trains nothing more); on SIGINT/SIGTERM save a checkpoint and raise `TrainingInterrupted`. What it returns (`EngineResult`): steps, epochs, losses, runtime, and an
`evaluate` / `predict` capability that the task's evaluation uses.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from peftlab.errors import PeftlabError

if TYPE_CHECKING:
    from peftlab.config import TrainConfig
    from peftlab.engines.hooks import TrainingHooks

# What the engine optimises: token cross-entropy of a causal LM, a class per sequence, or a task's own
# loss function (diffusion's noise prediction), called by the engine once per micro-batch.
LossKind = Literal["causal_lm", "sequence_classification", "custom"]


@dataclass
class TrainJob:
    """Everything an engine needs to train, and nothing about the task beyond the loss and batch interface."""

    model: Any  # the adapted model (PeftModel / a UNet with LoRA layers), trainable parameters requires_grad
    tokenizer: Any | None
    train_dataset: Any  # rows as the loss kind describes (see the module docstring)
    eval_dataset: Any | None
    loss_kind: LossKind
    train: TrainConfig
    seed: int
    precision: str  # bf16 | fp16 | fp32
    checkpoints: Path  # where checkpoint-N/ folders go
    max_length: int | None = None  # causal_lm: truncation length (None with padding-free batches)
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None  # None: the engine's default
    compute_metrics: Callable[[Any], dict[str, float]] | None = None  # (predictions, label_ids) -> metrics
    loss_fn: Callable[[Any, dict[str, Any]], Any] | None = None  # custom: (model, batch) -> scalar loss tensor
    epoch_records: bool = False  # a kind=epoch record per epoch in metrics.jsonl (classify)


@dataclass
class Prediction:
    predictions: Any  # logits, (rows, classes)
    label_ids: Any  # (rows,)
    metrics: dict[str, float]  # prefixed: eval_loss, test_accuracy, ...


@dataclass
class EngineResult:
    steps: int  # optimizer steps done, over all sessions of a resumed run
    epochs: float
    runtime_s: float  # training seconds, over all sessions
    final_train_loss: float | None  # of the last logging window
    mean_train_loss: float | None
    # (dataset, prefix) -> {f"{prefix}_loss": mean loss over the dataset (causal_lm: per trained token), ...}
    evaluate: Callable[[Any, str], dict[str, float]] | None = None
    # (dataset, prefix) -> logits, label ids and metrics: f"{prefix}_loss" plus job.compute_metrics' keys, prefixed
    predict: Callable[[Any, str], Prediction] | None = None
    fields: dict[str, Any] = field(default_factory=dict)  # engine-specific summary fields


class Engine(Protocol):
    name: str

    @classmethod
    def supports(cls, job: TrainJob) -> str | None: ...

    def train(self, job: TrainJob, hooks: TrainingHooks, resume_from: Path | None) -> EngineResult: ...


@dataclass(frozen=True)
class _Entry:
    target: str  # "module:Class", imported only when the engine is needed (it may need a GPU-only package)
    auto_rank: int


_ENGINES: dict[str, _Entry] = {}


def register_engine(name: str, target: str, auto_rank: int = 0) -> None:
    """`train.engine: name` runs `target` ("package.module:Class"); `auto` prefers a higher auto_rank."""
    _ENGINES[name] = _Entry(target, auto_rank)


def engine_names() -> tuple[str, ...]:
    return tuple(_ENGINES)


def _load(name: str) -> type[Engine] | str:
    module, _, attr = _ENGINES[name].target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        return f"it does not import here ({exc})"


def check_registered(requested: str) -> None:
    """Refuse an engine this install does not have, before a run folder is created."""
    if requested != "auto" and requested not in _ENGINES:
        raise PeftlabError(f"train.engine: '{requested}' is not registered in this install (registered: "
                           f"{', '.join(_ENGINES)}); fix: --set train.engine=auto")


def resolve_engine(requested: str, job: TrainJob) -> Engine:
    """The engine to run `job`: the requested one (a one-line error when it cannot), or the best for `auto`."""
    check_registered(requested)
    if requested != "auto":
        engine = _load(requested)
        why = engine if isinstance(engine, str) else engine.supports(job)
        if why:
            raise PeftlabError(f"train.engine: {requested} cannot run this {job.loss_kind} job: {why}; "
                               "fix: --set train.engine=auto")
        return engine()
    reasons = []
    for name in sorted(_ENGINES, key=lambda n: -_ENGINES[n].auto_rank):
        engine = _load(name)
        why = engine if isinstance(engine, str) else engine.supports(job)
        if not why:
            return engine()
        reasons.append(f"{name}: {why}")
    raise PeftlabError(f"train.engine: no registered engine runs this {job.loss_kind} job ({'; '.join(reasons)}); "
                       "fix: change the recipe (see the reasons)")


register_engine("hf", "peftlab.engines.hf:HfEngine")
register_engine("fast", "peftlab.engines.fast.engine:FastEngine", auto_rank=1)  # sft/classify on CUDA (engines/fast/)
