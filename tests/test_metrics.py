"""Classification metrics: the numbers scikit-learn gives, under the names the reports use."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, classification_report, f1_score
from transformers import EvalPrediction

from peftlab.metrics import (
    classification_metrics,
    compute_metrics,
    lower_is_better,
    per_class_report,
    plot_confusion_matrix,
)

# Imbalanced, with class 3 never predicted and class 2 never true: macro and weighted F1 differ.
LABELS = np.array([0, 0, 0, 0, 1, 1, 3, 3, 0, 1])
PREDS = np.array([0, 0, 1, 0, 1, 2, 0, 1, 0, 1])


def test_metrics_equal_scikit_learn_and_f1_is_macro() -> None:
    got = classification_metrics(LABELS, PREDS)
    assert got["accuracy"] == pytest.approx(accuracy_score(LABELS, PREDS))
    assert got["f1"] == pytest.approx(f1_score(LABELS, PREDS, average="macro", zero_division=0))
    assert got["f1_weighted"] == pytest.approx(f1_score(LABELS, PREDS, average="weighted", zero_division=0))
    assert got["f1"] != pytest.approx(got["f1_weighted"])


def test_trainer_hook_takes_the_argmax_of_the_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(LABELS), 4))
    logits[np.arange(len(PREDS)), PREDS] += 10.0  # make PREDS the argmax
    got = compute_metrics(EvalPrediction(predictions=logits, label_ids=LABELS))
    assert got == pytest.approx(classification_metrics(LABELS, PREDS))


def test_per_class_report_names_every_class_even_unseen_ones(tmp_path) -> None:
    names = ["card", "cash", "fee", "pin", "top_up"]  # "top_up" (4) occurs nowhere
    report = per_class_report(LABELS, PREDS, names)
    assert set(names) <= set(report)
    assert report["top_up"]["support"] == 0
    expected = classification_report(LABELS, PREDS, labels=range(5), output_dict=True, zero_division=0)
    assert report["card"]["f1-score"] == pytest.approx(expected["0"]["f1-score"])
    path = tmp_path / "cm.png"
    plot_confusion_matrix(LABELS, PREDS, names, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("metric", "lower"), [("eval_loss", True), ("perplexity", True), ("eval_f1", False),
                                               ("eval_accuracy", False)])
def test_direction_from_the_metric_name(metric: str, lower: bool) -> None:
    assert lower_is_better(metric) is lower
