"""One place that runs a recipe into a run folder and records how it ended, whatever happens."""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.config import Recipe
from peftlab.distributed import barrier, broadcast, init_process_group, ranks, strategy
from peftlab.engines import check_registered
from peftlab.errors import GuardFailure, PeftlabError
from peftlab.registry import forget_run, index_run
from peftlab.runlock import owner
from peftlab.runs import RunDir, environment, finish_fields, io_cause, io_error, sanitize_name
from peftlab.watch.console import say

if TYPE_CHECKING:
    from peftlab.engines.hooks import Listener

INTERRUPTED_EXIT = 130


def default_run_name(recipe: Recipe) -> str:
    return f"{recipe.name}-{recipe.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_recipe(recipe: Recipe, runs_dir: Path, name: str | None = None, overwrite: bool = False,
               show_progress: bool = True, listeners: Sequence[Listener] = ()) -> RunDir:
    """Train `recipe` into runs_dir/name. On failure the summary says `failed` (or `interrupted`) and why.
    `listeners`: followers of the evaluations (a sweep's pruner, see engines/hooks.py)."""
    check_registered(recipe.train.engine)
    run = _create_run(recipe, runs_dir, name, overwrite)
    return _execute(recipe, run, show_progress, listeners=listeners)


def _create_run(recipe: Recipe, runs_dir: Path, name: str | None, overwrite: bool) -> RunDir:
    """Rank 0 creates the folder; in a multi-process run every rank gets the same one (read-only elsewhere)."""
    init_process_group()
    name = broadcast(name or default_run_name(recipe))
    proc = ranks()
    run = RunDir(Path(runs_dir) / sanitize_name(name), writer=proc.is_main)
    if proc.is_main:
        try:
            run = RunDir.create(runs_dir, name, recipe, overwrite=overwrite)
            run.update_summary(name=run.name, recipe=recipe.name, task=recipe.task, method=recipe.method.name,
                               environment=environment(), world_size=proc.world_size,
                               strategy=strategy() if proc.distributed else None)
        except OSError as exc:
            run.release()
            raise io_error(exc) from None
    barrier()
    return run


def resume_run(ref: str, runs_dir: Path, recipe: Recipe | None = None, show_progress: bool = True) -> RunDir:
    """Continue run `ref` from its newest complete checkpoint, with the recipe it was started with."""
    from peftlab.reliability import plan_resume

    init_process_group()  # before environment() below initialises CUDA
    try:
        plan = plan_resume(ref, runs_dir, recipe, lock=ranks().is_main)
    except OSError as exc:  # the lock file or the trimmed log could not be written
        raise io_error(exc) from None
    summary = plan.run.summary()
    started_with = summary.get("world_size", 1)
    if started_with != ranks().world_size:
        plan.run.release()
        raise PeftlabError(
            f"--resume {ref}: the run was started with {started_with} process(es), this launch has "
            f"{ranks().world_size}; fix: resume with --gpus {started_with} (the data order depends on it)"
        )
    plan.run.writer = ranks().is_main
    resumes = [*summary.get("resumes", []), {"from_step": plan.step, "environment": environment()}]
    try:
        plan.run.update_summary(status="running", reason=None, resumes=resumes)
    except OSError as exc:
        plan.run.release()
        raise io_error(exc, plan.run) from None
    say(f"resuming from {plan.checkpoint.name}")
    return _execute(plan.recipe, plan.run, show_progress, resume_from=plan.checkpoint)


def _io_failure(run: RunDir, cause: OSError) -> PeftlabError:
    """A full disk, a read-only remount, a quota: one error line, and `failed` where the summary can
    still be written (else the run shows as `dead` once this process has exited)."""
    from peftlab.reliability.checkpoints import discard_incomplete

    error = io_error(cause, run)
    try:
        # The checkpoint whose save failed is not one (resume skips it anyway): its space lets the summary be written.
        if run.writer and run.checkpoints_path.is_dir():
            discard_incomplete(run.checkpoints_path, after=run.checkpoints_path / "checkpoint-0")
        run.update_summary(**finish_fields("failed", "I/O error"), diagnosis=str(error))
    except OSError:
        error = PeftlabError(f"{error} (summary.json could not be updated either: `peftlab runs` shows the run "
                             "as dead once this process has exited)")
    return error


def _record_end(run: RunDir, **fields: Any) -> None:
    """How the run ended, into summary.json; a write the disk refuses becomes one error line."""
    try:
        run.update_summary(**fields)
    except OSError as exc:
        raise io_error(exc, run) from None


def _began(run: RunDir) -> bool:
    """Whether the run holds anything a user could want: a logged step, a checkpoint or an adapter."""
    return any(p.exists() for p in (run.metrics_path, run.checkpoints_path, run.adapter_path))


def _remove(run: RunDir) -> None:
    """A run refused on bad input before its first step: nothing was trained, so nothing is kept. The error line
    says what to fix; `train` with the same --name then starts afresh."""
    run.release()
    if run.writer:
        shutil.rmtree(run.path, ignore_errors=True)
        forget_run(run)
        say(f"run folder {run.path}: removed (refused before its first step, nothing was trained)")


def _execute(recipe: Recipe, run: RunDir, show_progress: bool, resume_from: Path | None = None,
             listeners: Sequence[Listener] = ()) -> RunDir:
    import torch

    from peftlab.reliability import TrainingInterrupted, terminate_as_interrupt
    from peftlab.reliability.oom import memory_advice
    from peftlab.training import train

    say(f"run folder: {run.path}")
    refused = False  # bad input found before the first step: the folder goes, or it would block the corrected rerun
    together = False  # every rank stopped at the same step: they leave together, below
    try:
        # pid, host and start time tell a live run from a dead one where its lock cannot be probed.
        run.update_summary(**owner())
        if run.writer:
            index_run(run)  # the registry sees the run while it trains
        with terminate_as_interrupt():
            results = train(recipe, run, show_progress=show_progress, resume_from=resume_from, listeners=listeners)
        summary = run.update_summary(**results, **finish_fields("completed"))
    except GuardFailure as exc:
        together = exc.every_rank
        saved = {"adapter": str(run.adapter_path)} if run.adapter_path.is_dir() else {}
        _record_end(run, **finish_fields("failed", "health guard"), diagnosis=str(exc), **saved)
        raise
    except PeftlabError as exc:
        refused = resume_from is None and not _began(run)
        if not refused:
            _record_end(run, **finish_fields("failed", "bad input"), diagnosis=str(exc))
        raise
    except KeyboardInterrupt as exc:
        together = isinstance(exc, TrainingInterrupted) and exc.every_rank
        saved = {"checkpoint": str(exc.checkpoint)} if isinstance(exc, TrainingInterrupted) else {}
        _record_end(run, **finish_fields("interrupted", str(exc) or "KeyboardInterrupt"), **saved,
                    resume=f"peftlab train --resume {run.path}")
        say(f"interrupted ({exc or 'KeyboardInterrupt'}); continue with: peftlab train --resume {run.path}")
        raise
    except torch.OutOfMemoryError as exc:
        message = memory_advice(recipe, run.summary().get("memory_estimate"), exc)
        _record_end(run, **finish_fields("failed", "out of memory"), diagnosis=message)
        raise PeftlabError(message) from None
    except Exception as exc:
        if (cause := io_cause(exc, run.path)) is not None:
            raise _io_failure(run, cause) from None
        _record_end(run, **finish_fields("failed", f"{exc.__class__.__name__}: {exc}"),
                    traceback=traceback.format_exc()[-4000:])
        raise
    finally:
        if refused:
            _remove(run)
        else:
            if run.writer:
                index_run(run)  # and how it ended, whatever happened
            run.release()  # only now: until the end is recorded, a free lock would read as a dead run
        if together:  # torchrun ends every rank once one exits non-zero: the others wait for rank 0's records
            barrier()
    say(f"done: {run.path} ({_losses(summary)}{_speed(summary)})")
    return run


def _losses(summary: dict[str, Any]) -> str:
    """`loss 0.2919, eval loss 0.27`: 4 significant digits, as the step lines; a loss the run has not is left out
    (diffusion has no eval loss: it said `eval loss None`)."""
    values = ((label, summary.get(key)) for label, key in (("loss", "final_train_loss"), ("eval loss", "eval_loss")))
    return ", ".join(f"{label} {value:.4g}" for label, value in values if isinstance(value, (int, float)))


def _speed(summary: dict[str, Any]) -> str:
    """The fast engine's compile time apart from its steady-state speed, for the finish line ("" without them)."""
    compile_s, rate, mfu = summary.get("compile_s"), summary.get("steady_tokens_per_s"), summary.get("mfu")
    if rate is None:
        return ""
    return ((f"; compile {compile_s} s, then" if compile_s is not None else ";") + f" {rate:.0f} tokens/s"
            + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
