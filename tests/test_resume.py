"""Interrupt (SIGINT/SIGTERM) -> checkpoint + `interrupted`; --resume continues exactly where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from peftlab.config import load_recipe
from peftlab.errors import PeftlabError
from peftlab.reliability import TrainingInterrupted, latest_complete, plan_resume
from peftlab.runner import INTERRUPTED_EXIT, resume_run, run_recipe
from peftlab.runs import RunDir

# grad_accum 2 (the Trainer skips batches to restore the data order), LoRA dropout on (RNG state),
# and few enough rows that the resumed part crosses an epoch boundary (sampler re-seeding).
RESUMABLE = {"train.max_steps": 6, "train.logging_steps": 1, "train.grad_accum": 2, "data.max_samples": 12,
             "eval.compare_base": False}


class SignalAt(TrainerCallback):
    """Sends a real signal to this process at the end of step `step`, as Ctrl-C or `kill` would."""

    def __init__(self, step: int, sig: signal.Signals = signal.SIGINT) -> None:
        self.step, self.sig = step, sig

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.sig)


def train_records(run: RunDir) -> dict[int, dict]:
    records = [r for r in run.metrics() if r["kind"] == "train"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in records}


def test_interrupt_then_resume_matches_an_uninterrupted_run(tiny_recipe, runs_dir):
    recipe = tiny_recipe(RESUMABLE)
    straight = run_recipe(recipe, runs_dir, "straight", show_progress=False)

    with pytest.raises(TrainingInterrupted) as stopped:
        run_recipe(recipe, runs_dir, "stopped", show_progress=False, callbacks=[SignalAt(2, signal.SIGINT)])
    run = RunDir(runs_dir / "stopped")
    summary = run.summary()
    assert summary["status"] == "interrupted" and "SIGINT" in summary["reason"]
    assert stopped.value.step == 2 and latest_complete(run.checkpoints_path).name == "checkpoint-2"
    assert (run.adapter_path / "adapter_model.safetensors").is_file()
    assert sorted(train_records(run)) == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    resume_run("stopped", runs_dir, show_progress=False)
    expected, resumed = train_records(straight), train_records(run)
    assert sorted(resumed) == sorted(expected) == list(range(1, 7))
    # stopped mid-epoch (the Trainer skips the consumed batches) and the resumed part crossed an epoch
    assert resumed[2]["epoch"] < 1.0 < resumed[6]["epoch"]
    for step, want in expected.items():
        got = resumed[step]
        for key in ("loss", "grad_norm", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (step, key)
    a, b = straight.summary(), run.summary()
    assert b["status"] == "completed" and b["resumes"][0]["from_step"] == 2
    for key in ("steps", "samples", "tokens", "trained_tokens", "final_train_loss"):
        assert b[key] == pytest.approx(a[key]), key
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)


def test_sigterm_through_the_cli_exits_130_then_resume_completes(tiny_recipe, runs_dir, fast_sets, cli):
    sets = [*fast_sets, "--set", "train.max_steps=12", "--set", "train.logging_steps=1"]
    command = [sys.executable, "-m", "peftlab", "train", "tiny-gemma2-dolly", *sets, "--runs-dir", str(runs_dir),
               "--name", "t"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = runs_dir / "t" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == INTERRUPTED_EXIT, output[-2000:]
    assert "Traceback" not in output and "--resume" in output

    run = RunDir(runs_dir / "t")
    summary = run.summary()
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["reason"]
    stopped_at = latest_complete(run.checkpoints_path)
    assert stopped_at is not None and Path(summary["checkpoint"]) == stopped_at

    code, lines = cli("train", "--resume", "t", "--runs-dir", str(runs_dir))
    assert code == 0, lines[-3:]
    done = run.summary()
    assert done["status"] == "completed" and done["steps"] == 12
    assert sorted(train_records(run)) == list(range(1, 13))


def test_resume_refuses_what_it_cannot_continue(tiny_recipe, runs_dir, cli):
    recipe = tiny_recipe()
    run = RunDir.create(runs_dir, "r", recipe)

    with pytest.raises(PeftlabError, match=r"recipe differs .*train\.lr: run has 0\.01, given 0\.5"):
        plan_resume("r", runs_dir, tiny_recipe({"train.lr": 0.5}))
    with pytest.raises(PeftlabError, match="no complete checkpoint"):
        plan_resume("r", runs_dir, recipe)
    checkpoint = run.checkpoints_path / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    with pytest.raises(PeftlabError, match="no complete checkpoint"):  # no trainer_state.json: cut short
        plan_resume("r", runs_dir)
    assert not checkpoint.exists()  # the debris is cleared so that the step can be saved again
    run.update_summary(status="completed")
    with pytest.raises(PeftlabError, match="already completed"):
        plan_resume("r", runs_dir)

    code, lines = cli("train", "--resume", "r", "--set", "train.lr=0.5", "--runs-dir", str(runs_dir))
    assert code == 2 and lines[-1].startswith("error: --set with --resume")
    code, lines = cli("train", "--runs-dir", str(runs_dir))
    assert code == 2 and "missing RECIPE" in lines[-1]


def test_resume_refuses_a_run_still_being_trained(tiny_recipe, runs_dir):
    import socket

    run = RunDir.create(runs_dir, "live", tiny_recipe())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.update_summary(status="running", pid=sleeper.pid, host=socket.gethostname())
        with pytest.raises(PeftlabError, match=f"still being trained by process {sleeper.pid}"):
            plan_resume("live", runs_dir)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_saved_recipe_is_what_resume_uses(tiny_recipe, runs_dir):
    recipe = tiny_recipe({"train.lr": 0.003})
    run = RunDir.create(runs_dir, "keep", recipe)
    saved = load_recipe(str(run.config_path))
    assert saved == recipe
    assert json.loads(run.summary_path.read_text())["config_hash"] == recipe.config_hash()
