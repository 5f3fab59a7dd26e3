"""Optional experiment tracking (Weights & Biases) through the Trainer's own `report_to` integration.

The run folder stays the source of truth: tracking only mirrors it. W&B is used only when the recipe
enables it and the package is importable (`pip install 'peftlab[wandb]'`); offline mode needs no
account and writes its files inside the run folder. peftlab never reads, stores or logs an API key:
online mode uses whatever `wandb login` or the environment already provides.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from peftlab.config import TrackingConfig
from peftlab.runs import RunDir


@dataclass
class Tracking:
    report_to: list[str] = field(default_factory=list)  # [] = "none" for the Trainer
    env: dict[str, str] = field(default_factory=dict)  # settings for the integration, never a credential
    note: str | None = None


def plan(cfg: TrackingConfig, run: RunDir) -> Tracking:
    if not cfg.wandb:
        return Tracking()
    if importlib.util.find_spec("wandb") is None:
        return Tracking(note="tracking.wandb is on but wandb is not installed (pip install 'peftlab[wandb]'); "
                             "this run is recorded in its run folder only")
    env = {
        "WANDB_PROJECT": cfg.project,
        "WANDB_MODE": cfg.mode,
        "WANDB_DIR": str(run.path),  # offline files live beside the run they mirror
        "WANDB_LOG_MODEL": "false",  # the adapter is in the run folder; never upload weights implicitly
    }
    where = f"offline, files under {run.path / 'wandb'} (`wandb sync` uploads them later)" if cfg.mode == "offline" \
        else "online (credentials from `wandb login` or the environment; peftlab stores none)"
    return Tracking(report_to=["wandb"], env=env, note=f"tracking: W&B project '{cfg.project}', {where}")


@contextlib.contextmanager
def environment(tracking: Tracking) -> Iterator[None]:
    """Set the integration's variables for the duration of one run, then restore the previous values."""
    previous = {key: os.environ.get(key) for key in tracking.env}
    os.environ.update(tracking.env)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------ trackers fed by the monitor (every task, every engine)

def _wandb(cfg: TrackingConfig, run: RunDir) -> tuple[Any, str]:
    from accelerate.tracking import WandBTracker

    # WANDB_LOG_MODEL: the adapter is in the run folder; never upload weights implicitly.
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    os.environ.setdefault("WANDB_SILENT", "true")  # our note says where the files are
    tracker = WandBTracker(cfg.project, name=run.name, dir=str(run.path), mode=cfg.mode)
    where = f"{run.path / 'wandb'} (`wandb sync` uploads it)" if cfg.mode == "offline" else "W&B online (your `wandb login`)"
    return tracker, where


def _tensorboard(cfg: TrackingConfig, run: RunDir) -> tuple[Any, str]:
    from accelerate.tracking import TensorBoardTracker

    return TensorBoardTracker(run.name, run.path / "tensorboard"), f"{run.path / 'tensorboard'} (`tensorboard --logdir` it)"


def _mlflow(cfg: TrackingConfig, run: RunDir) -> tuple[Any, str]:
    import mlflow
    from accelerate.tracking import MLflowTracker

    if cfg.mode == "offline":  # online: MLFLOW_TRACKING_URI, the user's own server, as mlflow reads it
        mlflow.set_tracking_uri(f"sqlite:///{run.path / 'mlflow.db'}")
    where = f"{run.path / 'mlflow.db'} (`mlflow ui --backend-store-uri sqlite:///...`)" if cfg.mode == "offline" \
        else f"MLflow at {mlflow.get_tracking_uri()}"
    return MLflowTracker(cfg.project, run_name=run.name), where


def _trackio(cfg: TrackingConfig, run: RunDir) -> tuple[Any, str]:
    from accelerate.tracking import TrackioTracker

    # trackio reads TRACKIO_DIR once, at import: the first run of a process decides where its database lives.
    if cfg.mode == "offline":
        os.environ.setdefault("TRACKIO_DIR", str(run.path / "trackio"))
    import trackio.utils

    return TrackioTracker(cfg.project, name=run.name), f"{trackio.utils.TRACKIO_DIR} (`trackio show`)"


# report_to name -> (module it needs, the accelerate tracker it builds and where its files go)
TRACKER_BUILDERS = {"wandb": ("wandb", _wandb), "tensorboard": ("tensorboard", _tensorboard),
                    "mlflow": ("mlflow", _mlflow), "trackio": ("trackio", _trackio)}


@dataclass
class Trackers:
    """The run's trackers (accelerate's tracker classes: one API for every backend), fed every record that goes to
    metrics.jsonl. A tracker never fails a run: one that breaks is dropped with a note."""

    active: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def log(self, record: dict[str, Any], step: int) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(values, step=step)
            except Exception as exc:  # a tracker is a mirror: losing it must not lose the run
                self.active.pop(name)
                self.notes.append(f"tracking: {name} stopped ({exc.__class__.__name__}: {exc}); the run folder has every record")

    def finish(self) -> None:
        for tracker in self.active.values():
            with contextlib.suppress(Exception):
                tracker.finish()
        self.active.clear()


def start_trackers(cfg: TrackingConfig, run: RunDir, config: dict[str, Any]) -> Trackers:
    """Start the recipe's trackers (rank 0 only: the caller decides) with the resolved recipe as their config.
    A tracker whose package is missing is a note naming the install, not an error."""
    trackers = Trackers()
    if cfg.trackers:
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through its state; a no-op when a launcher made it already
    for name in cfg.trackers:
        module, build = TRACKER_BUILDERS[name]
        if importlib.util.find_spec(module) is None:
            trackers.notes.append(f"tracking: {name} is not installed (pip install 'peftlab[trackers]'); "
                                  "this run is recorded in its run folder only")
            continue
        tracker, where = build(cfg, run)
        tracker.start()
        tracker.store_init_configuration(_flat(config))
        trackers.active[name] = tracker
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
