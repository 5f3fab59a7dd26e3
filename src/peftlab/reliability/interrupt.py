"""Ctrl-C / SIGTERM during training: finish the current step, save a checkpoint, stop cleanly.

The signal handler only sets a flag (no I/O, no allocation inside a handler); `StopCallback` turns
the flag into `control.should_save` + `should_training_stop` at the next step end, so the HF Trainer
writes a full checkpoint (weights, optimizer, scheduler, RNG, trainer_state) through its own code
path. A second signal, or one outside the training loop, raises KeyboardInterrupt at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput

from peftlab.config import TrainConfig
from peftlab.reliability.checkpoints import (
    STATE_FILE,
    CarryState,
    LogWindow,
    RetentionCallback,
    carried_state,
    finished,
)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving `checkpoint`. A KeyboardInterrupt, so that no
    `except Exception` on the way up swallows it and the CLI exits with INTERRUPTED_EXIT."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path, every_rank: bool = False) -> None:
        super().__init__(f"{signal_name} at step {step}; checkpoint saved: {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.every_rank = every_rank  # every process stopped at this step (they agreed on it, as the fast engine does)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Install `handler` for SIGINT and SIGTERM, restore the previous ones on exit (main thread only:
    Python delivers signals there, and signal.signal() refuses other threads)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def terminate_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so a killed job still records `interrupted`."""
    return on_stop_signals(_raise_interrupt)


class StopRequest:
    """The flag the signal handler sets."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # asked twice: the user wants out now
            _raise_interrupt(signum, frame)
        self.signal_name = signal.Signals(signum).name


class StopCallback(TrainerCallback):
    def __init__(self, request: StopRequest) -> None:
        self.request = request

    def on_step_end(self, args, state, control, **kwargs):
        if self.request.signal_name is not None:
            # No forced log here: the steps since the last log travel in the checkpoint (LogWindow), so the
            # resumed run logs them at the step an uninterrupted run would.
            control.should_save = True
            control.should_training_stop = True
        return control


def train_resumable(trainer: Any, train: TrainConfig, resume_from: Path | None = None,
                    carry: Callable[[], dict[str, Any]] | None = None) -> Any:
    """`trainer.train()` that stops on SIGINT/SIGTERM with a checkpoint (then raises
    TrainingInterrupted), resumes from `resume_from`, keeps the last N checkpoints plus the best,
    and saves `carry()` (task counters) and the open logging window inside every checkpoint.
    Returns the Trainer's TrainOutput, its training_loss the mean over every step of the run (HF's
    covers only the steps of this call). A checkpoint taken at max_steps is not trained on: its
    weights are loaded and only what followed training (evaluation, adapter, samples) is left."""
    request = StopRequest()
    window = LogWindow(trainer, carried_state(resume_from).get(LogWindow.KEY))
    saved = CarryState(lambda: {**(carry() if carry else {}), LogWindow.KEY: window.saved})
    for callback in (StopCallback(request), window, RetentionCallback(train.save_total_limit), saved):
        trainer.add_callback(callback)
    if resume_from is not None and finished(resume_from):
        return _restore_finished(trainer, resume_from, window)
    with on_stop_signals(request.handle):
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    step = trainer.state.global_step
    checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{step}"
    # A signal after the last step's end found the loop already done: nothing left to stop.
    if request.signal_name is not None and checkpoint.is_dir():
        raise TrainingInterrupted(request.signal_name, step, checkpoint)
    if resume_from is not None and not window.restore:  # a checkpoint from before the window was carried
        return result
    return TrainOutput(step, trainer._total_loss_scalar / max(step, 1), result.metrics)


def _restore_finished(trainer: Any, checkpoint: Path, window: LogWindow) -> Any:
    """The Trainer as it was when its training loop ended at `checkpoint` (state, weights, best model)."""
    trainer.state = TrainerState.load_from_json(str(checkpoint / STATE_FILE))
    trainer._load_from_checkpoint(str(checkpoint))
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
        trainer._load_best_model()
    step = trainer.state.global_step
    return TrainOutput(step, window.run_loss_sum() / max(step, 1), {})
