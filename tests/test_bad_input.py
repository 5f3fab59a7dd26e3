"""Every bad input, through the real `peftlab` entry point: one line naming the field/file, what was
found and a fix, exit code 2, and never a run folder that looks complete."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from peftlab.runs import RunDir


def one_line_error(code: int, lines: list[str], *needles: str) -> str:
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2, lines[-5:]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert not any("Traceback" in line for line in lines)
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def failed_run(runs_dir: Path, name: str, reason: str = "bad input") -> dict:
    summary = RunDir(runs_dir / name).summary()
    assert summary["status"] == "failed" and summary["reason"] == reason, summary.get("status")
    assert not (runs_dir / name / "adapter").exists()
    return summary


def test_malformed_yaml(cli, tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("name: x\ntrain:\n  lr: [1e-4\n  epochs: 2\n")
    one_line_error(*cli("train", str(recipe)), str(recipe), "malformed YAML at line", "fix:")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("train.lrr=1e-4", ("unknown key 'train.lrr'", "did you mean 'train.lr'")),
        ("method.lora.rank=8", ("unknown key 'method.lora.rank'",)),
        ("train.lr=fast", ("train.lr", "fast")),
        ("train.lr=0", ("train.lr", "greater than 0", "(got 0)")),
        ("method.lora.r=-4", ("method.lora.r", "(got -4)")),
        ("method.lora.dropout=1.0", ("method.lora.dropout", "less than 1")),
        ("train.epochs=0", ("train.epochs", "(got 0)")),
        ("train.lr", ("expected KEY=VALUE",)),
    ],
)
def test_recipe_values(cli, runs_dir, override, needles):
    one_line_error(*cli("train", "tiny-gemma2-dolly", "--set", override, "--runs-dir", str(runs_dir)), *needles)
    assert not runs_dir.exists()  # refused before any run folder is made


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("missing", ("data.source", "not found", "fix:")),
        ("columns", ("column 'instruction'", "columns found: question, answer", "data.columns.instruction")),
        ("empty", ("holds no rows", "fix:")),
        ("split", ("data.eval_fraction", "leaves no training rows", "fix:")),
    ],
)
def test_data_files(cli, runs_dir, fast_sets, tmp_path, case, needles):
    rows = {"columns": [{"question": "q", "answer": "a"}] * 3, "empty": [], "split": [{"instruction": "i", "response": "r"}]}
    source = tmp_path / "absent.jsonl" if case == "missing" else write_jsonl(tmp_path / f"{case}.jsonl", rows[case])
    sets = ["--set", f"data.source={source}", "--set", "data.eval_fraction=0.5"]
    error = one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, *sets, "--runs-dir", str(runs_dir), "--name", case),
                           *needles)
    assert failed_run(runs_dir, case)["diagnosis"] == error.removeprefix("error: ")


def test_target_modules_that_match_nothing_list_the_linear_layers(cli, runs_dir, fast_sets):
    sets = ["--set", 'method.lora.target_modules=["q_proj","qkv"]']
    error = one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, *sets, "--runs-dir", str(runs_dir), "--name", "t"),
                           "method.lora.target_modules", "['qkv']")
    for layer in ("q_proj", "k_proj", "down_proj"):
        assert layer in error
    failed_run(runs_dir, "t")


def test_qlora_without_bitsandbytes(cli, runs_dir, fast_sets, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", "method.name=qlora", "--runs-dir", str(runs_dir),
                        "--name", "q"), "method.name", "bitsandbytes", "method.name=lora")
    failed_run(runs_dir, "q")


def test_max_length_shorter_than_the_prompt_template(cli, runs_dir, fast_sets):
    one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", "data.max_length=6", "--runs-dir", str(runs_dir),
                        "--name", "m"), "data.max_length: 6", "prompt template", "fix:")
    failed_run(runs_dir, "m")


def test_output_folder_holding_another_run_is_left_alone(cli, runs_dir, tiny_recipe):
    other = RunDir.create(runs_dir, "taken", tiny_recipe({"train.lr": 0.001}))
    before = {p.name: p.read_bytes() for p in other.path.iterdir()}
    one_line_error(*cli("train", "tiny-gemma2-dolly", "--runs-dir", str(runs_dir), "--name", "taken"),
                   "already holds a run", "--resume taken", "--overwrite", "--name NEW")
    assert {p.name: p.read_bytes() for p in other.path.iterdir()} == before


def test_out_of_memory_names_the_knobs_that_lower_memory(cli, runs_dir, fast_sets, monkeypatch):
    from peftlab.engines.hf import CountingSFTTrainer

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(CountingSFTTrainer, "training_step", oom)
    error = one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, "--runs-dir", str(runs_dir), "--name", "o"),
                           "out of GPU memory", "Tried to allocate 20.00 GiB", "estimate", "train.batch_size=1",
                           "train.grad_accum=2", "data.max_length=", "method.name=qlora", "peftlab doctor")
    summary = failed_run(runs_dir, "o", reason="out of memory")
    assert summary["diagnosis"] == error.removeprefix("error: ")


def test_memory_advice_ranks_knobs_by_the_estimate(tiny_recipe):
    from peftlab.reliability.oom import memory_advice

    recipe = tiny_recipe({"train.batch_size": 4, "train.gradient_checkpointing": False})
    error = torch.OutOfMemoryError("CUDA out of memory")
    activations = {"weights_gib": 1.0, "trainable_state_gib": 0.1, "activations_gib": 30.0, "logits_gib": 2.0, "total_gib": 33.1}
    weights = {**activations, "weights_gib": 60.0, "activations_gib": 0.5}
    first_fix = lambda text: text.split("biggest saving first: ")[1]  # noqa: E731
    assert first_fix(memory_advice(recipe, activations, error)).startswith("train.batch_size=2 with train.grad_accum=")
    assert "train.gradient_checkpointing=true" in memory_advice(recipe, activations, error)
    assert first_fix(memory_advice(recipe, weights, error)).startswith("method.name=qlora")
    assert "estimate ~" not in memory_advice(recipe, None, error)  # no estimate recorded: still the knobs
