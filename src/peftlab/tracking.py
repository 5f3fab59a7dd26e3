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


class Tracker:
    """Mirrors the run's metric records into W&B, for every engine (the training hooks call `log`).
    Rank 0 only; a no-op when tracking is off or wandb is missing (the plan's note says so)."""

    def __init__(self, tracking: Tracking, run: RunDir, config: dict[str, Any]) -> None:
        self.tracking, self.run, self.config = tracking, run, config
        self._wandb_run: Any = None

    def start(self) -> None:
        if "wandb" not in self.tracking.report_to or not self.run.writer:
            return
        import wandb

        self._wandb_run = wandb.init(project=self.tracking.env["WANDB_PROJECT"], mode=self.tracking.env["WANDB_MODE"],
                                     dir=str(self.run.path), name=self.run.name, config=self.config)

    def log(self, record: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
            self._wandb_run.log({f"{record['kind']}/{k}": v for k, v in numbers.items()}, step=record["step"])

    def finish(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
