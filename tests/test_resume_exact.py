"""A resumed run finishes exactly the work that was left and writes the records an uninterrupted run
writes (issue 12, items 9 and 10)."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import FAST
from test_resume import as_sets, signal_during_step, train_records

from peftlab.config import load_recipe, with_overrides
from peftlab.engines.hf import CountingSFTTrainer, CountingTrainer
from peftlab.runner import INTERRUPTED_EXIT, run_recipe
from peftlab.runs import RunDir

# Every field of a train record that does not depend on the wall clock.
EXACT = ("step", "epoch", "loss", "grad_norm", "lr", "tokens", "padded_tokens", "samples")
SUMMARY = ("steps", "samples", "tokens", "trained_tokens", "final_train_loss", "mean_train_loss")


def assert_same_records(resumed: RunDir, straight: RunDir) -> None:
    got, want = train_records(resumed), train_records(straight)
    assert sorted(got) == sorted(want)  # no extra record at the step the run was stopped
    for step, record in want.items():
        for key in EXACT:
            assert got[step][key] == pytest.approx(record[key], rel=1e-6, abs=1e-9), (step, key)
    a, b = straight.summary(), resumed.summary()
    assert b["status"] == "completed"
    for key in SUMMARY:
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)


def test_records_after_a_resume_mid_logging_window_are_the_uninterrupted_ones(tiny_recipe, runs_dir, fast_sets, cli,
                                                                             monkeypatch):
    """The issue's case: logging every 5 steps, stopped at step 11; the resumed run logs step 15 over
    steps 11-15, as the uninterrupted run does, and nothing at step 11."""
    changes = {"train.max_steps": 15, "train.logging_steps": 5, "eval.compare_base": False}
    straight = run_recipe(tiny_recipe(changes), runs_dir, "straight", show_progress=False)
    with monkeypatch.context() as patch:
        signal_during_step(patch, 11, signal.SIGTERM)
        code, _ = cli("train", "tiny-gemma2-dolly", *fast_sets, *as_sets(changes), "--runs-dir", str(runs_dir),
                      "--name", "stopped")
    run = RunDir(runs_dir / "stopped")
    assert code == INTERRUPTED_EXIT and sorted(train_records(run)) == [5, 10]
    code, lines = cli("train", "--resume", "stopped", "--runs-dir", str(runs_dir))
    assert code == 0, lines[-3:]
    assert_same_records(run, straight)


def interrupt_first_call(monkeypatch: pytest.MonkeyPatch, trainer: type, method: str) -> None:
    """Ctrl-C (a real SIGINT) at the first call of `trainer.method` (the final evaluation: after the last
    checkpoint was written)."""
    original, sent = getattr(trainer, method), []

    def interrupted(self, *args, **kwargs):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer, method, interrupted)


AT_MAX = {"train.max_steps": 4, "train.save_steps": 2, "train.logging_steps": 1, "eval.compare_base": False}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """The uninterrupted run, shared by the ways of stopping it at its last step."""
    recipe = with_overrides(load_recipe("tiny-gemma2-dolly"), {**FAST, **AT_MAX})
    return run_recipe(recipe, tmp_path_factory.mktemp("runs"), "straight", show_progress=False)


@pytest.mark.parametrize("when", ["final evaluation", "last step"])
def test_resume_from_a_checkpoint_at_max_steps_trains_nothing_more(when, four_steps, runs_dir, fast_sets, cli,
                                                                   monkeypatch):
    straight, changes = four_steps, AT_MAX
    with monkeypatch.context() as patch:
        if when == "last step":
            signal_during_step(patch, 4, signal.SIGTERM)
        else:
            interrupt_first_call(patch, CountingSFTTrainer, "evaluate")
        code, _ = cli("train", "tiny-gemma2-dolly", *fast_sets, *as_sets(changes), "--runs-dir", str(runs_dir),
                      "--name", "stopped")
    run = RunDir(runs_dir / "stopped")
    assert code == INTERRUPTED_EXIT and run.summary()["status"] == "interrupted"
    code, lines = cli("train", "--resume", "stopped", "--runs-dir", str(runs_dir))
    assert code == 0 and "resuming from checkpoint-4" in " ".join(lines), lines[-3:]
    assert run.summary()["steps"] == 4  # not 5 of 4
    assert_same_records(run, straight)
    assert (run.adapter_path / "adapter_model.safetensors").is_file()
    assert (run.samples_path / "generations.jsonl").read_text() == (straight.samples_path / "generations.jsonl").read_text()


def test_a_classify_run_stopped_in_its_final_evaluation_resumes_to_the_same_results(tiny_classifier, runs_dir, cli,
                                                                                   monkeypatch):
    """With train.best_metric: the resumed run reloads the best checkpoint, as the loop's end did."""
    recipe = tiny_classifier({"data.classify.test": None})
    straight = run_recipe(recipe, runs_dir, "straight", show_progress=False)
    with monkeypatch.context() as patch:
        interrupt_first_call(patch, CountingTrainer, "predict")
        with pytest.raises(KeyboardInterrupt):
            run_recipe(recipe, runs_dir, "stopped", show_progress=False)
    code, lines = cli("train", "--resume", "stopped", "--runs-dir", str(runs_dir))
    assert code == 0, lines[-3:]
    a, b = straight.summary(), RunDir(runs_dir / "stopped").summary()
    assert b["steps"] == a["steps"] == 8 and b["best_checkpoint"].endswith(a["best_checkpoint"].split("/")[-1])
    for key in ("eval_loss", "eval_accuracy", "eval_f1", "mean_train_loss", "final_train_loss", "tokens"):
        assert b[key] == pytest.approx(a[key], rel=1e-6), key
