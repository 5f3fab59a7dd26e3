"""`peftlab sweep`: trials as run folders, the best trial, a final run on test, resume, pruning, both tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from peftlab.config import load_recipe, with_overrides
from peftlab.errors import PeftlabError
from peftlab.runs import RunDir
from peftlab.sweep import PruningCallback, check_sweepable, direction, run_sweep

SPACE = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "train.batch_size": {"type": "categorical", "choices": [8, 16]}}


def test_two_trials_a_best_trial_and_a_final_run_on_test_then_resume(tiny_classifier, runs_dir: Path, cli) -> None:
    recipe = tiny_classifier({"sweep.space": SPACE})
    result = run_sweep(recipe, runs_dir, trials=2, study_name="s1", final=True, show_progress=False)
    folder = runs_dir / "s1"
    trials = [RunDir(folder / f"trial-{i:03d}") for i in range(2)]
    for run in trials:
        s = run.summary()
        assert s["status"] == "completed" and "test_accuracy" not in s  # trials never see the test set
        assert s["sweep"]["params"]["train.batch_size"] in (8, 16)
        assert 1e-3 <= s["sweep"]["params"]["train.lr"] <= 1e-2
        assert "test: null" in run.config_path.read_text()
    values = {run.name: run.summary()["eval_f1"] for run in trials}
    assert result.best_run.name == max(values, key=values.get)
    final = result.final_run.summary()
    assert result.final_run.name == f"final-{result.best_run.name}" and final["status"] == "completed"
    assert 0 <= final["test_accuracy"] <= 1 and final["data"]["test_rows"] == 200
    assert final["sweep"]["params"] == result.best_run.summary()["sweep"]["params"]
    saved = json.loads((folder / "sweep.json").read_text())
    assert saved["direction"] == "maximize" and saved["best"]["run"] == result.best_run.name
    assert [t["state"] for t in saved["trials"]] == ["complete", "complete"]
    assert all((folder / f"{name}.png").is_file() for name in ("optimization_history", "param_importances"))
    assert (folder / "study.db").is_file()

    with pytest.raises(PeftlabError, match="already exists.*--resume"):
        run_sweep(recipe, runs_dir, trials=1, study_name="s1")
    code, lines = cli("sweep", "tiny-dialogpt-banking77", "--study", "s1", "--resume", "--trials", "1",
                      "--runs-dir", str(runs_dir), "--set", f"sweep.space={json.dumps(SPACE)}",
                      *[a for k, v in {"train.max_steps": 8, "train.eval_steps": 4, "train.save_steps": 4,
                                      "data.max_samples": 160}.items() for a in ("--set", f"{k}={v}")])
    assert code == 0, lines
    assert (folder / "trial-002" / "summary.json").is_file()  # numbering continues in the stored study
    # issue 14 item 5: trial n/N of this call with the overall ETA; the classify phases show progress
    trial_lines = [line for line in lines if line.startswith("[trial ")]
    assert len(trial_lines) == 1, trial_lines
    assert re.fullmatch(r"\[trial 1/1\] trial-002: train\.lr=\S+, train\.batch_size=\d+  elapsed \S+  overall eta n/a",
                        trial_lines[0]), trial_lines
    for done in ("tokenizing train: done in", "tokenizing validation: done in", "evaluating on validation: done in",
                 "[trials] 1/1 in"):
        assert any(line.startswith(done) for line in lines), done
    assert len(json.loads((folder / "sweep.json").read_text())["trials"]) == 3


def test_sft_sweep_minimizes_eval_loss_and_prunes_into_a_pruned_run(tiny_recipe, runs_dir: Path) -> None:
    recipe = tiny_recipe({"sweep.space": {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
                          "train.eval_steps": 2, "train.save_steps": 2})
    assert direction(recipe) == "minimize"
    # A pruner that prunes at the first report: the run must stop early and say so.
    result = run_sweep(recipe, runs_dir, trials=1, study_name="sft", show_progress=False,
                       pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    trial = result.study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [2]
    s = RunDir(runs_dir / "sft" / "trial-000").summary()
    assert s["status"] == "pruned" and "step 2" in s["reason"] and s["steps"] == 2
    assert result.best_run is None


def test_pruning_ignores_evaluations_after_training() -> None:
    reports = []
    trial = SimpleNamespace(report=lambda v, step: reports.append((step, v)), should_prune=lambda: True)
    callback = PruningCallback(trial, "eval_f1")
    control = SimpleNamespace(should_training_stop=False)  # what the training hooks do with the answers
    control.should_training_stop |= callback.evaluated(3, {"eval_f1": 0.5})
    callback.train_begun()
    control.should_training_stop |= callback.evaluated(4, {"eval_f1": float("nan")})
    assert reports == [] and not control.should_training_stop  # not training yet; NaN is not a value
    control.should_training_stop |= callback.evaluated(5, {"eval_f1": 0.5})
    assert reports == [(5, 0.5)] and control.should_training_stop and callback.pruned == (5, 0.5)
    callback.train_ended()
    callback.evaluated(5, {"eval_f1": 0.6})
    assert len(reports) == 1


@pytest.mark.parametrize(("changes", "message"), [
    ({"sweep.metric": "eval_f1"}, "sweep.metric 'eval_f1' is not a validation metric of task sft; valid: eval_loss"),
    ({}, "sweep.space is empty"),
    ({"sweep.space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3}}, "data.eval_fraction": 0},
     "needs a validation set"),
])
def test_unsweepable_recipes_are_one_line_errors(tiny_recipe, changes, message) -> None:
    with pytest.raises(PeftlabError, match=message):
        check_sweepable(tiny_recipe(changes))


@pytest.mark.parametrize(("space", "message"), [
    ({"train.lrr": {"type": "float", "low": 1, "high": 2}}, "'train.lrr' is not a recipe field to search; fix: did you mean 'train.lr'"),
    ({"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "log=true needs low > 0"),
    ({"train.batch_size": {"type": "categorical"}}, "needs a non-empty 'choices' list"),
    # a missing key named, not pydantic's bare "Field required" (its input is the mapping that lacks the key)
    ({"train.lr": {"low": 1e-5, "high": 1e-3}}, "sweep.space.train.lr.type: required, not given; fix: add `type:` to "
                                                "sweep.space.train.lr"),
])
def test_bad_search_spaces_fail_at_load(space, message) -> None:
    with pytest.raises(PeftlabError, match=message):
        with_overrides(load_recipe("tiny-dialogpt-banking77"), {"sweep.space": space})


def test_the_original_search_space_is_declared_in_the_recipe() -> None:
    recipe = load_recipe("dialogpt-banking77")
    space = recipe.sweep.space
    assert (space["train.lr"].low, space["train.lr"].high, space["train.lr"].log) == (1e-5, 5e-4, True)
    assert space["train.batch_size"].choices == [4, 8, 16]
    assert (space["train.warmup_steps"].low, space["train.warmup_steps"].high, space["train.warmup_steps"].step) == (100, 500, 50)
    assert recipe.sweep.metric == "eval_f1" and direction(recipe) == "maximize" and recipe.sweep.trials == 5


def test_zero_trials_on_a_new_study_is_one_line_and_makes_no_study(runs_dir: Path, cli) -> None:
    """--trials 0 is for an existing study (--resume): on a new one it made an empty study.db and plots of nothing."""
    from test_bad_input import one_line_error

    one_line_error(*cli("sweep", "tiny-dialogpt-banking77", "--trials", "0", "--runs-dir", str(runs_dir)),
                   "error: --trials 0: a new study with no trial has nothing to report; fix: --trials N")
    assert not (runs_dir / "tiny-dialogpt-banking77").exists()
