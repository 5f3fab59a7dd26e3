"""The one training skeleton every task runs through: recipe -> task -> engine -> run folder.

The task prepares model and data (`Task.prepare`), an engine runs the optimisation loop (`train.engine`,
see engines/), and this skeleton owns everything around it the same way for every task and engine: the
monitor and health guard (through the hooks), progress, tracking, resume counters, memory readings,
the adapter on interrupt, and the summary fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftlab.config import Recipe
from peftlab.distributed import ranks
from peftlab.engines import Engine, resolve_engine
from peftlab.engines.hooks import Listener, TrainingHooks
from peftlab.errors import GuardFailure
from peftlab.reliability import TrainingInterrupted, carried_state
from peftlab.runs import RunDir
from peftlab.secrets import redact_recipe
from peftlab.tasks import Prepared, Task, get_task
from peftlab.tracking import start_trackers
from peftlab.watch.console import say
from peftlab.watch.guard import guard_for
from peftlab.watch.memory import memory_kind, peak_memory_all_ranks, reset_peak_memory
from peftlab.watch.progress import Progress


def train(recipe: Recipe, run: RunDir, show_progress: bool = True, resume_from: Path | None = None,
          listeners: Sequence[Listener] = ()) -> dict[str, Any]:
    """Train `recipe` into `run` (or continue from the checkpoint `resume_from`); returns the summary fields.
    `listeners` see the built job before any step (job_ready: the demo's accuracy before), then follow the
    evaluations (a sweep's pruner)."""
    task = get_task(recipe.task)
    prepared = task.prepare(recipe, run)
    for listener in listeners:
        listener.job_ready(prepared.job)
    engine = resolve_engine(recipe.train.engine, prepared.job)
    carried = carried_state(resume_from)
    prepared.counter = prepared.counter_class(**_own_counters(carried))
    guard = guard_for(recipe.watch, prepared.context)
    tracker = start_trackers(recipe.tracking, run, redact_recipe(recipe.to_dict()))  # as config.yaml: no secrets
    for note in tracker.notes:
        say(f"note: {note}")
    prepared.summary["notes"] = [*prepared.summary.get("notes", []), *tracker.notes]
    hooks = TrainingHooks(run, prepared.counter, guard, Progress("train", show_progress), tracker, listeners, carried)
    run.update_summary(engine=engine.name, **prepared.summary)
    reset_peak_memory()
    try:
        return _train_and_finish(task, run, prepared, engine, hooks, resume_from)
    finally:
        hooks.progress.cancel()  # a loop stopped by an error (the guard, Ctrl-C) leaves no live bar behind
        tracker.finish()


def _own_counters(carried: dict[str, Any]) -> dict[str, Any]:
    """This rank's counters at the checkpoint: its own where every rank's were saved (`counter_per_rank`), else
    the one set there is (one process; the hf engine saves rank 0's)."""
    per_rank = carried.get("counter_per_rank")
    return per_rank[ranks().rank] if per_rank else carried.get("counter", {})


def _train_and_finish(task: Task, run: RunDir, prepared: Prepared, engine: Engine, hooks: TrainingHooks,
                      resume_from: Path | None) -> dict[str, Any]:
    try:
        result = engine.train(prepared.job, hooks, resume_from)
    except (TrainingInterrupted, GuardFailure):
        task.save(run, prepared)  # what was learnt so far stays usable (and, after a guard stop, inspectable)
        raise
    summary = {"runtime_s": round(result.runtime_s, 3), "steps": result.steps, "epochs": result.epochs,
               "steps_per_s": round(result.steps / result.runtime_s, 4), **prepared.counter.summary(result.runtime_s),
               "final_train_loss": result.final_train_loss, "mean_train_loss": result.mean_train_loss,
               "memory_kind": memory_kind(), **peak_memory_all_ranks(), **result.fields}
    task.save(run, prepared)
    summary.update(task.finish(run, prepared, result))
    return summary
