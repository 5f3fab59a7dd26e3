"""Every verb for every task, on its tiny twin, through the real CLI: a verb that does not support a task fails here.

One run per task is trained once for the module (interrupted at step 2 by a signal, then resumed), with W&B
tracking on (a stand-in `wandb` module records what peftlab hands it); the other verbs read that run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import types
from pathlib import Path

import pytest

from peftlab.engines import engine_names
from peftlab.engines.hooks import TrainingHooks
from peftlab.runs import RunDir

# Tiny step counts: each task's run takes seconds on 2 CPU cores.
TASKS = {
    "sft": ("tiny-gemma2-dolly", {"data.max_samples": 32, "data.eval_fraction": 0.125, "data.max_length": 128,
                                  "train.batch_size": 2, "train.grad_accum": 1, "eval.prompts": ["Name a color."],
                                  "eval.max_new_tokens": 4}),
    "classify": ("tiny-dialogpt-banking77", {"data.max_samples": 96, "train.eval_steps": 2, "train.best_metric": None,
                                             "train.batch_size": 8}),
    "diffusion": ("tiny-sd-vangogh", {"data.max_samples": 4, "eval.prompts": ["a church"], "diffusion.sample_seeds": [0],
                                      "diffusion.sample_steps": 2}),
}
STEPS = {"train.max_steps": 4, "train.logging_steps": 1, "train.save_steps": 2}
INTERRUPT_AT = 2
SPACE = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
# What each task's runs must show in `runs` and `compare`: its key metric.
KEY_METRIC = {"sft": "eval_loss", "classify": "test_accuracy", "diffusion": "final_train_loss"}
SAMPLES = {"sft": 'id="generations"', "classify": 'id="confusion"', "diffusion": 'id="sample-images"'}
OBJECTIVE = {"sft": "eval_loss", "classify": "eval_f1", "diffusion": "final_train_loss"}  # sweep.metric (classify's recipe sets it)


def sets(changes: dict) -> list[str]:
    return [arg for key, value in changes.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records init arguments and logged values per run."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.runs: list[dict] = []

    def init(self, **kwargs):
        record = {"init": kwargs, "logged": [], "finished": False}
        self.runs.append(record)
        return types.SimpleNamespace(log=lambda data, step: record["logged"].append((step, data)),
                                     finish=lambda: record.update(finished=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """runs_dir, the fake wandb, and a `peftlab` runner, with tracking faked for the whole module."""
    from peftlab.cli import main

    runs_dir = tmp_path_factory.mktemp("verbs")
    wandb = FakeWandb()
    real_find_spec = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", wandb)
        mp.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real_find_spec(name, *a))

        def peftlab(*args: str) -> tuple[int, str]:
            mp.setattr(sys, "argv", ["peftlab", *args])
            try:
                main()
                return 0, ""
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else 1, str(exc.code)

        yield types.SimpleNamespace(runs_dir=runs_dir, wandb=wandb, peftlab=peftlab)


def interrupt_at(step: int):
    """A training hook that sends SIGINT at the end of `step`, as Ctrl-C would (any engine sees it)."""
    original = TrainingHooks.step_end

    def step_end(self, current: int) -> None:
        original(self, current)
        if current == step:
            os.kill(os.getpid(), signal.SIGINT)

    return step_end


@pytest.fixture(scope="module")
def trained(world) -> dict[str, tuple[RunDir, dict]]:
    """Per task: `train` stopped by SIGINT at step 2 (exit 130), then `train --resume` to the end."""
    runs = {}
    for task, (recipe, changes) in TASKS.items():
        args = [recipe, "--name", task, "--runs-dir", str(world.runs_dir), *sets({**changes, **STEPS, "tracking.wandb": True})]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TrainingHooks, "step_end", interrupt_at(INTERRUPT_AT))
            code, _ = world.peftlab("train", *args)
        run = RunDir(world.runs_dir / task)
        stopped = run.summary()
        assert code == 130 and stopped["status"] == "interrupted", (task, stopped.get("reason"))
        code, _ = world.peftlab("train", "--resume", task, "--runs-dir", str(world.runs_dir))
        assert code == 0, (task, run.summary())
        runs[task] = (run, stopped)
    return runs


@pytest.mark.parametrize("task", TASKS)
def test_train_then_resume(trained, task) -> None:
    run, stopped = trained[task]
    summary = run.summary()
    assert stopped["checkpoint"].endswith(f"checkpoint-{INTERRUPT_AT}")
    assert summary["status"] == "completed" and summary["task"] == task and summary["engine"] in engine_names()
    assert summary["steps"] == STEPS["train.max_steps"] and summary["resumes"][0]["from_step"] == INTERRUPT_AT
    steps = [r["step"] for r in run.metrics() if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # each step logged once across the two sessions
    assert (run.adapter_path).is_dir() and summary[KEY_METRIC[task]] is not None


@pytest.mark.parametrize("task", TASKS)
def test_tracking_records_every_task(trained, world, task) -> None:
    run, _ = trained[task]
    sessions = [r for r in world.wandb.runs if r["init"]["dir"] == str(run.path)]
    assert len(sessions) == 2 and all(s["finished"] for s in sessions)  # the interrupted session, then the resumed one
    assert sessions[0]["init"]["mode"] == "offline" and sessions[0]["init"]["config"]["task"] == task
    logged_steps = [step for s in sessions for step, data in s["logged"] if "train/loss" in data]
    assert logged_steps == [1, 2, 3, 4]


@pytest.mark.parametrize("task", TASKS)
def test_doctor(world, task) -> None:
    recipe, changes = TASKS[task]
    code, _ = world.peftlab("doctor", recipe, *sets({**changes, **STEPS}))
    assert code in (0, 1)  # healthy, or problems found: either way the checkup ran to its verdict


@pytest.mark.parametrize("task", TASKS)
def test_generate(trained, world, task, capsys) -> None:
    capsys.readouterr()
    code, _ = world.peftlab("generate", task, "--prompt", "a short question", "--runs-dir", str(world.runs_dir),
                            "--max-new-tokens", "3", "--steps", "2")
    printed = capsys.readouterr()
    out = printed.out + printed.err
    assert code == 0 and ("a short question" in out if task != "diffusion" else ".png" in out)


@pytest.mark.parametrize("task", TASKS)
def test_sweep(world, task) -> None:
    recipe, changes = TASKS[task]
    code, _ = world.peftlab("sweep", recipe, "--trials", "1", "--study", f"study-{task}", "--runs-dir",
                            str(world.runs_dir), *sets({**changes, **STEPS, "train.save_steps": None,
                                                        "sweep.space": SPACE}))
    result = json.loads((world.runs_dir / f"study-{task}" / "sweep.json").read_text())
    assert code == 0 and [t["state"] for t in result["trials"]] == ["complete"]
    assert result["metric"] == OBJECTIVE[task]


@pytest.mark.parametrize("task", TASKS)
def test_matrix(world, task) -> None:
    recipe, changes = TASKS[task]
    code, _ = world.peftlab("matrix", recipe, "--methods", "lora", "--name", f"matrix-{task}", "--runs-dir",
                            str(world.runs_dir), *sets({**changes, **STEPS, "train.save_steps": None}))
    assert code == 0 and RunDir(world.runs_dir / f"matrix-{task}-lora").summary()["status"] == "completed"
    assert (world.runs_dir / f"matrix-{task}-report.html").is_file()


@pytest.mark.parametrize("task", TASKS)
def test_compare_report_runs_and_watch(trained, world, task, capsys) -> None:
    runs_dir = str(world.runs_dir)
    capsys.readouterr()
    code, _ = world.peftlab("compare", task, "--format", "json", "--runs-dir", runs_dir)
    row = json.loads(capsys.readouterr().out)["runs"][0]
    assert code == 0 and row["task"] == task and row[KEY_METRIC[task]] is not None

    page = Path(runs_dir) / f"report-{task}.html"
    code, _ = world.peftlab("report", task, "--output", str(page), "--runs-dir", runs_dir)
    assert code == 0 and SAMPLES[task] in page.read_text()  # the report block the task declares

    capsys.readouterr()
    code, _ = world.peftlab("runs", "--task", task, "--json", "--runs-dir", runs_dir)
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert code == 0 and KEY_METRIC[task] in entries[task]["key_metrics"]

    capsys.readouterr()
    code, _ = world.peftlab("watch", task, "--runs-dir", runs_dir)
    assert code == 0 and "run completed" in capsys.readouterr().out
