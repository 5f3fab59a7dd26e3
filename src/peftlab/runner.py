"""One place that runs a recipe into a run folder and records how it ended, whatever happens."""

from __future__ import annotations

import time
import traceback
from pathlib import Path

from peftlab.config import Recipe
from peftlab.errors import GuardFailure, PeftlabError
from peftlab.runs import RunDir, environment, finish_fields
from peftlab.watch.console import say

INTERRUPTED_EXIT = 130


def default_run_name(recipe: Recipe) -> str:
    return f"{recipe.name}-{recipe.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_recipe(recipe: Recipe, runs_dir: Path, name: str | None = None, overwrite: bool = False,
               show_progress: bool = True) -> RunDir:
    """Train `recipe` into runs_dir/name. On failure the summary says `failed` (or `interrupted`) and why."""
    from peftlab.tasks import sft

    run = RunDir.create(runs_dir, name or default_run_name(recipe), recipe, overwrite=overwrite)
    run.update_summary(name=run.name, recipe=recipe.name, task=recipe.task, method=recipe.method.name,
                       environment=environment())
    say(f"run folder: {run.path}")
    try:
        results = sft.train(recipe, run, show_progress=show_progress)
    except GuardFailure as exc:
        run.update_summary(**finish_fields("failed", "health guard"), diagnosis=str(exc))
        raise
    except PeftlabError as exc:
        run.update_summary(**finish_fields("failed", "bad input"), diagnosis=str(exc))
        raise
    except KeyboardInterrupt:
        run.update_summary(**finish_fields("interrupted", "KeyboardInterrupt"))
        raise
    except Exception as exc:
        run.update_summary(**finish_fields("failed", f"{exc.__class__.__name__}: {exc}"),
                           traceback=traceback.format_exc()[-4000:])
        raise
    summary = run.update_summary(**results, **finish_fields("completed"))
    say(f"done: {run.path} (loss {summary.get('final_train_loss')}, eval loss {summary.get('eval_loss')})")
    return run
