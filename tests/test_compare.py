"""Comparison tables: ratios and deltas against a baseline, task-aware columns, n/a for missing, formats."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from peftlab.config import load_recipe
from peftlab.errors import PeftlabError
from peftlab.report.compare import NA, ReferenceFile, compare, main_table, render, verdicts, vs_table
from peftlab.runs import RunDir

LORA = {"method": "lora", "runtime_s": 120.0, "peak_mem_allocated_gib": 10.0, "tokens_per_s": 1000.0,
        "samples_per_s": 4.0, "steps_per_s": 0.5, "steps": 60, "final_train_loss": 1.8, "eval_loss": 2.0,
        "perplexity": 7.39}
QLORA = {"method": "qlora", "runtime_s": 80.0, "peak_mem_allocated_gib": 6.5, "tokens_per_s": 1500.0,
         "samples_per_s": 6.0, "steps_per_s": 0.75, "steps": 60, "final_train_loss": 1.9, "eval_loss": 2.1,
         "perplexity": 8.17}


def column(headers: list[str], body: list[list[str]], title: str) -> list[str]:
    return [row[headers.index(title)] for row in body]


def test_ratios_and_deltas_against_the_first_run(make_run):
    lora, qlora = make_run("lora", LORA), make_run("qlora", QLORA)
    comp = compare([lora, qlora])
    assert comp.base["run"] == "lora"
    vs = comp.rows[1]["vs"]
    assert vs["speedup"] == pytest.approx(LORA["runtime_s"] / QLORA["runtime_s"])
    mem = QLORA["peak_mem_allocated_gib"] / LORA["peak_mem_allocated_gib"]
    assert vs["peak_mem_gib_change_pct"] == pytest.approx(100 * (mem - 1))
    assert vs["tokens_per_s_ratio"] == pytest.approx(QLORA["tokens_per_s"] / LORA["tokens_per_s"])
    assert vs["eval_loss_delta"] == pytest.approx(QLORA["eval_loss"] - LORA["eval_loss"])
    assert vs["eval_loss_delta_pct"] == pytest.approx(100 * (QLORA["eval_loss"] / LORA["eval_loss"] - 1))
    assert comp.rows[0]["vs"]["speedup"] == pytest.approx(1.0)

    [line] = verdicts(comp)
    assert f"{LORA['runtime_s'] / QLORA['runtime_s']:.2f}x faster" in line
    assert f"{abs(100 * (mem - 1)):.1f}% less memory" in line
    assert f"eval loss {QLORA['eval_loss'] - LORA['eval_loss']:+.4f}" in line

    headers, body = vs_table(comp)
    assert column(headers, body, "speedup") == ["1.00x", f"{LORA['runtime_s'] / QLORA['runtime_s']:.2f}x"]
    assert body[0][0] == "lora (baseline)"


def test_baseline_option_and_a_baseline_outside_the_list(make_run):
    lora, qlora, other = make_run("lora", LORA), make_run("qlora", QLORA), make_run("other", QLORA)
    comp = compare([lora, qlora], baseline=qlora)
    assert comp.base["run"] == "qlora" and [r["run"] for r in comp.rows] == ["lora", "qlora"]
    assert comp.rows[0]["vs"]["speedup"] == pytest.approx(QLORA["runtime_s"] / LORA["runtime_s"])
    assert "slower" in verdicts(comp)[0]

    comp = compare([lora, qlora], baseline=other)  # shown first, so every ratio has its reference in view
    assert [r["run"] for r in comp.rows] == ["other", "lora", "qlora"] and comp.base["run"] == "other"


def test_same_named_runs_from_different_folders_are_told_apart(make_run, tmp_path):
    here = make_run("lora", LORA)
    there = RunDir.create(tmp_path / "elsewhere", "lora", load_recipe("tiny-gemma2-dolly"))
    there.update_summary(**QLORA)
    assert [r["run"] for r in compare([here, there]).rows] == ["runs/lora", "elsewhere/lora"]


def test_missing_and_non_finite_metrics_are_na_never_nan(make_run):
    lora = make_run("lora", LORA)
    broken = make_run("broken", {"method": "qlora", "status": "failed", "runtime_s": 30.0,
                                 "final_train_loss": "nan", "eval_loss": None, "tokens_per_s": "inf"})
    comp = compare([lora, broken])
    row = comp.rows[1]
    assert row["final_train_loss"] is None and row["eval_loss"] is None and row["peak_mem_gib"] is None
    vs = row["vs"]
    assert vs["peak_mem_gib_change_pct"] is None and vs["tokens_per_s_ratio"] is None and vs["eval_loss_delta"] is None
    assert vs["speedup"] == pytest.approx(LORA["runtime_s"] / 30.0)

    headers, body = main_table(comp)
    assert column(headers, body, "eval loss") == [f"{LORA['eval_loss']:.4f}", NA]
    assert column(headers, body, "final loss")[1] == NA
    everything = json.dumps(body) + json.dumps(vs_table(comp)) + "".join(verdicts(comp)) + render(comp, "markdown")
    assert "nan" not in everything.lower() and "inf" not in everything.lower().replace("info", "")
    speed, memory, *_ = verdicts(comp)[0].split(": ", 1)[1].split(", ")
    assert speed.endswith("faster") and memory == f"memory {NA}"
    assert json.loads(render(comp, "json"))["runs"][1]["eval_loss"] is None


def test_zero_baseline_value_gives_na_not_a_division_error(make_run):
    comp = compare([make_run("zero", {**LORA, "tokens_per_s": 0.0}), make_run("b", QLORA)])
    assert comp.rows[1]["vs"]["tokens_per_s_ratio"] is None


def test_columns_follow_the_tasks_of_the_runs(make_run):
    sft_only = compare([make_run("a", {"runtime_s": 10.0}), make_run("b", {"runtime_s": 12.0})])
    names = [c.name for c in sft_only.columns]
    assert "eval_loss" in names and "perplexity" in names and "tokens_per_s" in names  # SFT columns even when n/a
    assert "test_accuracy" not in names and "it_per_s" not in names

    cls = make_run("cls", {"task": "classify", "runtime_s": 50.0, "test_accuracy": 0.91, "test_f1": 0.90,
                           "eval_f1": 0.89, "tokens_per_s": 9000.0})
    diff = make_run("diff", {"task": "diffusion", "runtime_s": 140.0, "it_per_s": 0.69, "final_train_loss": 0.12})
    mixed = compare([cls, diff, make_run("sft", LORA)])
    titles = main_table(mixed)[0]
    for title in ("test acc", "test F1", "eval F1", "it/s", "eval loss"):
        assert title in titles

    qcls = make_run("qcls", {"task": "classify", "runtime_s": 60.0, "test_accuracy": 0.93, "test_f1": 0.925,
                             "tokens_per_s": 7000.0})
    [line] = verdicts(compare([cls, qcls]))
    assert f"test acc {0.93 - 0.91:+.4f}" in line and f"test F1 {0.925 - 0.90:+.4f}" in line
    assert f"{7000 / 9000:.2f}x tokens/s" in line

    qdiff = make_run("qdiff", {"task": "diffusion", "runtime_s": 160.0, "it_per_s": 0.61, "final_train_loss": 0.13})
    [line] = verdicts(compare([diff, qdiff]))
    assert f"{0.61 / 0.69:.2f}x it/s" in line


def test_reference_metrics_file_as_baseline(make_run, tmp_path):
    ref = tmp_path / "previous.json"
    ref.write_text(json.dumps({"task": "classify", "test_accuracy": 0.93, "test_f1": 0.93, "tokens_per_s": 90000,
                               "peak_mem_allocated_gib": 7.2}))
    run = make_run("cls", {"task": "classify", "test_accuracy": 0.95, "test_f1": 0.94, "tokens_per_s": 45000,
                           "peak_mem_allocated_gib": 3.6})
    comp = compare([run], baseline=ReferenceFile(ref))
    vs = comp.rows[1]["vs"]
    assert comp.base["run"] == "previous"
    assert vs["test_accuracy_delta"] == pytest.approx(0.95 - 0.93)
    assert vs["peak_mem_gib_change_pct"] == pytest.approx(100 * (3.6 / 7.2 - 1))

    ref.write_text("[1, 2]")
    with pytest.raises(PeftlabError, match="expected a JSON object"):
        compare([run], baseline=ReferenceFile(ref))


def test_markdown_csv_and_json_formats(make_run):
    comp = compare([make_run("lora", LORA), make_run("qlora", {**QLORA, "eval_loss": None})])
    md = render(comp, "markdown").splitlines()
    assert md[0].startswith("| run |") and set(md[1].replace("|", "").split()) == {"---"}
    assert sum(line.startswith("| lora") or line.startswith("| qlora") for line in md) == 4  # two tables

    rows = list(csv.DictReader(io.StringIO(render(comp, "csv"))))
    assert [r["run"] for r in rows] == ["lora", "qlora"]
    assert float(rows[1]["vs_speedup"]) == pytest.approx(LORA["runtime_s"] / QLORA["runtime_s"])
    assert rows[1]["eval_loss"] == NA and rows[1]["vs_eval_loss_delta"] == NA
    assert float(rows[1]["runtime_s"]) == QLORA["runtime_s"]

    data = json.loads(render(comp, "json"))
    assert data["baseline"] == "lora" and data["runs"][1]["vs"]["eval_loss_delta"] is None
    assert data["runs"][1]["vs"]["tokens_per_s_ratio"] == pytest.approx(QLORA["tokens_per_s"] / LORA["tokens_per_s"])

    with pytest.raises(PeftlabError, match="--format 'xml'"):
        render(comp, "xml")


def test_compare_command(make_run, runs_dir):
    make_run("lora", LORA)
    make_run("qlora", QLORA)
    cli = [sys.executable, "-m", "peftlab", "compare", "--runs-dir", str(runs_dir)]
    out = subprocess.run([*cli, "lora", "qlora", "--baseline", "qlora", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["baseline"] == "qlora"
    table = subprocess.run([*cli, "lora", "qlora"], capture_output=True, text=True, check=True).stdout
    assert "vs baseline lora" in table and "faster" in table
    bad = subprocess.run([*cli, "lora", "--format", "xml"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error: --format 'xml'" in bad.stderr
    missing = subprocess.run([*cli, "lora", "nope"], capture_output=True, text=True)
    assert missing.returncode == 2 and "run 'nope' not found" in missing.stderr


def test_runs_of_other_tasks_are_shown_but_never_compared(make_run, runs_dir):
    sft = make_run("sft", {"runtime_s": 100.0, "final_train_loss": 2.4, "eval_loss": 2.5})
    sft2 = make_run("sft2", {"runtime_s": 50.0, "final_train_loss": 1.2, "eval_loss": 1.5})
    cls = make_run("cls", {"task": "classify", "runtime_s": 40.0, "final_train_loss": 0.5, "test_accuracy": 0.9})
    diff = make_run("diff", {"task": "diffusion", "runtime_s": 60.0, "final_train_loss": 0.12, "it_per_s": 0.7})
    comp = compare([sft, cls, diff, sft2])
    by_run = {r["run"]: r for r in comp.rows}
    for other in ("cls", "diff"):  # the "final loss -95%" of an SFT loss against a diffusion loss, and the speedups
        assert all(value is None for value in by_run[other]["vs"].values()), other
        assert by_run[other]["final_train_loss"] is not None  # still shown, side by side
    assert by_run["sft2"]["vs"]["speedup"] == pytest.approx(2.0)  # the same task is compared as before
    assert by_run["sft2"]["vs"]["final_train_loss_delta"] == pytest.approx(-1.2)
    assert [line.split(" vs ")[0] for line in verdicts(comp)] == ["sft2"]
    [note] = comp.notes
    assert "cls (classify)" in note and "diff (diffusion)" in note and "sft (sft)" in note
    for fmt in ("markdown", "json"):
        assert note in render(comp, fmt) or json.dumps(note) in render(comp, fmt)
    assert not compare([sft, sft2]).notes

    cli = [sys.executable, "-m", "peftlab", "compare", "--runs-dir", str(runs_dir)]
    table = subprocess.run([*cli, "sft", "cls", "diff"], capture_output=True, text=True, check=True).stdout
    assert "-95" not in table and "note: not compared with baseline sft (sft), another task" in table


def test_runs_of_different_lengths_compare_their_time_per_step(make_run):
    """A 120-step run that took 72 s is not '1.5x slower' than a 12-step run that took 49 s."""
    short = make_run("hf", {**LORA, "runtime_s": 49.1, "steps": 12, "steps_per_s": 0.244})
    long = make_run("fast", {**LORA, "runtime_s": 72.5, "steps": 120, "steps_per_s": 1.655})
    comp = compare([short, long])
    assert comp.rows[1]["vs"]["speedup"] == pytest.approx(1.655 / 0.244)
    [line] = verdicts(comp)
    assert f"{1.655 / 0.244:.2f}x faster" in line
