"""Interrupt (SIGINT/SIGTERM) -> checkpoint + `interrupted`; --resume continues exactly where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.config import load_recipe
from peftlab.errors import PeftlabError
from peftlab.reliability import latest_complete, plan_resume, terminate_as_interrupt
from peftlab.reliability.interrupt import StopRequest, on_stop_signals
from peftlab.runner import INTERRUPTED_EXIT, run_recipe
from peftlab.runs import RunDir

# grad_accum 2 (the Trainer skips batches to restore the data order), LoRA dropout on (RNG state),
# and few enough rows that the resumed part crosses an epoch boundary (sampler re-seeding).
RESUMABLE = {"train.max_steps": 6, "train.logging_steps": 1, "train.grad_accum": 2, "data.max_samples": 12,
             "eval.compare_base": False}


def as_sets(changes: dict) -> list[str]:
    return [arg for key, value in changes.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def signal_during_step(monkeypatch: pytest.MonkeyPatch, step: int, sig: signal.Signals) -> None:
    """Sends one real signal to this process in the middle of training step `step`, as Ctrl-C or `kill` would."""
    from peftlab.engines.hf import CountingSFTTrainer

    original, sent = CountingSFTTrainer.training_step, []

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step - 1 and not sent:
            sent.append(sig)
            os.kill(os.getpid(), sig)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CountingSFTTrainer, "training_step", training_step)


def train_records(run: RunDir) -> dict[int, dict]:
    records = [r for r in run.metrics() if r["kind"] == "train"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r for r in records}


def test_interrupt_then_resume_matches_an_uninterrupted_run(tiny_recipe, runs_dir, fast_sets, cli_out, monkeypatch):
    straight = run_recipe(tiny_recipe(RESUMABLE), runs_dir, "straight", show_progress=False)
    handler = signal.getsignal(signal.SIGTERM)

    with monkeypatch.context() as patch:
        signal_during_step(patch, 2, signal.SIGTERM)
        code, lines = cli_out("train", "tiny-gemma2-dolly", *fast_sets, *as_sets(RESUMABLE), "--runs-dir", str(runs_dir),
                          "--name", "stopped")
    assert code == INTERRUPTED_EXIT and "continue with: peftlab train --resume" in lines[-1], lines[-3:]
    run = RunDir(runs_dir / "stopped")
    summary = run.summary()
    assert summary["config_hash"] == straight.summary()["config_hash"]
    assert summary["status"] == "interrupted" and "SIGTERM at step 2" in summary["reason"]
    assert Path(summary["checkpoint"]) == latest_complete(run.checkpoints_path) == run.checkpoints_path / "checkpoint-2"
    assert (run.adapter_path / "adapter_model.safetensors").is_file()
    assert sorted(train_records(run)) == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is handler  # handlers restored

    code, lines = cli_out("train", "--resume", "stopped", "--runs-dir", str(runs_dir))
    assert code == 0, lines[-3:]
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


def test_signal_handling_is_a_flag_then_a_hard_stop():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    request = StopRequest()
    with on_stop_signals(request.handle):
        os.kill(os.getpid(), signal.SIGINT)
        assert request.signal_name == "SIGINT"  # first signal: a flag, training goes on to the step end
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # second signal: out now
    assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)  # outside the training loop SIGTERM is Ctrl-C: summary `interrupted`
    assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]


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
    assert checkpoint.exists()  # nothing to resume from: nothing is deleted either
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
