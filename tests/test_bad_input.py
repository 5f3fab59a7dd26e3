"""Every bad input, through the real `peftlab` entry point: one line naming the field/file, what was
found and a fix, exit code 2, and never a run folder that looks complete: a run refused before its first step
leaves no folder at all (it would only block the corrected rerun under the same --name)."""

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


def refused_run(cli, runs_dir: Path, name: str, fast_sets: list[str]) -> None:
    """No folder, not in `peftlab runs`, and the same --name starts afresh once the input is fixed."""
    assert not (runs_dir / name).exists()
    code, lines = cli("runs", "--runs-dir", str(runs_dir), "--json")
    assert code == 0 and json.loads("\n".join(lines)) == []
    code, lines = cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", "train.max_steps=1", "--runs-dir",
                      str(runs_dir), "--name", name)
    assert code == 0 and RunDir(runs_dir / name).summary()["status"] == "completed", lines[-3:]


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
        ("blank", ("blank.jsonl': the file holds no rows; fix:",)),  # blank lines: ours, not datasets' message
        ("split", ("data.eval_fraction", "leaves no training rows", "fix:")),
    ],
)
def test_data_files(cli, runs_dir, fast_sets, tmp_path, case, needles):
    rows = {"columns": [{"question": "q", "answer": "a"}] * 3, "empty": [], "split": [{"instruction": "i", "response": "r"}]}
    source = tmp_path / "absent.jsonl" if case == "missing" else write_jsonl(tmp_path / f"{case}.jsonl", rows.get(case, []))
    if case == "blank":
        source.write_text("\n  \n\n")
    sets = ["--set", f"data.source={source}", "--set", "data.eval_fraction=0.5"]
    code, lines = cli("train", "tiny-gemma2-dolly", *fast_sets, *sets, "--runs-dir", str(runs_dir), "--name", case)
    one_line_error(code, lines, *needles)
    assert not (runs_dir / case).exists()
    if case != "missing":  # a run folder was announced: the output says it is gone again
        assert f"run folder {runs_dir / case}: removed (refused before its first step, nothing was trained)" in lines
    if case == "columns":  # once: the corrected rerun under the same name
        refused_run(cli, runs_dir, case, fast_sets)


def test_target_modules_that_match_nothing_list_the_linear_layers(cli, runs_dir, fast_sets):
    sets = ["--set", 'method.lora.target_modules=["q_proj","qkv"]']
    error = one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, *sets, "--runs-dir", str(runs_dir), "--name", "t"),
                           "method.lora.target_modules", "['qkv']", "; fix: choose among its linear layers: ")
    for layer in ("q_proj", "k_proj", "down_proj"):
        assert layer in error
    assert not (runs_dir / "t").exists()


def test_a_model_path_that_does_not_exist_is_no_hub_id_to_download(cli, runs_dir, fast_sets, tmp_path):
    missing = tmp_path / "no-such-model"  # it said: not in the HF cache ...; fix: `hf download /tmp/.../no-such-model`
    one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", f"model.source={missing}", "--runs-dir",
                        str(runs_dir), "--name", "p"), f"model.source '{missing}': no such folder; fix: check the path")
    assert not (runs_dir / "p").exists()


def test_qlora_without_bitsandbytes(cli, runs_dir, fast_sets, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", "method.name=qlora", "--runs-dir", str(runs_dir),
                        "--name", "q"), "method.name", "bitsandbytes", "method.name=lora")
    assert not (runs_dir / "q").exists()


def test_max_length_shorter_than_the_prompt_template(cli, runs_dir, fast_sets):
    one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", "data.max_length=6", "--runs-dir", str(runs_dir),
                        "--name", "m"), "data.max_length: 6", "prompt template", "fix:")
    assert not (runs_dir / "m").exists()


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


GOOD = '{"instruction": "i", "response": "r"}'
MALFORMED = {  # file name -> (bytes, what the one error line must name)
    "middle.jsonl": ("\n".join([GOOD, GOOD, '{"instruction": "i", "response: "r"}', GOOD]).encode(),
                     ("line 3, column", "Expecting ':' delimiter")),
    "list-row.jsonl": ("\n".join([GOOD, '["i", "r"]', GOOD]).encode(), ("line 2:", "a JSON list, not an object")),
    "latin1.jsonl": (GOOD.encode() + b"\n" + '{"instruction": "caf\xe9", "response": "r"}'.encode("latin-1"),
                     ("line 2:", "not UTF-8", "byte 0xe9")),
    "document.json": (f'[{GOOD},\n {{"instruction" "i"}}\n]'.encode(), ("line 2, column", "Expecting ':' delimiter")),
    "fields.csv": (b"instruction,response\ni,r\ni,r,extra\ni,r\n", ("line 3:", "3 fields, the header has 2")),
    "garbage.parquet": (b"this is not parquet", ("Parquet magic bytes not found",)),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_data_files_name_the_file_line_and_problem(cli, runs_dir, fast_sets, tmp_path, name):
    content, needles = MALFORMED[name]
    source = tmp_path / name
    source.write_bytes(content)
    error = one_line_error(*cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", f"data.source={source}",
                                "--runs-dir", str(runs_dir), "--name", "bad"),
                           f"data.source '{source}'", "cannot parse it as", "fix:", *needles)
    assert "An error occurred while generating the dataset" not in error


def test_malformed_image_captions_name_the_line(tmp_path):
    from peftlab.config import DataConfig
    from peftlab.data.images import load_image_table
    from peftlab.errors import PeftlabError

    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "1.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "1.png", "text": "ok"}\n{"file_name": "1.png" "text": "x"}\n')
    with pytest.raises(PeftlabError, match=r"metadata\.jsonl: line 2, column .*Expecting ','"):
        load_image_table(DataConfig(source=str(folder)))


def test_outputs_in_missing_folders_are_made_and_blocked_ones_are_one_line(cli, runs_dir, make_run, tmp_path):
    """report -o, export -o and recipes copy PATH: parents are made (mkdir -p), a file in the way is one line."""
    make_run("r1", {"runtime_s": 10.0})
    out = tmp_path / "a" / "missing" / "dir" / "x.html"
    code, lines = cli("report", "r1", "-o", str(out), "--runs-dir", str(runs_dir))
    assert code == 0 and out.is_file(), lines
    copied = tmp_path / "b" / "c" / "mine.yaml"
    assert cli("recipes", "copy", "tiny-gemma2-dolly", str(copied))[0] == 0 and copied.is_file()
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    one_line_error(*cli("report", "r1", "-o", str(blocker / "x.html"), "--runs-dir", str(runs_dir)),
                   f"-o {blocker / 'x.html'}: cannot write {blocker} (a file is in the way of a folder); fix:")
    one_line_error(*cli("recipes", "copy", "tiny-gemma2-dolly", str(blocker / "x.yaml")),
                   f"error: {blocker / 'x.yaml'}: cannot write {blocker} (a file is in the way of a folder); fix:")
    one_line_error(*cli("export", "r1", "-o", str(blocker / "m"), "--runs-dir", str(runs_dir)),
                   f"-o {blocker / 'm'}: cannot write {blocker} (a file is in the way of a folder); fix:")


def test_a_run_shorter_than_one_logging_window_reports_its_last_loss(cli, runs_dir, fast_sets):
    code, lines = cli("train", "tiny-gemma2-dolly", *fast_sets, "--set", "train.max_steps=2", "--set",
                      "train.logging_steps=5", "--runs-dir", str(runs_dir), "--name", "short")
    assert code == 0, lines[-3:]
    summary = RunDir(runs_dir / "short").summary()
    records = [r for r in RunDir(runs_dir / "short").metrics() if r["kind"] == "train"]
    assert [r["step"] for r in records] == [2] and summary["final_train_loss"] == records[0]["loss"] > 0
    assert f"done: {runs_dir / 'short'} (loss {summary['final_train_loss']:.4g}, eval loss {summary['eval_loss']:.4g})" in lines


def test_the_finish_line_leaves_out_a_loss_the_run_has_not() -> None:
    from peftlab.runner import _losses

    # a diffusion run has no eval loss: its line said `eval loss None`, and the others 0.29189129670461017
    assert _losses({"final_train_loss": 1.0744757652282715, "eval_loss": None}) == "loss 1.074"
    assert _losses({"final_train_loss": 0.29189129670461017, "eval_loss": 0.2700117528438568}) == "loss 0.2919, eval loss 0.27"
