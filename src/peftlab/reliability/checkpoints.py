"""Checkpoints that survive a crash: which one is complete, which ones to keep, what they carry.

The HF Trainer writes `checkpoint-N/` in place: weights, optimizer, scheduler, RNG state, and
`trainer_state.json` last. A SIGKILL mid-write leaves a folder without (or with a torn)
trainer_state.json, or with a truncated weights file, so "the newest folder" is not "the last
checkpoint": `latest_complete` is the newest one whose state parses and whose files are whole.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import nested_gather

from peftlab.config import TrainConfig

STATE_FILE = "trainer_state.json"
STEP = re.compile(r"^checkpoint-(\d+)$")
TRASH_PREFIX = ".trash-"


def step_of(path: Path) -> int | None:
    match = STEP.match(path.name)
    return int(match.group(1)) if match else None


def checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders, oldest step first (complete or not)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {STATE_FILE} (the write was cut short)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{STATE_FILE} is torn"
    if state.get("global_step") != step_of(checkpoint):
        return f"{STATE_FILE} is for step {state.get('global_step')}"
    weights = list(checkpoint.glob("*.safetensors"))
    if not weights:
        return "no .safetensors weights"
    for path in weights:
        if not _safetensors_whole(path):
            return f"{path.name} is truncated"
    for path in [*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth")]:
        # torch.save writes a zip whose central directory comes last: a cut-short file has none.
        if not zipfile.is_zipfile(path):
            return f"{path.name} is truncated"
    return None


def _safetensors_whole(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):  # checks the header covers the whole file
            return True
    except (SafetensorError, OSError):
        return False


def latest_complete(folder: Path) -> Path | None:
    """The newest checkpoint that can be resumed from."""
    for checkpoint in reversed(checkpoints(folder)):
        if problem(checkpoint) is None:
            return checkpoint
    return None


def discard(path: Path) -> None:
    """Rename first (atomic), then delete: a kill mid-delete leaves trash, never a half checkpoint-N."""
    trash = path.with_name(TRASH_PREFIX + path.name)
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def discard_incomplete(folder: Path, after: Path) -> list[str]:
    """Delete the unfinished checkpoints a crash left after the checkpoint `after` (the resumed run
    saves those steps again) and old trash; returns what was removed and why."""
    removed = []
    for trash in folder.glob(TRASH_PREFIX + "*"):
        shutil.rmtree(trash, ignore_errors=True)
    for checkpoint in checkpoints(folder):
        why = problem(checkpoint)
        if why is not None and step_of(checkpoint) > step_of(after):
            discard(checkpoint)
            removed.append(f"{checkpoint.name} ({why})")
    return removed


def prune(folder: Path, keep_last: int, best: str | None) -> None:
    """Keep the newest `keep_last` complete checkpoints and the best one; delete the others."""
    complete = [c for c in checkpoints(folder) if problem(c) is None]
    keep = set(complete[-keep_last:])
    if best:
        keep.add(Path(best))
    newest = step_of(complete[-1]) if complete else -1
    for checkpoint in checkpoints(folder):
        # An incomplete folder newer than every complete one may be a save still in progress.
        if checkpoint not in keep and step_of(checkpoint) <= newest:
            discard(checkpoint)


def checkpoint_args(train: TrainConfig) -> dict[str, Any]:
    """TrainingArguments for resumable checkpoints; retention is ours (RetentionCallback), not HF's,
    because HF's save_total_limit counts the best checkpoint inside the limit."""
    return {
        "save_strategy": "steps" if train.save_steps else "no",
        "save_steps": train.save_steps,
        "save_total_limit": None,
        "save_only_model": False,  # resume needs optimizer, scheduler and RNG state
        "metric_for_best_model": train.best_metric,
    }


class RetentionCallback(TrainerCallback):
    def __init__(self, keep_last: int) -> None:
        self.keep_last = keep_last

    def on_save(self, args, state, control, **kwargs):
        prune(Path(args.output_dir), self.keep_last, state.best_model_checkpoint)


class CarryState(TrainerCallback, ExportableState):
    """Task counters (tokens seen, runtime) saved inside trainer_state.json, so they are written
    together with the checkpoint they belong to. HF does not restore them (we read them back with
    `carried_state`), because its restore would rebuild this callback without `get`."""

    def __init__(self, get: Callable[[], dict[str, Any]] | None = None) -> None:
        self.get = get

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": self.get() if self.get else {}}


def carried_state(checkpoint: Path | None) -> dict[str, Any]:
    """What CarryState saved in `checkpoint` ({} for a fresh run or a checkpoint without it)."""
    if checkpoint is None:
        return {}
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    return state.get("stateful_callbacks", {}).get(CarryState.__name__, {}).get("attributes", {})


def finished(checkpoint: Path) -> bool:
    """Whether `checkpoint` was taken when training had done all its steps (Ctrl-C during the final
    evaluation, a kill while the adapter was written): resuming it must not train again."""
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


class LogWindow(TrainerCallback):
    """The HF Trainer's logging window (the loss summed since the last logged step) and running loss total,
    carried across a resume. HF resets both in every train() call, so a run resumed mid-window logged the
    mean of the resumed steps only (17.358 over steps 12-15 against 17.471 over 11-15, issue 12) and its
    train_loss covered only the resumed steps. These are the Trainer's private `_tr_loss`,
    `_globalstep_last_logged` and `_total_loss_scalar` (transformers 5.x): no public API exposes them."""

    KEY = "log_window"

    def __init__(self, trainer: Any, restore: dict[str, Any] | None) -> None:
        self.trainer, self.restore = trainer, restore
        self.saved: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.restore:  # after HF's reset, before the first step
            self.trainer._tr_loss.fill_(self.restore["window_loss_sum"])
            self.trainer._globalstep_last_logged = self.restore["last_logged_step"]
            self.trainer._total_loss_scalar = self.restore["logged_loss_sum"]

    def on_step_end(self, args, state, control, **kwargs):
        # Runs after the flow callback decided this step's log and save; HF logs (draining the window into
        # the total) before it saves, so a checkpoint holds the window as it is after that log. Every rank
        # restores the mean over ranks, as HF's log gathers it: the mean of the sums stays right.
        if control.should_save:
            window = nested_gather(self.trainer._tr_loss, args.parallel_mode).mean().item()
            logs = control.should_log and state.global_step > self.trainer._globalstep_last_logged
            self.saved = {
                "window_loss_sum": 0.0 if logs else window,
                "last_logged_step": state.global_step if logs else self.trainer._globalstep_last_logged,
                "logged_loss_sum": self.trainer._total_loss_scalar + (window if logs else 0.0),
            }

    def run_loss_sum(self) -> float:
        """The loss summed over every step up to the restored checkpoint."""
        return (self.restore or {}).get("logged_loss_sum", 0.0) + (self.restore or {}).get("window_loss_sum", 0.0)
