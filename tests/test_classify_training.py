"""The classify task end to end on the CPU twin: it learns real intents, and its run folder holds what a user
needs (metrics on validation and test, per-class report, confusion matrix, per-epoch speed, a reloadable adapter)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_main
from safetensors import safe_open

from peftlab.config import load_recipe, with_overrides
from peftlab.errors import PeftlabError
from peftlab.runner import run_recipe
from peftlab.runs import RunDir
from peftlab.tasks import classify

# 5 real Banking77 intents (663 train / 74 validation / 200 test rows), 2 epochs: chance is 0.2.
LEARN = {"train.epochs": 2, "train.eval_steps": 42, "train.save_steps": 42}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    recipe = with_overrides(load_recipe("tiny-dialogpt-banking77"), LEARN)
    return run_recipe(recipe, tmp_path_factory.mktemp("runs"), "learn", show_progress=False)


def test_the_tiny_twin_learns_real_intents_well_above_chance(trained: RunDir) -> None:
    s = trained.summary()
    assert s["status"] == "completed"
    assert s["data"]["num_labels"] == 5
    assert s["test_accuracy"] > 2 * (1 / 5)  # chance is 0.2
    assert s["test_f1"] > 0.4
    for key in ("eval_accuracy", "eval_f1", "eval_f1_weighted", "eval_loss", "test_accuracy", "test_f1",
                "test_f1_weighted", "test_loss", "runtime_s", "steps", "samples_per_s", "tokens_per_s",
                "padded_tokens_per_s", "peak_mem_rss_gib"):
        assert isinstance(s[key], (int, float)) and math.isfinite(s[key]), key
    assert s["padded_tokens_per_s"] >= s["tokens_per_s"] > 0
    assert s["best_metric"] == pytest.approx(max(r["eval_f1"] for r in trained.metrics() if r["kind"] == "eval"))
    assert "macro" in s["f1_definition"]


def test_run_folder_has_report_confusion_matrix_and_epoch_records(trained: RunDir) -> None:
    report = json.loads((trained.path / classify.REPORT_FILE).read_text())
    assert report["split"] == "test" and report["card_arrival"]["support"] == 40
    assert (trained.path / classify.CONFUSION_FILE).read_bytes()[:4] == b"\x89PNG"
    epochs = [r for r in trained.metrics() if r["kind"] == "epoch"]
    assert [round(r["epoch"]) for r in epochs] == [1, 2]
    for record in epochs:
        assert record["padded_tokens_per_s"] >= record["tokens_per_s"] > 0
        assert record["epoch_time_s"] > record["eval_time_s"] >= 0 and record["peak_mem_rss_gib"] > 0


def test_adapter_carries_the_head_and_labels_and_reloads_to_the_same_accuracy(trained: RunDir) -> None:
    with safe_open(str(trained.adapter_path / "adapter_model.safetensors"), "pt") as fh:
        names = list(fh.keys())
    assert any(".score." in name for name in names)  # the head (modules_to_save) travels with the LoRA weights
    recipe = load_recipe(str(trained.config_path))
    model, tokenizer, labels = classify.load_for_inference(trained, recipe)
    assert labels[:2] == ["card_arrival", "card_linking"]
    from peftlab.data.intents import build_class_data

    data = build_class_data(recipe.data, tokenizer, recipe.seed)
    texts = tokenizer.batch_decode(list(data.test["input_ids"]))
    predicted = classify.predict(model, tokenizer, labels, texts, recipe.data.max_length)
    accuracy = sum(labels[y] == p for y, (p, _) in zip(data.test["labels"], predicted, strict=True)) / len(texts)
    assert accuracy == pytest.approx(trained.summary()["test_accuracy"], abs=0.011)


def test_baseline_comparison_shows_deltas_and_na_never_nan(trained: RunDir, cli) -> None:
    code, lines = cli("compare", str(trained.path), "--baseline", "dialogpt-banking77-original")
    assert code == 0
    text = "\n".join(lines)
    assert "nan" not in text.lower() and "n/a" in text
    assert "QUOTED from the original" in text
    row = next(line for line in lines if line.strip().startswith("learn") and "%" in line)
    assert "-" in row  # a delta against test accuracy 0.93


def test_doctor_checks_the_first_batch_and_one_step(cli_out) -> None:
    code, lines = cli_out("doctor", "tiny-dialogpt-banking77")
    assert code == 0 and lines[-1] == "doctor: healthy"
    assert any("first training batch carries class ids" in line for line in lines)


def test_qlora_trains_the_head_with_kbit_prep_and_a_cpu_optimizer(tiny_classifier, runs_dir: Path) -> None:
    recipe = tiny_classifier({"method.name": "qlora", "method.quant.kbit_prep": "peft", "train.optimizer": "paged_adamw_8bit",
                              "train.gradient_checkpointing": True, "train.max_steps": 4, "data.classify.test": None})
    run = run_recipe(recipe, runs_dir, "qlora", show_progress=False)
    s = run.summary()
    assert s["status"] == "completed" and "test_accuracy" not in s and math.isfinite(s["eval_f1"])
    notes = " ".join(s["notes"])
    assert "paged_adamw_8bit needs a CUDA GPU" in notes and "uses adamw_torch" in notes
    assert "gradient checkpointing on" in notes and "classification head score" in notes


def test_labels_dropped_before_the_model_are_caught(tiny_classifier) -> None:
    """The original run's failure: a label column under another name is silently dropped by the Trainer."""
    from transformers import Trainer, TrainingArguments

    from peftlab.engines.hf import check_labels_reach_model

    setup = classify.build(tiny_classifier())
    renamed = setup.data.train.rename_column("labels", "intent")
    trainer = Trainer(model=setup.model, args=TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to="none"),
                      train_dataset=renamed, data_collator=classify.collator(tiny_classifier(), setup.tokenizer))
    with pytest.raises(PeftlabError, match="reach the model without labels"):
        check_labels_reach_model(trainer, len(setup.data.labels))


def test_generate_on_a_classify_run_prints_a_known_label_per_text(trained: RunDir, monkeypatch, capsys) -> None:
    labels = json.loads((trained.adapter_path / classify.LABELS_FILE).read_text())["id2label"].values()
    code, out, _ = run_main(monkeypatch, capsys, "generate", str(trained.path), "--prompt", "My card has not arrived yet",
                            "--prompt", "How do I activate my card?")
    lines = [line for line in out.splitlines() if line.strip()]  # stdout: the labels alone (progress: stderr)
    assert code == 0
    answers = [line for line in lines if not line.startswith(">")]
    assert len(answers) == 2
    for answer in answers:
        label, probability = answer.rsplit(" (", 1)
        assert label in labels and 0.0 < float(probability.rstrip(")")) <= 1.0
