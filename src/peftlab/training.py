"""The one training skeleton every task runs through: recipe -> task -> engine -> run folder.

The task prepares model and data (`Task.prepare`), an engine runs the optimisation loop (`train.engine`,
see engines/), and this skeleton owns everything around it the same way for every task and engine: the
monitor and health guard (through the hooks), progress, tracking, resume counters, memory readings,
the adapter on interrupt, and the summary fields.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftlab.config import Recipe
from peftlab.engines import Engine, resolve_engine
from peftlab.engines.hooks import Listener, TrainingHooks
from peftlab.reliability import TrainingInterrupted, carried_state
from peftlab.runs import RunDir
from peftlab.secrets import redact
from peftlab.tasks import Prepared, Task, get_task
from peftlab.tracking import Tracker, environment, plan
from peftlab.watch.console import Progress, say
from peftlab.watch.guard import HealthGuard
from peftlab.watch.memory import memory_kind, peak_memory_all_ranks, reset_peak_memory


def train(recipe: Recipe, run: RunDir, show_progress: bool = True, resume_from: Path | None = None,
          listeners: Sequence[Listener] = ()) -> dict[str, Any]:
    """Train `recipe` into `run` (or continue from the checkpoint `resume_from`); returns the summary fields.
    `listeners` follow the evaluations (a sweep's pruner)."""
    task = get_task(recipe.task)
    tracking = plan(recipe.tracking, run)
    if tracking.note:
        say(f"note: {tracking.note}")
    prepared = task.prepare(recipe, run)
    if tracking.note:
        prepared.summary["notes"] = [*prepared.summary.get("notes", []), tracking.note]
    engine = resolve_engine(recipe.train.engine, prepared.job)
    carried = carried_state(resume_from)
    prepared.counter = prepared.counter_class(**carried.get("counter", {}))
    guard = HealthGuard(prepared.context, recipe.watch.patience) if recipe.watch.guard else None
    tracker = Tracker(tracking, run, json.loads(redact(json.dumps(recipe.to_dict()))))  # as config.yaml: no secrets
    hooks = TrainingHooks(run, prepared.counter, guard, Progress("train", show_progress), tracker, listeners,
                          carried.get("runtime_s", 0.0))
    run.update_summary(engine=engine.name, **prepared.summary)
    reset_peak_memory()
    with environment(tracking):
        tracker.start()
        try:
            return _train_and_finish(task, run, prepared, engine, hooks, resume_from)
        finally:
            tracker.finish()


def _train_and_finish(task: Task, run: RunDir, prepared: Prepared, engine: Engine, hooks: TrainingHooks,
                      resume_from: Path | None) -> dict[str, Any]:
    try:
        result = engine.train(prepared.job, hooks, resume_from)
    except TrainingInterrupted:
        task.save(run, prepared)  # what was learnt so far stays usable
        raise
    summary = {"runtime_s": round(result.runtime_s, 3), "steps": result.steps, "epochs": result.epochs,
               "steps_per_s": round(result.steps / result.runtime_s, 4), **prepared.counter.summary(result.runtime_s),
               "final_train_loss": result.final_train_loss, "mean_train_loss": result.mean_train_loss,
               "memory_kind": memory_kind(), **peak_memory_all_ranks(), **result.fields}
    task.save(run, prepared)
    summary.update(task.finish(run, prepared, result))
    return summary
