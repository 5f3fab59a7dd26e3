"""`peftlab train --resume RUN`: reopen a run folder and continue it exactly where it stopped.

The recipe is the one saved in the run (a recipe passed along must be the same), the checkpoint
the newest complete one, and metrics.jsonl is cut back to that checkpoint's step so that steps
re-run after a crash are not logged twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from peftlab import runlock
from peftlab.config import Recipe, load_recipe
from peftlab.errors import PeftlabError
from peftlab.reliability.checkpoints import discard_incomplete, latest_complete, step_of
from peftlab.runs import RunDir, atomic_write_text, open_run
from peftlab.secrets import redact_recipe
from peftlab.watch.console import say


@dataclass
class ResumePlan:
    run: RunDir
    recipe: Recipe
    checkpoint: Path

    @property
    def step(self) -> int:
        return step_of(self.checkpoint) or 0


def plan_resume(ref: str, runs_dir: Path, recipe: Recipe | None = None, lock: bool = True) -> ResumePlan:
    """Check that run `ref` can be resumed (with `recipe`, when given) and prepare its folder. With `lock`
    (the writing process) the run's lock is taken first and held by the plan's run: a live run is refused."""
    run = open_run(ref, runs_dir)
    fresh = lock and not runlock.holds(run.path)
    if lock:
        run.lock = runlock.acquire(run.path)
    try:
        return _plan(run, recipe)
    except BaseException:
        if fresh:
            run.release()
        raise


def _plan(run: RunDir, recipe: Recipe | None) -> ResumePlan:
    saved = load_recipe(str(run.config_path))
    if recipe is not None:
        _check_same_recipe(recipe, run)
    _check_resumable(run)
    checkpoint = latest_complete(run.checkpoints_path)
    if checkpoint is None:
        raise PeftlabError(
            f"run '{run.path}' has no complete checkpoint in {run.checkpoints_path.name}/ to resume from; fix: start "
            "it again with --overwrite (and set train.save_steps so that long runs checkpoint as they go)"
        )
    for item in discard_incomplete(run.checkpoints_path, after=checkpoint):
        say(f"resume: removed incomplete checkpoint {item}")
    plan = ResumePlan(run, recipe or saved, checkpoint)
    trim_metrics(run, plan.step)
    return plan


def _check_resumable(run: RunDir) -> None:
    summary = run.summary()
    status = summary.get("status")
    if status == "completed":
        raise PeftlabError(f"run '{run.path}' already completed; nothing to resume; fix: train a new run (--name NEW)")
    pid = summary.get("pid")
    # A run written before run folders had a lock, or trained by a process that could not take it.
    if status == "running" and pid != runlock.owner()["pid"] and runlock.process_alive(summary):
        raise PeftlabError(
            f"run '{run.path}' is still being trained by process {pid}; fix: stop it first "
            "(Ctrl-C or SIGTERM saves a checkpoint), then resume"
        )


def _check_same_recipe(recipe: Recipe, run: RunDir) -> None:
    """config.yaml is written redacted, so compare the passed recipe as it would have been written."""
    given = redact_recipe(recipe.to_dict())
    saved = yaml.safe_load(run.config_path.read_text(encoding="utf-8"))
    differences = _differences(given, saved)
    if differences:
        shown = "; ".join(f"{key}: run has {old!r}, given {new!r}" for key, old, new in differences[:3])
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise PeftlabError(
            f"--resume '{run.name}': the recipe differs from the one the run was started with ({shown}{more}); "
            f"fix: resume without a recipe or --set (the run's config.yaml is used), or start a new run"
        )


def _differences(given: Any, saved: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(given, dict) and isinstance(saved, dict):
        found = []
        for key in list(saved) + [k for k in given if k not in saved]:
            found += _differences(given.get(key), saved.get(key), f"{prefix}{key}.")
        return found
    return [] if given == saved else [(prefix.rstrip("."), saved, given)]


def trim_metrics(run: RunDir, step: int) -> None:
    """Drop the records logged after `step` (they will be logged again) and a torn last line."""
    if not run.metrics_path.exists():
        return
    kept = [r for r in run.metrics() if not isinstance(r.get("step"), int) or r["step"] <= step]
    atomic_write_text(run.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
