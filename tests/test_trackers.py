"""Every tracker of `report_to` mirrors the run offline, inside the run folder, with no account or key."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.config import load_recipe
from peftlab.runs import RunDir
from peftlab.tracking import start_trackers

LOSSES = [2.0, 1.5, 1.25]
SCRIPT = """
import json, sys
from pathlib import Path
from peftlab.config import load_recipe
from peftlab.runs import RunDir
from peftlab.tracking import start_trackers
recipe = load_recipe("tiny-gemma2-dolly", ["report_to=" + sys.argv[2]])
run = RunDir.create(Path(sys.argv[1]), "tracked", recipe)
trackers = start_trackers(recipe.tracking, run, recipe.to_dict())
for step, loss in enumerate(json.loads(sys.argv[3]), 1):
    trackers.log({"step": step, "kind": "train", "loss": loss, "lr": 1e-3})
trackers.finish()
print("NOTES " + json.dumps(trackers.notes))
"""


def track(tmp_path: Path, name: str, printed: list[str] | None = None) -> tuple[Path, list[str]]:
    """One process per tracker: each reads its settings at import, as a real run's process does. `printed` receives
    the process's stdout lines (its exit included: atexit hooks print too)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "runs"), name, json.dumps(LOSSES)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("NOTES ")]
    if printed is not None:
        printed += proc.stdout.splitlines()
    return tmp_path / "runs" / "tracked", json.loads(notes[-1].removeprefix("NOTES "))


def test_tensorboard_events_hold_the_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, notes = track(tmp_path, "tensorboard")
    assert "tensorboard (offline)" in notes[0]
    events = EventAccumulator(str(run / "tensorboard" / "tracked"))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == list(enumerate(LOSSES, 1))


def test_mlflow_database_holds_the_losses_and_the_recipe(tmp_path):
    pytest.importorskip("mlflow")
    run, notes = track(tmp_path, "mlflow")
    assert "mlflow (offline)" in notes[0]
    with sqlite3.connect(run / "mlflow.db") as db:
        losses = db.execute("select step, value from metrics where key = 'train/loss' order by step").fetchall()
        params = dict(db.execute("select key, value from params").fetchall())
    assert [(s, round(v, 4)) for s, v in losses] == list(enumerate(LOSSES, 1))
    assert params["train.lr"] == str(load_recipe("tiny-gemma2-dolly").train.lr)


def test_trackio_database_holds_the_losses(tmp_path):
    pytest.importorskip("trackio")
    printed: list[str] = []
    run, notes = track(tmp_path, "trackio", printed)
    assert "trackio (offline)" in notes[0]
    # trackio's own banners (ANSI-coloured "View dashboard" lines, "Run finished" twice) stay out of our output
    assert [line for line in printed if line.strip()] == [f"NOTES {json.dumps(notes)}"], printed
    with sqlite3.connect(run / "trackio" / "peftlab.db") as db:
        rows = db.execute("select step, metrics from metrics order by step").fetchall()
    assert [(step, round(json.loads(m)["train/loss"], 4)) for step, m in rows if "train/loss" in json.loads(m)] == list(enumerate(LOSSES, 1))


def test_wandb_offline_run_needs_no_key(tmp_path):
    pytest.importorskip("wandb")
    run, notes = track(tmp_path, "wandb")
    assert "wandb (offline)" in notes[0] and "wandb sync" in notes[0]
    runs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert not (tmp_path / ".netrc").exists()  # nothing was logged in, no key asked for or stored


def test_off_by_default_and_the_trainer_never_reports_itself(tmp_path):
    from peftlab.engines.hf import trainer_arguments

    recipe = load_recipe("tiny-dialogpt-banking77")
    run = RunDir.create(tmp_path, "untracked", recipe)
    trackers = start_trackers(recipe.tracking, run, recipe.to_dict())
    assert trackers.active == {} and trackers.notes == []
    assert trainer_arguments(recipe.train, recipe.seed, run.checkpoints_path, "fp32")["report_to"] == "none"


@pytest.mark.parametrize("name", ["wandb", "mlflow", "tensorboard", "trackio"])
def test_a_missing_tracker_is_a_note_not_an_error(tmp_path, monkeypatch, name):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == name else real(module, *a))
    recipe = load_recipe("tiny-gemma2-dolly", [f"report_to={name}"])
    trackers = start_trackers(recipe.tracking, RunDir.create(tmp_path, "x", recipe), recipe.to_dict())
    assert trackers.active == {} and f"{name} is not installed (pip install 'peftlab[trackers]')" in trackers.notes[0]


def test_a_broken_tracker_is_dropped_with_a_note():
    from peftlab.tracking import Trackers

    class Broken:
        def log(self, values, step):
            raise OSError("disk full")

    trackers = Trackers(active={"tensorboard": Broken()})
    trackers.log({"kind": "train", "step": 1, "loss": 1.0})
    assert trackers.active == {} and "tensorboard stopped (OSError: disk full)" in trackers.notes[0]
