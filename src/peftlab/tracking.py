"""Optional experiment trackers: W&B, TensorBoard, MLflow and trackio, mirroring the run for every task and engine.

The run folder stays the source of truth: the training hooks hand every record they write to metrics.jsonl
to the trackers too (engines/hooks.py), so a tracker sees the same numbers whatever engine trained. We stand
on accelerate's tracker classes (one API over every backend) rather than the Trainer's `report_to`, which
only the hf engine's Trainer would honour. Offline modes need no account and write inside the run folder;
peftlab never reads, stores or logs an API key: online modes use what `wandb login`, MLFLOW_TRACKING_URI or
the environment already provide. Rank 0 alone tracks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from peftlab.config import TrackingConfig
from peftlab.runs import RunDir


def _wandb(cfg: TrackingConfig, run: RunDir, config: dict[str, Any]) -> tuple[Any, str]:
    from accelerate.tracking import WandBTracker

    tracker = WandBTracker(cfg.project, name=run.name, dir=str(run.path), mode=cfg.mode, config=config)
    tracker.start()
    where = f"{run.path / 'wandb'} (`wandb sync` uploads it)" if cfg.mode == "offline" else "W&B online (your `wandb login`)"
    return tracker, where


def _tensorboard(cfg: TrackingConfig, run: RunDir, config: dict[str, Any]) -> tuple[Any, str]:
    from accelerate.tracking import TensorBoardTracker

    tracker = TensorBoardTracker(run.name, run.path / "tensorboard")
    tracker.start()
    tracker.store_init_configuration(config)
    return tracker, f"{run.path / 'tensorboard'} (`tensorboard --logdir` it)"


def _mlflow(cfg: TrackingConfig, run: RunDir, config: dict[str, Any]) -> tuple[Any, str]:
    import mlflow
    from accelerate.tracking import MLflowTracker

    if cfg.mode == "offline":  # online: MLFLOW_TRACKING_URI, the user's own server, as mlflow reads it
        mlflow.set_tracking_uri(f"sqlite:///{run.path / 'mlflow.db'}")
    where = f"{run.path / 'mlflow.db'} (`mlflow ui --backend-store-uri sqlite:///...`)" if cfg.mode == "offline" \
        else f"MLflow at {mlflow.get_tracking_uri()}"
    tracker = MLflowTracker(cfg.project, run_name=run.name)
    tracker.start()
    tracker.store_init_configuration(config)
    return tracker, where


def _trackio(cfg: TrackingConfig, run: RunDir, config: dict[str, Any]) -> tuple[Any, str]:
    from accelerate.tracking import TrackioTracker

    # trackio reads TRACKIO_DIR once, at its import: the first run of a process decides where its database lives.
    with _scoped_env({"TRACKIO_DIR": str(run.path / "trackio")} if cfg.mode == "offline" else {}):
        import trackio.utils

    tracker = TrackioTracker(cfg.project, name=run.name, config=config)
    tracker.start()
    return tracker, f"{trackio.utils.TRACKIO_DIR} (`trackio show`)"


@contextlib.contextmanager
def _scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them (the user's are kept)."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update({key: value for key, value in values.items() if previous[key] is None})
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)


# report_to name -> (module it needs, the accelerate tracker it builds and where its files go)
TRACKER_BUILDERS = {"wandb": ("wandb", _wandb), "tensorboard": ("tensorboard", _tensorboard),
                    "mlflow": ("mlflow", _mlflow), "trackio": ("trackio", _trackio)}


@dataclass
class Trackers:
    """The run's trackers (accelerate's tracker classes: one API for every backend), fed every record that goes to
    metrics.jsonl. A tracker never fails a run: one that breaks is dropped with a note."""

    active: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record ({"kind": "train"|"eval"|..., "step": N, ...}): its numbers as `kind/name`."""
        values = {f"{record.get('kind', 'train')}/{k}": v for k, v in record.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step", "time")}
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(values, step=record["step"])
            except Exception as exc:  # a tracker is a mirror: losing it must not lose the run
                self.active.pop(name)
                self.notes.append(f"tracking: {name} stopped ({exc.__class__.__name__}: {exc}); the run folder has every record")

    def finish(self) -> None:
        for name, tracker in self.active.items():
            with contextlib.suppress(Exception), quiet_stdout():
                tracker.finish()
                if name == "trackio":  # accelerate's finish leaves the run current: trackio's atexit would end it again
                    import trackio

                    trackio.finish()
        self.active.clear()


def quiet_stdout() -> contextlib.AbstractContextManager:
    """Trackers print banners of their own on start and finish (trackio's, ANSI-coloured even in a log); the
    `note: tracking: ...` line says where the files go and how to open them."""
    return contextlib.redirect_stdout(io.StringIO())


def start_trackers(cfg: TrackingConfig, run: RunDir, config: dict[str, Any]) -> Trackers:
    """Start the recipe's trackers with `config` (the resolved recipe) as their hyperparameters; on rank 0 only
    (`run.writer`). A tracker whose package is missing is a note naming the install, not an error."""
    trackers = Trackers()
    if cfg.trackers and run.writer:
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through its state; a no-op when a launcher made it already
    for name in cfg.trackers if run.writer else []:
        module, build = TRACKER_BUILDERS[name]
        if importlib.util.find_spec(module) is None:
            trackers.notes.append(f"tracking: {name} is not installed (pip install 'peftlab[trackers]'); "
                                  "this run is recorded in its run folder only")
            continue
        with quiet_stdout():
            trackers.active[name], where = build(cfg, run, _flat(config))
        trackers.notes.append(f"tracking: {name} ({cfg.mode}) -> {where}")
    return trackers


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`train.lr`-style keys with scalar values: what every tracker's hyperparameter table accepts."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) or value is None else str(value)
    return out
