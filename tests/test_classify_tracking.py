"""Optional W&B tracking: off by default, a note (not a crash) when wandb is missing, offline without a key."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from peftlab import tracking
from peftlab.config import TrackingConfig, load_recipe
from peftlab.engines.hf import trainer_arguments
from peftlab.runs import RunDir

WANDB_VARS = ("WANDB_PROJECT", "WANDB_MODE", "WANDB_DIR", "WANDB_LOG_MODEL")


@pytest.fixture
def run(runs_dir: Path) -> RunDir:
    return RunDir.create(runs_dir, "tracked", load_recipe("tiny-dialogpt-banking77"))


def test_disabled_by_default_reports_to_nothing(run: RunDir) -> None:
    recipe = load_recipe("tiny-dialogpt-banking77")
    plan = tracking.plan(recipe.tracking, run)
    assert plan.report_to == [] and plan.env == {} and plan.note is None
    assert trainer_arguments(recipe.train, recipe.seed, run.checkpoints_path, "fp32", plan.report_to)["report_to"] == "none"


def test_enabled_without_wandb_installed_is_a_note_and_the_run_folder_only(run: RunDir) -> None:
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    plan = tracking.plan(TrackingConfig(wandb=True), run)
    assert plan.report_to == [] and "pip install 'peftlab[wandb]'" in plan.note


def test_enabled_offline_sets_only_integration_settings_and_restores_them(run: RunDir, monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real_find_spec(name, *a))
    for var in (*WANDB_VARS, "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    plan = tracking.plan(TrackingConfig(wandb=True, project="banking"), run)
    assert plan.report_to == ["wandb"]
    assert plan.env == {"WANDB_PROJECT": "banking", "WANDB_MODE": "offline", "WANDB_DIR": str(run.path),
                        "WANDB_LOG_MODEL": "false"}
    assert "offline" in plan.note and "wandb sync" in plan.note
    with tracking.environment(plan):
        assert os.environ["WANDB_MODE"] == "offline" and "WANDB_API_KEY" not in os.environ
    assert not any(var in os.environ for var in WANDB_VARS)
