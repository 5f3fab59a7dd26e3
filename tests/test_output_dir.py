"""Issue 14 item 2: a recipe's `output_dir` (HF's TrainingArguments.output_dir) is where its runs go.

`train` runs into output_dir itself; `matrix` and `sweep` put a folder per run (per trial) under it; --runs-dir and
--name win with a note; output_dir is where, not what: it stays out of config.yaml and config_hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bad_input import one_line_error

from peftlab.config import load_recipe, validate_recipe, with_overrides
from peftlab.errors import PeftlabError
from peftlab.runs import RunDir, place


@pytest.mark.parametrize("data", [
    {"output_dir": "out/hf1"},  # top level, as axolotl writes it
    {"train": {"output_dir": "out/hf1"}},  # inside train:, as TrainingArguments holds it
])
def test_output_dir_is_read_at_the_top_or_under_train(data):
    assert validate_recipe(data).output_dir == "out/hf1"


def test_output_dir_from_set_and_a_conflict_names_both():
    assert load_recipe("tiny-gemma2-dolly", ["train.output_dir=out/x"]).output_dir == "out/x"
    with pytest.raises(PeftlabError, match="'output_dir' and 'output_dir' are the same field, set to 'b' and 'a'"):
        validate_recipe({"output_dir": "a", "train": {"output_dir": "b"}})


def test_output_dir_is_where_not_what(tiny_recipe, runs_dir):
    recipe = tiny_recipe()
    placed = with_overrides(recipe, {"output_dir": "out/hf1"})
    assert placed.output_dir == "out/hf1" and with_overrides(placed, {"train.lr": 1e-3}).output_dir == "out/hf1"
    assert placed.config_hash() == recipe.config_hash()  # compare/matrix group it with the same recipe elsewhere
    assert placed.to_dict() == recipe.to_dict() and "output_dir" not in placed.to_yaml()
    run = RunDir.create(runs_dir, "a", placed)
    assert run.summary()["output_dir"] == "out/hf1" and run.summary()["config_hash"] == recipe.config_hash()
    assert "output_dir" not in run.config_path.read_text()
    assert "output_dir" not in RunDir.create(runs_dir, "b", recipe).summary()  # recorded only when asked


def test_place_follows_hf_for_one_run_and_for_many(tmp_path):
    default = Path("runs")
    assert place("out/hf1", None, None, default, one_run=True) == place(None, Path("out"), "hf1", default, True)
    assert place("out/hf1", None, "m", default, one_run=False).runs_dir == Path("out/hf1")  # matrix: --name is a prefix
    assert place(None, None, None, default, one_run=False).runs_dir == default
    flagged = place("out/hf1", Path("mine"), None, default, one_run=False)
    assert flagged.runs_dir == Path("mine") and flagged.note == (
        "note: the recipe's output_dir 'out/hf1' is overridden by --runs-dir: the runs go in mine")
    assert place("~/hf1", None, None, default, one_run=True).runs_dir == Path.home()


def test_train_writes_to_output_dir_and_flags_win_with_a_note(cli, fast_sets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("peftlab.cli.DEFAULT_RUNS", Path("runs"))
    recipe = tmp_path / "hf.yaml"
    recipe.write_text("name: hf\ntrain:\n  output_dir: out/hf1\n  max_steps: 2\n")
    code, lines = cli("train", str(recipe), *fast_sets, "--set", "train.max_steps=2")
    assert code == 0, lines[-5:]
    run = RunDir(tmp_path / "out" / "hf1")
    assert run.summary()["status"] == "completed" and run.summary()["output_dir"] == "out/hf1"
    assert run.adapter_path.is_dir() and not (tmp_path / "runs").exists()
    assert not any("overridden" in line for line in lines)

    # the folder now holds a run: the same rule as any run folder (no silent reuse)
    one_line_error(*cli("train", str(recipe), *fast_sets), "error: run folder 'out/hf1' already holds a run")

    code, lines = cli("train", str(recipe), *fast_sets, "--name", "hf2")
    assert code == 0, lines[-5:]
    assert [line for line in lines if "overridden" in line] == [
        "note: the recipe's output_dir 'out/hf1' is overridden by --name: the run goes to runs/hf2"]
    assert RunDir(tmp_path / "runs" / "hf2").summary()["status"] == "completed"


def test_a_folder_of_ones_own_at_output_dir_is_refused_like_any_run_folder(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "mine").mkdir(parents=True)
    (tmp_path / "out" / "mine" / "notes.txt").write_text("keep me")
    one_line_error(*cli("train", "tiny-gemma2-dolly", "--set", "output_dir=out/mine"),
                   "error: run folder 'out/mine' holds files that are not a run; fix: another folder", "--overwrite")
    assert (tmp_path / "out" / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("verb, value, needles", [
    ("train", "", ["error: output_dir: '' names no run folder; fix: a folder path"]),
    ("train", "out/..", ["error: output_dir: 'out/..' names no run folder; fix:"]),
    ("train", "out/my run", ["its last part is the run's name", "fix: output_dir: out/my-run"]),
    ("train", "taken.txt", ["error: output_dir: 'taken.txt': taken.txt is a file, not a folder; fix:"]),
    ("train", "taken.txt/hf1", ["error: output_dir: 'taken.txt/hf1': taken.txt is a file, not a folder; fix:"]),
    ("matrix", " ", ["error: output_dir: ' ' names no folder; fix:"]),
    ("sweep", "taken.txt", ["error: output_dir: 'taken.txt': taken.txt is a file, not a folder; fix:"]),
    ("train", "[a]", ["output_dir: Input should be a valid string"]),
])
def test_bad_output_dirs_are_one_line(cli, tmp_path, monkeypatch, verb, value, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.txt").write_text("x")
    recipe = "tiny-dialogpt-banking77" if verb == "sweep" else "tiny-gemma2-dolly"
    value = value if value.startswith("[") else json.dumps(value)
    one_line_error(*cli(verb, recipe, "--set", f"output_dir={value}"), *needles)
    assert [p.name for p in tmp_path.iterdir()] == ["taken.txt"]  # nothing made on the way


def test_matrix_and_sweep_put_each_run_under_output_dir(cli, fast_sets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, lines = cli("matrix", "tiny-gemma2-dolly", "--methods", "lora", *fast_sets, "--set", "train.max_steps=2",
                      "--set", "output_dir=out/m", "--name", "m")
    assert code == 0, lines[-5:]
    assert RunDir(tmp_path / "out" / "m" / "m-lora").summary()["output_dir"] == "out/m"
    assert (tmp_path / "out" / "m" / "m-report.html").is_file()

    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    sets = {"train.max_steps": 4, "train.eval_steps": 2, "train.save_steps": 2, "data.max_samples": 80,
            "sweep.space": json.dumps(space), "output_dir": "out/sw"}
    code, lines = cli("sweep", "tiny-dialogpt-banking77", "--trials", "1", "--study", "s",
                      *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert code == 0, lines[-5:]
    trial = RunDir(tmp_path / "out" / "sw" / "s" / "trial-000")  # as the Trainer's search: output_dir/run-N
    assert trial.summary()["status"] == "completed" and trial.summary()["output_dir"] == "out/sw"
    assert (tmp_path / "out" / "sw" / "s" / "sweep.json").is_file() and not (tmp_path / "runs").exists()


def test_two_processes_train_one_run_into_output_dir(tmp_path):
    """--gpus 2 (gloo processes): no name is chosen at launch, every rank reads the same folder from the recipe."""
    import os
    import subprocess
    import sys

    import torch

    from peftlab.models.presets import preset_checkpoint

    preset_checkpoint("tiny-gemma2", torch.float32)  # built once here, not raced by the two ranks
    sets = ["train.max_steps=2", "train.logging_steps=1", "train.batch_size=2", "train.grad_accum=1",
            "data.max_samples=32", 'eval.prompts=["Hi"]', "eval.max_new_tokens=2", f"output_dir={tmp_path / 'out' / 'ddp'}"]
    done = subprocess.run([sys.executable, "-m", "peftlab", "train", "tiny-gemma2-dolly", "--gpus", "2",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [p.name for p in (tmp_path / "out").iterdir() if p.is_dir()] == ["ddp"]  # one folder for both ranks
    summary = RunDir(tmp_path / "out" / "ddp").summary()
    assert summary["status"] == "completed" and summary["world_size"] == 2 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["", "out/my run"])
def test_flags_over_an_unusable_output_dir_still_say_so(value):
    """An output_dir that flags replace is not checked, but never passed over in silence (an empty one was)."""
    where = place(value, Path("elsewhere"), None, Path("runs"), one_run=True)
    assert where.runs_dir == Path("elsewhere") and where.note == (
        f"note: the recipe's output_dir '{value}' is overridden by --runs-dir: the run goes to elsewhere")
